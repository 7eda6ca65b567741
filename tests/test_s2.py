"""S2 multi-scale SigLIP features against a PyTorch reference assembled here from a transformers SigLIP and torch
interpolation (the official code's chessboard split/merge, bicubic resize, area pooling), and a whole tiny LVLM
with S2 training through both stages and generating."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import SiglipVisionConfig, SiglipVisionModel

from moiie_jax.convert import folder
from moiie_jax.convert.hf import build_state
from moiie_jax.convert.vision_keys import vision_params_from_hf
from moiie_jax.infer.generate import Generator, Prompt
from moiie_jax.models import s2
from moiie_jax.models.config import ConfigError, LVLMConfig, VisionConfig, vision_from_hf
from moiie_jax.models.vision import VisionTower
from moiie_jax.train import loop
from runlocal import phi3_config as _config
from torch_s2 import torch_s2_features

TOL = 1e-4
SCALES = (32, 64, 96)


@pytest.fixture(scope='module')
def tower():
  torch.manual_seed(0)
  hf_cfg = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=4)
  hf = SiglipVisionModel(hf_cfg).eval()
  cfg = vision_from_hf(hf_cfg.to_dict(), s2_scales=SCALES)
  tensors = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
  abstract = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  ours = nnx.merge(graphdef, build_state(abstract, vision_params_from_hf(tensors, cfg), 'tower'))
  return hf, cfg, ours


@pytest.mark.parametrize('in_size,out_size', [(96, 32), (96, 64), (32, 96), (50, 37), (7, 20), (96, 96)])
def test_bicubic_resize_equals_torch(in_size, out_size):
  x = torch.randn(2, 3, in_size, in_size, generator=torch.Generator().manual_seed(in_size + out_size))
  want = F.interpolate(x, size=out_size, mode='bicubic').permute(0, 2, 3, 1).numpy()
  got = np.asarray(s2.resize_bicubic(jnp.asarray(x.permute(0, 2, 3, 1).numpy()), out_size))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_tiles_round_trip_and_area_pool_equals_torch():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 12, 5)), jnp.float32)
  tiles = s2.to_tiles(x, 4)  # [2, 9, 4, 4, 5]
  np.testing.assert_array_equal(s2.from_tiles(tiles.reshape(2, 9, 16, 5), 3), x)
  want = F.interpolate(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2), size=4, mode='area')
  np.testing.assert_allclose(s2.area_pool(x, 4), want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_s2_features_equal_the_pytorch_reference(tower):
  hf, cfg, ours = tower
  assert (cfg.input_size, cfg.feature_size, cfg.tiles_per_image) == (96, 96, 14)
  images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
  want = torch_s2_features(hf, images, SCALES)
  got = ours.features(jnp.asarray(images.permute(0, 2, 3, 1).numpy()), -2)
  assert got.shape == (2, cfg.num_patches, 3 * cfg.hidden_size) == tuple(want.shape)
  assert float(np.abs(np.asarray(got) - want.numpy()).max()) <= TOL
  # Each scale's channels are that scale's map: the smallest one is the tower on the 32-px image alone.
  small = F.interpolate(images, size=32, mode='bicubic')
  with torch.no_grad():
    alone = hf(pixel_values=small, output_hidden_states=True).hidden_states[-2]
  assert float(np.abs(np.asarray(got[..., :32]) - alone.numpy()).max()) <= TOL


def test_s2_input_size_is_checked(tower):
  _, _, ours = tower
  with pytest.raises(ValueError, match=r'S2 tower .* expects \[B, 96, 96, 3\]'):
    ours.features(jnp.zeros((1, 32, 32, 3)), -2)


@pytest.mark.parametrize('scales,match', [((32, 48), 'each a multiple'), ((64, 96), 'starting at'),
                                          ((96, 64, 32), 'increasing')])
def test_bad_scales_are_named(scales, match):
  with pytest.raises(ConfigError, match=rf's2_scales=.*{match}'):
    VisionConfig(image_size=32, patch_size=8, s2_scales=scales).validate()


def test_s2_refuses_class_token_towers_and_drop_first():
  with pytest.raises(ConfigError, match='without a class token'):
    VisionConfig(architecture='clip', image_size=32, s2_scales=(32, 64)).validate()
  vision = VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, s2_scales=(28, 56))
  with pytest.raises(ConfigError, match='drop_first'):
    LVLMConfig(vision=vision, vision_feature_select_strategy='drop_first').validate()


# ------------------------------------------------------------------------------ a whole tiny LVLM with S2


def test_tiny_s2_lvlm_trains_both_stages_and_generates(tmp_path):
  s1 = loop.train(_config('stage=1,s2=on', total_steps=2), str(tmp_path / 's1'), progress=False)
  cfg1 = folder.load_config(s1['export'])
  assert cfg1.vision.s2_scales == SCALES and cfg1.vision.feature_size == 192
  c = _config('stage=2,s2=on', total_steps=2, log_every=1)
  c.init.checkpoint = s1['export']
  assert not c.init.fresh_connector  # stage 1 trained the S2 connector: it carries over
  s2_run = loop.train(c, str(tmp_path / 's2'), progress=False)
  assert np.isfinite(s2_run['metrics']['loss'])
  gen = Generator.from_folder(s2_run['export'])
  assert gen.cfg.vision.s2_scales == SCALES and gen.image_config.height == 96
  image = np.random.default_rng(0).integers(0, 255, size=(40, 60, 3), dtype=np.uint8)
  answer = gen.generate([Prompt('what shape is it?', image=image)], max_new_tokens=4)[0]
  assert isinstance(answer, str)


def test_official_s2_path_trains_a_fresh_connector_at_stage_2(tmp_path):
  s1 = loop.train(_config('stage=1,s2=official', total_steps=1), str(tmp_path / 's1'), progress=False)
  assert folder.load_config(s1['export']).vision.s2_scales == ()
  c = _config('stage=2,s2=official', total_steps=1)
  c.init.checkpoint = s1['export']
  assert c.init.fresh_connector
  cfg, model, _ = loop.build_model(c)
  assert cfg.vision.s2_scales == SCALES
  assert model.multi_modal_projector.linear_1.kernel.shape == (192, cfg.llm.hidden_size)
  # Without a fresh connector, the width mismatch is named.
  c.init.fresh_connector = False
  with pytest.raises(ConfigError, match=r'connector takes 64-wide .* gives 192 .* init.fresh_connector=True'):
    loop.build_model(c)


def test_convert_with_s2_gives_a_wide_fresh_connector_and_bad_scales_one_line(tower, tmp_path, capsys):
  import transformers
  from moiie_jax.convert import __main__ as convert_cli
  hf, _, _ = tower
  llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=128)).eval()
  llm.save_pretrained(tmp_path / 'llm')
  hf.save_pretrained(tmp_path / 'vision')
  out = str(tmp_path / 'out')
  args = ['--llm', str(tmp_path / 'llm'), '--vision', str(tmp_path / 'vision'), '--out', out]
  assert convert_cli.main(args + ['--s2']) == 0
  cfg, model, _ = folder.load_folder(out)
  assert cfg.vision.s2_scales == SCALES and model.multi_modal_projector.linear_1.kernel.shape == (96, 32)
  capsys.readouterr()
  assert convert_cli.main(args[:-1] + [out + '2', '--s2', '32,48']) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and 's2_scales=[32, 48]' in err and '\n' not in err, err
  assert not os.path.exists(out + '2')
