"""Forward+backward time and compiled FLOPs of the MoIIE layer against a dense SwiGLU doing the same work, a plain
matmul of the same FLOPs, and the PyTorch loop-over-experts block the official code is built like.

Run: `.venv/bin/python bench/moe_layer.py [--tokens 4096 --iters 9]`. Prints a table and writes
bench/results/moe_layer.json. Two dense equivalents do the work of the K experts each token activates: one
SwiGLU FFN of width K*F, and K FFNs of width F as one [K, D, F] batched matmul; ratios are taken against
whichever ran faster. Measurements are interleaved (each case once per round) so that load from other processes
hits all cases alike. Reported: wall-time medians (the headline ratios), minima, the median of per-round
ratios, and median process CPU time (all threads), which other processes' load disturbs least.

`torch_mixtral_loop`: transformers' `MixtralSparseMoeBlock` (its experts loop over the experts a batch hits, as
the official MoIIE block and MoE-LLaVA's do) with our layer's weights, its gate replaced by the MoIIE routing (the
visual router over vision + shared experts for image tokens, the textual one over language + shared for text,
top-2, renormalised); forward + backward w.r.t. parameters and input on the same shapes, in the same interleaved
rounds; its output is checked against ours first. `plain_matmul`: one [N, D] x [D, 3*K*F] product, forward +
backward (the FLOPs of the ideal layer): the machine's matmul rate in this run, against which the layer's FLOP rate
is quoted (`x matmul rate`): once for the FLOPs a path executes (capacity slots and padding rows included) and once
for its useful FLOPs (the ideal layer's, whatever it executes: the stricter reading, and the one the targets use).
`dropless_tiles256`: the dropless layer with the scan backend's tiles all of 256 rows, as before its whole +
remainder tiles (`gmm.Tiles`). FLOPs are counted by hand from the rows each path runs through the expert matmuls
(XLA's own counts, which see a loop body once and, on a GPU, no library matmul, are kept in the JSON).

`--dtype bfloat16` runs every path in bf16 (PyTorch too; routers in float32). Off a CPU (`--grouped_matmul`, or a
GPU's default ragged_dot) the dropless layer runs on that backend and `dropless_scan` is the same layer on the
scan backend; PyTorch runs on the GPU when JAX does.

N tokens, D model width, F FFN width, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from moiie_jax.models.moe import (MoEBlock, expert_capacity, separate_projections,  # noqa: E402
                                  weighted_aux_loss)
from moiie_jax.models import gmm  # noqa: E402

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
  ap.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                  help='parameters, activations and products of every path (PyTorch too); routers stay float32')
  ap.add_argument('--grouped_matmul', default='auto', choices=gmm.GROUPED_MATMULS,
                  help="the dropless layer's backend (auto: by platform); off the scan backend, scan rows beside it")
  ap.add_argument('--out', default=RESULTS)
  args = ap.parse_args()

  moe = MoEConfig(variant='moiie', n_vision=1, n_shared=2, n_language=1, top_k=2, grouped_matmul=args.grouped_matmul)
  cfg = LLMConfig(hidden_size=args.d, intermediate_size=args.f, num_hidden_layers=2, moe=moe, dtype=args.dtype,
                  param_dtype=args.dtype)
  n, d, f, k = args.tokens, args.d, args.f, moe.top_k
  b, t = n // args.seq, args.seq
  dtype = jnp.dtype(args.dtype)
  block = MoEBlock(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(block)
  # Off a CPU the default backend is not the scan backend: the same layer on the scan backend is a row of its own.
  on_scan = gmm.resolve(moe.grouped_matmul) == 'scan'
  graphdef_scan = graphdef if on_scan else nnx.split(MoEBlock(dataclasses.replace(
      cfg, moe=dataclasses.replace(moe, grouped_matmul='scan')), rngs=nnx.Rngs(0)))[0]
  x = jax.random.normal(jax.random.key(1), (b, t, d), dtype)
  g = jax.random.normal(jax.random.key(2), (b, t, d), dtype)  # output cotangent
  modality = jnp.broadcast_to((jnp.arange(t) < args.image_tokens).astype(jnp.int32), (b, t))
  valid = jnp.ones((b, t), jnp.int32)

  def moe_forward(cf, graphdef=graphdef):
    def fwd(params, x):
      y, stats = nnx.merge(graphdef, params)(x, modality, valid, capacity_factor=cf)
      return y, stats
    return fwd

  def moe_loss(cf, graphdef=graphdef):
    def loss(params, x):
      y, stats = moe_forward(cf, graphdef)(params, x)
      return jnp.sum((y * g).astype(jnp.float32)) + weighted_aux_loss(stats, moe)
    return loss

  def apart(fn):
    def wrapped(params, x):
      with separate_projections():  # read at trace time
        return fn(params, x)
    return wrapped

  one_tile = gmm.Tiles(256, 256)  # the scan backend's tiles before whole + remainder tiles (R = 256 at this shape)

  def one_tile_size(fn):
    def wrapped(params, x):
      with gmm.tiles_as(one_tile):  # read at trace time
        return fn(params, x)
    return wrapped

  keys = jax.random.split(jax.random.key(3), 3)
  dense = {'gate': 0.02 * jax.random.normal(keys[0], (d, k * f), dtype),
           'up': 0.02 * jax.random.normal(keys[1], (d, k * f), dtype),
           'down': 0.02 * jax.random.normal(keys[2], (k * f, d), dtype)}

  def dense_forward(p, x):
    return jnp.einsum('BTF,FD->BTD', jax.nn.silu(x @ p['gate']) * (x @ p['up']), p['down'])

  def dense_loss(p, x):
    return jnp.sum((dense_forward(p, x) * g).astype(jnp.float32))

  # The same work as K separate FFNs of width F (a [K, D, F] batched matmul, the experts' own shape).
  keys = jax.random.split(jax.random.key(4), 3)
  dense_k = {'gate': 0.02 * jax.random.normal(keys[0], (k, d, f), dtype),
             'up': 0.02 * jax.random.normal(keys[1], (k, d, f), dtype),
             'down': 0.02 * jax.random.normal(keys[2], (k, f, d), dtype)}

  def dense_k_forward(p, x):
    h = jax.nn.silu(jnp.einsum('BTD,KDF->KBTF', x, p['gate'])) * jnp.einsum('BTD,KDF->KBTF', x, p['up'])
    return jnp.einsum('KBTF,KFD->BTD', h, p['down'])

  def dense_k_loss(p, x):
    return jnp.sum((dense_k_forward(p, x) * g).astype(jnp.float32))

  wide = {'w': 0.02 * jax.random.normal(jax.random.key(5), (d, 3 * k * f), dtype)}
  g_wide = jax.random.normal(jax.random.key(6), (n, 3 * k * f), dtype)

  def matmul_forward(p, x):
    return x.reshape(n, d) @ p['w']

  def matmul_loss(p, x):
    return jnp.sum((matmul_forward(p, x) * g_wide).astype(jnp.float32))

  cases = {
      'plain_matmul': (matmul_loss, matmul_forward, wide),
      'dense_kF': (dense_loss, dense_forward, dense),
      'dense_K_ffns': (dense_k_loss, dense_k_forward, dense_k),
      'moiie_capacity': (moe_loss(args.capacity_factor), moe_forward(args.capacity_factor), params),
      'moiie_dropless': (moe_loss(0.0), moe_forward(0.0), params),
  }
  if not on_scan:  # the same layer on the scan backend (fused expert FFN), beside the platform's own backend
    cases['dropless_scan'] = (moe_loss(0.0, graphdef_scan), moe_forward(0.0, graphdef_scan), params)
  # The dropless layer as before the fused expert FFN: one grouped matmul per projection (scan backend).
  cases['dropless_apart'] = (apart(moe_loss(0.0, graphdef_scan)), apart(moe_forward(0.0, graphdef_scan)), params)
  # The dropless layer with one tile size of 256 rows for every tile (as before whole + remainder tiles).
  cases['dropless_tiles256'] = (one_tile_size(moe_loss(0.0, graphdef_scan)),
                                one_tile_size(moe_forward(0.0, graphdef_scan)), params)
  # value_and_grad: with grad alone XLA drops the dense FFN's last forward matmul (only its cotangent is needed),
  # which the MoE cannot do (its combine weights need the expert outputs); a training step needs the value anyway.
  steps = {name: jax.jit(jax.value_and_grad(loss, argnums=(0, 1))) for name, (loss, _, _) in cases.items()}
  for name, step in steps.items():
    for _ in range(args.warmup):
      jax.block_until_ready(step(cases[name][2], x))
  torch_step, torch_diff = torch_block(block, params, x, modality, g, args.dtype)
  steps['torch_mixtral_loop'] = torch_step
  for _ in range(args.warmup):
    torch_step()
  names = list(steps)
  times = {name: [] for name in names}
  cpu = {name: [] for name in names}  # process CPU seconds (all threads): less sensitive to other processes' load
  for _ in range(args.iters):
    for name, step in steps.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      if name == 'torch_mixtral_loop':
        step()
      else:
        jax.block_until_ready(step(cases[name][2], x))
      times[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  med = {name: statistics.median(v) for name, v in times.items()}
  scan_name = 'moiie_dropless' if on_scan else 'dropless_scan'
  best = {name: min(v) for name, v in times.items()}
  # Per-round ratios compare runs seconds apart, which cancels slow drifts in the machine's load.
  # The reference is the faster of the two dense forms in this run (the stricter comparison).
  ref = min(('dense_kF', 'dense_K_ffns'), key=lambda name: med[name])
  per_round = lambda slow, fast: statistics.median(a / b for a, b in zip(times[slow], times[fast]))
  paired = {name: per_round(name, ref) for name in times}
  med_cpu = {name: statistics.median(v) for name, v in cpu.items()}

  ideal_fwd = 2 * 3 * n * k * d * f
  # Every path's FLOPs are counted by hand, from the rows each pushes through the three D x F matmuls: XLA's cost
  # analysis counts a while loop's body once (the scan backend's tiles) and, on a GPU, leaves out the library
  # matmuls (cuBLAS custom calls). Its counts are kept beside them (`xla_*`).
  xla_fwd = {name: flops(fwd, p, x) for name, (_, fwd, p) in cases.items()}
  xla_step = {name: flops(jax.value_and_grad(loss, argnums=(0, 1)), p, x) for name, (loss, _, p) in cases.items()}
  _, stats = jax.jit(moe_forward(args.capacity_factor))(params, x)
  tiles = gmm.scan_tiles(n * k, moe.n_experts)
  router_flops = 2 * n * d * (moe.n_vision + 2 * moe.n_shared + moe.n_language)  # both routers run on every token
  # The scan backend's rows: at most N*K + E * (r - 1) (each expert's last tile of r rows may hold fewer of its
  # rows; an upper bound). Another backend (ragged_dot on a GPU) is counted at the rows it is given, N*K (what its
  # kernel executes on top, if anything, is not visible here). Capacity: E slots of C rows, filled or not.
  scan_rows = n * k + moe.n_experts * (tiles.rest - 1)
  expert_rows = {'moiie_dropless': scan_rows if on_scan else n * k, 'dropless_scan': scan_rows,
                 'dropless_apart': scan_rows, 'dropless_tiles256': n * k + moe.n_experts * (one_tile.rest - 1),
                 'moiie_capacity': moe.n_experts * expert_capacity(moe, n, args.capacity_factor),
                 'torch_mixtral_loop': n * k}  # the PyTorch block runs each expert on exactly its tokens
  fwd_flops = {name: 2 * 3 * rows * d * f + router_flops for name, rows in expert_rows.items() if name in names}
  # The dense forms and the plain matmul do the ideal layer's matmuls (N*K rows' worth), without routers.
  fwd_flops.update({name: ideal_fwd for name in ('plain_matmul', 'dense_kF', 'dense_K_ffns')})
  step_flops = {name: 3 * v for name, v in fwd_flops.items()}  # a matmul's backward is two of its size
  rate = {name: step_flops[name] / med[name] for name in names}  # FLOP/s executed (counted as above), median wall
  # The rate of useful work: the ideal layer's FLOPs (N*K rows through the three matmuls, and the routers) per
  # second, whatever a path executes on top (capacity slots, padding rows): the "x matmul rate" is read on
  # this one. The plain matmul does exactly the ideal FLOPs, so for it both rates are the same.
  useful = 3 * (ideal_fwd + router_flops)
  useful_rate = {name: (step_flops[name] if name == 'plain_matmul' else useful) / med[name] for name in names}

  result = {
      'date': datetime.date.today().isoformat(),
      'device': (f'{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'
                 if jax.default_backend() == 'cpu' else f'{jax.default_backend()} ({jax.devices()[0].device_kind})'),
      'dtype': args.dtype,
      'grouped_matmul': gmm.resolve(moe.grouped_matmul),
      'jax': jax.__version__,
      'shape': {'tokens': n, 'd': d, 'f': f, 'experts': moe.n_experts, 'layout': '1 vision + 2 shared + 1 language',
                'top_k': k, 'image_fraction': args.image_tokens / t, 'capacity_factor': args.capacity_factor,
                'capacity': expert_capacity(moe, n, args.capacity_factor),
                'dropless_rows_at_most': expert_rows['moiie_dropless'],
                'dropless_tile_rows': {'whole': tiles.whole, 'rest': tiles.rest}},
      'iters': args.iters,
      'median_s': med,
      'min_s': best,
      'all_s': times,
      'median_cpu_s': med_cpu,
      'all_cpu_s': cpu,
      'forward_flops': fwd_flops,
      'fwd_bwd_flops': step_flops,
      'xla_forward_flops': xla_fwd,
      'xla_fwd_bwd_flops': xla_step,
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
      'flop_rate': rate,
      'useful_flop_rate': useful_rate,
      'dropless_rate_vs_plain_matmul': rate['moiie_dropless'] / rate['plain_matmul'],
      'capacity_rate_vs_plain_matmul': rate['moiie_capacity'] / rate['plain_matmul'],
      'dropless_useful_rate_vs_plain_matmul': useful_rate['moiie_dropless'] / rate['plain_matmul'],
      'capacity_useful_rate_vs_plain_matmul': useful_rate['moiie_capacity'] / rate['plain_matmul'],
      # The scan backend's own comparisons: its default tiles and its fused FFN, on the row that runs them.
      'dropless_speedup_vs_tiles256': med['dropless_tiles256'] / med[scan_name],
      'dropless_speedup_vs_tiles256_paired': per_round('dropless_tiles256', scan_name),
      'dropless_speedup_vs_torch_loop': med['torch_mixtral_loop'] / med['moiie_dropless'],
      'dropless_speedup_vs_torch_loop_paired': per_round('torch_mixtral_loop', 'moiie_dropless'),
      'dropless_speedup_vs_apart': med['dropless_apart'] / med[scan_name],
      'dropless_speedup_vs_apart_paired': per_round('dropless_apart', scan_name),
      'torch_max_abs_diff_vs_ours': torch_diff,
      'torch': torch_version(),
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as fh:
    json.dump(result, fh, indent=2)

  print(f'MoIIE layer fwd+bwd, {result["device"]}, tokens={n} D={d} F={f} E={moe.n_experts} K={k}, '
        f'{args.iters} interleaved rounds; "x dense" against {ref}, the faster dense form')
  print(f'{"path":<20}{"median ms":>10}{"x dense":>9}{"min ms":>9}{"x dense":>9}{"paired":>8}{"cpu ms":>9}'
        f'{"x dense":>9}{"fwd GFLOP":>11}{"x ideal":>9}{"fwd+bwd GFLOP":>15}{"GFLOP/s":>9}{"x matmul":>9}'
        f'{"useful GFLOP/s":>16}{"x matmul":>9}')
  for name in names:
    print(f'{name:<20}{1e3 * med[name]:>10.1f}{med[name] / med[ref]:>9.2f}{1e3 * best[name]:>9.1f}'
          f'{best[name] / best[ref]:>9.2f}{paired[name]:>8.2f}{1e3 * med_cpu[name]:>9.1f}'
          f'{med_cpu[name] / med_cpu[ref]:>9.2f}{fwd_flops[name] / 1e9:>11.2f}'
          f'{fwd_flops[name] / ideal_fwd:>9.3f}{step_flops[name] / 1e9:>15.2f}{rate[name] / 1e9:>9.1f}'
          f'{rate[name] / rate["plain_matmul"]:>9.2f}{useful_rate[name] / 1e9:>16.1f}'
          f'{useful_rate[name] / rate["plain_matmul"]:>9.2f}')
  print(f'dropless vs the PyTorch loop-over-experts block: {result["dropless_speedup_vs_torch_loop"]:.2f}x faster '
        f'(median wall; {result["dropless_speedup_vs_torch_loop_paired"]:.2f}x per round); outputs agree to '
        f'{torch_diff:.1e}')
  if not on_scan:
    print(f'dropless on {result["grouped_matmul"]} vs the scan backend: {med[scan_name] / med["moiie_dropless"]:.2f}x '
          f'(median wall; {per_round(scan_name, "moiie_dropless"):.2f}x per round)')
  print(f'scan backend: fused expert FFN vs one grouped matmul per projection: '
        f'{result["dropless_speedup_vs_apart"]:.2f}x (median wall; '
        f'{result["dropless_speedup_vs_apart_paired"]:.2f}x per round)')
  print(f'scan backend: whole + remainder tiles ({tiles.whole} + {tiles.rest} rows) vs one tile size (256): '
        f'{result["dropless_speedup_vs_tiles256"]:.2f}x (median wall; '
        f'{result["dropless_speedup_vs_tiles256_paired"]:.2f}x per round)')
  print(f'ideal forward {ideal_fwd / 1e9:.2f} GFLOP; capacity {result["shape"]["capacity"]} rows/expert, '
        f'{100 * result["capacity_dropped_fraction"]:.1f}% of choices dropped; dropless: at most '
        f'{expert_rows["moiie_dropless"]} rows through the experts (FLOPs counted by hand, XLA\'s counts kept in the '
        f'JSON); "useful": the ideal layer\'s FLOPs per second, whatever a path executes; wrote {args.out}')


def torch_version() -> str:
  import torch  # pylint: disable=g-import-not-at-top
  return torch.__version__


def torch_block(block, params, x, modality, g, dtype):
  """transformers' MixtralSparseMoeBlock with our layer's weights and the MoIIE routing in place of its gate, in
  `dtype` (its routers in float32, as ours), on the GPU when JAX runs on one. Returns (a step running forward +
  backward w.r.t. parameters and input, max |its output - ours|)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import MixtralConfig  # pylint: disable=g-import-not-at-top
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # pylint: disable=g-import-not-at-top
  from moiie_jax.models.routing import router_ranges  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  tdtype = getattr(torch, dtype)
  moe = block.moe
  b, t, d = x.shape
  f = block.cfg.intermediate_size
  e = moe.n_experts
  tb = MixtralSparseMoeBlock(MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e,
                                           num_experts_per_tok=moe.top_k, hidden_act='silu'))
  as_t = lambda a: torch.from_numpy(np.array(a, np.float32)).to(device)
  ex = block.experts
  with torch.no_grad():  # ours: kernels [E, D, F] / [E, F, D]; theirs: [E, 2F, D] (gate, then up) and [E, D, F]
    tb.experts.gate_up_proj.copy_(torch.cat([as_t(ex.gate_proj.kernel[...]), as_t(ex.up_proj.kernel[...])],
                                            dim=2).transpose(1, 2))
    tb.experts.down_proj.copy_(as_t(ex.down_proj.kernel[...]).transpose(1, 2))
  (t0, t1), (v0, v1) = router_ranges(moe)
  image = torch.from_numpy(np.array(modality).reshape(-1) == 1).to(device)

  class MoIIEGate(torch.nn.Module):
    """The two routers, each a softmax over its own experts, top-k, renormalised; global expert indices."""

    def __init__(self):
      super().__init__()
      self.text = torch.nn.Parameter(as_t(block.gate.kernel[...]).T.contiguous())  # [t1 - t0, D]
      self.vis = torch.nn.Parameter(as_t(block.gate_vis.kernel[...]).T.contiguous())  # [v1 - v0, D]

    def forward(self, h):
      out = []
      for w, start, members in ((self.text, t0, ~image), (self.vis, v0, image)):
        probs = torch.softmax(torch.nn.functional.linear(h.float(), w), dim=-1)
        top, idx = torch.topk(probs, moe.top_k, dim=-1)
        out.append((members, top / top.sum(-1, keepdim=True), idx + start))
      (m_t, w_t, i_t), (_, w_v, i_v) = out
      scores = torch.where(m_t[:, None], w_t, w_v)
      index = torch.where(m_t[:, None], i_t, i_v)
      return None, scores, index

  tb.experts.to(device=device, dtype=tdtype)
  tb.gate = MoIIEGate()  # float32 routers, as ours
  xt = as_t(x).to(tdtype).requires_grad_(True)
  gt = as_t(g).to(tdtype)
  with torch.no_grad():
    ours, _ = block(x, modality, jnp.ones(modality.shape, jnp.int32), capacity_factor=0.0)
    diff = float((tb(xt).float() - as_t(ours)).abs().max())

  def step():
    tb.zero_grad(set_to_none=True)
    xt.grad = None
    loss = (tb(xt) * gt).float().sum()
    loss.backward()
    sync()
    return loss

  del params
  return step, diff


if __name__ == '__main__':
  main()
