"""The expert layer: every fast path against the dropless oracle, routing invariants, aux loss, upcycling, wiring.

Tiny shapes throughout (D=16, F=24, a dozen tokens) so the whole file runs in well under a minute on a CPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from jax import test_util as jtu
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moiie_jax.convert import hf as hf_convert
from moiie_jax.convert import upcycle as up
from moiie_jax.models import gmm
from moiie_jax.models import moe as moe_lib
from moiie_jax.models import routing
from moiie_jax.models.config import ConfigError, LLMConfig, MoEConfig
from moiie_jax.models.decoder import CausalLM
from moiie_jax.models.mlp import MLP

D, F = 16, 24
LAYOUTS = {  # name: (variant, n_vision, n_shared, n_language, top_k)
    'moiie-4': ('moiie', 1, 2, 1, 2),
    'moiie-8-balanced': ('moiie', 2, 4, 2, 2),
    'moiie-8-unbalanced': ('moiie', 3, 2, 3, 2),
    'vanilla-4': ('vanilla', 0, 4, 0, 2),
    'modality-4': ('modality', 2, 0, 2, 2),
}


def make_cfg(layout='moiie-4', arch='llama', **moe_kw) -> LLMConfig:
  variant, nv, ns, nl, k = LAYOUTS[layout]
  moe = MoEConfig(variant=variant, n_vision=nv, n_shared=ns, n_language=nl, top_k=k, **moe_kw)
  return LLMConfig(architecture=arch, vocab_size=64, hidden_size=D, intermediate_size=F, num_hidden_layers=4,
                   num_attention_heads=2, num_key_value_heads=2, hidden_act='gelu_new' if arch == 'phi' else 'silu',
                   moe=moe)


def make_block(cfg, seed=0, router_std=1.0):
  """A block with large router weights so routing is far from uniform and top-k choices are distinct."""
  block = moe_lib.MoEBlock(cfg, rngs=nnx.Rngs(seed))
  for router in (block.gate, block.gate_vis):
    if router is not None:
      router.kernel[...] = router_std * jax.random.normal(jax.random.key(seed + 7), router.kernel[...].shape)
  return block


def make_inputs(b=2, t=12, seed=1):
  x = jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)
  # Row 0: text, image (5), text; row 1: image (4), text, then 3 padding positions.
  modality = jnp.array([[0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]])[:b, :t]
  valid = jnp.array([[1] * 12, [1] * 9 + [0] * 3])[:b, :t]
  return x, modality, valid


# ------------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize('moe_kw, field', [
    (dict(variant='moiie', n_vision=1, n_shared=0, n_language=1, top_k=2), 'top_k'),
    (dict(variant='modality', n_vision=0, n_shared=0, n_language=2, top_k=1), 'n_vision'),
    (dict(variant='modality', n_vision=2, n_shared=0, n_language=0, top_k=1), 'n_language'),
    (dict(variant='vanilla', n_vision=0, n_shared=0, n_language=0, top_k=1), 'n_shared'),
    (dict(variant='moiie', n_vision=-1, n_shared=2, n_language=1), 'n_vision'),
    (dict(variant='modality', n_vision=1, n_shared=2, n_language=1, top_k=1), 'n_shared'),
    (dict(variant='dense'), 'variant'),
])
def test_bad_config_fails_at_construction_naming_the_field(moe_kw, field):
  cfg = LLMConfig(hidden_size=D, intermediate_size=F, moe=MoEConfig(**moe_kw))
  with pytest.raises(ConfigError, match=field):
    moe_lib.MoEBlock(cfg, rngs=nnx.Rngs(0))


def test_phi3_with_mlp_bias_is_rejected():
  cfg = dataclasses.replace(make_cfg(arch='phi3'), mlp_bias=True)
  with pytest.raises(ConfigError, match='mlp_bias'):
    moe_lib.MoEBlock(cfg, rngs=nnx.Rngs(0))


def test_parameter_names_and_shapes():
  block = moe_lib.MoEBlock(make_cfg('moiie-8-unbalanced'), rngs=nnx.Rngs(0))
  shapes = {'.'.join(map(str, p)): v.shape for p, v in hf_convert.flat_abstract(block).items()}
  assert shapes == {'experts.gate_proj.kernel': (8, D, F), 'experts.up_proj.kernel': (8, D, F),
                    'experts.down_proj.kernel': (8, F, D), 'gate.kernel': (D, 5), 'gate_vis.kernel': (D, 5)}
  phi3 = moe_lib.MoEBlock(make_cfg('vanilla-4', arch='phi3'), rngs=nnx.Rngs(0))
  shapes = {'.'.join(map(str, p)): v.shape for p, v in hf_convert.flat_abstract(phi3).items()}
  assert shapes == {'experts.gate_up_proj.kernel': (4, D, 2 * F), 'experts.down_proj.kernel': (4, F, D),
                    'gate.kernel': (D, 4)}
  phi2 = moe_lib.MoEBlock(make_cfg('vanilla-4', arch='phi'), rngs=nnx.Rngs(0))
  shapes = {'.'.join(map(str, p)): v.shape for p, v in hf_convert.flat_abstract(phi2).items()}
  assert shapes == {'experts.fc1.kernel': (4, D, F), 'experts.fc1.bias': (4, F), 'experts.fc2.kernel': (4, F, D),
                    'experts.fc2.bias': (4, D), 'gate.kernel': (D, 4)}


# ------------------------------------------------------------------------------------------------ upcycling
@pytest.mark.parametrize('layout, arch, bias', [('moiie-4', 'llama', False), ('moiie-8-balanced', 'phi3', False),
                                                ('vanilla-4', 'llama', True), ('modality-4', 'phi3', False),
                                                ('moiie-4', 'phi', True)])
def test_upcycled_block_equals_dense_mlp(layout, arch, bias):
  cfg = dataclasses.replace(make_cfg(layout, arch), mlp_bias=bias and arch != 'phi')  # Phi-2's MLP is biased
  mlp = MLP(cfg, rngs=nnx.Rngs(3))
  if bias:  # nonzero biases, so that copying them is checked too
    for name in ('gate_proj', 'up_proj', 'down_proj', 'fc1', 'fc2'):
      lin = getattr(mlp, name, None)
      if lin is not None:
        lin.bias[...] = 0.1 * jax.random.normal(jax.random.key(5), lin.bias[...].shape)
  block = moe_lib.MoEBlock(cfg, rngs=nnx.Rngs(0))
  nnx.update(block, up.upcycle_block(nnx.state(mlp, nnx.Param).to_pure_dict(), cfg, jax.random.key(4)))
  last = 'fc2' if arch == 'phi' else 'down_proj'
  np.testing.assert_array_equal(getattr(block.experts, last).kernel[...][-1], getattr(mlp, last).kernel[...])
  assert block.gate.kernel[...].std() == pytest.approx(cfg.initializer_range, rel=0.3)
  x, modality, valid = make_inputs()
  want = np.asarray(mlp(x))
  for cf in (0.0, 2.0):
    y, _ = block(x, modality, valid, capacity_factor=cf)
    ok = np.asarray(valid, bool)
    np.testing.assert_allclose(np.asarray(y)[ok], want[ok], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(y)[~ok], 0.0)  # padding is not routed


@pytest.mark.parametrize('scan_from, scan_to', [(False, False), (False, True)])
def test_upcycled_model_equals_dense_model(scan_from, scan_to):
  moe_cfg = make_cfg('moiie-4', 'phi3', placement='interleaved', first_layer=1)
  moe_cfg = dataclasses.replace(moe_cfg, scan_layers=scan_to, pad_token_id=0)
  dense_cfg = dataclasses.replace(moe_cfg, moe=MoEConfig(variant='dense'), scan_layers=scan_from)
  dense = CausalLM(dense_cfg, rngs=nnx.Rngs(0))
  flat = {p: np.asarray(v) for p, v in hf_convert.flat_abstract(nnx.state(dense, nnx.Param)).items()}
  if scan_from != scan_to:  # the source layout defaults to the target's, which does not fit a looped source
    with pytest.raises(up.ConvertError, match='source_scan_layers'):
      up.upcycle(flat, moe_cfg, jax.random.key(0))
  new = up.upcycle(flat, moe_cfg, jax.random.key(0), source_scan_layers=scan_from)
  if not scan_to:  # interleaved from layer 1: experts in layers 1 and 3, dense MLPs in 0 and 2
    assert new[('model', 'layers', 1, 'mlp', 'experts', 'gate_up_proj', 'kernel')].shape == (4, D, 2 * F)
    assert ('model', 'layers', 2, 'mlp', 'gate_up_proj', 'kernel') in new
    assert not any(p[:4] == ('model', 'layers', 2, 'mlp') and 'experts' in p for p in new)
  model = nnx.eval_shape(lambda: CausalLM(moe_cfg, rngs=nnx.Rngs(0)))
  state = hf_convert.build_state(model, new, 'upcycled')
  model = CausalLM(moe_cfg, rngs=nnx.Rngs(1))
  nnx.update(model, state)
  ids = jax.random.randint(jax.random.key(2), (2, 10), 1, 64)
  modality = (jnp.arange(10) < 6).astype(jnp.int32)[None].repeat(2, 0)
  want = dense(ids, modality=modality).logits
  out = model(ids, modality=modality)
  np.testing.assert_allclose(out.logits, want, atol=1e-5, rtol=0)
  assert out.moe_stats.slot_counts.shape == (2, 2, 4)  # layers 1 and 3


# ------------------------------------------------------------------------------------------------ routing
@pytest.mark.parametrize('layout', list(LAYOUTS))
@pytest.mark.parametrize('rule', ['all_image', 'official'])
def test_modalities_never_reach_the_other_modalitys_experts(layout, rule):
  cfg = make_cfg(layout, modality_rule=rule)
  moe = cfg.moe
  block = make_block(cfg)
  x, modality, valid = make_inputs()
  x = jnp.concatenate([x, 3.0 * x], axis=0)  # more tokens, wider logits
  modality, valid = jnp.concatenate([modality] * 2), jnp.concatenate([valid] * 2)
  vision, routed, counted = routing.routing_masks(modality, valid, rule)
  r = routing.route(x.reshape(-1, D), block.gate.kernel[...],
                    None if block.gate_vis is None else block.gate_vis.kernel[...], vision.reshape(-1), moe)
  experts = np.asarray(r.experts)
  is_vis = np.asarray(vision).reshape(-1)
  vision_experts = set(range(moe.n_vision))
  language_experts = set(range(moe.n_vision + moe.n_shared, moe.n_experts))
  assert not set(experts[is_vis].ravel()) & language_experts
  assert not set(experts[~is_vis].ravel()) & vision_experts
  assert len(set(experts[is_vis].ravel())) > 1 and len(set(experts[~is_vis].ravel())) > 1  # not vacuous
  # The same, from the layer's statistics.
  _, stats = block(x, modality, valid)
  tpe = np.asarray(stats.tokens_per_expert)
  assert tpe[routing.IMAGE, sorted(language_experts)].sum() == 0
  assert tpe[routing.TEXT, sorted(vision_experts)].sum() == 0
  assert tpe.sum() == moe.top_k * np.asarray(counted).sum()
  if rule == 'official':  # each image's last token is routed as text
    assert not vision[0, 6] and vision[0, 5] and not vision[1, 3] and vision[1, 2]
    assert routed.all() and not counted[1, 9:].any()


def test_topk_weights_renormalised_or_not():
  x, modality, valid = make_inputs()
  for renorm in (True, False):
    cfg = make_cfg('moiie-8-balanced', renormalize=renorm)
    block = make_block(cfg, router_std=0.3)
    vision, _, _ = routing.routing_masks(modality, valid, 'all_image')
    r = routing.route(x.reshape(-1, D), block.gate.kernel[...], block.gate_vis.kernel[...], vision.reshape(-1),
                      cfg.moe)
    total = np.asarray(r.weights.sum(-1))
    if renorm:
      np.testing.assert_allclose(total, 1.0, atol=1e-6)
    else:
      assert (total < 1.0 - 1e-3).all()
      np.testing.assert_allclose(r.weights, jnp.take_along_axis(r.probs, r.experts, -1), atol=0)
    np.testing.assert_allclose(r.probs.sum(-1), 1.0, atol=1e-6)
    y, _ = block(x, modality, valid)
    np.testing.assert_allclose(y, moe_lib.moe_reference(block, x, modality, valid), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ aux loss
def test_aux_loss_hand_computed():
  """4 real tokens (2 image, 2 text) with chosen router probabilities, one padding token that must not count."""
  cfg = dataclasses.replace(make_cfg('moiie-4'), hidden_size=5)
  block = moe_lib.MoEBlock(cfg, rngs=nnx.Rngs(0))
  # Token t is the basis vector e_t, so its logits are row t of its router's kernel.
  vis = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [1, 1, 1], [1, 1, 1], [1, 1, 1]]))
  txt = np.log(np.array([[1, 1, 1], [1, 1, 1], [0.6, 0.3, 0.1], [0.25, 0.15, 0.6], [1, 1, 1]]))
  txt[4] = [30.0, -30.0, 0.0]  # the padding token: would skew the text router if it counted
  block.gate_vis.kernel[...] = jnp.asarray(vis, jnp.float32)
  block.gate.kernel[...] = jnp.asarray(txt, jnp.float32)
  x = jnp.eye(5)[None]
  modality = jnp.array([[1, 1, 0, 0, 0]])
  valid = jnp.array([[1, 1, 1, 1, 0]])
  _, stats = block(x, modality, valid)
  # Visual router (experts v, s1, s2): choices {v, s1}, {s2, s1}: f = (1/2, 1, 1/2), P = (0.3, 0.25, 0.45).
  # 3 * (0.15 + 0.25 + 0.225) = 1.875. Textual (s1, s2, l): {s1, s2}, {l, s1}: f = (1, 1/2, 1/2),
  # P = (0.425, 0.225, 0.35): 3 * (0.425 + 0.1125 + 0.175) = 2.1375.
  aux, z = moe_lib.layer_aux_loss(stats, cfg.moe)
  assert float(aux) == pytest.approx(1.875 + 2.1375, abs=1e-5)
  assert float(moe_lib.aux_loss([stats], cfg.moe)[0]) == pytest.approx(4.0125, abs=1e-5)
  # Probabilities above sum to 1, so logsumexp = 0 for the four counted tokens.
  assert float(z) == pytest.approx(0.0, abs=1e-5)
  np.testing.assert_allclose(stats.num_tokens, [2, 2])
  np.testing.assert_allclose(stats.slot_counts, [[0, 2, 1, 1], [1, 2, 1, 0]])


def test_aux_loss_is_k_per_router_when_routing_is_uniform():
  cfg = make_cfg('moiie-8-balanced')
  block = moe_lib.MoEBlock(cfg, rngs=nnx.Rngs(0))
  block.gate.kernel[...] = jnp.zeros_like(block.gate.kernel[...])
  block.gate_vis.kernel[...] = jnp.zeros_like(block.gate_vis.kernel[...])
  x, modality, valid = make_inputs()
  _, both = block(x, modality, valid)
  _, text_only = block(x, jnp.zeros_like(modality), valid)
  k = cfg.moe.top_k
  assert float(moe_lib.aux_loss(both, cfg.moe)[0]) == pytest.approx(2 * k, abs=1e-5)
  assert float(moe_lib.aux_loss(text_only, cfg.moe)[0]) == pytest.approx(k, abs=1e-5)


@pytest.mark.parametrize('scope', ['global', 'per_layer'])
def test_aux_loss_matches_hf_mixtral_per_router(scope):
  """The official code's loss: HF Mixtral's function on each router's logits of all layers, attention-masked."""
  cfg = make_cfg('moiie-8-unbalanced', aux_loss_scope=scope)
  x, modality, valid = make_inputs()
  vision = np.asarray(modality * valid, bool).reshape(-1)
  blocks = [make_block(cfg, seed=s, router_std=0.5) for s in (0, 1)]
  stats = [blk(x * (1 + i), modality, valid)[1] for i, blk in enumerate(blocks)]
  want = 0.0
  for router, members in (('gate_vis', vision), ('gate', ~vision)):
    mask = torch.tensor((members & np.asarray(valid, bool).reshape(-1)).reshape(x.shape[:2]).astype(np.float32))
    logits = [torch.tensor(np.asarray(x.reshape(-1, D) * (1 + i) @ getattr(blk, router).kernel[...]))
              for i, blk in enumerate(blocks)]
    if scope == 'global':
      want += float(load_balancing_loss_func(tuple(logits), 5, 2, mask))
    else:
      want += np.mean([float(load_balancing_loss_func((lg,), 5, 2, mask)) for lg in logits])
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats)
  for s in (stats, stacked):
    assert float(moe_lib.aux_loss(s, cfg.moe)[0]) == pytest.approx(want, rel=1e-5)
  loss = moe_lib.weighted_aux_loss(stats, cfg.moe)
  assert float(loss) == pytest.approx(cfg.moe.aux_loss_coef * want, rel=1e-5)


# ------------------------------------------------------------------------------------------------ capacity
@pytest.mark.parametrize('layout', ['moiie-4', 'moiie-8-unbalanced', 'vanilla-4', 'modality-4'])
@pytest.mark.parametrize('rule', ['all_image', 'official'])
def test_capacity_path_equals_reference_when_capacity_is_ample(layout, rule):
  cfg = make_cfg(layout, arch='phi' if layout == 'moiie-8-unbalanced' else 'llama', modality_rule=rule)
  block = make_block(cfg)
  x, modality, valid = make_inputs()
  want = moe_lib.moe_reference(block, x, modality, valid)
  n, moe = x.shape[0] * x.shape[1], cfg.moe
  for cf in (0.0, moe.n_experts / moe.top_k):  # dropless (grouped); C = N
    y, stats = block(x, modality, valid, capacity_factor=cf)
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
    assert float(stats.dropped_fraction) == 0.0
    np.testing.assert_array_equal(block(x, modality, valid, capacity_factor=cf)[0], y)  # no noise: deterministic
  assert moe_lib.expert_capacity(moe, n, moe.n_experts / moe.top_k) == n


def _expected_routing(block, x, modality, valid):
  """Numpy routing: per-router softmax/top-k/renormalise (all_image rule), global expert ids."""
  moe = block.moe
  x2 = np.asarray(x, np.float64).reshape(-1, D)
  vision = np.asarray(modality * valid, bool).reshape(-1)
  (t0, _), (v0, _) = routing.router_ranges(moe)
  experts = np.zeros((len(x2), moe.top_k), int)
  weights = np.zeros((len(x2), moe.top_k))
  for i, row in enumerate(x2):
    router, offset = (block.gate_vis, v0) if vision[i] else (block.gate, t0)
    logits = row @ np.asarray(router.kernel[...], np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p)[:moe.top_k]
    experts[i] = top + offset
    weights[i] = p[top] / p[top].sum()
  return experts, weights


def _ffn_np(block, e, x2):
  ex = block.experts
  g = x2 @ np.asarray(ex.gate_proj.kernel[...][e], np.float64)
  u = x2 @ np.asarray(ex.up_proj.kernel[...][e], np.float64)
  return (g / (1 + np.exp(-g)) * u) @ np.asarray(ex.down_proj.kernel[...][e], np.float64)


@pytest.mark.parametrize('cf', [0.25, 0.5, 1.0])
def test_capacity_drops_exactly_the_expected_slots(cf):
  cfg = make_cfg('moiie-4')
  block = make_block(cfg)
  x, modality, valid = make_inputs()
  moe = cfg.moe
  n = x.shape[0] * x.shape[1]
  c = int(np.ceil(cf * n * moe.top_k / moe.n_experts))  # every expert has c rows
  assert moe_lib.expert_capacity(moe, n, cf) == c
  experts, weights = _expected_routing(block, x, modality, valid)
  routed = np.asarray(valid, bool).reshape(-1)
  fill = np.zeros(moe.n_experts, int)
  kept = np.zeros_like(experts, bool)
  for j in range(moe.top_k):  # first choices of every token before any second choice
    for i in range(n):
      if routed[i] and fill[experts[i, j]] < c:
        kept[i, j] = True
        fill[experts[i, j]] += 1
  x2 = np.asarray(x, np.float64).reshape(-1, D)
  outs = [_ffn_np(block, e, x2) for e in range(moe.n_experts)]
  want = np.zeros_like(x2)
  for i in range(n):
    for j in range(moe.top_k):
      if kept[i, j]:
        want[i] += weights[i, j] * outs[experts[i, j]][i]
  y, stats = block(x, modality, valid, capacity_factor=cf)
  assert kept.sum() < routed.sum() * moe.top_k  # something was dropped
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, atol=1e-5)
  assert float(stats.dropped_fraction) == pytest.approx(1 - kept.sum() / (routed.sum() * moe.top_k))


def test_dispatch_and_collect_vjps_are_transposes():
  experts = jnp.array([[0, 1], [1, 2], [1, 0], [2, 1], [0, 2]])
  routed = jnp.array([True, True, True, False, True])
  a2s, s2a, kept = routing.assign_slots(experts, routed, 3, 2)
  # First choices 0, 1, 1, -, 0 fill experts 0 and 1; second choices: token 0's expert 1 and token 2's expert 0
  # find them full, tokens 1 and 4 take expert 2; token 3 is not routed.
  np.testing.assert_array_equal(kept, [[1, 0], [1, 1], [1, 0], [0, 0], [1, 1]])
  np.testing.assert_array_equal(a2s, [[0, 6], [2, 4], [3, 6], [6, 6], [1, 5]])
  s2n = jnp.where(s2a < 10, s2a // 2, 5)
  x = jax.random.normal(jax.random.key(0), (5, 4))
  y = jax.random.normal(jax.random.key(1), (6, 4))
  jtu.check_grads(lambda x: moe_lib._dispatch(x, s2n, a2s), (x,), order=1, modes=('rev',))
  jtu.check_grads(lambda y: moe_lib._collect(y, a2s, s2a), (y,), order=1, modes=('rev',))


def test_grouped_dropless_layout_and_matmul():
  experts = jnp.array([[0, 1], [1, 2], [1, 0], [2, 1], [0, 2]])
  routed = jnp.array([True, True, True, False, True])
  a2s, s2a, kept, block_expert = routing.assign_grouped(experts, routed, 3, 2, 5)
  # Counts 3, 3, 2 -> padded to 4, 4, 2 rows: expert 0 at rows 0-3, expert 1 at 4-7, expert 2 at 8-9.
  np.testing.assert_array_equal(block_expert, [0, 0, 1, 1, 2])
  np.testing.assert_array_equal(a2s, [[0, 6], [4, 8], [5, 2], [10, 10], [1, 9]])
  np.testing.assert_array_equal(kept, np.asarray(routed)[:, None].repeat(2, 1))
  np.testing.assert_array_equal(s2a, [0, 8, 5, 10, 2, 4, 1, 10, 3, 9])
  x = jax.random.normal(jax.random.key(0), (5, 2, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4))
  sizes = jnp.array([4, 4, 2], jnp.int32)  # the blocked scan (now gmm's 'scan'), on this layout's groups
  blocked = lambda x, w: gmm.grouped_matmul(x.reshape(10, 3), w, sizes, impl='scan', tile_rows=2).reshape(5, 2, 4)
  np.testing.assert_allclose(blocked(x, w), jnp.einsum('QRD,QDF->QRF', x, w[block_expert]), atol=1e-6)
  jtu.check_grads(blocked, (x, w), order=1, modes=('rev',))


# ------------------------------------------------------------------------------------------------ training
def test_gradients_match_the_reference_and_reach_routers_and_experts():
  cfg = make_cfg('moiie-4')
  block = make_block(cfg, router_std=0.5)
  x, modality, valid = make_inputs()
  g = jax.random.normal(jax.random.key(9), x.shape)

  def loss(block, x, cf):
    y = moe_lib.moe_reference(block, x, modality, valid) if cf is None else block(
        x, modality, valid, capacity_factor=cf)[0]
    return jnp.sum(y * g)

  want = nnx.grad(loss, argnums=(0, 1))(block, x, None)
  for cf in (2.0, 0.0):  # capacity layout with C = N, grouped dropless layout
    got = nnx.grad(loss, argnums=(0, 1))(block, x, cf)
    check_grads_equal(got, want)


def check_grads_equal(got, want):
  fast = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(got[0])}
  for p, v in nnx.to_flat_state(want[0]):
    np.testing.assert_allclose(fast[p], v[...], atol=1e-5, rtol=1e-4, err_msg=str(p))
    if p[0] == 'experts':  # every expert gets a gradient
      assert (np.abs(fast[p]).sum(axis=(1, 2)) > 0).all(), p
    else:  # every router weight does
      assert (np.abs(fast[p]) > 0).all(), p
  assert {p[0] for p in fast} == {'experts', 'gate', 'gate_vis'}
  np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('layout', ['dense'] + list(LAYOUTS))
def test_every_variant_trains_a_step(layout):
  cfg = make_cfg('moiie-4' if layout == 'dense' else layout)
  if layout == 'dense':
    cfg = dataclasses.replace(cfg, moe=MoEConfig(variant='dense'))
  model = MLP(cfg, rngs=nnx.Rngs(0)) if layout == 'dense' else make_block(cfg, router_std=0.3)
  x, modality, valid = make_inputs()
  target = jax.random.normal(jax.random.key(3), x.shape)
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  def loss_fn(model):
    if layout == 'dense':
      return jnp.mean((model(x) - target) ** 2)
    y, stats = model(x, modality, valid, capacity_factor=1.5)
    return jnp.mean((y - target) ** 2) + moe_lib.weighted_aux_loss(stats, cfg.moe)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  first = step(model, opt)
  second = loss_fn(model)
  assert np.isfinite(float(first)) and float(second) < float(first)
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert not np.array_equal(before[p], np.asarray(v[...])), p


# ------------------------------------------------------------------------------------------------ placement
@pytest.mark.parametrize('moe_kw, layers', [
    (dict(placement='interleaved', first_layer=1), (1, 3, 5)),
    (dict(placement='interleaved', first_layer=0), (0, 2, 4)),
    (dict(placement='all'), (0, 1, 2, 3, 4, 5)),
    (dict(placement='list', layers=(4, 2, 2)), (2, 4)),
])
def test_placement(moe_kw, layers):
  cfg = dataclasses.replace(make_cfg('moiie-4', **moe_kw), num_hidden_layers=6)
  assert cfg.moe_layers == layers
  assert dataclasses.replace(cfg, moe=MoEConfig(variant='dense')).moe_layers == ()


def test_placement_list_out_of_range_is_an_error():
  cfg = dataclasses.replace(make_cfg('moiie-4', placement='list', layers=(1, 4)), num_hidden_layers=4)
  with pytest.raises(ConfigError, match='layers'):
    cfg.validate()


@pytest.mark.parametrize('placement, scan', [('all', False), ('interleaved', True)])
def test_placement_wires_moe_blocks_into_the_decoder(placement, scan):
  cfg = dataclasses.replace(make_cfg('moiie-4', placement=placement), scan_layers=scan)
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  paths = {'.'.join(map(str, p)) for p in hf_convert.flat_abstract(model)}
  want = cfg.moe_layers
  if not scan:
    have = tuple(i for i in range(4) if f'model.layers.{i}.mlp.experts.gate_up_proj.kernel' in paths
                 or f'model.layers.{i}.mlp.experts.gate_proj.kernel' in paths)
    assert have == want
  ids = jax.random.randint(jax.random.key(2), (2, 8), 1, 64)
  out = model(ids, modality=(jnp.arange(8) < 5).astype(jnp.int32)[None].repeat(2, 0))
  assert out.moe_stats.tokens_per_expert.shape == (len(want), 2, 4)
  aux, _ = moe_lib.aux_loss(out.moe_stats, cfg.moe)
  assert np.isfinite(float(aux)) and float(aux) > 0


def test_bf16_compute_keeps_float32_routing():
  cfg = dataclasses.replace(make_cfg('moiie-4'), dtype='bfloat16')
  block = make_block(cfg)
  x, modality, valid = make_inputs()
  y, stats = block(x.astype(jnp.bfloat16), modality, valid)
  assert y.dtype == jnp.bfloat16 and stats.prob_sums.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32), moe_lib.moe_reference(block, x, modality, valid),
                             atol=0.1, rtol=0.05)


# ------------------------------------------------------------------------------------------------ DeepSpeed's gate
def _deepspeed_top2(logits: np.ndarray, cf: float, min_capacity: int = 0):
  """DeepSpeed's `top2gating` without noise, written from its definition (MoE-LLaVA's gate): returns the combine
  tensor [S, E, C] and l_aux."""
  s, e = logits.shape
  gates = np.exp(logits - logits.max(1, keepdims=True))
  gates /= gates.sum(1, keepdims=True)
  cap = max(int(np.ceil(s / e * (2 * cf))), min_capacity)
  mask1 = np.eye(e)[gates.argmax(1)]
  masked = np.where(mask1 > 0, -np.inf, logits)
  mask2 = np.eye(e)[masked.argmax(1)]
  loc1 = np.cumsum(mask1, 0) - 1
  loc2 = np.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdims=True)  # every first choice before any second
  l_aux = np.mean(gates.mean(0) * mask1.mean(0)) * e * e
  mask1 *= loc1 < cap
  mask2 *= loc2 < cap
  g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
  denom = np.maximum(g1 + g2, np.finfo(np.float32).eps)
  g1, g2 = g1 / denom, g2 / denom
  combine = np.zeros((s, e, cap))
  for i in range(s):
    for g, mask, loc in ((g1, mask1, loc1), (g2, mask2, loc2)):
      if mask[i].any():
        j = int(mask[i].argmax())
        combine[i, j, int(loc[i, j])] += g[i]
  return combine, l_aux


@pytest.mark.parametrize('cf, min_capacity', [(0.5, 0), (0.25, 8), (2.0, 0)])
def test_deepspeed_gate_equals_top2gating_slot_by_slot(cf, min_capacity):
  cfg = make_cfg('vanilla-4', gate='deepspeed', aux_loss_scope='sum', min_capacity=min_capacity)
  block = make_block(cfg)
  x, modality, valid = make_inputs()  # 3 padding positions: DeepSpeed routes them like any token
  n = x.shape[0] * x.shape[1]
  x2 = np.asarray(x, np.float64).reshape(n, D)
  combine, want_aux = _deepspeed_top2(x2 @ np.asarray(block.gate.kernel[...], np.float64), cf, min_capacity)
  c = combine.shape[2]
  assert moe_lib.expert_capacity(cfg.moe, n, cf) == min(c, n)
  # Our slots: the same routing, slot assignment and renormalised weights, laid out as DeepSpeed's [S, E, C].
  vision, routed, _ = (m.reshape(-1) for m in routing.token_masks(modality, valid, cfg.moe))
  assert bool(routed.all())
  r = routing.route(jnp.asarray(x2, jnp.float32), block.gate.kernel[...], None, vision, cfg.moe)
  a2s, _, kept = routing.assign_slots(r.experts, routed, 4, min(c, n))
  w = np.asarray(routing.combine_weights(r, kept, cfg.moe))
  ours = np.zeros((n, 4, c))
  for i in range(n):
    for j in range(2):
      if kept[i, j]:
        slot = int(a2s[i, j])
        ours[i, slot // min(c, n), slot % min(c, n)] = w[i, j]
  np.testing.assert_allclose(ours, combine, atol=1e-6)
  if cf < 2.0:
    assert (combine.sum((1, 2)) < 1 - 1e-6).any() or (combine > 0).sum() < 2 * n  # drops happened
  # The layer's output and its aux loss (scope 'sum' over one layer = GShard's l_aux).
  y, stats = block(x, modality, valid, capacity_factor=cf)
  expert_out = np.stack([np.asarray(moe_lib._ffn(block.experts, e, jnp.asarray(x2, jnp.float32))) for e in range(4)])
  want_y = np.einsum('SEC,ESD->SD', combine, expert_out)
  np.testing.assert_allclose(np.asarray(y).reshape(n, D), want_y, atol=1e-5)
  aux, _ = moe_lib.aux_loss([stats], cfg.moe)
  assert float(aux) == pytest.approx(want_aux, rel=1e-5)


def test_deepspeed_gate_config():
  with pytest.raises(ConfigError, match='top_k'):
    MoEConfig(variant='vanilla', n_vision=0, n_shared=4, n_language=0, top_k=1, gate='deepspeed').validate()
  with pytest.raises(ConfigError, match='gate_noise'):
    MoEConfig(variant='vanilla', n_vision=0, n_shared=4, n_language=0, gate_noise='gumbel').validate()
  with pytest.raises(ConfigError, match='gate'):
    MoEConfig(gate='gshard').validate()
  # Dropless, the deepspeed gate routes padding as well: the oracle agrees.
  cfg = make_cfg('vanilla-4', gate='deepspeed')
  block = make_block(cfg)
  x, modality, valid = make_inputs()
  y, _ = block(x, modality, valid, capacity_factor=0.0)
  np.testing.assert_allclose(y, moe_lib.moe_reference(block, x, modality, valid), atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(y[1, -3:]).max()) > 0  # padding went through the experts


def test_deepspeed_gumbel_second_choice_is_reproducible_and_follows_the_softmax():
  kw = dict(variant='vanilla', n_vision=0, n_shared=4, n_language=0, gate='deepspeed')
  plain, noisy = MoEConfig(**kw), MoEConfig(**kw, gate_noise='gumbel')
  assert plain.gate_noise == 'none'  # off by default
  # 4000 identical tokens: the first choice is always the argmax; by the Gumbel-max trick the second is drawn
  # from the softmax over the other experts.
  n, logits_row = 4000, np.array([2.0, 1.0, 0.5, -1.0], np.float32)
  x = jnp.ones((n, 4), jnp.float32)
  kernel = jnp.asarray(np.diag(logits_row))  # x @ kernel = logits_row for every token
  vision = jnp.zeros(n, bool)
  route = jax.jit(routing.route, static_argnums=(4,))
  r = route(x, kernel, None, vision, noisy)
  experts = np.asarray(r.experts)
  assert (experts[:, 0] == 0).all() and (experts[:, 1] != 0).all()
  p = np.exp(logits_row[1:]) / np.exp(logits_row[1:]).sum()
  freq = np.bincount(experts[:, 1], minlength=4)[1:] / n
  np.testing.assert_allclose(freq, p, atol=0.03)
  # Reproducible under a seed; another seed or another batch draws differently; no noise is plain top-2.
  np.testing.assert_array_equal(np.asarray(route(x, kernel, None, vision, noisy).experts), experts)
  other_seed = route(x, kernel, None, vision, dataclasses.replace(noisy, gate_noise_seed=1)).experts
  other_batch = route(x * 1.5, kernel / 1.5, None, vision, noisy).experts
  assert (np.asarray(other_seed)[:, 1] != experts[:, 1]).any()
  assert (np.asarray(other_batch)[:, 1] != experts[:, 1]).any()
  assert (np.asarray(route(x, kernel, None, vision, plain).experts) == [0, 1]).all()
