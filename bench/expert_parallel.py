"""Expert parallelism from the compiled HLO: collective bytes, FLOPs and peak memory per device, EP = 1, 2, 4, 8.

Run: `.venv/bin/python bench/expert_parallel.py [--tokens_per_device 512 --d 512 --f 1024]`. Prints a table and
writes bench/results/expert_parallel.json. Runs on 8 devices (8 fake CPU devices unless real accelerators are
present) as a mesh (data = 8 / EP, expert = EP), with a MoIIE layer of 8 experts (2 vision + 4 shared + 2
language, top-2) and a fixed number of tokens per device. Nothing is timed: every number is read from the compiled
executable of the layer's forward pass and of its forward + backward pass (`value_and_grad`, one training step of
the layer), so the table is the same on any machine with the same XLA.

  collective bytes  the result sizes of every all-to-all / all-gather / all-reduce / reduce-scatter /
                    collective-permute in the per-device HLO, against the minimum: two all-to-alls of a
                    cf * N_l * K * D buffer (forward), four with the backward pass (N_l tokens per device).
                    The step's all-reduces of the replicated routers' and expert weights' gradients over the
                    data axis are data parallelism, reported apart.
  FLOPs             XLA's cost analysis against the ideal: 6 * N_l * K * D * F for the activated experts plus the
                    two routers on every token (forward; x3 for forward + backward).
  peak memory       XLA's memory analysis of the step: arguments + outputs + temporaries - aliased.

N_l tokens per device, D model width, F FFN width, E experts, K top-k, cf capacity factor.
"""

from __future__ import annotations

import os

if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moiie_jax.models import moe as moe_lib  # noqa: E402
from moiie_jax.models.config import LLMConfig, MoEConfig  # noqa: E402
from moiie_jax.parallel import dispatch  # noqa: E402
from moiie_jax.parallel import mesh as mesh_lib  # noqa: E402
from moiie_jax.parallel import sharding as sharding_lib  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'expert_parallel.json')
COLLECTIVES = ('all-to-all', 'all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute')
_BYTES = {'f64': 8, 'f32': 4, 'bf16': 2, 'f16': 2, 's64': 8, 'u64': 8, 's32': 4, 'u32': 4, 's16': 2, 'u16': 2,
          's8': 1, 'u8': 1, 'pred': 1}
_OP = re.compile(r'=\s*(?P<type>\([^()]*\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+'
                 r'(?P<op>' + '|'.join(COLLECTIVES) + r')(?P<start>-start)?\((?P<rest>[^\n]*)')
_SHAPE = re.compile(r'([a-z0-9]+)\[([0-9,]*)\]')


def group_size(attrs: str) -> int:
  """Devices per replica group of one collective (its attribute text); 0 when the format is not recognised."""
  m = re.search(r'replica_groups=\{\{([^}]*)\}', attrs)  # explicit: {{0,1},{2,3}}
  if m:
    return len(m.group(1).split(','))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)  # mesh['axis_0'=2,...] {'axis_0'}
  if m:
    sizes = {k.strip("' "): int(v) for k, v in (item.split('=') for item in m.group(1).split(','))}
    return int(np.prod([sizes[a.strip("' ")] for a in m.group(2).split(',') if a.strip()]))
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]', attrs)  # iota: [groups, size]<=[n]
  return int(m.group(2)) if m else 0


def collectives(hlo: str) -> list[dict]:
  """Every collective of a compiled (per-device) HLO module that moves data: op name, result shapes and bytes.
  Collectives over groups of one device (left behind by size-1 mesh axes) move nothing and are skipped."""
  out = []
  for m in _OP.finditer(hlo):
    if group_size(m.group('rest')) == 1:
      continue
    shapes = [(dt, tuple(int(s) for s in dims.split(',') if s)) for dt, dims in _SHAPE.findall(m.group('type'))]
    if m.group('start'):  # async pair: (operands..., results...), count the results only
      shapes = shapes[len(shapes) // 2:]
    size = sum(_BYTES.get(dt, 4) * int(np.prod(dims)) for dt, dims in shapes)
    out.append({'op': m.group('op'), 'shapes': shapes, 'bytes': size})
  return out


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))


def peak_bytes(compiled) -> int:
  mem = compiled.memory_analysis()
  peak = getattr(mem, 'peak_memory_in_bytes', 0)
  if peak:
    return int(peak)
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes)


def measure(ep: int, args, cfg: LLMConfig) -> dict:
  moe = cfg.moe
  n_dev = len(jax.devices())
  mesh = mesh_lib.make_mesh({'data': n_dev // ep, 'expert': ep})
  plan = dispatch.ExpertParallel(mesh)
  b, t, d, f, k, e = n_dev, args.tokens_per_device, cfg.hidden_size, cfg.intermediate_size, moe.top_k, moe.n_experts
  graphdef, state = nnx.split(nnx.eval_shape(lambda: moe_lib.MoEBlock(cfg, rngs=nnx.Rngs(0))))
  state_sharding = sharding_lib.param_shardings(state, mesh)
  rows = jax.sharding.NamedSharding(mesh, mesh_lib.batch_spec(3, mesh))
  flags = jax.sharding.NamedSharding(mesh, mesh_lib.batch_spec(2, mesh))
  x = jax.ShapeDtypeStruct((b, t, d), jnp.dtype(cfg.dtype), sharding=rows)
  modality = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=flags)
  valid = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=flags)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sharding)

  def forward(state, x, modality, valid):
    return dispatch.moe_forward(nnx.merge(graphdef, state), x, modality, valid, plan,
                                capacity_factor=args.capacity_factor)

  def loss(state, x, modality, valid):
    y, stats = forward(state, x, modality, valid)
    return jnp.sum(y.astype(jnp.float32) ** 2) + moe_lib.weighted_aux_loss(stats, moe)

  fwd = jax.jit(forward).lower(state, x, modality, valid).compile()
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(state, x, modality, valid).compile()

  itemsize = jnp.dtype(cfg.dtype).itemsize
  c_l = moe_lib.expert_capacity(moe, t, args.capacity_factor)
  min_fwd = 2 * args.capacity_factor * t * k * d * itemsize
  ideal_fwd = 6 * t * k * d * f + 2 * t * d * (moe.n_vision + 2 * moe.n_shared + moe.n_language)
  fwd_coll, step_coll = collectives(fwd.as_text()), collectives(step.as_text())
  a2a_fwd = sum(c['bytes'] for c in fwd_coll if c['op'] == 'all-to-all')
  a2a_step = sum(c['bytes'] for c in step_coll if c['op'] == 'all-to-all')
  # An all-gather whose result has all E experts on its leading dimension would be an expert weight gathered
  # over the expert axis (what expert parallelism must never do).
  weight_gathers = [c for c in fwd_coll + step_coll if c['op'] == 'all-gather' and any(
      len(s) == 3 and s[0] == e and set(s[1:]) == {d, f} for _, s in c['shapes'])]
  by_op = {}
  for c in step_coll:
    by_op[c['op']] = by_op.get(c['op'], 0) + c['bytes']
  return {
      'ep': ep,
      'mesh': dict(mesh.shape),
      'tokens_per_device': t,
      'capacity_per_expert_per_device': c_l,
      'collective_bytes_fwd': sum(c['bytes'] for c in fwd_coll),
      'all_to_all_bytes_fwd': a2a_fwd,
      'min_bytes_fwd': min_fwd,
      'collective_bytes_ratio_vs_min': sum(c['bytes'] for c in fwd_coll) / min_fwd,
      'all_to_all_bytes_step': a2a_step,
      'min_bytes_step': 2 * min_fwd,
      'all_to_all_ratio_vs_min_step': a2a_step / (2 * min_fwd),
      'step_collective_bytes_by_op': by_op,
      'expert_weight_all_gathers': len(weight_gathers),
      'flops_fwd': flops(fwd),
      'ideal_flops_fwd': ideal_fwd,
      'flops_ratio_vs_ideal': flops(fwd) / ideal_fwd,
      'flops_step': flops(step),
      'flops_ratio_vs_ideal_step': flops(step) / (3 * ideal_fwd),
      'peak_bytes_per_device': peak_bytes(step),
      'peak_bytes_per_device_fwd': peak_bytes(fwd),
      'expert_weight_bytes_per_device': 3 * (e // ep) * d * f * itemsize,
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--tokens_per_device', type=int, default=512)
  ap.add_argument('--d', type=int, default=512)
  ap.add_argument('--f', type=int, default=1024)
  ap.add_argument('--capacity_factor', type=float, default=1.25)
  ap.add_argument('--ep', default='1,2,4,8')
  ap.add_argument('--out', default=RESULTS)
  args = ap.parse_args()

  moe = MoEConfig(variant='moiie', n_vision=2, n_shared=4, n_language=2, top_k=2)
  cfg = LLMConfig(hidden_size=args.d, intermediate_size=args.f, num_hidden_layers=2, moe=moe)
  rows = [measure(int(ep), args, cfg) for ep in args.ep.split(',')]
  result = {
      'date': datetime.date.today().isoformat(),
      'device': f'{len(jax.devices())} x {jax.devices()[0].platform} ({platform.machine()})',
      'jax': jax.__version__,
      'shape': {'tokens_per_device': args.tokens_per_device, 'd': args.d, 'f': args.f, 'experts': moe.n_experts,
                'layout': '2 vision + 4 shared + 2 language', 'top_k': moe.top_k,
                'capacity_factor': args.capacity_factor, 'dtype': cfg.dtype},
      'rows': rows,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as fh:
    json.dump(result, fh, indent=2)

  print(f'MoIIE layer, expert-parallel over {result["device"]}: {args.tokens_per_device} tokens/device, D={args.d} '
        f'F={args.f} E={moe.n_experts} K={moe.top_k} cf={args.capacity_factor}; per device, from compiled HLO')
  print(f'{"EP":>3}{"mesh":>14}{"a2a MB fwd":>12}{"min MB":>8}{"coll/min":>9}{"a2a/min step":>13}'
        f'{"W gathers":>10}{"GFLOP fwd":>10}{"x ideal":>8}{"x ideal step":>13}{"peak MB":>9}')
  for r in rows:
    mesh = f'd{r["mesh"]["data"]}xe{r["mesh"]["expert"]}'
    print(f'{r["ep"]:>3}{mesh:>14}{r["all_to_all_bytes_fwd"] / 1e6:>12.2f}{r["min_bytes_fwd"] / 1e6:>8.2f}'
          f'{r["collective_bytes_ratio_vs_min"]:>9.3f}{r["all_to_all_ratio_vs_min_step"]:>13.3f}'
          f'{r["expert_weight_all_gathers"]:>10}{r["flops_fwd"] / 1e9:>10.3f}{r["flops_ratio_vs_ideal"]:>8.3f}'
          f'{r["flops_ratio_vs_ideal_step"]:>13.3f}{r["peak_bytes_per_device"] / 1e6:>9.2f}')
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
