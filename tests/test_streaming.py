"""Conversion in bounded memory: the weights are read through memory maps and written a layer at a time, so no
whole-model copy exists (peak traced allocation about one layer); the output equals the source, cast per parameter
when asked (bf16 stored as bf16 without an fp32 pass)."""

import os
import tracemalloc

import ml_dtypes
import numpy as np
import torch
import transformers
from flax import nnx

from moiie_jax.convert import __main__ as convert_cli
from moiie_jax.convert import folder, hf, streaming

LAYERS, D, F, V = 8, 256, 688, 2048


def _folders(tmp_path, dtype=torch.float32):
  torch.manual_seed(0)
  llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=128)).eval().to(dtype)
  tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
      patch_size=8)).eval().to(dtype)
  llm.save_pretrained(tmp_path / 'llm', max_shard_size='8MB')  # several shards with an index
  tower.save_pretrained(tmp_path / 'vision')
  return str(tmp_path / 'llm'), str(tmp_path / 'vision')


def _params(out):
  _, model, _ = folder.load_folder(out)
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_groups_follow_layers():
  assert streaming.group_key(('language_model', 'model', 'layers', 3, 'mlp', 'up_proj', 'kernel')) == (
      'language_model', 'model', 'layers', 3)
  assert streaming.group_key(('language_model', 'model', 'embed_tokens', 'embedding')) == ('language_model', 'model')
  assert streaming.group_key(('multi_modal_projector', 'linear_1', 'kernel')) == ('multi_modal_projector', 'linear_1')


def test_no_whole_model_copy_while_converting(tmp_path):
  llm_dir, vision_dir = _folders(tmp_path)
  layer = (4 * D * D // 2 * 2 + 3 * D * F + 2 * D) * 4  # attention (4 heads, 2 kv heads: q, o full; k, v half) + MLP
  total = sum(a.nbytes for a in hf.read_tensors(llm_dir).values())
  assert total > 7 * layer  # the model is many layers: a whole-model copy would be far above one layer
  # A first conversion imports and compiles what the CLI needs, so the traced one counts arrays, not modules.
  assert convert_cli.main(['--llm', llm_dir, '--vision', vision_dir, '--out', str(tmp_path / 'warm')]) == 0
  out = str(tmp_path / 'out')
  tracemalloc.start()
  try:
    assert convert_cli.main(['--llm', llm_dir, '--vision', vision_dir, '--out', out]) == 0
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  embed = V * D * 4  # the largest single tensors: the embeddings and the head
  assert peak < 2 * layer + 2 * embed, (peak, layer, embed, total)
  assert peak < total / 2, (peak, total)
  # ... and the output is the source, exactly.
  source = hf.read_tensors(llm_dir)
  got = _params(out)
  np.testing.assert_array_equal(got[('language_model', 'model', 'layers', 5, 'mlp', 'down_proj', 'kernel')],
                                source['model.layers.5.mlp.down_proj.weight'].T)
  np.testing.assert_array_equal(got[('language_model', 'lm_head', 'kernel')], source['lm_head.weight'].T)


def test_bf16_stays_bf16_and_fp32_is_cast_per_parameter(tmp_path):
  llm_dir, vision_dir = _folders(tmp_path, torch.bfloat16)
  source = hf.read_tensors(llm_dir)
  assert source['model.layers.0.self_attn.q_proj.weight'].dtype == ml_dtypes.bfloat16
  out = str(tmp_path / 'bf16')
  assert convert_cli.main(['--llm', llm_dir, '--vision', vision_dir, '--out', out, '--dtype', 'bfloat16']) == 0
  got = _params(out)
  kernel = got[('language_model', 'model', 'layers', 7, 'self_attn', 'q_proj', 'kernel')]
  assert kernel.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(kernel, source['model.layers.7.self_attn.q_proj.weight'].T)
  # An fp32 source written as bf16: each parameter rounded once, as astype does.
  llm32, vision32 = _folders(tmp_path / 'f32')
  out32 = str(tmp_path / 'from32')
  assert convert_cli.main(['--llm', llm32, '--vision', vision32, '--out', out32, '--dtype', 'bfloat16']) == 0
  w = hf.read_tensors(llm32)['model.layers.2.mlp.gate_proj.weight']
  np.testing.assert_array_equal(_params(out32)[('language_model', 'model', 'layers', 2, 'mlp', 'gate_proj', 'kernel')],
                                w.T.astype(ml_dtypes.bfloat16))
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p or p.endswith('.groups')]


def test_export_copies_one_tensor_at_a_time(tmp_path):
  """Export reads the checkpoint (zero-copy numpy views of the restored arrays), maps keys to views and writes
  each tensor as it is made contiguous: no whole-model copy beside the loaded model."""
  from moiie_jax import export as export_cli
  llm_dir, vision_dir = _folders(tmp_path)
  ours = str(tmp_path / 'ours')
  assert convert_cli.main(['--llm', llm_dir, '--vision', vision_dir, '--out', ours]) == 0
  total = sum(a.nbytes for a in hf.read_tensors(llm_dir).values())
  # The largest tensors: embeddings and head, which llava-hf copies once each to add the placeholder's row.
  embed = (V + 1) * D * 4
  for fmt in ('hf-llm', 'llava-hf'):
    assert export_cli.main(['--checkpoint', ours, '--format', fmt, '--out', str(tmp_path / f'warm-{fmt}')]) == 0
    tracemalloc.start()
    try:
      assert export_cli.main(['--checkpoint', ours, '--format', fmt, '--out', str(tmp_path / fmt)]) == 0
      _, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
    assert peak < 5 * embed and peak < total / 2, (fmt, peak, embed, total)
    out = hf.read_tensors(str(tmp_path / fmt))
    key = 'model.layers.4.mlp.up_proj.weight' if fmt == 'hf-llm' else 'language_model.model.layers.4.mlp.up_proj.weight'
    np.testing.assert_array_equal(out[key], hf.read_tensors(llm_dir)['model.layers.4.mlp.up_proj.weight'])
