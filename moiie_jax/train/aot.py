"""Compile a recipe's training step for a TPU slice without the slice: memory per chip, FLOPs, traffic, roofline.

    report = compile_report(config, 'v5p-64')        # a dict, also what --out writes as JSON
    print(format_report(report))

The step is the training loop's own (`loop.build_training(..., abstract=True)`: same model config, optimizer with
its frozen groups and accumulation, shardings, remat, MoE dispatch, global batch = data.batch_size x the slice's
hosts), lowered from ShapeDtypeStructs that carry the NamedShardings (no weights are created) and compiled by
libtpu for the slice's devices. The report holds

  memory      per chip: parameters and optimizer state (each leaf's per-device shard, from its sharding),
              temporaries (`memory_analysis().temp_size_in_bytes`: activations and XLA's scratch), and the total
              arguments + temporaries + outputs - aliased (donated) bytes, against the chip's HBM;
  flops       the model FLOPs of one micro-step (`flops.train_flops_per_step`; the tower's backward counts only
              when it trains) and the compiled FLOPs of all chips, loop-corrected (`hlo_stats`) and as XLA's
              cost analysis counts them (loop bodies once);
  collectives bytes per chip per kind, loop-corrected (formulas in `parallel/hlo_stats.py`);
  roofline    compute = compiled FLOPs / (chips x peak), HBM = XLA's 'bytes accessed' x the loop factor (corrected
              / uncorrected FLOPs: an assumption, bytes scale like FLOPs) / HBM bandwidth, network = collective
              bytes per chip / ICI bandwidth per chip; estimate = the max (perfect overlap), bound = the sum (none);
              MFU = model FLOPs / (estimate x chips x peak). Hardware figures: `topology.HARDWARE`.

A step that does not fit raises `DoesNotFit` with the largest buffers (from XLA's buffer-assignment dump, which
libtpu writes even when it runs out of memory, or from its error message).
"""

from __future__ import annotations

import glob
import json
import math
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moiie_jax.parallel import hlo_stats
from moiie_jax.parallel import sharding as sharding_lib
from moiie_jax.parallel import topology
from moiie_jax.train import flops as flops_lib
from moiie_jax.train import loop
from moiie_jax.train import optimizer as optimizer_lib

GiB = topology.GiB


class DoesNotFit(RuntimeError):
  """The step needs more HBM per chip than the slice has; `report` holds what is known (largest buffers)."""

  def __init__(self, message: str, report: dict[str, Any]):
    super().__init__(message)
    self.report = report


# --------------------------------------------------------------------------------------------------- compiling
def abstract_args(t: loop.Training) -> tuple[Any, Any, Any, Any]:
  """(params, opt_state, batch, lrs) as ShapeDtypeStructs carrying the step's shardings: the step the loop runs,
  with every group's learning rate an input (`optimizer.learning_rates`)."""
  step = t.step

  def with_sharding(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t.params)
  opt_state = jax.eval_shape(step.tx.init, params)
  return (with_sharding(params, step.params_sharding), with_sharding(opt_state, step.opt_state_sharding),
          with_sharding(t.batch, step.batch_sharding),
          {g: jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding_lib.replicated(t.mesh))
           for g in optimizer_lib.GROUPS})


def shard_bytes(tree: Any) -> int:
  """Bytes of one device's shards of every leaf (ShapeDtypeStructs with shardings); the largest shard counts."""
  total = 0
  for a in jax.tree.leaves(tree):
    shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
    total += math.prod(shape) * np.dtype(a.dtype).itemsize
  return total


def _dump_files(folder: str, suffix: str) -> str:
  found = sorted(glob.glob(os.path.join(folder, f'*{suffix}')), key=os.path.getsize)
  if not found:
    return ''
  with open(found[-1]) as f:  # the train step's module is the largest one dumped
    return f.read()


def compile_step(t: loop.Training, dump_dir: str):
  """`t.step.step` lowered for its mesh's devices and compiled (XLA dumps its buffer assignment in `dump_dir`)."""
  lowered = t.step.step.lower(*abstract_args(t))
  return lowered.compile(compiler_options={'xla_dump_to': dump_dir})


def _model_flops(t: loop.Training) -> float:
  tower_trains = optimizer_lib.stage_param_groups(t.opt_cfg.stage, t.opt_cfg)['vision_tower'] is not None
  rows, length = t.batch['input_ids'].shape
  return flops_lib.train_flops_per_step(t.cfg, rows, length, vision_backward=tower_trains)


def compile_report(config: ml_collections.ConfigDict, topology_name: str, *, top: int = 10) -> dict[str, Any]:
  """Builds the recipe's step for `topology_name`, compiles it and returns the report (see the module doc).

  Raises ConfigError (unknown topology, a mesh that does not fit the slice) and DoesNotFit.
  """
  s = topology.get(topology_name)
  devices = topology.devices(s)
  processes = topology.hosts(s, devices)
  t = loop.build_training(config, devices=devices, processes=processes, abstract=True)
  rows, length = t.batch['input_ids'].shape
  params, opt_state, _, _ = abstract_args(t)
  chip = s.chip
  report: dict[str, Any] = {
      'topology': s.name, 'chip': chip.name, 'chips': s.chips, 'hosts': processes,
      'compiled_for': s.compile_on or s.name, 'device_kind': devices[0].device_kind,
      'memory_estimate': 'TPU compiler' if s.is_gpu else 'exact (XLA:TPU)',
      'mesh': dict(t.mesh.shape), 'global_batch': rows, 'seq_len': length,
      'grad_accum_steps': int(t.opt_cfg.grad_accum_steps), 'optimizer_stage': t.opt_cfg.stage,
      'parameters': int(sum(math.prod(a.shape) for a in jax.tree.leaves(params))),
      'hardware': {'hbm_gib': chip.hbm_gib, 'peak_flops': chip.peak_flops, 'hbm_bw': chip.hbm_bw,
                   'ici_bw': chip.ici_bw, 'source': chip.source},
  }
  memory = report['memory'] = {'params': shard_bytes(params), 'opt_state': shard_bytes(opt_state),
                               'hbm': chip.hbm_bytes}
  with tempfile.TemporaryDirectory(prefix='moiie_aot_') as dump:
    t0 = time.perf_counter()
    try:
      compiled = compile_step(t, dump)
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      report['compile_seconds'] = time.perf_counter() - t0
      oom = hlo_stats.parse_resource_exhausted(str(e))
      memory['total'] = oom.get('required_bytes')
      if s.is_gpu and memory['total'] is not None and memory['total'] <= chip.hbm_bytes:
        # Past the stand-in TPU's HBM but within the GPU's: the total is known, FLOPs and traffic are not.
        memory['margin'] = chip.hbm_bytes - memory['total']
        report['fits'] = True
        report['note'] = f'the {s.compile_on} stand-in ran out of HBM, so only the memory total is known'
        return report
      hlo = _dump_files(dump, 'after_optimizations.txt') or _dump_files(dump, 'oom_intermediate_module.txt')
      largest = hlo_stats.buffer_assignment(_dump_files(dump, 'buffer-assignment.txt'), hlo, top)
      report['largest_buffers'] = [vars(b) for b in largest] or oom['largest']
      report['fits'] = False
      raise DoesNotFit(f'{s.name}: the step does not fit: XLA:TPU needs {_size(memory["total"])} per chip, '
                       f'{_size(oom.get("available_bytes"))} available (RESOURCE_EXHAUSTED)', report) from None
    report['compile_seconds'] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    buffers = _dump_files(dump, 'buffer-assignment.txt')
  memory.update(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                aliased=mem.alias_size_in_bytes, temps=mem.temp_size_in_bytes,
                code=mem.generated_code_size_in_bytes)
  memory['total'] = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes)
  memory['margin'] = chip.hbm_bytes - memory['total']
  report['fits'] = memory['margin'] >= 0

  stats = hlo_stats.analyze(hlo)
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  report['flops'] = {'model': _model_flops(t), 'compiled': stats.flops * s.chips,
                     'compiled_flat': stats.flops_flat * s.chips, 'xla_cost_analysis': cost.get('flops', 0.0) * s.chips,
                     'loop_factor': stats.loop_factor, 'loop_trip_counts': stats.loop_trip_counts}
  report['collectives'] = {'bytes_per_chip': stats.collective_bytes, 'count': stats.collective_counts,
                           'bytes_per_chip_flat': stats.collective_bytes_flat}
  bytes_accessed = float(cost.get('bytes accessed', 0.0)) * stats.loop_factor
  compute = stats.flops / chip.peak_flops
  hbm = bytes_accessed / chip.hbm_bw
  network = sum(stats.collective_bytes.values()) / chip.ici_bw
  estimate = max(compute, hbm, network)
  report['roofline'] = {
      'compute_s': compute, 'hbm_s': hbm, 'network_s': network, 'estimate_s': estimate,
      'no_overlap_s': compute + hbm + network, 'bytes_accessed_per_chip': bytes_accessed,
      'mfu': report['flops']['model'] / (estimate * s.chips * chip.peak_flops) if estimate else None}
  if not report['fits']:
    largest = hlo_stats.buffer_assignment(buffers, hlo, top) or hlo_stats.largest_arrays(hlo, top)
    report['largest_buffers'] = [vars(b) for b in largest]
    raise DoesNotFit(f'{s.name}: the step does not fit: it needs {_size(memory["total"])} per chip, '
                     f'{_size(chip.hbm_bytes)} HBM on a {chip.name}', report)
  return report


# ---------------------------------------------------------------------------------------------------- output
def _count(n: int) -> str:
  return f'{n / 1e9:.2f}B' if n >= 1e8 else f'{n / 1e6:.2f}M'


def _size(n: float | None) -> str:
  """Bytes in the largest binary unit that keeps the number >= 1 (KiB ... TiB)."""
  if n is None:
    return '?'
  for unit, scale in (('TiB', 1024 ** 4), ('GiB', GiB), ('MiB', 1024 ** 2), ('KiB', 1024)):
    if abs(n) >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{n:.0f} B'


def _seconds(x: float) -> str:
  return f'{x * 1e3:12.3f} ms'


def format_report(r: dict[str, Any]) -> str:
  """The report as a table (what `python -m moiie_jax.aot` prints)."""
  hw = r['hardware']
  mesh = ' '.join(f'{k}={v}' for k, v in r['mesh'].items())
  lines = [f'{r["topology"]}: {r["chips"]} x {r["chip"]} ({r["device_kind"]} compiler for {r["compiled_for"]}), '
           f'{r["hosts"]} host(s); mesh {mesh}',
           f'step: {r["global_batch"]} x {r["seq_len"]} tokens per micro-step, grad accumulation '
           f'{r["grad_accum_steps"]}, optimizer {r["optimizer_stage"]}, {_count(r["parameters"])} parameters; '
           f'compiled in {r.get("compile_seconds", 0):.0f} s', '']
  m = r['memory']
  label = 'TPU-compiler estimate' if r['memory_estimate'] != 'exact (XLA:TPU)' else 'XLA:TPU'
  lines.append(f'memory per chip ({label})')
  lines.append(f'  parameters                     {_size(m["params"]):>12}')
  lines.append(f'  optimizer state                {_size(m["opt_state"]):>12}')
  if 'temps' in m:
    lines.append(f'  activations / temporaries      {_size(m["temps"]):>12}')
    lines.append(f'  arguments / outputs / aliased  {_size(m["arguments"])} / {_size(m["outputs"])} / '
                 f'{_size(m["aliased"])}')
  verdict = 'fits' if r['fits'] else 'DOES NOT FIT'
  margin = f', margin {_size(m["margin"])}' if 'margin' in m else ''
  lines.append(f'  total (args + temps + out - aliased) {_size(m.get("total"))} of {_size(m["hbm"])} HBM: '
               f'{verdict}{margin}')
  if r.get('largest_buffers'):
    lines.append('  largest buffers:')
  if r.get('note'):
    lines.append(f'  note: {r["note"]}')
  for b in r.get('largest_buffers', ()):
    times = f'{b.get("count", 1)} x ' if b.get('count', 1) > 1 else ''
    lines.append(f'    {times + _size(b["bytes"]):>16}  {b["shape"][:40]:40}  {b.get("kind", "")[:18]:18}  '
                 f'{b.get("op_name", "")[-56:]}')
  if 'flops' in r:
    f = r['flops']
    lines += ['', 'FLOPs per micro-step (all chips)',
              f'  model (6N + attention)         {f["model"]:12.4g}',
              f'  compiled, loop-corrected       {f["compiled"]:12.4g}   (x{f["loop_factor"]:.2f}; trip counts '
              f'{f["loop_trip_counts"][:8]}{"..." if len(f["loop_trip_counts"]) > 8 else ""})',
              f'  compiled, loop bodies once     {f["compiled_flat"]:12.4g}   (XLA cost analysis: '
              f'{f["xla_cost_analysis"]:.4g})',
              '', 'collectives per chip per micro-step     bytes     ops']
    c = r['collectives']
    for kind in hlo_stats.COLLECTIVES:
      if kind in c['bytes_per_chip']:
        lines.append(f'  {kind:30} {_size(c["bytes_per_chip"][kind]):>12} {c["count"][kind]:7d}')
    if not c['bytes_per_chip']:
      lines.append('  (none)')
    ro = r['roofline']
    lines += ['', f'roofline per micro-step ({r["chip"]}: {hw["peak_flops"] / 1e12:.0f} TFLOP/s bf16, '
                  f'{hw["hbm_bw"] / 1e9:.0f} GB/s HBM, {hw["ici_bw"] / 1e9:.0f} GB/s interconnect per chip)',
              f'  compute                        {_seconds(ro["compute_s"])}',
              f'  HBM (bytes accessed x loop)    {_seconds(ro["hbm_s"])}',
              f'  network                        {_seconds(ro["network_s"])}',
              f'  estimate (perfect overlap)     {_seconds(ro["estimate_s"])}   no overlap: '
              f'{ro["no_overlap_s"] * 1e3:.3f} ms',
              f'  MFU                            {100 * (ro["mfu"] or 0):12.1f} %']
  return '\n'.join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
  """Writes the report atomically (a temporary file in the same folder, then rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.aot_', suffix='.json')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(report, f, indent=2, default=float)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
