"""Expert parallelism on 8 fake CPU devices: the sharded MoE layer and the sharded training step against
single-device references, the sharding table, and the configuration errors.

Meshes: (data=2, expert=4) and (fsdp=2, expert=4) with 4 experts (1 vision + 2 shared + 1 language), (expert=8)
with 8 experts (2 + 4 + 2). Every mesh has 8 token groups, so the single-device references are shared between
meshes. Ample capacity (dropless) must equal the dropless references; tight capacity must equal MoEBlock's own
capacity path applied per token group (`dispatch.grouped_moe`), which is what the mesh computes.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from moiie_jax.models import moe as moe_lib
from moiie_jax.models.config import ConfigError, LLMConfig, LVLMConfig, MoEConfig, VisionConfig
from moiie_jax.models.lvlm import LVLM
from moiie_jax.parallel import dispatch
from moiie_jax.parallel import mesh as mesh_lib
from moiie_jax.parallel import sharding as sharding_lib
from moiie_jax.train import step as ts
from moiie_jax.train import optimizer as optimizer_lib
from moiie_jax.train import step as step_lib

D, F, B, T = 16, 24, 8, 6
GROUPS = 8
TIGHT = 1.0  # capacity factor that drops some choices with these router weights
LAYOUTS = {'moiie-4': (1, 2, 1), 'moiie-8': (2, 4, 2)}
MESHES = {
    'data2-expert4': ({'data': 2, 'expert': 4}, 'moiie-4'),
    'fsdp2-expert4': ({'fsdp': 2, 'expert': 4}, 'moiie-4'),
    'expert8': ({'expert': 8}, 'moiie-8'),
}


def llm_cfg(layout, **kw) -> LLMConfig:
  nv, ns, nl = LAYOUTS[layout]
  moe = MoEConfig(variant='moiie', n_vision=nv, n_shared=ns, n_language=nl, top_k=2, aux_loss_coef=0.1,
                  z_loss_coef=0.01)
  # The 8-expert layout is Phi-2's (parallel residual, LayerNorm, fc1/fc2 GELU experts with biases).
  phi2 = dict(architecture='phi', hidden_act='gelu_new', partial_rotary_factor=0.5) if layout == 'moiie-8' else {}
  return LLMConfig(vocab_size=64, hidden_size=D, intermediate_size=F, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, moe=moe, **phi2, **kw)


def assert_close(a, b, tol=1e-5, what=''):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol,
                               err_msg=f'{what}{jax.tree_util.keystr(path)}')


# ================================================================================================ the MoE layer
@functools.lru_cache(maxsize=None)
def layer_setup(layout):
  """A block with large router weights (routing far from uniform, so capacity bites) and O(1) outputs; inputs
  with padding. Weights and inputs come from numpy (eager jax ops would each compile on the CPU)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: moe_lib.MoEBlock(llm_cfg(layout), rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  scale = {'gate': 1.0, 'gate_vis': 1.0, 'experts': 0.3}  # experts 0.3: outputs O(1), so 1e-5 is a real bound
  state = jax.tree_util.tree_map_with_path(
      lambda path, a: (scale[optimizer_lib.path_names(path)[0]] * rng.standard_normal(a.shape)).astype(np.float32),
      state)
  x = rng.standard_normal((B, T, D)).astype(np.float32)
  cot = rng.standard_normal((B, T, D)).astype(np.float32)
  modality = (rng.uniform(size=(B, T)) < 0.5).astype(np.int32)
  valid = np.ones((B, T), np.int32)
  valid[1, 4:] = valid[6, 3:] = 0
  return nnx.merge(graphdef, state), graphdef, state, x, cot, modality, valid


def layer_loss(forward, graphdef, cot, state, x):
  block = nnx.merge(graphdef, state)
  y, stats = forward(block, x)
  moe = block.moe
  aux, z = moe_lib.aux_loss(stats, moe)
  return jnp.sum(y * cot) + moe.aux_loss_coef * aux + moe.z_loss_coef * z, (y, aux, z, stats)


def value_and_grads(forward, graphdef, cot, state, x):
  (_, out), grads = jax.value_and_grad(functools.partial(layer_loss, forward, graphdef, cot), argnums=(0, 1),
                                       has_aux=True)(state, x)
  return out, grads


@functools.lru_cache(maxsize=None)
def layer_reference(layout):
  """Single device: (dropless MoEBlock, grouped tight-capacity MoEBlock) outputs and grads, and the oracle."""
  block, graphdef, state, x, cot, modality, valid = layer_setup(layout)

  @jax.jit
  def run(state, x):
    dropless = lambda blk, x: moe_lib.MoEBlock.__call__(blk, x, modality, valid, capacity_factor=0.0)
    tight = lambda blk, x: dispatch.grouped_moe(blk, x, modality, valid, GROUPS, capacity_factor=TIGHT)
    oracle = moe_lib.moe_reference(nnx.merge(graphdef, state), x, modality, valid)
    return (value_and_grads(dropless, graphdef, cot, state, x), value_and_grads(tight, graphdef, cot, state, x),
            oracle)

  return run(state, x)


@pytest.mark.parametrize('name', list(MESHES))
def test_sharded_layer_equals_single_device(name):
  axes, layout = MESHES[name]
  block, graphdef, state, x, cot, modality, valid = layer_setup(layout)
  mesh = mesh_lib.make_mesh(axes)
  plan = dispatch.ExpertParallel(mesh)
  assert plan.groups == GROUPS and plan.ep == {'moiie-4': 4, 'moiie-8': 8}[layout]

  @jax.jit
  def run(state, x):
    ample = lambda blk, x: dispatch.moe_forward(blk, x, modality, valid, plan, capacity_factor=0.0)
    tight = lambda blk, x: dispatch.moe_forward(blk, x, modality, valid, plan, capacity_factor=TIGHT)
    return value_and_grads(ample, graphdef, cot, state, x), value_and_grads(tight, graphdef, cot, state, x)

  # Expert weights live split over `expert` (and `fsdp`), as in training.
  state = jax.device_put(state, sharding_lib.param_shardings(state, mesh))
  (ample, ample_grads), (tight, tight_grads) = run(state, x)
  (ref, ref_grads), (ref_tight, ref_tight_grads), oracle = layer_reference(layout)

  # Ample capacity: output = the dropless oracle; aux/z loss, statistics and gradients = single-device MoEBlock.
  np.testing.assert_allclose(ample[0], oracle, atol=1e-5)
  assert float(ample[3].dropped_fraction) == 0.0
  assert_close(ample, ref, what='dropless ')
  assert_close(ample_grads, ref_grads, what='dropless grads ')
  # Tight capacity: choices really are dropped, and exactly as MoEBlock drops them within each token group.
  assert 0.05 < float(tight[3].dropped_fraction) < 0.6
  assert np.abs(np.asarray(tight[0]) - np.asarray(ample[0])).max() > 0.1
  assert_close(tight, ref_tight, what='tight ')
  assert_close(tight_grads, ref_tight_grads, what='tight grads ')
  # A token only reaches experts its modality may use: no text choice on a vision expert, no image choice on a
  # language expert.
  nv, _, nl = LAYOUTS[layout]
  per_modality = np.asarray(ample[3].tokens_per_expert)  # [text, image] x E
  assert per_modality[0, :nv].sum() == 0 and per_modality[1, -nl:].sum() == 0 and per_modality.sum() > 0
  # The gradient w.r.t. the sharded expert weights keeps their layout (no gathered copy comes back).
  kernel_grad = ample_grads[0]['experts']['fc1' if block.cfg.mlp_kind == 'gelu' else 'gate_proj']['kernel']
  assert kernel_grad[...].sharding.spec[0] == 'expert'


# ================================================================================================ the whole model
def lvlm_cfg(layout):
  vision = VisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                        image_size=8, patch_size=4)
  return LVLMConfig(llm=llm_cfg(layout), vision=vision, image_token_id=64)


def make_batch(seed=0, b=B, t=10):
  """Rows with 4 image tokens at positions 1-4, answers from position 5 on, some right padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 64, (b, t)).astype(np.int32)
  ids[:, 1:5] = 64
  mask = np.ones((b, t), np.int32)
  mask[2, 7:] = 0
  mask[5, 8:] = 0
  labels = np.where((np.arange(t) >= 5) & (mask == 1), ids, -100).astype(np.int32)
  return dict(input_ids=ids, labels=labels, attention_mask=mask,
              pixel_values=rng.normal(size=(b, 8, 8, 3)).astype(np.float32))


@functools.lru_cache(maxsize=None)
def model_setup(layout, capacity_factor):
  """(cfg, graphdef, params as numpy). Weights are drawn with numpy into the abstract model's shapes (an init
  under jit costs as much to compile as a training step on this CPU); routers are sharp so capacity bites."""
  cfg = lvlm_cfg(layout)
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(
      cfg.llm, moe=dataclasses.replace(cfg.llm.moe, capacity_factor=capacity_factor)))
  graphdef, params = nnx.split(nnx.eval_shape(lambda: LVLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  rng = np.random.default_rng(0)

  def draw(path, a):
    names = optimizer_lib.path_names(path)
    if 'norm' in '.'.join(names):
      return (1.0 + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
    std = 3.0 if names[-2] in ('gate', 'gate_vis') else 0.1
    return (std * rng.standard_normal(a.shape)).astype(np.float32)

  return cfg, graphdef, jax.tree_util.tree_map_with_path(draw, params)


def adamw_config():
  opt = optimizer_lib.get_config('stage2')
  opt.total_steps, opt.warmup_ratio = 10, 0.0
  opt.lr = ml_collections.ConfigDict({g: 1e-3 for g in optimizer_lib.GROUPS})
  return opt


@pytest.mark.parametrize('name, capacity, optimizer', [
    ('data2-expert4', 0.0, 'sgd'),  # dropless: == the plain single-device step; SGD(lr=1) exposes the gradients
    ('fsdp2-expert4', TIGHT, 'sgd'),  # tight capacity: == the single-device capacity path per token group
    ('expert8', 0.0, 'adamw'),  # 8 experts on 8 devices, the project's optimizer, two steps
])
def test_sharded_train_step_equals_single_device(name, capacity, optimizer):
  axes, layout = MESHES[name]
  cfg, graphdef, params = model_setup(layout, capacity)
  # AdamW with clipping, as `make_optimizer` builds per group (one group here keeps the compile small on 2 cores;
  # the per-group state layout is covered by test_opt_state_follows_params).
  tx = optax.sgd(1.0) if optimizer == 'sgd' else optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  batches = [make_batch(0), make_batch(1)][:1 if optimizer == 'sgd' else 2]

  if capacity > 0:
    reference = ts.make_grouped_train_step(graphdef, tx, cfg, params, GROUPS)
  else:
    reference = jax.jit(step_lib.make_train_step(graphdef, tx, cfg))
  ref_params, ref_opt = params, jax.jit(tx.init)(params)
  ref_metrics = []
  for batch in batches:
    ref_params, ref_opt, metrics = reference(ref_params, ref_opt, batch)
    ref_metrics.append(metrics)

  mesh = mesh_lib.make_mesh(axes)
  step = ts.make_sharded_train_step(graphdef, tx, cfg, mesh, params, batches[0])
  p, o = step.init(params)
  for batch, want in zip(batches, ref_metrics):
    p, o, metrics = step(p, o, step.shard_batch(batch))
    for key in ('loss', 'ce_loss', 'aux_loss', 'z_loss', 'grad_norm'):
      np.testing.assert_allclose(metrics[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert_close(metrics['moe_stats'], want['moe_stats'], what='moe_stats ')
  dropped = float(metrics['moe_stats'].dropped_fraction.max())  # [MoE layers]
  assert (dropped > 0.02) if capacity > 0 else dropped == 0.0
  # SGD(lr=1): params - new params = the gradient, so this compares gradients; AdamW: parameters after 2 steps.
  # A key bias (Phi-2's k_proj.bias) shifts every score of a query by the same q . b, which the softmax ignores: its
  # gradient is 0 up to rounding, and AdamW turns that rounding noise into +-lr steps whose sign differs between
  # two summation orders. It is compared with the tolerance of one such step.
  def k_bias(path):
    return 'k_proj' in jax.tree_util.keystr(path) and 'bias' in jax.tree_util.keystr(path)
  got = jax.tree_util.tree_flatten_with_path(p)[0]
  want = jax.tree.leaves(ref_params)
  for (path, a), b in zip(got, want):
    tol = 2e-3 if optimizer == 'adamw' and k_bias(path) else 1e-5
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=1e-5,
                               err_msg=f'params {jax.tree_util.keystr(path)}')
  moved = max(np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))
  assert moved > 1e-4
  # The state stays in its layout: expert weights split over `expert`, Adam moments like their parameters.
  first = 'fc1' if cfg.llm.mlp_kind == 'gelu' else 'gate_proj'
  experts = p['language_model']['model']['layers'][1]['mlp']['experts'][first]['kernel'][...]
  assert experts.sharding.spec[0] == 'expert'
  assert experts.addressable_shards[0].data.shape[0] == cfg.llm.moe.n_experts // mesh.shape['expert']
  if optimizer == 'adamw':
    for leaf, want in zip(jax.tree.leaves(o), jax.tree.leaves(step.opt_state_sharding)):
      assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


# ================================================================================================ sharding table
FAMILIES = {  # LLMConfig fields of each decoder family the table must cover (moiie-8 is Phi-2 already)
    'llama': ('moiie-4', {}), 'phi': ('moiie-8', {}),
    'stablelm': ('moiie-4', dict(architecture='stablelm', use_qkv_bias=True, partial_rotary_factor=0.25)),
    'qwen2': ('moiie-4', dict(architecture='qwen2')),
}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_sharding_table_covers_every_parameter_and_agrees_with_the_model(family):
  layout, fields = FAMILIES[family]
  for scan in (False, True):
    cfg = lvlm_cfg(layout)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, scan_layers=scan, **fields))
    assert cfg.llm.architecture == family
    abstract = nnx.eval_shape(lambda: LVLM(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    checked = 0
    for path, var in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]:
      names = optimizer_lib.path_names(path)
      axes = sharding_lib.logical_axes(names, var.ndim)  # raises for a parameter without a rule
      declared = sharding_lib.annotated_axes(var)
      if declared is not None:
        assert axes == declared, names
        checked += 1
    assert checked >= 15  # the decoder's annotated parameters, routers and experts included
  mesh = mesh_lib.make_mesh({'fsdp': 2, 'expert': 4})
  assert mesh_lib.spec_for(('expert', 'embed', 'mlp'), mesh, (4, 16, 24)) == jax.sharding.PartitionSpec(
      'expert', 'fsdp', None)
  assert mesh_lib.spec_for(('embed', 'heads'), mesh, (16, 16)) == jax.sharding.PartitionSpec(('fsdp', 'expert'), None)
  assert mesh_lib.spec_for(('embed', None), mesh, (12, 3)) == jax.sharding.PartitionSpec('fsdp', None)


def test_opt_state_follows_params():
  cfg, _, params = model_setup('moiie-4', 0.0)
  mesh = mesh_lib.make_mesh({'fsdp': 2, 'expert': 4})
  tx = optimizer_lib.make_optimizer(adamw_config(), params)[0]
  shardings = sharding_lib.opt_state_shardings(jax.eval_shape(tx.init, params), params, mesh)
  leaves = jax.tree_util.tree_flatten_with_path(shardings)[0]
  specs = {'.'.join(optimizer_lib.path_names(p)): s.spec for p, s in leaves}
  mu = [k for k in specs if k.endswith('experts.down_proj.kernel') and '.mu.' in f'.{k}.']
  assert mu and specs[mu[0]] == jax.sharding.PartitionSpec('expert', None, 'fsdp')
  counts = [s for k, s in specs.items() if k.endswith('count')]
  assert counts and all(s == jax.sharding.PartitionSpec() for s in counts)


# ================================================================================================ errors
def test_mesh_errors_name_the_problem():
  with pytest.raises(ConfigError, match='needs 16 devices, more than the 8'):
    mesh_lib.make_mesh({'data': 2, 'expert': 8})
  with pytest.raises(ConfigError, match='fewer than the 8'):
    mesh_lib.make_mesh({'expert': 4})
  with pytest.raises(ConfigError, match='only one axis may be -1'):
    mesh_lib.make_mesh({'data': -1, 'expert': -1})
  with pytest.raises(ConfigError, match=r'mesh.expert=-1: the other axes use 3 devices'):
    mesh_lib.make_mesh({'data': 3, 'expert': -1})
  with pytest.raises(ConfigError, match=r"unknown axes \['model'\]"):
    mesh_lib.make_mesh({'model': 2})
  with pytest.raises(ConfigError, match='mesh.tensor=0'):
    mesh_lib.make_mesh({'tensor': 0})
  mesh = mesh_lib.make_mesh({'data': 2, 'expert': -1})
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}


def test_experts_not_divisible_by_the_expert_axis():
  mesh = mesh_lib.make_mesh({'expert': 8})
  cfg, graphdef, params = model_setup('moiie-4', 0.0)
  with pytest.raises(ConfigError, match='4 experts .* do not split over mesh.expert=8'):
    ts.make_sharded_train_step(graphdef, optax.sgd(1.0), cfg, mesh, params, make_batch())
  block, *_ = layer_setup('moiie-4')
  x = np.zeros((B, T, D))
  with pytest.raises(ConfigError, match='divisible by the expert axis size'):
    dispatch.moe_forward(block, x, np.zeros((B, T), np.int32), np.ones((B, T)), dispatch.ExpertParallel(mesh))


def test_batch_not_divisible_by_the_batch_axes():
  mesh = mesh_lib.make_mesh({'data': 2, 'expert': 4})
  cfg, graphdef, params = model_setup('moiie-4', 0.0)
  with pytest.raises(ConfigError, match=r"batch\['input_ids'\]: batch size 6 is not divisible by the 8 batch shards"):
    ts.make_sharded_train_step(graphdef, optax.sgd(1.0), cfg, mesh, params, make_batch(b=6))
  with pytest.raises(ConfigError, match='batch size 4 is not divisible by the 8 token groups'):
    block, *_ = layer_setup('moiie-4')
    dispatch.moe_forward(block, np.zeros((4, T, D)), np.zeros((4, T), np.int32), np.ones((4, T)),
                         dispatch.ExpertParallel(mesh))


def test_dense_fsdp_step_all_reduces_no_more_than_its_gradients():
  """Activations stay split over the batch axes (models/partitioning.py pins them on a mesh). Unpinned, XLA's
  propagation splits the scanned dense decoder's residual stream like its FSDP weights and all-reduces every
  matmul's output: 25.5 MB per device here, 20x the gradients (on v5p-64, Phi-3 dense: 2 TB per chip a step)."""
  from moiie_jax.parallel import hlo_stats
  from moiie_jax.train import aot, loop, recipe
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = recipe.load(os.path.join(root, 'configs', 'phi3_mini_moiie.py:stage=2,variant=dense,runlocal=True'))
  c.mesh.fsdp, c.data.batch_size, c.global_batch_size, c.mesh_devices = 8, 8, 16, 0
  c.model.scan_layers, c.model.remat = True, True
  t = loop.build_training(c, devices=jax.devices()[:8], abstract=True)
  text = t.step.step.lower(*aot.abstract_args(t)).compile().as_text()
  moved = hlo_stats.analyze(text).collective_bytes.get('all-reduce', 0.0)
  gradients = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t.params))  # f32, whole
  assert 0 < moved <= 2 * gradients, (moved, gradients)


def test_remat_does_not_repeat_the_expert_exchange():
  """With layers recomputed in the backward pass (remat 'full'), what the all-to-alls received is kept
  (partitioning.EXCHANGED), so the step runs as many all-to-alls as without remat: 2 there and back, forward and
  backward, not 2 more for the recomputation. Same loss."""
  import re
  cfg, _, params = model_setup('moiie-4', TIGHT)
  mesh = mesh_lib.make_mesh({'data': 2, 'expert': 4})
  batch = make_batch(0)
  counts, losses = {}, {}
  for remat in (False, True):
    c = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, remat=remat, remat_policy='full'))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LVLM(c, rngs=nnx.Rngs(0))))
    step = step_lib.make_sharded_train_step(graphdef, optax.sgd(1.0), c, mesh, params, batch, donate=False)
    p, o = step.init(params)
    compiled = step.step.lower(p, o, step.shard_batch(batch), {}).compile()
    counts[remat] = len(re.findall(r'%all-to-all[.0-9]* = ', compiled.as_text()))
    losses[remat] = float(compiled(p, o, step.shard_batch(batch), {})[2]['loss'])
  assert counts[True] == counts[False] >= 4, counts
  assert losses[True] == pytest.approx(losses[False], rel=1e-6)
