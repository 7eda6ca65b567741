"""Grouped matmul backends and the dropless expert layer on them: every backend against a plain per-group loop, the
dropless MoEBlock on every backend against `moe_reference`, the expert-parallel dropless exchanges against the
single-device layer, and a TPU compile (megablox kernel + ragged all-to-all) on this CPU host through libtpu.

Tiny shapes (D=16, F=24; a grouped matmul of 40 rows) and fp32 throughout; megablox runs in Pallas interpret mode.
"""

import collections
import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from moiie_jax.models import config as config_lib
from moiie_jax.models import gmm
from moiie_jax.models import moe as moe_lib
from moiie_jax.models.config import ConfigError, LLMConfig, MoEConfig
from moiie_jax.parallel import dispatch
from moiie_jax.parallel import mesh as mesh_lib
from moiie_jax.parallel import sharding as sharding_lib

IMPLS = ('scan', 'ragged_dot', 'megablox')
D, F = 16, 24
LAYOUTS = {  # name: (variant, n_vision, n_shared, n_language); top_k = 2 everywhere
    'moiie-1+2+1': ('moiie', 1, 2, 1),
    'moiie-2+2+4': ('moiie', 2, 2, 4),
    'moiie-3+3+2': ('moiie', 3, 3, 2),
    'vanilla-4': ('vanilla', 0, 4, 0),
    'vanilla-8': ('vanilla', 0, 8, 0),
    'modality-2+2': ('modality', 2, 0, 2),
    'modality-3+5': ('modality', 3, 0, 5),
}
# Each layout with one expert form: llama SwiGLU with biases, without, or Phi-3's fused gate_up_proj.
# The expert FFN of each layout: SwiGLU (llama, with biases, or phi3's fused gate_up) or Phi-2's GELU fc1/fc2.
FORMS = {'moiie-1+2+1': 'llama+bias', 'moiie-2+2+4': 'phi3', 'moiie-3+3+2': 'phi', 'vanilla-4': 'phi3',
         'vanilla-8': 'phi', 'modality-2+2': 'llama', 'modality-3+5': 'phi3'}


# ================================================================================================ grouped_matmul
M, K, N, G = 40, 64, 128, 4
SIZES = {
    'uneven, empty groups, padding rows': [11, 0, 21, 0],
    'one group holds every row': [0, 0, 40, 0],
    'all empty': [0, 0, 0, 0],
    'tile-straddling': [3, 9, 1, 27],
}


def group_loop(x, w, sizes):
  """The oracle: rows [start_g, end_g) through w[g], in float64; rows past the last group stay 0."""
  out = np.zeros((x.shape[0], w.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = x[start:start + size] @ w[g]
    start += size
  return out


def test_scan_tiles_by_shape_and_platform():
  # R ~ M / (2G) on a CPU (at most 1024), ~ M / G on a GPU (at most 4096); r = R / 4, at least 8 rows.
  assert gmm.scan_tiles(8192, 4) == gmm.Tiles(1024, 256)  # the full default layer on a CPU
  assert gmm.scan_tiles(64, 4) == gmm.Tiles(8, 8)
  assert gmm.scan_tiles(10 ** 6, 4) == gmm.Tiles(1024, 256)
  with gmm.target_platform('cuda'):
    assert gmm.scan_tiles(16384, 4) == gmm.Tiles(4096, 1024)  # the Phi-3-mini layer, measured on an H200
    assert gmm.scan_tiles(8192, 4) == gmm.Tiles(2048, 512)
    assert gmm.scan_tiles(10 ** 6, 4) == gmm.Tiles(4096, 1024)


# The scan backend with one tile size (one loop), and with whole tiles of 16 rows and remainder tiles of 4 (two
# loops: groups of 0, 1, 3, 9, 11, 21, 27 and 40 rows give every mix of whole and remainder tiles).
@pytest.mark.parametrize('impl,tiles', [('scan', 8), ('scan', (16, 4)), ('ragged_dot', None), ('megablox', None)])
def test_grouped_matmul_equals_a_loop_over_groups(impl, tiles):
  rng = np.random.default_rng(0)
  x, w, cot = (rng.standard_normal(s).astype(np.float32) for s in ((M, K), (G, K, N), (M, N)))

  @jax.jit
  def run(x, w, sizes):
    f = lambda x, w: gmm.grouped_matmul(x, w, sizes, impl=impl, tile_rows=tiles)
    return f(x, w), jax.grad(lambda x, w: jnp.sum(f(x, w) * cot), argnums=(0, 1))(x, w)

  x64, w64, cot64 = (a.astype(np.float64) for a in (x, w, cot))
  for name, sizes in SIZES.items():
    y, (dx, dw) = run(x, w, np.asarray(sizes, np.int32))
    # d/dx sum(cot * y) = cot_g @ w[g].T on group g's rows; d/dw[g] = x_g.T @ cot_g: the loop applied to the
    # transposed problem, which is what an exact VJP of a per-group loop is.
    want_dx = group_loop(cot64, w64.transpose(0, 2, 1), sizes)
    ends = np.cumsum(sizes)
    want_dw = np.stack([x64[e - s:e].T @ cot64[e - s:e] for s, e in zip(sizes, ends)])
    for got, want, what in ((y, group_loop(x64, w64, sizes), 'y'), (dx, want_dx, 'dx'), (dw, want_dw, 'dw')):
      np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5, err_msg=f'{impl} {name} {what}')
    assert np.all(np.asarray(y)[ends[-1]:] == 0) and np.all(np.asarray(dx)[ends[-1]:] == 0)  # padding rows


ON_HOPPER = jax.default_backend() == 'gpu' and gmm.is_hopper(jax.devices()[0].device_kind)


def test_mosaic_gpu_names_what_it_needs():
  # Checked before any kernel is built, so on every platform.
  x, w, sizes = jnp.zeros((40, 128), jnp.bfloat16), jnp.zeros((4, 128, 256), jnp.bfloat16), jnp.zeros(4, jnp.int32)
  if not ON_HOPPER:
    with pytest.raises(ConfigError, match=rf"mosaic_gpu.*Hopper GPU \(H100/H200\) only.*platform is {gmm.platform()}"):
      gmm.grouped_matmul(x, w, sizes, impl='mosaic_gpu')
  with gmm.target_platform('gpu'):
    with pytest.raises(ConfigError, match=r"mosaic_gpu.*bfloat16 or float16.*float32"):
      gmm.grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32), sizes, impl='mosaic_gpu')
    with pytest.raises(ConfigError, match=r"mosaic_gpu.*multiples of 128.*\(4, 64, 256\)"):
      gmm.grouped_matmul(x[:, :64], w[:, :64], sizes, impl='mosaic_gpu')


@pytest.mark.skipif(not ON_HOPPER, reason='Mosaic GPU kernels run on an H100/H200 only (no interpret mode)')
def test_mosaic_gpu_equals_a_loop_over_groups():
  # bf16 products against the float64 loop: 1000 rows (not a multiple of the kernels' 128), an empty group and
  # padding rows past the last group; forward, dX and dW through the custom VJP.
  rng = np.random.default_rng(0)
  m, k, n, sizes = 1000, 256, 384, [300, 0, 411, 250]
  x, w, cot = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (4, k, n), (m, n)))
  w *= 0.05
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)

  @jax.jit
  def run(x, w, sizes):
    f = lambda x, w: gmm.grouped_matmul(x, w, sizes, impl='mosaic_gpu')
    return f(x, w), jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * cot), argnums=(0, 1))(x, w)

  y, (dx, dw) = run(bf(x), bf(w), np.asarray(sizes, np.int32))
  x64, w64, cot64 = (np.asarray(bf(a), np.float64) for a in (x, w, cot))  # the operands as the kernels see them
  ends = np.cumsum(sizes)
  want_dw = np.stack([x64[e - s:e].T @ cot64[e - s:e] for s, e in zip(sizes, ends)])
  want_dx = group_loop(cot64, w64.transpose(0, 2, 1), sizes)
  for got, want, what in ((y, group_loop(x64, w64, sizes), 'y'), (dx, want_dx, 'dx'), (dw, want_dw, 'dw')):
    got = np.asarray(got, np.float64)
    assert np.max(np.abs(got - want)) <= 2e-2 * np.max(np.abs(want)), what  # bf16 outputs: 8 bits of mantissa
  assert np.all(np.asarray(y, np.float32)[ends[-1]:] == 0) and np.all(np.asarray(dx, np.float32)[ends[-1]:] == 0)


def test_auto_follows_the_target_platform():
  assert gmm.platform() == 'cpu' and gmm.resolve('auto') == 'scan'
  with gmm.target_platform('tpu'):
    assert gmm.resolve('auto') == 'megablox' and gmm.resolve('ragged_dot') == 'ragged_dot'
    with gmm.target_platform('cuda'):
      assert gmm.platform() == 'gpu' and gmm.resolve('auto') == 'ragged_dot'
    assert gmm.resolve('auto') == 'megablox'
  assert gmm.resolve('auto') == 'scan'
  with pytest.raises(ConfigError, match='grouped_matmul'):
    gmm.resolve('pallas')


def test_config_field_is_validated_and_round_trips(tmp_path):
  with pytest.raises(ConfigError, match='grouped_matmul'):
    MoEConfig(variant='moiie', grouped_matmul='cutlass').validate()
  cfg = LLMConfig(hidden_size=D, intermediate_size=F, moe=MoEConfig(variant='moiie', grouped_matmul='megablox'))
  config_lib.save_json(cfg, str(tmp_path / 'config.json'))
  assert config_lib.load_json(str(tmp_path / 'config.json')) == cfg
  # A config.json written before the field existed loads with the default.
  old = config_lib.to_dict(cfg)
  del old['moe']['grouped_matmul']
  (tmp_path / 'old.json').write_text(json.dumps({'type': 'LLMConfig', **old}))
  assert config_lib.load_json(str(tmp_path / 'old.json')).moe.grouped_matmul == 'auto'


# ================================================================================================ the dropless layer
def layer_cfg(layout, impl='auto') -> LLMConfig:
  variant, nv, ns, nl = LAYOUTS[layout]
  form = FORMS[layout]
  moe = MoEConfig(variant=variant, n_vision=nv, n_shared=ns, n_language=nl, top_k=2, capacity_factor=0.0,
                  grouped_matmul=impl)
  arch = form.split('+')[0]
  return LLMConfig(architecture=arch, vocab_size=64, hidden_size=D, intermediate_size=F,
                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, mlp_bias=form.endswith('bias'),
                   hidden_act='gelu_new' if arch == 'phi' else 'silu', moe=moe)


def block_def(layout, impl='auto'):
  """The graphdef of `layout`'s block with grouped matmul `impl` (a static config field, so one graphdef each;
  the parameters are the same)."""
  return nnx.graphdef(nnx.eval_shape(lambda: moe_lib.MoEBlock(layer_cfg(layout, impl), rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=None)
def layer_setup(layout, b=2, t=12):
  """(state, x, modality, valid, cot) as numpy: sharp routers (distinct top-k), O(1) expert outputs, nonzero
  biases, text and image runs, 3 padding positions (as test_moe.make_inputs; not imported: torch comes with it)."""
  state = nnx.state(nnx.eval_shape(lambda: moe_lib.MoEBlock(layer_cfg(layout), rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  scale = lambda path: 1.0 if str(path[0].key).startswith('gate') else 0.3
  state = jax.tree_util.tree_map_with_path(
      lambda path, a: (scale(path) * rng.standard_normal(a.shape)).astype(np.float32), state)
  x = rng.standard_normal((b, t, D)).astype(np.float32)
  cot = rng.standard_normal((b, t, D)).astype(np.float32)
  modality = np.zeros((b, t), np.int32)
  modality[0, 2:7] = modality[1, :4] = 1
  valid = np.ones((b, t), np.int32)
  valid[1, -3:] = 0
  return state, x, modality, valid, cot


def fast_compile(fn, *args):
  """jit(fn) compiled for `args` with XLA's backend optimisations off: these tests compare numbers within 1e-5 and
  spend most of their time compiling tiny programs (about half of it goes with this). With the library's own
  emitters (conftest.PRODUCTION_EMITTERS): the fused FFN is checked bit for bit against the projections one by one."""
  from conftest import PRODUCTION_EMITTERS
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0, **PRODUCTION_EMITTERS})


def output_and_grads(forward, graphdef, cot):
  """(state, x) -> (y, (d state, d x)) of sum(y * cot), y = forward(block, x)."""
  def run(state, x):
    loss = lambda state, x: (lambda y: (jnp.sum(y * cot), y))(forward(nnx.merge(graphdef, state), x))
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
    return y, grads
  return run


def assert_trees_close(got, want, what):
  flat, _ = jax.tree_util.tree_flatten_with_path(got)
  for (path, a), b in zip(flat, jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5,
                               err_msg=f'{what}{jax.tree_util.keystr(path)}')


@functools.lru_cache(maxsize=None)
def reference(layout):
  """moe_reference's output and gradients (w.r.t. every parameter and the input), shared by the backends."""
  state, x, modality, valid, cot = layer_setup(layout)
  run = output_and_grads(lambda blk, x: moe_lib.moe_reference(blk, x, modality, valid), block_def(layout), cot)
  return fast_compile(run, state, x)(state, x)


# Every backend sees all three variants and both expert counts; every layout runs on one backend at least (not all
# on all: each case is seconds of compiling, megablox's interpreted kernels most).
@pytest.mark.parametrize('impl, layout', [
    ('scan', 'moiie-1+2+1'), ('scan', 'vanilla-8'), ('scan', 'modality-2+2'), ('scan', 'modality-3+5'),
    ('ragged_dot', 'moiie-3+3+2'), ('ragged_dot', 'vanilla-4'), ('ragged_dot', 'modality-3+5'),
    ('megablox', 'moiie-1+2+1'), ('megablox', 'moiie-2+2+4'), ('megablox', 'vanilla-8'), ('megablox', 'modality-3+5'),
])
def test_dropless_layer_equals_the_reference(impl, layout):
  state, x, modality, valid, cot = layer_setup(layout)
  run = output_and_grads(lambda blk, x: blk(x, modality, valid, capacity_factor=0.0)[0], block_def(layout, impl), cot)
  y, grads = fast_compile(run, state, x)(state, x)
  want, want_grads = reference(layout)
  assert np.abs(np.asarray(want)).max() > 0.1 and np.all(np.asarray(want)[1, -3:] == 0)  # O(1), padding unrouted
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-5, rtol=1e-5)
  assert_trees_close(grads, want_grads, f'{impl} {layout} grads ')


@pytest.mark.parametrize('layout', ['moiie-1+2+1', 'moiie-2+2+4', 'moiie-3+3+2', 'modality-2+2'])
def test_fused_expert_ffn_equals_the_projections_one_by_one(layout):
  # The scan backend runs each expert's FFN fused per row tile (gmm.grouped_ffn): the same [R, ...] products and
  # elementwise operations as one grouped matmul per projection, so the same output and gradients to the bit, but
  # the biases' gradients (summed per tile instead of over all rows at once).
  state, x, modality, valid, cot = layer_setup(layout)
  forward = lambda blk, x: blk(x, modality, valid, capacity_factor=0.0)[0]
  fused = output_and_grads(forward, block_def(layout, 'scan'), cot)

  def apart(state, x):
    with moe_lib.separate_projections():  # read at trace time
      return fused(state, x)

  got, want = fast_compile(fused, state, x)(state, x), fast_compile(apart, state, x)(state, x)
  flat, _ = jax.tree_util.tree_flatten_with_path(got)
  assert len(flat) == len(jax.tree.leaves(want))
  for (path, a), b in zip(flat, jax.tree.leaves(want)):
    if 'bias' in jax.tree_util.keystr(path):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f'{layout} {jax.tree_util.keystr(path)}')


@pytest.mark.parametrize('tiles', [8, (16, 4)])
def test_grouped_ffn_equals_a_loop_over_groups(tiles):
  # The fused FFN's own forward and backward (custom VJP) against autodiff of a plain loop over the groups, with one
  # tile size and with whole + remainder tiles; SwiGLU with biases on both projections in and out.
  rng = np.random.default_rng(1)
  sizes = [3, 9, 0, 27]
  x, dy = (rng.standard_normal((M, d)).astype(np.float32) for d in (D, D))
  w_in = tuple(0.3 * rng.standard_normal((G, D, F)).astype(np.float32) for _ in range(2))
  b_in = tuple(0.3 * rng.standard_normal((G, F)).astype(np.float32) for _ in range(2))
  w_out, b_out = 0.3 * rng.standard_normal((G, F, D)).astype(np.float32), rng.standard_normal((G, D)).astype(np.float32)
  act = lambda gate, up: jax.nn.silu(gate) * up

  def fused(x, w_in, b_in, w_out, b_out):
    return gmm.grouped_ffn(x, w_in, b_in, w_out, b_out, jnp.asarray(sizes), act, tile_rows=tiles)

  def loop(x, w_in, b_in, w_out, b_out):
    out, start = [], 0
    for g, size in enumerate(sizes):
      xg = x[start:start + size]
      h = act(*(xg @ w[g] + b[g] for w, b in zip(w_in, b_in)))
      out.append(h @ w_out[g] + b_out[g])
      start += size
    return jnp.concatenate(out + [jnp.zeros((M - start, D))])

  run = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * dy), argnums=(0, 1, 2, 3, 4)))
  args = (x, w_in, b_in, w_out, b_out)
  assert_trees_close(run(fused)(*args), run(loop)(*args), f'tiles {tiles} ')
  y = jax.jit(fused)(*args)
  assert np.all(np.asarray(y)[sum(sizes):] == 0)  # padding rows


# ================================================================================================ expert parallel
def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
  """`jax.lax.ragged_all_to_all` as its docstring defines it, built from all_gathers (XLA:CPU has no
  ragged-all-to-all): receiver i gets source s's rows [input_offsets_s[i], + send_sizes_s[i]) written at
  output_offsets_s[i]; its other rows keep `output`'s values. Differentiable like any gather."""
  del recv_sizes  # what the sources send, by construction
  me = jax.lax.axis_index(axis_name)
  sources = jax.lax.all_gather(operand, axis_name)  # [P, S, D]
  starts, sizes, lands = (jax.lax.all_gather(a, axis_name)[:, me] for a in (input_offsets, send_sizes, output_offsets))
  row = jnp.arange(output.shape[0])
  hit = (row >= lands[:, None]) & (row < (lands + sizes)[:, None])  # [P, M]: source s writes row r
  index = jnp.clip(starts[:, None] + row - lands[:, None], 0, operand.shape[0] - 1)
  rows = sources[jnp.arange(sources.shape[0])[:, None], index]  # [P, M, D]
  return jnp.where(jnp.any(hit, 0)[:, None], jnp.sum(jnp.where(hit[..., None], rows, 0), axis=0), output)


def dropless_grads(graphdef, cot, modality, valid):
  """(state, x) -> (d state, d x) of sum(y * cot) + the weighted aux loss (so the routing statistics' gradients
  count too), with aux (y, stats), for the dropless block."""
  def loss(state, x):
    block = nnx.merge(graphdef, state)
    y, stats = block(x, modality, valid, capacity_factor=0.0)
    return jnp.sum(y * cot) + moe_lib.weighted_aux_loss(stats, block.moe), (y, stats)
  return jax.grad(loss, argnums=(0, 1), has_aux=True)


EP_CASES = {  # name: (mesh axes, layout, grouped matmul, exchange)
    # 2 experts per device, megablox (interpreted) inside shard_map, whose vma check is off for Pallas. (The
    # ragged exchange with the check on, as on GPU, is traced in the TPU test below.)
    'ragged-fsdp2-expert4-megablox': ({'fsdp': 2, 'expert': 4}, 'moiie-3+3+2', 'megablox', 'ragged'),
    'local-data2-fsdp4': ({'data': 2, 'fsdp': 4}, 'moiie-2+2+4', 'scan', 'local'),  # expert axis of size 1
}


@pytest.mark.parametrize('name', list(EP_CASES))
def test_expert_parallel_dropless_equals_single_device(name):
  axes, layout, impl, exchange = EP_CASES[name]
  state, x, modality, valid, cot = layer_setup(layout, b=8, t=6)
  mesh = mesh_lib.make_mesh(axes)
  plan = dispatch.ExpertParallel(mesh, dropless_exchange='ragged', ragged_all_to_all=emulated_ragged_all_to_all)
  assert plan.exchange(0.0) == exchange and plan.groups == 8

  def run(state, x):
    with dispatch.expert_parallel(plan):
      return dropless_grads(block_def(layout, impl), cot, modality, valid)(state, x)

  state_sharded = jax.device_put(state, sharding_lib.param_shardings(state, mesh))
  sharded = fast_compile(run, state_sharded, x)
  grads, (y, stats) = sharded(state_sharded, x)
  # The single-device layer, on the backend that compiles fastest here (each equals the oracle, above).
  single = dropless_grads(block_def(layout, 'ragged_dot'), cot, modality, valid)
  want_grads, (want, want_stats) = fast_compile(single, state, x)(state, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-5, rtol=1e-5)
  assert_trees_close(stats, want_stats, f'{name} stats ')
  assert float(stats.dropped_fraction) == 0.0
  assert_trees_close(grads, want_grads, f'{name} grads ')
  # Neither is the capacity exchange (all_to_alls of [E, N_l, D] buffers).
  assert 'all-to-all' not in sharded.as_text()


def test_dropless_exchange_by_platform():
  mesh = mesh_lib.make_mesh({'data': 2, 'expert': 4})
  assert dispatch.ExpertParallel(mesh).exchange(0.0) == 'capacity'  # CPU: ragged-all-to-all does not compile
  assert dispatch.ExpertParallel(mesh).exchange(1.5) == 'capacity'
  assert dispatch.ExpertParallel(mesh_lib.make_mesh({'data': 8})).exchange(1.5) == 'local'
  with pytest.raises(ConfigError, match='ragged'):
    dispatch.ExpertParallel(mesh, dropless_exchange='ragged').exchange(0.0)
  with pytest.raises(ConfigError, match='dropless_exchange'):
    dispatch.ExpertParallel(mesh, dropless_exchange='nccl').exchange(0.0)


# ================================================================================================ TPU, compiled here
def tpu_devices(topology='v5p:2x2x1'):
  """The devices of a TPU slice, from libtpu on this CPU host (nothing runs on them; they compile)."""
  # libtpu reads these when it loads: no metadata-server queries, and no abort if another process holds its lock.
  for key, value in (('TPU_SKIP_MDS_QUERY', '1'), ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'),
                     ('TPU_ACCELERATOR_TYPE', 'v5p-8'), ('TPU_WORKER_HOSTNAMES', 'localhost'), ('TPU_WORKER_ID', '0')):
    os.environ.setdefault(key, value)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return topologies.get_topology_desc(platform='tpu', topology_name=topology).devices


@pytest.mark.parametrize('impl', ['auto', 'ragged_dot'])
def test_dropless_layer_compiles_for_tpu(impl):
  """'auto' on a TPU mesh: compiled, with the megablox kernels and the ragged exchange in the executable.
  'ragged_dot' (the GPU combination: shard_map's vma check on, as for every backend but Pallas): lowered only."""
  mesh = mesh_lib.make_mesh({'fsdp': 2, 'expert': 2}, tpu_devices())
  plan = dispatch.ExpertParallel(mesh)
  assert plan.platform == 'tpu' and plan.exchange(0.0) == 'ragged'
  cfg = dataclasses.replace(layer_cfg('moiie-1+2+1', impl), hidden_size=64, intermediate_size=128)  # + biases
  graphdef, state = nnx.split(nnx.eval_shape(lambda: moe_lib.MoEBlock(cfg, rngs=nnx.Rngs(0))))
  b, t = 8, 16
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                       sharding_lib.param_shardings(state, mesh))
  x = jax.ShapeDtypeStruct((b, t, 64), jnp.float32, sharding=NamedSharding(mesh, mesh_lib.batch_spec(3, mesh)))
  flags = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=NamedSharding(mesh, mesh_lib.batch_spec(2, mesh)))

  @jax.jit
  def step(state, x, modality, valid):
    with dispatch.expert_parallel(plan):  # at trace time: the mesh's platform (TPU) picks megablox, not interpreted
      return dropless_grads(graphdef, 1.0, modality, valid)(state, x)

  lowered = step.lower(state, x, flags, flags)
  if impl == 'ragged_dot':
    text = lowered.as_text()
    assert text.count('ragged_all_to_all') >= 4 and 'ragged_dot' in text and 'tpu_custom_call' not in text
    return
  # Kept out of the persistent compilation cache (conftest's): a TPU executable cannot be read back on a CPU-only
  # host (a warning on every later run). Entries are written only above this compile time, read at each write.
  threshold = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float('inf'))
  try:
    hlo = lowered.compile().as_text()
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', threshold)
  kernels = collections.Counter(re.match(r'\s*(?:ROOT )?%([a-z]+)', line).group(1) for line in hlo.splitlines()
                                if 'custom_call_target="tpu_custom_call"' in line)
  # Three projections: megablox gmm forward and for dX (transpose_rhs), tgmm for dW; rows there and back, twice.
  assert kernels == {'gmm': 6, 'tgmm': 3}, kernels
  assert hlo.count('ragged-all-to-all(') == 4
