"""Export to Hugging Face: a LlavaForConditionalGeneration folder (and the language model alone) that transformers
loads and runs with our logits; greedy generation equal; a llava-hf folder round trips bit for bit; an MoE
checkpoint asked for a dense format gets one line naming the formats that hold it."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from moiie_jax import export as export_cli
from moiie_jax.convert import __main__ as convert_cli
from moiie_jax.convert import folder, hf
from moiie_jax.infer.generate import generate_ids
from moiie_jax.models import config as config_lib

V = 96


def _phi3_and_siglip(tmp_path):
  """Our LVLM from a tiny Phi-3 and a tiny SigLIP (placeholder id = vocab_size, outside the vocabulary; SigLIP
  keeps every patch) with a random connector."""
  torch.manual_seed(0)
  llm = transformers.Phi3ForCausalLM(transformers.Phi3Config(
      vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
  vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
      patch_size=8)).eval()
  llm.save_pretrained(tmp_path / 'llm')
  _word_tokenizer().save_pretrained(tmp_path / 'llm')
  vision.save_pretrained(tmp_path / 'vision')
  out = str(tmp_path / 'ours')
  assert convert_cli.main(['--llm', str(tmp_path / 'llm'), '--vision', str(tmp_path / 'vision'), '--out', out,
                           '--seed', '3']) == 0
  return out


def _word_tokenizer():
  """A WordLevel tokenizer over the tiny vocabulary: w0 .. w95 (w0 unknown, w1 BOS, w2 EOS)."""
  import tokenizers
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f'w{i}': i for i in range(V)}, unk_token='w0'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='w0', bos_token='w1', eos_token='w2',
                                              pad_token='w0')


def _inputs(cfg, rng):
  ids = rng.integers(3, V, size=(2, 12))
  ids[:, 1:1 + cfg.num_image_tokens] = cfg.image_token_id
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding
  pixels = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  return ids, mask, pixels


def test_llava_hf_export_runs_in_transformers_with_our_logits(tmp_path):
  ours = _phi3_and_siglip(tmp_path)
  out = str(tmp_path / 'llava-hf')
  assert export_cli.main(['--checkpoint', ours, '--format', 'llava-hf', '--out', out, '--max-shard-gb',
                          '0.00005']) == 0
  assert os.path.isfile(os.path.join(out, 'model.safetensors.index.json'))  # sharded (tiny shards, on purpose)
  cfg, model, _ = folder.load_folder(ours)
  hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  assert hf_model.config.vision_feature_select_strategy == 'full' and cfg.num_image_tokens == 4
  ids, mask, pixels = _inputs(cfg, np.random.default_rng(0))
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                    attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)).logits.numpy()
  got = np.asarray(nnx.jit(lambda m, i, p, a: m(i, p, attention_mask=a).logits)(
      model, jnp.asarray(ids, jnp.int32), jnp.asarray(pixels), jnp.asarray(mask, jnp.int32)))
  valid = mask.astype(bool)
  assert want.shape[-1] == V + 1  # the placeholder's row, never sampled (generation_config suppress_tokens)
  assert np.abs(got[valid] - want[..., :V][valid]).max() <= 1e-4
  # Greedy generation, token for token: transformers' generate with the exported generation config vs ours.
  row = ids[:1]
  with torch.no_grad():
    hf_tokens = hf_model.generate(input_ids=torch.tensor(row), pixel_values=torch.tensor(pixels[:1].transpose(
        0, 3, 1, 2)), attention_mask=torch.ones_like(torch.tensor(row)), max_new_tokens=6, do_sample=False,
        min_new_tokens=6).numpy()[0, row.shape[1]:]
  ours_tokens = generate_ids(model, row.astype(np.int32), None, pixels[:1], max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(ours_tokens)[0], hf_tokens)
  with open(os.path.join(out, 'generation_config.json')) as f:
    assert json.load(f)['suppress_tokens'] == [V]
  # The image processor preprocesses as ours does.
  from PIL import Image
  from moiie_jax.data import images
  processor = transformers.AutoImageProcessor.from_pretrained(out)
  image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (20, 28, 3), dtype=np.uint8))
  hf_pixels = processor(image, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
  ours_pixels = images.preprocess(image, images.config_for_tower('siglip', 16))
  assert np.abs(hf_pixels - ours_pixels).max() <= 1e-5
  # LlavaProcessor from the folder: `<image>` expands to the image's tokens at our placeholder id, and the model
  # run on what it makes gives our logits.
  llava_processor = transformers.AutoProcessor.from_pretrained(out)
  assert type(llava_processor).__name__ == 'LlavaProcessor'
  batch = llava_processor(images=image, text='w5 <image> w7 w9', return_tensors='pt')
  ids = batch['input_ids'].numpy()
  assert ids[0].tolist() == [5] + [cfg.image_token_id] * cfg.num_image_tokens + [7, 9]
  with torch.no_grad():
    want = hf_model(**batch).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(ours_pixels[None])).logits)
  assert np.abs(got - want[..., :V]).max() <= 1e-4


def test_llava_folder_round_trips_and_the_llm_exports_alone(tmp_path):
  torch.manual_seed(0)
  text = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=16, patch_size=8)
  src_model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      vision_config=vision, text_config=text, image_token_id=V - 1)).eval()
  src = str(tmp_path / 'src')
  src_model.save_pretrained(src)
  ours = str(tmp_path / 'ours')
  assert convert_cli.main(['--llava', src, '--out', ours]) == 0
  out = str(tmp_path / 'back')
  assert export_cli.main(['--checkpoint', ours, '--format', 'llava-hf', '--out', out]) == 0
  want, got = hf.read_tensors(src), hf.read_tensors(out)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # The language model alone.
  llm_out = str(tmp_path / 'llm')
  assert export_cli.main(['--checkpoint', ours, '--format', 'hf-llm', '--out', llm_out]) == 0
  llm = transformers.LlamaForCausalLM.from_pretrained(llm_out).eval()
  cfg, model, _ = folder.load_folder(ours)
  ids = np.random.default_rng(1).integers(0, V - 1, size=(2, 10))
  with torch.no_grad():
    ref = llm(input_ids=torch.tensor(ids)).logits.numpy()
  assert np.abs(np.asarray(model.language_model(jnp.asarray(ids, jnp.int32)).logits) - ref).max() <= 1e-4
  assert config_lib.llm_from_hf(config_lib.llm_to_hf(cfg.llm)) == dataclasses.replace(cfg.llm, moe=cfg.llm.moe)


def test_an_moe_checkpoint_names_the_formats_that_hold_it(tmp_path, capsys):
  from test_generate import tiny_config
  from moiie_jax.models.lvlm import LVLM
  cfg = tiny_config()
  ckpt = folder.save_folder(str(tmp_path / 'moe'), cfg, nnx.state(LVLM(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  for fmt in ('llava-hf', 'hf-llm'):
    capsys.readouterr()
    out = str(tmp_path / fmt)
    assert export_cli.main(['--checkpoint', ckpt, '--format', fmt, '--out', out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'moiie MoE model' in err[0] and 'moe-llava' in err[0], err
    assert not os.path.exists(out)
