"""Scanned decoder layers (nnx.scan over stacked blocks) equal the Python loop, with the same parameters moved
through `layer_location`: logits, MoE stats, cached decoding, remat gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moiie_jax.convert.llm_keys import llm_params_from_hf, llm_params_to_hf
from moiie_jax.models.config import ConfigError, LLMConfig, MoEConfig
from moiie_jax.models.decoder import CausalLM, layer_location, layer_period

TOL = 1e-5
BASE = LLMConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, rope_scaling=None, max_position_embeddings=64)


def _random_model(cfg: LLMConfig, seed: int = 0) -> CausalLM:
  """CausalLM(cfg) with numpy-random parameters (an abstract build: no per-op compiles of a random init)."""
  model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.RandomState(seed)
  params = {}
  for p, v in nnx.to_flat_state(nnx.state(model)):
    centre = 1.0 if p[-1] == 'weight' else 0.0  # RMSNorm weights around 1
    params[p] = (centre + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
  _load(model, params)
  return model


def _empty_model(cfg: LLMConfig) -> CausalLM:
  return nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))


@nnx.jit
def _loss_logits_grads(model, ids, mask):
  def loss(model):
    logits = model(ids, attention_mask=mask).logits
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits
  (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return logits, grads


@nnx.jit
def _prefill_and_step(model, ids, mask_s):
  out = model(ids, attention_mask=mask_s, cache=model.init_cache(ids.shape[0], mask_s.shape[1]))
  first = out.logits
  out = model(jnp.argmax(out.logits[:, -1:], axis=-1), attention_mask=mask_s, cache=out.cache)
  return first, out.logits, out.cache


@nnx.jit
def _forward(model, ids, mask, modality):
  out = model(ids, attention_mask=mask, modality=modality)
  return out.logits, out.moe_stats


def _flat(model) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _load(model, params: dict) -> None:
  flat = list(nnx.to_flat_state(nnx.state(model)))
  assert {p for p, _ in flat} == set(params), sorted({p for p, _ in flat} ^ set(params))
  for p, v in flat:
    assert tuple(v.shape) == params[p].shape, (p, v.shape, params[p].shape)
  nnx.update(model, nnx.from_flat_state([(p, v.replace(jnp.asarray(params[p]))) for p, v in flat]))


def _relocate(flat: dict, src: LLMConfig, dst: LLMConfig) -> dict:
  """Moves every layer's parameters from src's layout to dst's, asking only `layer_location`."""
  out, stacks, n = {}, {}, src.num_hidden_layers
  located = [layer_location(src, i) for i in range(n)]
  for path, value in flat.items():
    hits = [i for i, (pfx, _) in enumerate(located) if path[:len(pfx)] == pfx]
    if not hits:
      out[path] = value
      continue
    for i in hits:
      pfx, idx = located[i]
      dst_pfx, dst_idx = layer_location(dst, i)
      leaf = value if idx is None else value[idx]
      if dst_idx is None:
        out[dst_pfx + path[len(pfx):]] = leaf
      else:
        stacks.setdefault(dst_pfx + path[len(pfx):], {})[dst_idx] = leaf
  out.update({p: np.stack([d[b] for b in range(len(d))]) for p, d in stacks.items()})
  return out


def _inputs(cfg, length=7, seed=0):
  rng = np.random.RandomState(seed)
  ids = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, length)))
  mask = np.ones((2, length), np.int32)
  mask[1, :3] = 0  # left padding
  modality = np.zeros((2, length), np.int32)
  modality[:, 3:5] = 1  # a few image tokens, so MoIIE's visual router is used
  return ids, jnp.asarray(mask), jnp.asarray(modality)


def test_layer_period_and_location():
  assert layer_period(BASE) == 1
  moe = lambda **kw: dataclasses.replace(BASE, num_hidden_layers=4, moe=MoEConfig(variant='moiie', **kw),
                                         scan_layers=True)
  assert layer_period(moe()) == 2
  assert layer_period(moe(placement='all')) == 1
  assert layer_period(dataclasses.replace(moe(placement='list', layers=(1, 2, 4, 5)), num_hidden_layers=6)) == 3
  with pytest.raises(ConfigError, match='scan_layers=False'):
    layer_period(moe(placement='list', layers=(0, 1)))
  with pytest.raises(ConfigError, match='scan_layers=False'):
    layer_period(dataclasses.replace(moe(), num_hidden_layers=5))
  assert layer_location(BASE, 2) == (('model', 'layers', 2), None)
  assert layer_location(moe(), 3) == (('model', 'layers', 1), 1)
  assert layer_location(dataclasses.replace(BASE, scan_layers=True), 2) == (('model', 'layers', 0), 2)
  with pytest.raises(ValueError, match='outside'):
    layer_location(BASE, 3)


# Phi-2's layer (parallel residual, LayerNorm with bias, fc1/fc2 GELU MLP, partial rotary) besides LLaMA's.
PHI2 = dataclasses.replace(BASE, architecture='phi', hidden_act='gelu_new', partial_rotary_factor=0.5)


@pytest.mark.parametrize('base', [BASE, PHI2], ids=['llama', 'phi2'])
def test_dense_scan_equals_loop_with_cache_and_remat_grads(base):
  loop_cfg = base
  scan_cfg = dataclasses.replace(base, scan_layers=True, remat=True)
  looped = _random_model(loop_cfg)
  scanned = _empty_model(scan_cfg)
  # Through the HF converter both ways: the scanned stack is exactly the looped layers, stacked.
  _load(scanned, llm_params_from_hf(llm_params_to_hf(_flat(looped), loop_cfg), scan_cfg))
  q = _flat(scanned)[('model', 'layers', 0, 'self_attn', 'q_proj', 'kernel')]
  assert q.shape == (3, 32, 32)  # [L, D, N * H]
  np.testing.assert_array_equal(q[2], _flat(looped)[('model', 'layers', 2, 'self_attn', 'q_proj', 'kernel')])
  assert _flat(scanned).keys() == _relocate(_flat(looped), loop_cfg, scan_cfg).keys()

  ids, mask, _ = _inputs(base)
  logits_loop, g_loop = _loss_logits_grads(looped, ids, mask)
  logits_scan, g_scan = _loss_logits_grads(scanned, ids, mask)
  assert float(jnp.abs(logits_loop - logits_scan).max()) <= TOL
  # Gradients through nnx.scan + nnx.remat equal the loop's, parameter by parameter.
  g_loop = {p: np.asarray(v) for p, v in nnx.to_flat_state(g_loop)}
  g_scan = {p: np.asarray(v) for p, v in nnx.to_flat_state(g_scan)}
  g_moved = _relocate(g_loop, loop_cfg, scan_cfg)
  assert g_moved.keys() == g_scan.keys()
  for p in g_scan:
    np.testing.assert_allclose(g_scan[p], g_moved[p], atol=1e-6, rtol=1e-4, err_msg=str(p))

  # Cached decoding (prefill, then one step): scanned == looped, logits and cache contents.
  mask_s = jnp.concatenate([mask, jnp.ones((2, 2), jnp.int32)], axis=1)
  a, b = _prefill_and_step(looped, ids, mask_s), _prefill_and_step(scanned, ids, mask_s)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert float(jnp.abs(x - y).max()) <= TOL
  assert int(b[2].index) == ids.shape[1] + 1
  valid = np.asarray(mask).astype(bool)  # the prefill equals the plain forward at real tokens
  assert float(np.abs(np.asarray(a[0]) - np.asarray(logits_loop))[valid].max()) <= TOL


@pytest.mark.parametrize('placement,layers,n_layers,base', [('interleaved', (), 4, 'llama'),
                                                         ('list', (1, 2, 4, 5), 6, 'llama'),
                                                         ('interleaved', (), 4, 'phi2')])
def test_moe_scan_equals_loop(placement, layers, n_layers, base):
  """Interleaved MoE (period 2) and a period-3 layout with two MoE layers per block: logits and the per-layer
  stats, stacked in layer order, match the loop (Phi-2's parallel block with fc1/fc2 experts too)."""
  moe = MoEConfig(variant='moiie', n_vision=1, n_shared=2, n_language=1, top_k=2, placement=placement,
                  layers=layers)
  loop_cfg = dataclasses.replace({'llama': BASE, 'phi2': PHI2}[base], num_hidden_layers=n_layers, moe=moe)
  scan_cfg = dataclasses.replace(loop_cfg, scan_layers=True)
  looped = _random_model(loop_cfg)
  scanned = _empty_model(scan_cfg)
  _load(scanned, _relocate(_flat(looped), loop_cfg, scan_cfg))
  ids, mask, modality = _inputs(loop_cfg)
  logits_a, stats_a = _forward(looped, ids, mask, modality)
  logits_b, stats_b = _forward(scanned, ids, mask, modality)
  assert float(jnp.abs(logits_a - logits_b).max()) <= TOL
  n_moe = len(loop_cfg.moe_layers)
  for x, y in zip(jax.tree.leaves(stats_a), jax.tree.leaves(stats_b)):
    assert x.shape[0] == n_moe and x.shape == y.shape
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)
  # The stats are per layer, not a copy of one layer: the layers' routers differ, so their choices do too.
  weights = np.asarray(stats_a.weight_per_expert)
  assert not all(np.allclose(weights[0], weights[j]) for j in range(1, n_moe))


def test_flattened_linear_rows_are_the_same_math():
  """models/linear.py: on the CPU the linear layers multiply [B*T, D] rows; logits and gradients equal those of the
  [B, T, D] product nnx.Linear computes (up to float rounding), and the parameters are the same."""
  from moiie_jax.models import linear
  model = _random_model(PHI2)
  ids, mask, _ = _inputs(PHI2)
  assert linear.flatten()  # the CPU default
  graphdef, state = nnx.split(model)

  def make_run():  # a new function per variant: jit caches traces by function, and the switch acts when tracing
    def run(state, ids, mask):
      def loss(state):
        logits = nnx.merge(graphdef, state)(ids, attention_mask=mask).logits
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits
      return jax.value_and_grad(loss, has_aux=True)(state)
    return run

  outs, texts = {}, {}
  for on in (False, True):
    with linear.flattening(on):
      lowered = jax.jit(make_run()).lower(state, ids, mask)
    texts[on] = lowered.as_text()
    outs[on] = lowered.compile()(state, ids, mask)
  flat_rows = f'tensor<{ids.shape[0] * ids.shape[1]}x{PHI2.hidden_size}xf32>'
  assert flat_rows in texts[True] and flat_rows not in texts[False]  # [B*T, D] rows only when flattening
  (_, logits_a), grads_a = outs[False]
  (_, logits_b), grads_b = outs[True]
  np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
