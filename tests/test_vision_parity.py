"""Vision towers (SigLIP, CLIP) and the LLaVA connector against HF PyTorch, fp32, tiny random models."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlavaConfig, SiglipConfig, SiglipModel,
                          SiglipVisionConfig, SiglipVisionModel)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from moiie_jax.convert.errors import ConvertError
from moiie_jax.convert.hf import build_state
from moiie_jax.convert.vision_keys import (IGNORED_KEY_PATTERNS, connector_params_from_hf, connector_params_to_hf,
                                           vision_params_from_hf, vision_params_to_hf)
from moiie_jax.models.config import vision_from_hf
from moiie_jax.models.connector import MultiModalProjector
from moiie_jax.models.vision import VisionTower

TOL = 1e-4
TINY = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4)


def _numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _load(cls, flat, *args, **kwargs):
  """A model of `cls` filled from flat params, through the shared checked loader."""
  abstract = nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, build_state(abstract, flat, cls.__name__))


def _hf_run(model, pixels_nchw):
  with torch.no_grad():
    out = model(pixel_values=pixels_nchw, output_hidden_states=True)
  return out


def _pixels(seed=1):
  torch.manual_seed(seed)
  x = torch.randn(2, 3, 32, 32)
  return x, jnp.asarray(x.permute(0, 2, 3, 1).numpy())  # NCHW for HF, NHWC for us


def _diff(ours, theirs) -> float:
  ours, theirs = np.asarray(ours), theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max())


@pytest.fixture(scope='module')
def siglip():
  torch.manual_seed(0)
  hf_cfg = SiglipVisionConfig(**TINY)
  hf = SiglipVisionModel(hf_cfg).eval()
  cfg = vision_from_hf(hf_cfg.to_dict())
  tensors = _numpy_state(hf)
  return hf, cfg, tensors, _load(VisionTower, vision_params_from_hf(tensors, cfg), cfg)


@pytest.fixture(scope='module')
def clip():
  torch.manual_seed(0)
  hf_cfg = CLIPVisionConfig(**TINY)
  hf = CLIPVisionModel(hf_cfg).eval()
  cfg = vision_from_hf(hf_cfg.to_dict())
  tensors = _numpy_state(hf)
  return hf, cfg, tensors, _load(VisionTower, vision_params_from_hf(tensors, cfg), cfg)


def test_siglip_every_hidden_state_matches_hf(siglip):
  hf, cfg, _, ours = siglip
  assert cfg.architecture == 'siglip' and cfg.hidden_act == 'gelu_pytorch_tanh'
  x_t, x = _pixels()
  out = _hf_run(hf, x_t)
  assert len(out.hidden_states) == cfg.num_hidden_layers + 1
  for i in range(-len(out.hidden_states), len(out.hidden_states)):
    assert _diff(ours(x, output_layer=i), out.hidden_states[i]) < TOL, i
  assert _diff(ours(x), out.last_hidden_state) < TOL  # post_layernorm over all tokens
  for strategy in ('default', 'full'):  # no class token: both keep every patch
    feats = ours.features(x, -2, strategy)
    assert feats.shape == (2, cfg.num_patches, cfg.hidden_size)
    assert _diff(feats, out.hidden_states[-2]) < TOL


def test_clip_selected_layer_and_last_hidden_state_match_hf(clip):
  hf, cfg, _, ours = clip
  assert cfg.architecture == 'clip' and cfg.hidden_act == 'quick_gelu'
  x_t, x = _pixels()
  out = _hf_run(hf, x_t)
  for i in range(-len(out.hidden_states), len(out.hidden_states)):
    assert _diff(ours(x, output_layer=i), out.hidden_states[i]) < TOL, i
  default = ours.features(x, -2, 'default')
  assert default.shape == (2, cfg.num_patches, cfg.hidden_size)
  assert _diff(default, out.hidden_states[-2][:, 1:]) < TOL
  full = ours.features(x, -2, 'full')
  assert full.shape == (2, cfg.num_patches + 1, cfg.hidden_size)
  assert _diff(full, out.hidden_states[-2]) < TOL
  last = ours(x)
  assert _diff(last, out.last_hidden_state) < TOL
  # HF CLIP's post_layernorm acts on the pooled class token only.
  assert _diff(ours.vision_model.post_layernorm(last[:, 0]), out.pooler_output) < TOL


def test_only_needed_layers_run(siglip):
  _, cfg, tensors, _ = siglip
  flat = vision_params_from_hf(tensors, cfg)
  last = cfg.num_hidden_layers - 1
  flat = {p: (np.full_like(v, np.nan) if p[:4] == ('vision_model', 'encoder', 'layers', last) else v)
          for p, v in flat.items()}
  poisoned = _load(VisionTower, flat, cfg)
  _, x = _pixels()
  assert np.isfinite(np.asarray(poisoned.features(x, -2, 'default'))).all()
  assert np.isnan(np.asarray(poisoned(x))).all()  # the last layer does run when asked for


def test_bad_inputs_raise(siglip):
  _, cfg, _, ours = siglip
  with pytest.raises(ValueError, match=r'\[B, 32, 32, 3\]'):
    ours(jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match='output layer 4'):
    ours(jnp.zeros((1, 32, 32, 3)), output_layer=4)
  with pytest.raises(ValueError, match='select_strategy'):
    ours.features(jnp.zeros((1, 32, 32, 3)), -2, 'cls')


def test_bf16_compute_close_to_fp32(siglip):
  _, cfg, tensors, ours = siglip
  cfg16 = dataclasses.replace(cfg, dtype='bfloat16')
  ours16 = _load(VisionTower, vision_params_from_hf(tensors, cfg16), cfg16)
  _, x = _pixels()
  got = ours16.features(x, -2, 'default')
  assert got.dtype == jnp.bfloat16
  want = np.asarray(ours.features(x, -2, 'default'))
  assert np.abs(np.asarray(got, np.float32) - want).max() < 0.1 * np.abs(want).max()


def _tiny_siglip_model():
  torch.manual_seed(0)
  text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  hf_cfg = SiglipConfig(text_config=text, vision_config=TINY)
  return SiglipModel(hf_cfg).eval(), vision_from_hf(hf_cfg.to_dict())


def test_siglip_model_with_text_side_loads_and_rejects_bad_keys():
  hf, cfg = _tiny_siglip_model()
  tensors = _numpy_state(hf)
  assert any(k.startswith('text_model.') for k in tensors) and 'logit_bias' in tensors
  assert any(k.startswith('vision_model.head.') for k in tensors)
  flat = vision_params_from_hf(tensors, cfg, prefix='vision_model.')
  x_t, x = _pixels()
  with torch.no_grad():
    want = hf.vision_model(pixel_values=x_t).last_hidden_state
  assert _diff(_load(VisionTower, flat, cfg)(x), want) < TOL
  # Prefix '' reads the same file: the text side is skipped through IGNORED_KEY_PATTERNS.
  flat_root = vision_params_from_hf(tensors, cfg, prefix='')
  assert flat_root.keys() == flat.keys() and all(np.array_equal(flat_root[p], flat[p]) for p in flat)
  assert r'^text_model\.' in IGNORED_KEY_PATTERNS

  extra = 'vision_model.encoder.layers.0.self_attn.extra_proj.weight'
  with pytest.raises(ConvertError, match=extra.replace('.', r'\.')):
    vision_params_from_hf({**tensors, extra: np.zeros((32, 32), np.float32)}, cfg, prefix='vision_model.')
  with pytest.raises(ConvertError, match='mystery_tensor'):  # standalone files are checked whole
    vision_params_from_hf({**tensors, 'mystery_tensor': np.zeros(1, np.float32)}, cfg, prefix='vision_model.')
  beyond = 'vision_model.encoder.layers.3.mlp.fc1.weight'  # a 4th layer for a 3-layer config
  with pytest.raises(ConvertError, match=beyond.replace('.', r'\.')):
    vision_params_from_hf({**tensors, beyond: np.zeros((64, 32), np.float32)}, cfg, prefix='vision_model.')

  key = 'vision_model.encoder.layers.1.mlp.fc1.weight'
  with pytest.raises(ConvertError, match=key.replace('.', r'\.') + r'.*\(64, 16\)'):
    vision_params_from_hf({**tensors, key: np.zeros((64, 16), np.float32)}, cfg, prefix='vision_model.')
  missing = dict(tensors)
  del missing['vision_model.post_layernorm.bias']
  with pytest.raises(ConvertError, match=r'missing tensors vision_model\.post_layernorm\.bias'):
    vision_params_from_hf(missing, cfg, prefix='vision_model.')


def test_llava_prefixes(siglip):
  _, cfg, tensors, _ = siglip
  want = vision_params_from_hf(tensors, cfg)
  other = {'language_model.model.embed_tokens.weight': np.zeros((4, 4), np.float32),
           'multi_modal_projector.linear_1.weight': np.zeros((4, 32), np.float32)}
  on_disk = {'vision_tower.vision_model.' + k: v for k, v in tensors.items()}  # llava-hf files
  in_memory = {'model.vision_tower.' + k: v for k, v in tensors.items()}  # transformers 5 state_dict()
  for prefix, source in (('vision_tower.', on_disk), ('model.vision_tower.', in_memory)):
    got = vision_params_from_hf({**source, **other}, cfg, prefix=prefix)
    assert got.keys() == want.keys() and all(np.array_equal(got[p], want[p]) for p in want)


def test_export_back_to_hf_names(siglip, clip):
  for _, cfg, tensors, ours in (siglip, clip):
    exported = vision_params_to_hf(ours, cfg)
    kept = {k for k in tensors if not k.startswith('head.')}  # SigLIP's pooling head is not built
    assert exported.keys() == kept
    for k in kept:
      assert exported[k].shape == tensors[k].shape and np.array_equal(exported[k], tensors[k]), k
  hf, cfg = _tiny_siglip_model()
  tensors = _numpy_state(hf)
  exported = vision_params_to_hf(vision_params_from_hf(tensors, cfg, 'vision_model.'), cfg, 'vision_model.')
  assert exported and all(np.array_equal(v, tensors[k]) for k, v in exported.items())
  assert set(tensors) - set(exported) == {k for k in tensors if not k.startswith('vision_model.')
                                          or k.startswith('vision_model.head.')}


@pytest.mark.parametrize('bias', [True, False])
def test_connector_matches_llava_projector(bias):
  torch.manual_seed(0)
  hf_cfg = LlavaConfig(vision_config=dict(model_type='clip_vision_model', hidden_size=24),
                       text_config=dict(model_type='llama', hidden_size=40, vocab_size=64,
                                        num_attention_heads=4, num_key_value_heads=4),
                       multimodal_projector_bias=bias)
  hf = LlavaMultiModalProjector(hf_cfg).eval()
  tensors = {'model.multi_modal_projector.' + k: v for k, v in _numpy_state(hf).items()}
  flat = connector_params_from_hf(tensors, 'model.multi_modal_projector.', vision_width=24, llm_width=40, bias=bias)
  ours = _load(MultiModalProjector, flat, 24, 40, act=hf_cfg.projector_hidden_act, bias=bias)
  x = torch.randn(2, 5, 24)
  with torch.no_grad():
    want = hf(x)
  assert _diff(ours(jnp.asarray(x.numpy())), want) < 1e-5
  exported = connector_params_to_hf(ours, 'model.multi_modal_projector.')
  assert exported.keys() == tensors.keys() and all(np.array_equal(exported[k], tensors[k]) for k in tensors)
  with pytest.raises(ConvertError, match=r'model\.multi_modal_projector\.linear_2\.weight.*\(40, 41\)'):
    connector_params_from_hf({**tensors, 'model.multi_modal_projector.linear_2.weight': np.zeros((40, 41))},
                             'model.multi_modal_projector.')
  with pytest.raises(ConvertError, match='multimodal_projector_bias'):
    connector_params_from_hf(tensors, 'model.multi_modal_projector.', bias=not bias)
  with pytest.raises(ConvertError, match=r'multi_modal_projector\.linear_3\.weight'):
    connector_params_from_hf({**tensors, 'model.multi_modal_projector.linear_3.weight': np.zeros((1,))},
                             'model.multi_modal_projector.')
