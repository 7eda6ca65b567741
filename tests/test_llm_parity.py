"""The decoder LLM against Hugging Face PyTorch (fp32): LLaMA (llama3 RoPE, GQA, biases, tied/untied), Phi-3
(fused projections, partial rotary, longrope, sliding window), Phi-2 (parallel block, LayerNorm, biases, partial
rotary, gelu_new fc1/fc2, lm_head bias), StableLM-2 (LayerNorm, q/k/v biases, rotary 0.25, both residual kinds) and
Qwen2 (q/k/v biases: Qwen v1's math); conversion round trip; cached decoding."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, StableLmConfig, StableLmForCausalLM)

from moiie_jax.convert.errors import ConvertError
from moiie_jax.convert.llm_keys import HF_LAYOUTS, llm_hf_keys, llm_params_from_hf, llm_params_to_hf
from moiie_jax.models import config as config_lib
from moiie_jax.models.decoder import CausalLM

TOL = 1e-4
V = 128
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def _llama(**kw):
  return LlamaForCausalLM(LlamaConfig(**{**SMALL, 'num_hidden_layers': 2, **kw}))


def _phi3(**kw):
  return Phi3ForCausalLM(Phi3Config(**{**SMALL, 'num_hidden_layers': 2, 'pad_token_id': 0, 'bos_token_id': 1,
                                       'eos_token_id': 2, **kw}))


def _phi2(**kw):
  # MoE-LLaVA's Phi-2 rotates 0.4 of each head (32 of 80 dims); transformers 5 defaults to 0.5, so set it.
  return PhiForCausalLM(PhiConfig(**{**SMALL, 'num_hidden_layers': 2, 'hidden_act': 'gelu_new',
                                     'partial_rotary_factor': 0.4, **kw}))


def _stablelm(**kw):
  return StableLmForCausalLM(StableLmConfig(**{**SMALL, 'num_hidden_layers': 2, 'partial_rotary_factor': 0.25,
                                               'use_qkv_bias': True, **kw}))


def _qwen2(**kw):
  return Qwen2ForCausalLM(Qwen2Config(**{**SMALL, 'num_hidden_layers': 2, 'num_key_value_heads': 4,
                                         'tie_word_embeddings': False, **kw}))


CASES = {
    'llama3_gqa_bias_untied': lambda: _llama(
        rope_parameters=dict(rope_type='llama3', rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16),
        attention_bias=True, mlp_bias=True, num_hidden_layers=3),
    'llama_tied': lambda: _llama(tie_word_embeddings=True, num_key_value_heads=4),
    'phi3_default': lambda: _phi3(),
    'phi3_partial_rotary': lambda: _phi3(partial_rotary_factor=0.5),
    # original_max 8 < the 12-token batches, so those use the long factors and the 6-token batch the short ones.
    'phi3_longrope': lambda: _phi3(
        max_position_embeddings=64, original_max_position_embeddings=8,
        rope_parameters=dict(rope_type='longrope', rope_theta=10000.0,
                             short_factor=[1.0 + 0.05 * i for i in range(8)],
                             long_factor=[1.5 + 0.4 * i for i in range(8)])),
    'phi2': lambda: _phi2(num_key_value_heads=4),
    'phi2_gqa_exact_gelu': lambda: _phi2(hidden_act='gelu', layer_norm_eps=1e-6),
    'stablelm2': lambda: _stablelm(),
    'stablelm_parallel_no_qkv_bias': lambda: _stablelm(use_parallel_residual=True, use_qkv_bias=False),
    'qwen2': lambda: _qwen2(),
}


def _perturb(hf):
  """HF initialises biases to 0 and norm weights to 1; random ones make a misplaced bias or norm visible."""
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith('bias') or 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return hf


def _build(name: str, seed: int = 0):
  torch.manual_seed(seed)
  hf = _perturb(CASES[name]()).eval()
  cfg = config_lib.llm_from_hf(hf.config.to_dict())
  return hf, cfg


def load(model: nnx.Module, params: dict) -> None:
  """Writes converted arrays into `model`, checking paths and shapes against its state."""
  flat = list(nnx.to_flat_state(nnx.state(model)))
  paths = {p for p, _ in flat}
  assert paths == set(params), f'path mismatch: {sorted(paths ^ set(params))}'
  for p, v in flat:
    assert tuple(v.shape) == params[p].shape, (p, v.shape, params[p].shape)
  nnx.update(model, nnx.from_flat_state([(p, v.replace(jnp.asarray(params[p]))) for p, v in flat]))


def converted(cfg, tensors: dict) -> CausalLM:
  """CausalLM(cfg) holding the converted HF tensors (built abstractly: a random init would only be overwritten)."""
  model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
  load(model, llm_params_from_hf(tensors, cfg))
  return model


@nnx.jit
def forward(model, ids, mask):
  # One compiled program per config is far cheaper on CPU than eager op-by-op dispatch of a first run.
  return model(ids, attention_mask=mask).logits


def _state_dict(hf) -> dict:
  return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


def _batches(length: int = 12):
  """ids [3, length]; right- and left-padded masks; and a right-padded mask with at most 8 real tokens per row
  (positions stay below 8: the short-factor regime of the longrope case, at the same shape)."""
  rng = np.random.RandomState(1)
  ids = rng.randint(3, V, (3, length))
  right = np.ones((3, length), np.int64)
  right[1, length - 4:] = 0
  right[2, length - 7:] = 0
  left = right[:, ::-1].copy()
  short = right.copy()
  short[:, 8:] = 0
  return ids, right, left, short


def _hf_logits(hf, ids, mask):
  # Explicit positions cumsum - 1 (clipped at 0) so left padding gets the same positions as ours.
  pos = np.maximum(mask.cumsum(1) - 1, 0)
  with torch.no_grad():
    return hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()


def _max_diff(ours, ref, mask):
  return float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())


@pytest.mark.parametrize('name', list(CASES))
def test_logits_match_hf_and_export_round_trips(name):
  hf, cfg = _build(name)
  sd = _state_dict(hf)
  model = converted(cfg, sd)
  assert hasattr(model, 'lm_head') != cfg.tie_word_embeddings

  ids, right, left, short = _batches()
  logits = {}
  for kind, mask in (('right', right), ('left', left), ('short', short)):
    logits[kind] = ours = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert ours.dtype == jnp.float32 and ours.shape == (3, 12, V)
    diff = _max_diff(ours, _hf_logits(hf, ids, mask), mask)
    assert diff <= TOL, f'{name} ({kind} batch): max |logits - HF| = {diff}'
  if name == 'phi3_longrope':
    # Not vacuous: row 0 has 12 real tokens in `right` (long factors) and 8 in `short` (short factors).
    assert float(jnp.abs(logits['right'][0, :8] - logits['short'][0, :8]).max()) > 1e-3

  # Export: exactly the saved checkpoint (a tied head is not saved by save_pretrained).
  back = llm_params_to_hf(dict(nnx.to_flat_state(nnx.state(model))), cfg)
  want = {k: v for k, v in sd.items() if not (cfg.tie_word_embeddings and k == 'lm_head.weight')}
  assert sorted(back) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(back[k], want[k], err_msg=k)


def test_sliding_window_matches_hf():
  """HF Phi-3 honours `sliding_window`; llm_from_hf copies it and our decoder applies it."""
  torch.manual_seed(0)
  hf = _phi3(sliding_window=4).eval()
  cfg = config_lib.llm_from_hf(hf.config.to_dict())
  assert cfg.sliding_window == 4
  model = converted(cfg, _state_dict(hf))
  ids, right, left, _ = _batches()
  for mask in (right, left):
    diff = _max_diff(forward(model, jnp.asarray(ids), jnp.asarray(mask)), _hf_logits(hf, ids, mask), mask)
    assert diff <= TOL, diff
  plain = converted(dataclasses.replace(cfg, sliding_window=None), _state_dict(hf))
  mask = jnp.asarray(right)
  assert float(jnp.abs(forward(plain, jnp.asarray(ids), mask) - forward(model, jnp.asarray(ids), mask)).max()) > 1e-3


def test_inputs_embeds_equals_input_ids():
  hf, cfg = _build('phi3_default')
  model = converted(cfg, _state_dict(hf))
  ids, right, _, _ = _batches()
  ids, right = jnp.asarray(ids), jnp.asarray(right)
  from_embeds = nnx.jit(lambda m, e, a: m(inputs_embeds=e, attention_mask=a).logits)
  np.testing.assert_allclose(np.asarray(forward(model, ids, right)),
                             np.asarray(from_embeds(model, model.model.embed_tokens(ids), right)), atol=1e-6)
  with pytest.raises(ValueError, match='exactly one'):
    model()


@pytest.mark.parametrize('name', ['llama3_gqa_bias_untied', 'phi2', 'stablelm2'])
def test_cached_decoding_equals_full_forward(name):
  """Left-padded prompts, prefill + greedy steps through one jitted function; every step equals a full forward of
  the sequence so far (ours, and HF's). Causality lets one forward of the final sequence serve every step."""
  hf, cfg = _build(name)
  model = converted(cfg, _state_dict(hf))
  ids, _, left, _ = _batches(6)
  prompt_len, steps = ids.shape[1], 4
  max_len = prompt_len + steps
  mask_s = np.concatenate([left, np.ones((3, steps), np.int64)], axis=1)  # future slots marked real in advance

  traces = []

  @nnx.jit
  def step(model, tokens, mask, cache):
    traces.append(tokens.shape)
    return model(tokens, attention_mask=mask, cache=cache)

  out = step(model, jnp.asarray(ids), jnp.asarray(mask_s), model.init_cache(3, max_len))
  cached = [out.logits]
  seq = ids
  for k in range(steps):
    token = np.asarray(jnp.argmax(out.logits[:, -1], axis=-1))[:, None]
    seq = np.concatenate([seq, token], axis=1)
    out = step(model, jnp.asarray(token), jnp.asarray(mask_s), out.cache)
    assert int(out.cache.index) == prompt_len + k + 1
    cached.append(out.logits)
  cached = np.asarray(jnp.concatenate(cached, axis=1))  # [B, len(seq), V]: column t is the logits after token t
  assert len(traces) == 2  # one trace for the prompt shape, one for all decode steps: the write index is dynamic

  seq_mask = mask_s[:, :seq.shape[1]]
  full = np.asarray(forward(model, jnp.asarray(seq), jnp.asarray(seq_mask)))
  ref = _hf_logits(hf, seq, seq_mask)
  for t in range(prompt_len - 1, seq.shape[1]):
    assert np.abs(cached[:, t] - full[:, t]).max() <= TOL, f'position {t}: cached vs full forward'
    assert np.abs(cached[:, t] - ref[:, t]).max() <= TOL, f'position {t}: cached vs HF'
  assert _max_diff(cached[:, :prompt_len], full[:, :prompt_len], left) <= TOL  # the prefill itself

  with pytest.raises(ValueError, match='attention_mask'):
    model(jnp.asarray(ids), attention_mask=jnp.asarray(left), cache=model.init_cache(3, max_len))
  with pytest.raises(ValueError, match='overflow'):
    model(jnp.asarray(ids), cache=model.init_cache(3, 4))


def test_converter_errors_name_the_key():
  hf, cfg = _build('llama_tied')
  sd = _state_dict(hf)
  with pytest.raises(ConvertError, match='model.layers.0.mlp.extra.weight'):
    llm_params_from_hf({**sd, 'model.layers.0.mlp.extra.weight': np.zeros(3)}, cfg)
  with pytest.raises(ConvertError, match='model.norm.weight'):
    llm_params_from_hf({k: v for k, v in sd.items() if k != 'model.norm.weight'}, cfg)
  with pytest.raises(ConvertError, match=r'model.layers.1.self_attn.k_proj.weight: shape \(32, 64\)'):
    llm_params_from_hf({**sd, 'model.layers.1.self_attn.k_proj.weight': np.zeros((32, 64), np.float32)}, cfg)
  with pytest.raises(ConvertError, match='lm_head.weight: LLMConfig.tie_word_embeddings=True'):
    llm_params_from_hf({**sd, 'lm_head.weight': sd['lm_head.weight'] + 1}, cfg)
  moe_cfg = dataclasses.replace(cfg, moe=config_lib.MoEConfig(variant='moiie'))
  with pytest.raises(ConvertError, match='upcycle'):
    llm_params_from_hf(sd, moe_cfg)
  # Other layouts: the same tensors under the LLaVA prefixes convert to the same parameters.
  plain = llm_params_from_hf(sd, cfg)
  for decoder_prefix, head in HF_LAYOUTS.values():
    moved = {decoder_prefix + k[len('model.'):]: v for k, v in sd.items() if k.startswith('model.')}
    moved['vision_tower.some.weight'] = np.zeros(2)  # outside the LLM: left alone
    got = llm_params_from_hf(moved, cfg, decoder_prefix=decoder_prefix, lm_head_key=head)
    assert got.keys() == plain.keys() and all(np.array_equal(got[k], plain[k]) for k in plain)
  assert llm_hf_keys(cfg)[0] == 'model.embed_tokens.weight' and 'lm_head.weight' not in llm_hf_keys(cfg)


def test_unsupported_rope_raises():
  cfg = config_lib.LLMConfig(**{**SMALL, 'num_hidden_layers': 1},
                             rope_scaling=config_lib._freeze({'rope_type': 'dynamic', 'factor': 2.0}))
  with pytest.raises(NotImplementedError, match='dynamic'):
    CausalLM(cfg, rngs=nnx.Rngs(0))
  cfg = dataclasses.replace(cfg, architecture='phi3', rope_scaling=config_lib._freeze(
      {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
       'original_max_position_embeddings': 8}))
  with pytest.raises(NotImplementedError, match="'llama3' is not implemented for architecture='phi3'"):
    CausalLM(cfg, rngs=nnx.Rngs(0))
