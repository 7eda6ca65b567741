"""Forward+backward time and compiled FLOPs of the MoIIE layer against a dense SwiGLU doing the same work.

Run: `.venv/bin/python bench/moe_layer.py [--tokens 4096 --iters 9]`. Prints a table and writes
bench/results/moe_layer.json. Two dense equivalents do the work of the K experts each token activates: one
SwiGLU FFN of width K*F, and K FFNs of width F as one [K, D, F] batched matmul; ratios are taken against
whichever ran faster. Measurements are interleaved (each case once per round) so that load from other processes
hits all cases alike. Reported: wall-time medians (the headline ratios), minima, the median of per-round
ratios, and median process CPU time (all threads), which other processes' load disturbs least.

N tokens, D model width, F FFN width, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moiie_jax.models.config import LLMConfig, MoEConfig  # noqa: E402
from moiie_jax.models.moe import MoEBlock, expert_capacity, weighted_aux_loss  # noqa: E402
from moiie_jax.models.gmm import scan_tile  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'moe_layer.json')


def flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--tokens', type=int, default=4096)
  ap.add_argument('--seq', type=int, default=1024, help='tokens per row; each row starts with its image')
  ap.add_argument('--image_tokens', type=int, default=729, help='image tokens per row (SigLIP-so400m at 384)')
  ap.add_argument('--d', type=int, default=512)
  ap.add_argument('--f', type=int, default=1408)
  ap.add_argument('--capacity_factor', type=float, default=1.25)
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--iters', type=int, default=9)
  ap.add_argument('--out', default=RESULTS)
  args = ap.parse_args()

  moe = MoEConfig(variant='moiie', n_vision=1, n_shared=2, n_language=1, top_k=2)
  cfg = LLMConfig(hidden_size=args.d, intermediate_size=args.f, num_hidden_layers=2, moe=moe)
  n, d, f, k = args.tokens, args.d, args.f, moe.top_k
  b, t = n // args.seq, args.seq
  block = MoEBlock(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(block)
  x = jax.random.normal(jax.random.key(1), (b, t, d), jnp.float32)
  g = jax.random.normal(jax.random.key(2), (b, t, d), jnp.float32)  # output cotangent
  modality = jnp.broadcast_to((jnp.arange(t) < args.image_tokens).astype(jnp.int32), (b, t))
  valid = jnp.ones((b, t), jnp.int32)

  def moe_forward(cf):
    def fwd(params, x):
      y, stats = nnx.merge(graphdef, params)(x, modality, valid, capacity_factor=cf)
      return y, stats
    return fwd

  def moe_loss(cf):
    def loss(params, x):
      y, stats = moe_forward(cf)(params, x)
      return jnp.sum(y * g) + weighted_aux_loss(stats, moe)
    return loss

  keys = jax.random.split(jax.random.key(3), 3)
  dense = {'gate': 0.02 * jax.random.normal(keys[0], (d, k * f)), 'up': 0.02 * jax.random.normal(keys[1], (d, k * f)),
           'down': 0.02 * jax.random.normal(keys[2], (k * f, d))}

  def dense_forward(p, x):
    return jnp.einsum('BTF,FD->BTD', jax.nn.silu(x @ p['gate']) * (x @ p['up']), p['down'])

  def dense_loss(p, x):
    return jnp.sum(dense_forward(p, x) * g)

  # The same work as K separate FFNs of width F (a [K, D, F] batched matmul, the experts' own shape).
  keys = jax.random.split(jax.random.key(4), 3)
  dense_k = {'gate': 0.02 * jax.random.normal(keys[0], (k, d, f)), 'up': 0.02 * jax.random.normal(keys[1], (k, d, f)),
             'down': 0.02 * jax.random.normal(keys[2], (k, f, d))}

  def dense_k_forward(p, x):
    h = jax.nn.silu(jnp.einsum('BTD,KDF->KBTF', x, p['gate'])) * jnp.einsum('BTD,KDF->KBTF', x, p['up'])
    return jnp.einsum('KBTF,KFD->BTD', h, p['down'])

  def dense_k_loss(p, x):
    return jnp.sum(dense_k_forward(p, x) * g)

  cases = {
      'dense_kF': (dense_loss, dense_forward, dense),
      'dense_K_ffns': (dense_k_loss, dense_k_forward, dense_k),
      'moiie_capacity': (moe_loss(args.capacity_factor), moe_forward(args.capacity_factor), params),
      'moiie_dropless': (moe_loss(0.0), moe_forward(0.0), params),
  }
  # value_and_grad: with grad alone XLA drops the dense FFN's last forward matmul (only its cotangent is needed),
  # which the MoE cannot do (its combine weights need the expert outputs); a training step needs the value anyway.
  steps = {name: jax.jit(jax.value_and_grad(loss, argnums=(0, 1))) for name, (loss, _, _) in cases.items()}
  for name, step in steps.items():
    for _ in range(args.warmup):
      jax.block_until_ready(step(cases[name][2], x))
  times = {name: [] for name in cases}
  cpu = {name: [] for name in cases}  # process CPU seconds (all threads): less sensitive to other processes' load
  for _ in range(args.iters):
    for name, step in steps.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(step(cases[name][2], x))
      times[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  med = {name: statistics.median(v) for name, v in times.items()}
  best = {name: min(v) for name, v in times.items()}
  # Per-round ratios compare runs seconds apart, which cancels slow drifts in the machine's load.
  # The reference is the faster of the two dense forms in this run (the stricter comparison).
  ref = min(('dense_kF', 'dense_K_ffns'), key=lambda name: med[name])
  paired = {name: statistics.median(a / b for a, b in zip(times[name], times[ref])) for name in times}
  med_cpu = {name: statistics.median(v) for name, v in cpu.items()}

  ideal_fwd = 2 * 3 * n * k * d * f
  fwd_flops = {name: flops(fwd, p, x) for name, (_, fwd, p) in cases.items()}
  step_flops = {name: flops(jax.value_and_grad(loss, argnums=(0, 1)), p, x) for name, (loss, _, p) in cases.items()}
  _, stats = jax.jit(moe_forward(args.capacity_factor))(params, x)
  # XLA's cost analysis counts a while loop's body once, so the CPU's grouped dropless path (`gmm` scan backend: a
  # loop over the occupied (tile, expert) pairs of the N*K rows sorted by expert) is counted by hand: its rows
  # through the three expert matmuls, at most N*K + (E - 1) * tile of them (a tile straddling an expert boundary is
  # visited once per expert; an upper bound), plus the routers (both run on every token).
  block = scan_tile(n * k, moe.n_experts)
  n_blocks = -(-(n * k + (moe.n_experts - 1) * block) // block)
  router_flops = 2 * n * d * (moe.n_vision + 2 * moe.n_shared + moe.n_language)
  fwd_flops['moiie_dropless_xla_one_iteration'] = fwd_flops['moiie_dropless']
  fwd_flops['moiie_dropless'] = 2 * 3 * n_blocks * block * d * f + router_flops
  step_flops['moiie_dropless_xla_one_iteration'] = step_flops['moiie_dropless']
  step_flops['moiie_dropless'] = 3 * fwd_flops['moiie_dropless']

  result = {
      'date': datetime.date.today().isoformat(),
      'device': f'{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, '
                f'{os.cpu_count()} cores)',
      'jax': jax.__version__,
      'shape': {'tokens': n, 'd': d, 'f': f, 'experts': moe.n_experts, 'layout': '1 vision + 2 shared + 1 language',
                'top_k': k, 'image_fraction': args.image_tokens / t, 'capacity_factor': args.capacity_factor,
                'capacity': expert_capacity(moe, n, args.capacity_factor),
                'dropless_rows_at_most': n_blocks * block, 'dropless_tile_rows': block},
      'iters': args.iters,
      'median_s': med,
      'min_s': best,
      'all_s': times,
      'median_cpu_s': med_cpu,
      'all_cpu_s': cpu,
      'forward_flops': fwd_flops,
      'fwd_bwd_flops': step_flops,
      'ideal_forward_flops': ideal_fwd,
      'dense_reference': ref,
      'capacity_time_ratio_vs_dense': med['moiie_capacity'] / med[ref],
      'dropless_time_ratio_vs_dense': med['moiie_dropless'] / med[ref],
      'capacity_time_ratio_vs_dense_min': best['moiie_capacity'] / best[ref],
      'dropless_time_ratio_vs_dense_min': best['moiie_dropless'] / best[ref],
      'capacity_time_ratio_vs_dense_paired': paired['moiie_capacity'],
      'dropless_time_ratio_vs_dense_paired': paired['moiie_dropless'],
      'capacity_cpu_time_ratio_vs_dense': med_cpu['moiie_capacity'] / med_cpu[ref],
      'dropless_cpu_time_ratio_vs_dense': med_cpu['moiie_dropless'] / med_cpu[ref],
      'capacity_flops_ratio_vs_ideal': fwd_flops['moiie_capacity'] / ideal_fwd,
      'dropless_flops_ratio_vs_ideal': fwd_flops['moiie_dropless'] / ideal_fwd,
      'dense_flops_ratio_vs_ideal': fwd_flops['dense_kF'] / ideal_fwd,
      'capacity_dropped_fraction': float(stats.dropped_fraction),
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as fh:
    json.dump(result, fh, indent=2)

  print(f'MoIIE layer fwd+bwd, {result["device"]}, tokens={n} D={d} F={f} E={moe.n_experts} K={k}, '
        f'{args.iters} interleaved rounds; "x dense" against {ref}, the faster dense form')
  print(f'{"path":<16}{"median ms":>10}{"x dense":>9}{"min ms":>9}{"x dense":>9}{"paired":>8}{"cpu ms":>9}'
        f'{"x dense":>9}{"fwd GFLOP":>11}{"x ideal":>9}{"fwd+bwd GFLOP":>15}')
  for name in cases:
    print(f'{name:<16}{1e3 * med[name]:>10.1f}{med[name] / med[ref]:>9.2f}{1e3 * best[name]:>9.1f}'
          f'{best[name] / best[ref]:>9.2f}{paired[name]:>8.2f}{1e3 * med_cpu[name]:>9.1f}'
          f'{med_cpu[name] / med_cpu[ref]:>9.2f}{fwd_flops[name] / 1e9:>11.2f}'
          f'{fwd_flops[name] / ideal_fwd:>9.3f}{step_flops[name] / 1e9:>15.2f}')
  print(f'ideal forward {ideal_fwd / 1e9:.2f} GFLOP; capacity {result["shape"]["capacity"]} rows/expert, '
        f'{100 * result["capacity_dropped_fraction"]:.1f}% of choices dropped; dropless: at most {n_blocks} tiles of '
        f'{block} rows (FLOPs counted by hand: XLA counts a scan body once); wrote {args.out}')


if __name__ == '__main__':
  main()
