"""Whole-model conversion: HF LLaVA and LLM + vision folders -> our checkpoint folder -> same logits as HF.

Tiny random HF models are built from config objects here (no downloads), saved with save_pretrained, converted
through the CLI and compared in fp32 (max abs diff <= 1e-4 on logits).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from moiie_jax.convert import __main__ as convert_cli
from moiie_jax.convert import folder

VOCAB = 96
IMAGE_TOKEN = 95


def _llama_config(**kw):
  return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  rope_theta=10000.0, pad_token_id=0, **kw)


def _clip_config():
  return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=32, patch_size=8, projection_dim=16)


def _siglip_config():
  return transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8)


def _save(model, path, **kw):
  model.save_pretrained(path, **kw)
  return str(path)


@pytest.fixture(scope='module')
def llava(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlavaConfig(vision_config=_clip_config(), text_config=_llama_config(), image_token_id=IMAGE_TOKEN,
                                 vision_feature_layer=-2, vision_feature_select_strategy='default',
                                 projector_hidden_act='gelu')
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  root = tmp_path_factory.mktemp('llava')
  src = _save(model, root / 'hf')
  out = str(root / 'ours')
  assert convert_cli.main(['--llava', src, '--out', out]) == 0
  return model, src, out


def _batch(rng, lengths, n_image, total, left_pad):
  """Rows of random text with one image block (n_image tokens) after a 2-token prefix, padded to `total`."""
  ids = np.zeros((len(lengths), total), np.int64)
  mask = np.zeros((len(lengths), total), np.int64)
  for r, n in enumerate(lengths):
    row = rng.integers(1, IMAGE_TOKEN - 1, size=n)
    row[2:2 + n_image] = IMAGE_TOKEN
    if left_pad:
      ids[r, total - n:], mask[r, total - n:] = row, 1
    else:
      ids[r, :n], mask[r, :n] = row, 1
  return ids, mask


@pytest.mark.parametrize('left_pad', [False, True])
def test_llava_logits_match_hf_on_padded_batch(llava, left_pad):
  hf_model, _, out = llava
  cfg, model, meta = folder.load_folder(out)
  assert meta['template'] == 'llama3' and cfg.num_image_tokens == 16
  rng = np.random.default_rng(0)
  ids, mask = _batch(rng, [30, 24], cfg.num_image_tokens, 30, left_pad)
  pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                    attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)).logits.numpy()
  got = model(jnp.asarray(ids, jnp.int32), jnp.asarray(pixels.transpose(0, 2, 3, 1)),
              attention_mask=jnp.asarray(mask, jnp.int32))
  valid = mask.astype(bool)
  np.testing.assert_array_equal(np.asarray(got.modality)[valid], (ids == IMAGE_TOKEN)[valid])
  diff = np.abs(np.asarray(got.logits)[valid] - want[valid]).max()
  assert diff <= 1e-4, diff


def _llm_and_vision(tmp_path, vision_cls, vision_cfg, dtype=torch.float32, safe=True):
  torch.manual_seed(1)
  llm = transformers.LlamaForCausalLM(_llama_config()).eval()
  vision = vision_cls(vision_cfg).eval()
  llm_dir = _save(llm.to(dtype), tmp_path / 'llm', safe_serialization=safe)
  vision_dir = _save(vision.to(dtype), tmp_path / 'vision', safe_serialization=safe)
  return llm, vision, llm_dir, vision_dir


@pytest.mark.parametrize('vision_cls,vision_cfg,dtype,safe', [
    (transformers.SiglipVisionModel, _siglip_config(), torch.float32, True),
    (transformers.CLIPVisionModel, _clip_config(), torch.float32, False),  # PyTorch .bin
    (transformers.SiglipVisionModel, _siglip_config(), torch.bfloat16, True),
])
def test_llm_plus_vision_matches_its_parts(tmp_path, vision_cls, vision_cfg, dtype, safe):
  llm, vision, llm_dir, vision_dir = _llm_and_vision(tmp_path, vision_cls, vision_cfg, dtype, safe)
  out = str(tmp_path / 'ours')
  assert convert_cli.main(['--llm', llm_dir, '--vision', vision_dir, '--out', out, '--template', 'phi3']) == 0
  cfg, model, meta = folder.load_folder(out)
  assert meta['template'] == 'phi3' and cfg.image_token_id == VOCAB  # outside the vocabulary by default
  llm, vision = llm.float(), vision.float()  # the reference computes in fp32 from the same (rounded) weights
  rng = np.random.default_rng(2)
  ids = rng.integers(1, VOCAB, size=(2, 12))
  with torch.no_grad():
    want = llm(input_ids=torch.tensor(ids)).logits.numpy()
  got = model.language_model(jnp.asarray(ids, jnp.int32)).logits
  assert np.abs(np.asarray(got) - want).max() <= 1e-4
  pixels = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    hidden = vision(pixel_values=torch.tensor(pixels), output_hidden_states=True).hidden_states[-2].numpy()
  if cfg.vision.has_class_token:
    hidden = hidden[:, 1:]
  feats = model.vision_tower.features(jnp.asarray(pixels.transpose(0, 2, 3, 1)), -2, 'default')
  assert np.abs(np.asarray(feats) - hidden).max() <= 1e-4
  assert os.path.isfile(os.path.join(out, 'config.json')) and os.path.isdir(os.path.join(out, 'params'))


def _run_cli_error(capsys, argv):
  capsys.readouterr()  # drop what building the HF fixtures printed
  code = convert_cli.main(argv)
  err = capsys.readouterr().err.strip()
  assert code != 0
  assert err.startswith('error: ') and '\n' not in err, err
  return err


def test_bad_inputs_give_one_line_errors_and_no_output(tmp_path, capsys):
  llm, vision, llm_dir, vision_dir = _llm_and_vision(tmp_path, transformers.SiglipVisionModel, _siglip_config())
  out = str(tmp_path / 'out')

  # Not an HF checkpoint folder.
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert 'no config.json' in _run_cli_error(capsys, ['--llm', str(empty), '--vision', vision_dir, '--out', out])

  # Unsupported architecture name.
  bad_arch = tmp_path / 'bad_arch'
  _save(vision, bad_arch)
  with open(bad_arch / 'config.json') as f:
    c = json.load(f)
  c['architectures'] = ['GPT2LMHeadModel']
  with open(bad_arch / 'config.json', 'w') as f:
    json.dump(c, f)
  assert 'GPT2LMHeadModel' in _run_cli_error(capsys, ['--llm', str(bad_arch), '--vision', vision_dir, '--out', out])

  # Shape mismatch: the config says a wider model than the weights hold.
  wide = tmp_path / 'wide'
  _save(llm, wide)
  with open(wide / 'config.json') as f:
    c = json.load(f)
  c['intermediate_size'] = 128
  with open(wide / 'config.json', 'w') as f:
    json.dump(c, f)
  err = _run_cli_error(capsys, ['--llm', str(wide), '--vision', vision_dir, '--out', out])
  assert 'mlp' in err and 'shape' in err

  # A missing tensor.
  from safetensors.torch import load_file, save_file
  holed = tmp_path / 'holed'
  _save(llm, holed)
  tensors = load_file(holed / 'model.safetensors')
  del tensors['model.layers.1.self_attn.k_proj.weight']
  save_file(tensors, holed / 'model.safetensors', metadata={'format': 'pt'})
  err = _run_cli_error(capsys, ['--llm', str(holed), '--vision', vision_dir, '--out', out])
  assert 'model.layers.1.self_attn.k_proj.weight' in err

  # An unexpected tensor.
  extra = tmp_path / 'extra'
  _save(llm, extra)
  tensors = load_file(extra / 'model.safetensors')
  tensors['model.layers.0.mlp.surprise.weight'] = torch.zeros(3)
  save_file(tensors, extra / 'model.safetensors', metadata={'format': 'pt'})
  assert 'surprise' in _run_cli_error(capsys, ['--llm', str(extra), '--vision', vision_dir, '--out', out])

  # A shard cut short (an interrupted download): the file is named, not a numpy reshape error.
  cut = tmp_path / 'cut'
  _save(llm, cut)
  weights = cut / 'model.safetensors'
  with open(weights, 'r+b') as f:
    f.truncate(weights.stat().st_size - 1000)
  err = _run_cli_error(capsys, ['--llm', str(cut), '--vision', vision_dir, '--out', out])
  assert str(weights) in err and 'truncated' in err, err

  # Nothing was written, not even a temporary folder.
  assert not os.path.exists(out)
  assert not [p for p in os.listdir(tmp_path) if p.startswith('out')]


def test_existing_output_is_not_overwritten(llava, tmp_path, capsys):
  _, src, _ = llava
  out = tmp_path / 'taken'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  assert 'already exists' in _run_cli_error(capsys, ['--llava', src, '--out', str(out)])
  assert (out / 'keep.txt').read_text() == 'mine'
