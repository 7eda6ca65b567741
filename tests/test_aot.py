"""`python -m moiie_jax.aot` on the tiny recipe compiled for a v5p-8 slice (libtpu, no TPU), the HLO counts of
`parallel/hlo_stats.py` on programs whose FLOPs and traffic are known, and bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moiie_jax.parallel import hlo_stats, topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config', 'configs/phi3_mini_moiie.py:stage=2,runlocal=True']


def _aot(*args):
  from conftest import TEST_ONLY_XLA_FLAGS  # the suite's cheaper CPU codegen must not change a TPU report
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if f not in TEST_ONLY_XLA_FLAGS]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(flags))
  return subprocess.run([sys.executable, '-m', 'moiie_jax.aot', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def _compile(f, *args):
  return jax.jit(f).lower(*args).compile()


@pytest.fixture(scope='module')
def v5p8():
  # conftest's persistent cache cannot reload executables compiled for a topology without a TPU client.
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  yield topology.devices(topology.get('v5p-8'))
  jax.config.update('jax_enable_compilation_cache', enabled)


def test_tiny_recipe_on_v5p8_fits_and_counts_expert_all_to_all(tmp_path):
  out = tmp_path / 'report.json'
  # Capacity > 0 takes the shard_map all_to_all path; scanned layers make the loop correction count.
  r = _aot(*TINY, '--topology', 'v5p-8', '--config.mesh.data=1', '--config.mesh.fsdp=2', '--config.mesh.expert=2',
           '--config.model.moe.capacity_factor=1.25', '--config.model.scan_layers=True', '--out', str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'fits' in r.stdout and 'all-to-all' in r.stdout, r.stdout
  report = json.loads(out.read_text())
  assert report['fits'] and report['chips'] == 4 and report['hosts'] == 1
  assert report['mesh'] == {'data': 1, 'fsdp': 2, 'expert': 2, 'tensor': 1}  # mesh_devices=1 ignored
  m = report['memory']
  assert 0 < m['params'] < m['arguments'] and m['opt_state'] > m['params']  # Adam moments + accumulator
  assert m['total'] == m['arguments'] + m['temps'] + m['outputs'] - m['aliased'] < m['hbm']
  f = report['flops']
  assert f['model'] > 0 and f['compiled_flat'] > 0
  assert f['loop_trip_counts'] and f['compiled'] > f['compiled_flat']
  assert 0.7 < f['compiled_flat'] / f['xla_cost_analysis'] <= 1.0  # XLA adds elementwise FLOPs
  assert 0.8 < f['compiled'] / f['model'] < 1.5
  assert report['collectives']['bytes_per_chip']['all-to-all'] > 0
  ro = report['roofline']
  assert ro['estimate_s'] == max(ro['compute_s'], ro['hbm_s'], ro['network_s']) > 0 and 0 < ro['mfu'] < 1


def test_tiny_dropless_recipe_compiles_the_ragged_exchange(tmp_path):
  out = tmp_path / 'report.json'
  # The paper's dropless experts on an expert axis: megablox grouped matmuls and ragged_all_to_all on TPU
  # (tests/test_gmm.py checks the kernels in the layer's HLO).
  r = _aot(*TINY, '--topology', 'v5p-8', '--config.mesh.data=1', '--config.mesh.fsdp=2', '--config.mesh.expert=2',
           '--config.model.moe.capacity_factor=0', '--out', str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['fits']
  moved = report['collectives']['bytes_per_chip']
  assert report['collectives']['count'].get('ragged-all-to-all', 0) > 0
  # The tokens travel by the ragged exchange; what all-to-all is left is XLA resharding small arrays.
  assert moved['ragged-all-to-all'] > 10 * moved.get('all-to-all', 0)


def test_unknown_topology_is_one_line():
  r = _aot(*TINY, '--topology', 'v9x-8')
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "unknown topology 'v9x-8'" in lines[0] and 'v5p-64' in lines[0], r.stderr


def test_mesh_that_does_not_fit_the_slice_is_one_line():
  r = _aot(*TINY, '--topology', 'v5p-8', '--config.mesh.data=1', '--config.mesh.fsdp=8')
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and 'mesh:' in lines[0] and 'fsdp=8' in lines[0] and '4 available' in lines[0], r.stderr


def test_scan_trip_count_multiplies_dot_flops(v5p8):
  layers, d, rows = 6, 256, 64
  mesh = Mesh(np.array(v5p8), ('x',))
  w = jax.ShapeDtypeStruct((layers, d, d), jnp.float32, sharding=NamedSharding(mesh, P()))
  x = jax.ShapeDtypeStruct((rows, d), jnp.float32, sharding=NamedSharding(mesh, P('x')))

  def scanned(w, x):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

  def unrolled(w, x):
    for i in range(layers):
      x = jnp.tanh(x @ w[i])
    return x.sum()

  c = _compile(scanned, w, x)
  s = hlo_stats.analyze(c.as_text())
  per_device = 2 * (rows // 4) * d * d * layers
  assert s.loop_trip_counts == [layers]
  assert s.flops == per_device and s.flops_flat == per_device / layers
  assert s.flops_flat == pytest.approx(c.cost_analysis()['flops'], rel=0.2)
  assert hlo_stats.analyze(_compile(unrolled, w, x).as_text()).flops == per_device


def test_collective_bytes_in_shard_map(v5p8):
  n, rows, d = 4, 32, 128
  mesh = Mesh(np.array(v5p8), ('x',))
  x = jax.ShapeDtypeStruct((n * rows, d), jnp.float32, sharding=NamedSharding(mesh, P('x')))
  shard = rows * d * 4

  def f(x):
    def body(x):
      return jax.lax.psum(x, 'x'), jax.lax.all_gather(x, 'x', tiled=True)
    return jax.shard_map(body, mesh=mesh, in_specs=P('x'), out_specs=(P('x'), P()), check_vma=False)(x)

  s = hlo_stats.analyze(_compile(f, x).as_text())
  assert s.collective_bytes['all-reduce'] == 2 * shard * (n - 1) / n
  assert s.collective_bytes['all-gather'] == shard * (n - 1)


HAND_WRITTEN = """HloModule m, num_partitions=8

%body (p: (s32[], f32[4,16])) -> (s32[], f32[4,16]) {
  %p = (s32[], f32[4,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %h = f32[4,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %dot.1 = f32[4,16]{1,0} dot(%h, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ags = (f32[4,16], f32[8,16]) all-gather-start(f32[4,16]{1,0} %dot.1), dimensions={0}, replica_groups=[4,2]<=[8]
  %agd = f32[8,16]{1,0} all-gather-done(%ags)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[4,16]) tuple(%next, %dot.1)
}

%cond (c: (s32[], f32[4,16])) -> pred[] {
  %c = (s32[], f32[4,16]) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(99)
  ROOT %lt = pred[] compare(%ci, %n), direction=LT
}

ENTRY %main (x: f32[4,16]) -> f32[4,16] {
  %x = f32[4,16]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,16]) tuple(%zero, %x)
  %loop = (s32[], f32[4,16]) while(%init), condition=%cond, body=%body, TRIPS
  %ar = f32[4,16]{1,0} all-reduce(%x), replica_groups={}, to_apply=%cond
  ROOT %out = f32[4,16]{1,0} get-tuple-element(%loop), index=1
}
""".replace('TRIPS', 'backend_config={"known_trip_count":{"n":"12"}}')


def test_hand_written_hlo_known_trip_count_async_pair_and_group_formats():
  s = hlo_stats.analyze(HAND_WRITTEN)
  assert s.loop_trip_counts == [12]  # known_trip_count wins over the condition's bound
  assert s.flops == 12 * 2 * 4 * 16 * 16 and s.flops_flat == 2 * 4 * 16 * 16
  assert s.collective_counts == {'all-gather': 12, 'all-reduce': 1}  # -start counted, -done not
  assert s.collective_bytes['all-gather'] == 12 * 4 * 16 * 4 * (2 - 1)  # groups of 2
  assert s.collective_bytes['all-reduce'] == 2 * 4 * 16 * 4 * 7 / 8  # empty groups: all 8 partitions
  without = HAND_WRITTEN.replace(', backend_config={"known_trip_count":{"n":"12"}}', '')
  assert without != HAND_WRITTEN
  assert hlo_stats.analyze(without).loop_trip_counts == [99]


def test_resource_exhausted_message_is_parsed():
  msg = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (100.00G) '
         'exceeds available HBM (95.74G).')
  out = hlo_stats.parse_resource_exhausted(msg)
  assert out['required_bytes'] == 100 * 1024 ** 3 and out['available_bytes'] == int(95.74 * 1024 ** 3)


def test_device_kinds_read_the_one_hardware_table():
  from moiie_jax.train import flops
  for kind, chip in (('TPU v4', 'v4'), ('TPU v5 lite', 'v5e'), ('TPU v5', 'v5p'), ('TPU v5p', 'v5p'),
                     ('TPU v6 lite', 'v6e'), ('NVIDIA H100 80GB HBM3', 'h100'), ('NVIDIA H200', 'h200'),
                     ('NVIDIA A100-SXM4-80GB', 'a100')):
    assert topology.chip_of_device_kind(kind) is topology.HARDWARE[chip], kind
    assert flops.peak_flops(kind) == topology.HARDWARE[chip].peak_flops
  assert topology.chip_of_device_kind('cpu') is None and flops.peak_flops('cpu') is None
