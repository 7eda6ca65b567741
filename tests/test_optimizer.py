"""Optimizer: groups from paths, stage presets, frozen groups, per-group Adam lrs, schedule, clipping, accumulation.

The model is a stand-in NNX LVLM with the real top-level names and HF-style paths (B batch, T tokens, D width,
F FFN width, E experts, P pixels per image).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moiie_jax.train import optimizer as opt

D, F, E, P, V = 8, 16, 4, 12, 32


class _DenseMLP(nnx.Module):

  def __init__(self, rngs):
    self.gate_proj = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(F, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class _Experts(nnx.Module):

  def __init__(self, rngs):
    self.gate_up_proj = nnx.Param(0.1 * jax.random.normal(rngs.params(), (E, D, 2 * F)))
    self.down_proj = nnx.Param(0.1 * jax.random.normal(rngs.params(), (E, F, D)))


class _MoE(nnx.Module):
  """Dense soft mixture over all experts: enough to give every expert and router a gradient."""

  def __init__(self, rngs):
    self.gate = nnx.Linear(D, 3, use_bias=False, rngs=rngs)
    self.gate_vis = nnx.Linear(D, 3, use_bias=False, rngs=rngs)
    self.experts = _Experts(rngs)

  def __call__(self, x):  # x: float32[B, T, D]
    w = jnp.concatenate([jax.nn.softmax(self.gate(x), -1), jax.nn.softmax(self.gate_vis(x), -1)[..., :1]], -1)
    gu = jnp.einsum('BTD,EDF->BTEF', x, self.experts.gate_up_proj[...])
    g, u = jnp.split(gu, 2, axis=-1)
    y = jnp.einsum('BTEF,EFD->BTED', nnx.silu(g) * u, self.experts.down_proj[...])
    return jnp.einsum('BTED,BTE->BTD', y, w)


class _Layer(nnx.Module):

  def __init__(self, moe, rngs):
    self.input_layernorm = nnx.RMSNorm(D, rngs=rngs)
    self.self_attn = nnx.Module()
    self.self_attn.q_proj = nnx.Linear(D, D, rngs=rngs)
    self.mlp = _MoE(rngs) if moe else _DenseMLP(rngs)

  def __call__(self, x):
    h = self.input_layernorm(x)
    # Mixing over positions (a stand-in for attention) lets the image position reach the text logits.
    return x + self.self_attn.q_proj(jnp.mean(h, axis=1, keepdims=True)) + self.mlp(h)


class _Decoder(nnx.Module):

  def __init__(self, moe, rngs):
    self.embed_tokens = nnx.Embed(V, D, rngs=rngs)
    self.layers = nnx.List([_Layer(False, rngs), _Layer(moe, rngs)])
    self.norm = nnx.RMSNorm(D, rngs=rngs)


class _LM(nnx.Module):

  def __init__(self, moe, rngs):
    self.model = _Decoder(moe, rngs)
    self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)


class StandIn(nnx.Module):
  """vision_tower / multi_modal_projector / language_model, as the real LVLM."""

  def __init__(self, moe=True, seed=0):
    rngs = nnx.Rngs(seed)
    self.vision_tower = nnx.Module()
    self.vision_tower.patch_embedding = nnx.Linear(P, D, rngs=rngs)
    self.vision_tower.post_layernorm = nnx.LayerNorm(D, rngs=rngs)
    self.multi_modal_projector = nnx.Module()
    self.multi_modal_projector.linear_1 = nnx.Linear(D, D, rngs=rngs)
    self.multi_modal_projector.linear_2 = nnx.Linear(D, D, rngs=rngs)
    self.language_model = _LM(moe, rngs)

  def __call__(self, pixels, tokens):  # float32[B, 1, P], int32[B, T] -> logits float32[B, 1 + T, V]
    v = self.vision_tower.post_layernorm(self.vision_tower.patch_embedding(pixels))
    v = self.multi_modal_projector.linear_2(nnx.gelu(self.multi_modal_projector.linear_1(v)))
    x = jnp.concatenate([v, self.language_model.model.embed_tokens(tokens)], axis=1)
    for layer in self.language_model.model.layers:
      x = layer(x)
    return self.language_model.lm_head(self.language_model.model.norm(x))


def _batch(seed=0, b=2, t=5):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (b, 1, P)), jax.random.randint(k2, (b, t + 1), 0, V)


def _loss(model, batch):
  pixels, tokens = batch
  logits = model(pixels, tokens[:, :-1])[:, 1:].astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _cfg(stage, **kw):
  cfg = opt.get_config(stage)
  cfg.total_steps = 100
  cfg.warmup_ratio = 0.0
  for k, v in kw.items():
    if k.startswith('lr_'):
      cfg.lr[k[3:]] = v
    else:
      cfg[k] = v
  return cfg


def _flat(state):
  return {'.'.join(opt.path_names(p)): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


# Building the model eagerly compiles every init op on its own (seconds on a busy CPU); one jitted init is quicker.
_GRAPHDEF = nnx.split(nnx.eval_shape(StandIn), nnx.Param, ...)[0]
_init = jax.jit(lambda: nnx.split(StandIn(), nnx.Param, ...)[1:])


def _params():
  """(graphdef, params, rest), fresh buffers on every call."""
  return (_GRAPHDEF, *_init())


@jax.jit
def _random_like(tree, seed):
  """Normal noise with the structure of `tree`, a different stream per leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def test_labels_from_paths():
  params = nnx.state(nnx.eval_shape(StandIn), nnx.Param)
  labels = _flat(opt.param_labels(params))
  assert labels['vision_tower.patch_embedding.kernel'] == 'vision_tower'
  assert labels['vision_tower.post_layernorm.scale'] == 'vision_tower'
  assert labels['multi_modal_projector.linear_1.bias'] == 'multi_modal_projector'
  assert labels['language_model.model.layers.1.mlp.experts.gate_up_proj'] == 'experts'
  assert labels['language_model.model.layers.1.mlp.gate.kernel'] == 'routers'
  assert labels['language_model.model.layers.1.mlp.gate_vis.kernel'] == 'routers'
  assert labels['language_model.model.layers.0.mlp.gate_proj.kernel'] == 'language_model'  # dense FFN, not a router
  assert labels['language_model.model.embed_tokens.embedding'] == 'language_model'
  assert labels['language_model.lm_head.kernel'] == 'language_model'
  with pytest.raises(opt.OptimizerConfigError, match=r'image_newline.*no optimizer group'):
    opt.group_of(('image_newline',))


def test_stage_presets_and_overrides():
  assert opt.stage_param_groups('stage1') == {'vision_tower': None, 'multi_modal_projector': 1e-3,
                                              'language_model': None, 'experts': None, 'routers': None}
  s2 = opt.stage_param_groups('stage2', opt.get_config('stage2'))
  assert s2 == {'vision_tower': 2e-6, 'multi_modal_projector': 2e-5, 'language_model': 2e-5, 'experts': 2e-5,
                'routers': 2e-5}
  cfg = opt.get_config('stage2')
  cfg.freeze_vision_tower = True
  assert opt.stage_param_groups('stage2', cfg)['vision_tower'] is None
  assert opt.stage_param_groups('sft_dense') == s2 | {'vision_tower': None}
  assert opt.stage_param_groups('moe_only') == {'vision_tower': None, 'multi_modal_projector': None,
                                                'language_model': None, 'experts': 2e-5, 'routers': 2e-5}
  cfg = _cfg('stage1', lr_multi_modal_projector=5e-4, frozen='language_model', lr_language_model=1e-5)
  groups = opt.stage_param_groups('stage1', cfg)
  assert groups['multi_modal_projector'] == 5e-4 and groups['language_model'] is None  # frozen wins
  with pytest.raises(opt.OptimizerConfigError, match='optimizer.stage'):
    opt.stage_param_groups('stage9')
  with pytest.raises(opt.OptimizerConfigError, match=r'optimizer.frozen.*encoder'):
    opt.stage_param_groups('stage2', _cfg('stage2', frozen='encoder'))
  with pytest.raises(opt.OptimizerConfigError, match='optimizer.lr.routers'):
    opt.stage_param_groups('stage2', _cfg('stage2', lr_routers=-1.0))
  dense_params = nnx.state(nnx.eval_shape(lambda: StandIn(moe=False)), nnx.Param)
  with pytest.raises(opt.OptimizerConfigError, match='nothing would train'):
    opt.make_optimizer(_cfg('moe_only'), dense_params)


def _train_step(graphdef, rest, tx):
  """The functional step the training loop uses: jit, donated (params, opt_state), fp32 master weights."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch):
    loss_fn = lambda p: _loss(nnx.merge(graphdef, opt.cast_params(p, jnp.bfloat16), rest), batch)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def _n_floats(tree):
  return sum(x.size for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


def test_stage1_trains_only_the_connector_and_allocates_no_frozen_state():
  graphdef, params, rest = _params()
  tx, labels = opt.make_optimizer(_cfg('stage1'), params)
  opt_state = tx.init(params)
  connector = sum(x.size for x, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
                  if l == 'multi_modal_projector')
  assert _n_floats(opt_state) == 2 * connector  # Adam mu + nu for the connector, nothing else
  tx2, _ = opt.make_optimizer(_cfg('stage1', grad_accum_steps=2), params)
  assert _n_floats(tx2.init(params)) == 3 * connector  # + the MultiSteps accumulator, again connector only
  before = jax.tree.map(np.array, params)  # host copies: the step donates `params`
  step = _train_step(graphdef, rest, tx)
  params, opt_state, loss = step(params, opt_state, _batch())  # bf16 forward/backward, fp32 update
  assert np.isfinite(loss)
  after, ref = _flat(params), _flat(before)
  for name, group in _flat(labels).items():
    assert after[name].dtype == jnp.float32, name  # the master copy stays fp32
    if group == 'multi_modal_projector':
      assert not np.array_equal(after[name], ref[name]), name
    else:
      np.testing.assert_array_equal(after[name], ref[name], err_msg=name)


def test_first_adam_step_moves_each_group_by_its_lr():
  lrs = dict(vision_tower=1e-3, multi_modal_projector=2e-3, language_model=3e-3, experts=4e-3, routers=5e-3)
  cfg = _cfg('stage2', grad_clip=0.0, **{f'lr_{g}': v for g, v in lrs.items()})
  _, params, _ = _params()
  tx, labels = opt.make_optimizer(cfg, params)
  grads = jax.tree.map(lambda g: g + 0.5 * jnp.sign(g), _random_like(params, 1))  # |g| >= 0.5 >> eps
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  for u, g, label in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(labels)):
    # Bias-corrected first step: m_hat = g, v_hat = g^2, so the update is -lr * g / (|g| + eps) ~ -lr * sign(g).
    np.testing.assert_allclose(u, -lrs[label] * np.sign(g), rtol=1e-5, err_msg=label)


def _hf_cosine(step, total, warmup, peak, floor_ratio=0.0):
  if step < warmup:
    return peak * step / warmup
  progress = (step - warmup) / (total - warmup)
  return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_schedule_warmup_then_cosine():
  cfg = _cfg('stage2', total_steps=1000, warmup_ratio=0.03)  # 30 warmup steps
  sched = opt.learning_rate_schedule(cfg, 'language_model')
  for step in (0, 1, 15, 29, 30, 31, 515, 900, 999, 1000):
    np.testing.assert_allclose(sched(step), _hf_cosine(step, 1000, 30, 2e-5), rtol=1e-5, atol=1e-12)
  assert float(sched(0)) == 0.0 and abs(float(sched(515)) - 1e-5) < 1e-11
  cfg.min_lr_ratio = 0.1
  sched = opt.learning_rate_schedule(cfg, 'vision_tower')
  for step in (10, 30, 400, 1000, 1200):
    np.testing.assert_allclose(sched(step), _hf_cosine(min(step, 1000), 1000, 30, 2e-6, 0.1), rtol=1e-5)
  cfg.freeze_vision_tower = True
  lrs = opt.current_lrs(cfg, 30)
  assert lrs['vision_tower'] == 0.0 and abs(lrs['experts'] - 2e-5) < 1e-12
  np.testing.assert_allclose(opt.learning_rate_schedule(_cfg('stage2', total_steps=1, warmup_ratio=0.5),
                                                       'experts')(0), 2e-5)
  with pytest.raises(opt.OptimizerConfigError, match='optimizer.total_steps'):
    opt.learning_rate_schedule(_cfg('stage2', total_steps=0), 'experts')


def test_learning_rates_as_inputs_are_bit_identical_and_leave_one_program():
  # The loop feeds each update's lrs into the step (optimizer.learning_rates): through warmup, cosine and a floor,
  # with accumulation, that must equal the schedules computing them in the graph to the bit, and the program must
  # be the same for another schedule (peaks, warmup, length), so that such runs reuse one compiled step.
  _, params, _ = _params()

  from conftest import PRODUCTION_EMITTERS  # two programs compared bit for bit

  def run(cfg):
    tx, _ = opt.make_optimizer(cfg, params)

    @functools.partial(jax.jit, compiler_options=PRODUCTION_EMITTERS)
    def update(p, s, g, lrs):
      with opt.given_learning_rates(lrs):
        u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    return tx, update

  kw = dict(total_steps=6, warmup_ratio=0.34, min_lr_ratio=0.1, lr_vision_tower=1e-3, lr_routers=3e-3,
            grad_accum_steps=2)
  cfg = _cfg('stage2', **kw)
  tx, update = run(cfg)
  lrs_at = opt.learning_rates(cfg)
  inside = given = (params, tx.init(params))
  for i in range(12):
    g = _random_like(params, i)
    inside = update(*inside, g, {})
    given = update(*given, g, lrs_at(i // 2))
  jax.tree.map(np.testing.assert_array_equal, inside, given)
  assert not np.array_equal(jax.tree.leaves(given[0])[0], jax.tree.leaves(params)[0])
  assert lrs_at(0)['routers'] == 0.0 and lrs_at(3)['routers'] == np.float32(3e-3)  # warmup: 3 updates
  assert {k: float(v) for k, v in lrs_at(4).items()} == opt.current_lrs(cfg, 4)

  other = _cfg('stage2', **{**kw, 'total_steps': 50, 'warmup_ratio': 0.1, 'lr_routers': 1.0})
  tx2, update2 = run(other)
  lowered = [u.lower(params, t.init(params), params, opt.learning_rates(c)(0)).as_text()
             for t, u, c in ((tx, update, cfg), (tx2, update2, other))]
  assert lowered[0] == lowered[1]


def test_clipping_uses_the_trainable_norm_only():
  _, params, _ = _params()
  labels = jax.tree.leaves(opt.param_labels(params))
  # Connector gradients of global norm 10; frozen gradients far larger, which must not enter the norm.
  grads = [jnp.full(x.shape, 1e6) if l != 'multi_modal_projector' else jnp.ones(x.shape)
           for x, l in zip(jax.tree.leaves(params), labels)]
  n_conn = sum(g.size for g, l in zip(grads, labels) if l == 'multi_modal_projector')
  grads = jax.tree.unflatten(jax.tree.structure(params), [g * 10 / math.sqrt(n_conn) if l == 'multi_modal_projector'
                                                         else g for g, l in zip(grads, labels)])
  for clip, scale in ((1.0, 0.1), (0.0, 1.0), (20.0, 1.0)):
    tx, _ = opt.make_optimizer(_cfg('stage1', grad_clip=clip), params)
    _, state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    mus = [x for x in jax.tree.leaves(state) if x.ndim > 0]  # Adam mu then nu, connector leaves only
    conn_grads = [g for g, l in zip(jax.tree.leaves(grads), labels) if l == 'multi_modal_projector']
    assert len(mus) == 2 * len(conn_grads)
    # After one step mu = (1 - b1) * clipped g.
    got = sorted(float(np.abs(m).max()) for m in mus[:len(conn_grads)])
    want = sorted(float(np.abs(0.1 * scale * g).max()) for g in conn_grads)
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f'clip={clip}')


def test_accumulation_equals_a_step_on_the_mean_gradient():
  _, params, _ = _params()
  # warmup 1 of 10: update 0 runs at lr 0, update 1 at the peak, so the schedule must count updates, not micro-steps.
  kw = dict(total_steps=10, warmup_ratio=0.1, grad_clip=0.5, lr_vision_tower=1e-3, lr_routers=3e-3)
  tx1, _ = opt.make_optimizer(_cfg('stage2', **kw), params)
  tx4, _ = opt.make_optimizer(_cfg('stage2', grad_accum_steps=4, **kw), params)
  micro = [_random_like(params, i) for i in range(8)]

  @jax.jit
  def update(tx_id, p, s, g):
    tx = (tx1, tx4)[tx_id]
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  update = jax.jit(update.__wrapped__, static_argnums=0)
  p1, s1 = params, tx1.init(params)
  for k in range(2):
    mean = jax.tree.map(lambda *g: sum(g) / 4, *micro[4 * k:4 * k + 4])
    p1, s1 = update(0, p1, s1, mean)
  p4, s4 = params, tx4.init(params)
  for i, g in enumerate(micro):
    prev = p4
    p4, s4 = update(1, p4, s4, g)
    if i in (4, 5, 6):  # inside the second accumulation window nothing moves
      jax.tree.map(np.testing.assert_array_equal, p4, prev)
  assert not np.array_equal(jax.tree.leaves(p1)[0], jax.tree.leaves(params)[0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p4, p1)


def test_weight_decay_skips_biases_and_norms():
  _, params, _ = _params()
  tx, _ = opt.make_optimizer(_cfg('stage2', weight_decay=0.1, grad_clip=0.0, lr_vision_tower=2e-5), params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = _flat(jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(zeros, params))
  ref = _flat(params)
  head = 'language_model.lm_head.kernel'
  np.testing.assert_allclose(updates[head], -2e-5 * 0.1 * ref[head], rtol=1e-5)
  np.testing.assert_allclose(updates['language_model.model.layers.1.mlp.experts.down_proj'],
                             -2e-6 * ref['language_model.model.layers.1.mlp.experts.down_proj'], rtol=1e-5)
  for name in ('vision_tower.patch_embedding.bias', 'vision_tower.post_layernorm.scale',
               'language_model.model.norm.scale', 'language_model.model.layers.0.input_layernorm.scale'):
    assert not np.any(updates[name]), name


def test_cast_params_bf16_compute_fp32_master():
  graphdef, params, rest = _params()
  cast = _flat(opt.cast_params(params, jnp.bfloat16))
  assert cast['language_model.lm_head.kernel'].dtype == jnp.bfloat16
  assert cast['vision_tower.post_layernorm.scale'].dtype == jnp.bfloat16
  assert cast['language_model.model.layers.1.mlp.gate.kernel'].dtype == jnp.float32  # routers stay fp32
  mixed = {'w': jnp.ones(3), 'ids': jnp.arange(3)}
  assert opt.cast_params(mixed, jnp.bfloat16)['ids'].dtype == jnp.int32
  batch = _batch()
  loss_fn = lambda p, dtype: _loss(nnx.merge(graphdef, opt.cast_params(p, dtype), rest), batch)
  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
  l32, g32 = loss_and_grad(params, jnp.float32)
  l16, g16 = loss_and_grad(params, jnp.bfloat16)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  np.testing.assert_allclose(l16, l32, rtol=2e-2)
  rel = optax.global_norm(jax.tree.map(jnp.subtract, g16, g32)) / optax.global_norm(g32)
  assert rel < 0.05, rel
  # Why fp32 master weights: updates of 1e-4 vanish in a bf16 copy of 1.0 but accumulate in fp32.
  master, half = jnp.float32(1.0), jnp.bfloat16(1.0)
  for _ in range(10):
    master, half = master + jnp.float32(1e-4), half + jnp.bfloat16(1e-4)
  assert float(half) == 1.0 and abs(float(master) - 1.001) < 1e-6


def test_works_with_nnx_optimizer():
  graphdef, params, rest = _params()
  model = nnx.merge(graphdef, params, rest)
  tx, _ = opt.make_optimizer(_cfg('moe_only'), nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = _flat(jax.tree.map(np.array, nnx.state(model, nnx.Param)))

  @nnx.jit
  def step(model, optimizer, batch):
    optimizer.update(model, nnx.grad(_loss)(model, batch))

  step(model, optimizer, _batch())
  after = _flat(nnx.state(model, nnx.Param))
  labels = _flat(opt.param_labels(nnx.state(model, nnx.Param)))
  for name, group in labels.items():
    assert np.array_equal(after[name], before[name]) == (group not in ('experts', 'routers')), name
