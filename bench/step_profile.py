"""Where one training step's time goes: the XLA ops of the compiled step, timed by the JAX profiler.

    python bench/step_profile.py [--configs tiny] [--variants dense,moiie] [--seq 96] [--steps 8] [--top 20]

For each (config, variant) of `bench/train_step.py` (random weights, AdamW, everything trains), the step is compiled,
run a few times, then `--steps` steps are traced with `jax.profiler`; the op events of XLA's worker threads are
summed per step and grouped, from the compiled HLO's metadata, by part (the named scopes the model and step put
on their ops: vision_tower, self_attn, attention_core, mlp, moe, loss, optimizer) and by kind (the JAX primitive in
`op_name`), each forward or backward (`transpose(jvp(...))`). On a CPU the threads run
ops side by side, so the summed op time exceeds the wall time; the table gives both, and every op's share of the
summed time. Also timed, without the profiler: the step fed the nnx.State trees the training loop holds, and the same
compiled step fed their flat leaves (what the per-call pytree handling of nnx Variables costs).

JSON: bench/results/step_profile.json (the 100 slowest ops with time, part, kind and shape; the groups; the wall
times).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_step as train_step_bench  # noqa: E402  (bench/train_step.py: the configs and their batches)
from moiie_jax.parallel import hlo_stats  # noqa: E402
from moiie_jax.train import step as step_lib  # noqa: E402

# Control flow: a loop's or branch's event spans its body's ops, which have events of their own.
_CONTROL = ('while', 'conditional', 'call')


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (output shape, op_name metadata)} of a compiled module's text: the instructions that carry
  op_name metadata, control flow left out."""
  names = hlo_stats.op_names(hlo_text)
  comps, _ = hlo_stats.parse_module(hlo_text)
  return {i.name: (i.shape, names[i.name]) for c in comps for i in c.instructions
          if i.name in names and i.opcode not in _CONTROL}


# The named scopes of the model and the step (innermost wins: attention_core lies inside self_attn).
PARTS = ('vision_tower', 'multi_modal_projector', 'self_attn', 'attention_core', 'mlp', 'moe', 'loss', 'optimizer')
_PART = re.compile(r'\b(' + '|'.join(PARTS) + r')\b')


def _direction(op_name: str) -> str:
  return 'bwd' if 'transpose(' in op_name else 'fwd'  # JAX names the backward pass transpose(jvp(...))


def part_of(op_name: str) -> str:
  """'<scope> (fwd|bwd)': the innermost of PARTS named in op_name ('other': embeddings, norms, lm_head, ...)."""
  found = _PART.findall(op_name)
  return f'{found[-1] if found else "other"} ({_direction(op_name)})'


def kind_of(op_name: str) -> str:
  """'<primitive> (fwd|bwd)' from an op_name such as jit(train_step)/transpose(jvp())/dot_general."""
  return f'{op_name.rsplit("/", 1)[-1] or "?"} ({_direction(op_name)})'


def trace_ops(fn, steps: int, ops: dict) -> dict[str, float]:
  """Seconds per step of each traced event named like an instruction of `ops`, over `steps` calls of fn()."""
  folder = tempfile.mkdtemp(prefix='step_profile_')
  jax.profiler.start_trace(folder)
  for _ in range(steps):
    fn()
  jax.profiler.stop_trace()
  path = glob.glob(os.path.join(folder, '**', '*.xplane.pb'), recursive=True)[0]
  totals: collections.Counter = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in ops:
          totals[event.name] += event.duration_ns * 1e-9 / steps
  return dict(totals)


def measure(name: str, variant: str, seq: int | None, steps: int, top: int) -> dict:
  cfg, spec, graphdef, tx, params, opt_state, batch = train_step_bench.setup(name, variant, seq)
  step = jax.jit(step_lib.make_train_step(graphdef, tx, cfg), donate_argnums=(0, 1))
  compiled = step.lower(params, opt_state, batch).compile()
  ops = hlo_ops(compiled.as_text())
  state = [params, opt_state]
  treedefs = [jax.tree.structure(x) for x in state]

  def tree_call():  # the compiled step as the loop calls it: nnx.State trees in, trees out
    state[0], state[1], metrics = compiled(state[0], state[1], batch)
    jax.block_until_ready(metrics['loss'])

  # The same step on flat leaves in and out: no nnx Variable to flatten or rebuild per call.
  flat = jax.jit(lambda p, o, b: jax.tree.leaves(step(jax.tree.unflatten(treedefs[0], p),
                                                      jax.tree.unflatten(treedefs[1], o), b)[:2]),
                 donate_argnums=(0, 1))

  for _ in range(3):
    tree_call()
  flat_state = [jax.tree.leaves(state[0]), jax.tree.leaves(state[1])]
  n_p = len(flat_state[0])
  flat_compiled = flat.lower(*flat_state, batch).compile()
  wall = {'trees': [], 'leaves': []}
  for _ in range(steps):  # alternating, so a noisy neighbour slows both alike
    t0 = time.perf_counter()
    tree_call()
    wall['trees'].append(time.perf_counter() - t0)
    flat_state = [jax.tree.leaves(state[0]), jax.tree.leaves(state[1])]
    t0 = time.perf_counter()
    out = flat_compiled(*flat_state, batch)
    jax.block_until_ready(out[0])
    wall['leaves'].append(time.perf_counter() - t0)
    state[0] = jax.tree.unflatten(treedefs[0], out[:n_p])
    state[1] = jax.tree.unflatten(treedefs[1], out[n_p:])
  per_op = trace_ops(tree_call, steps, ops)
  total = sum(per_op.values())
  groups: collections.Counter = collections.Counter()
  parts: collections.Counter = collections.Counter()
  rows = []
  for op, sec in per_op.items():
    shape, op_name = ops[op]
    kind, part = kind_of(op_name), part_of(op_name)
    groups[kind] += sec
    parts[part] += sec
    rows.append({'op': op, 'seconds': sec, 'kind': kind, 'part': part, 'shape': shape})
  rows.sort(key=lambda r: -r['seconds'])
  return {'config': name, 'variant': variant, 'batch': spec['batch'], 'seq_len': seq or spec['seq'],
          'wall_step_s_trees': float(np.median(wall['trees'])), 'wall_step_s_leaves': float(np.median(wall['leaves'])),
          'op_seconds_per_step': total, 'ops_per_step': len(rows),
          'parts': [{'part': k, 'seconds': v, 'share': v / total} for k, v in parts.most_common()],
          'groups': [{'kind': k, 'seconds': v, 'share': v / total} for k, v in groups.most_common()],
          'top_ops': rows[:max(top, 100)]}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--configs', default='tiny')
  p.add_argument('--variants', default='dense,moiie')
  p.add_argument('--seq', type=int, default=96, help='tokens per row (96: the demo stage 2 bucket); 0 = config')
  p.add_argument('--steps', type=int, default=8)
  p.add_argument('--top', type=int, default=20)
  p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                               'step_profile.json'))
  args = p.parse_args()
  # No persistent compilation cache: its key ignores op metadata, so a cached executable could carry the op names
  # (and scopes) of an older build of the model.
  results = [measure(c, v, args.seq or None, args.steps, args.top)
             for c in args.configs.split(',') for v in args.variants.split(',')]
  for r in results:
    print(f'\n{r["config"]} {r["variant"]}, batch {r["batch"]} x {r["seq_len"]}: wall {1e3 * r["wall_step_s_trees"]:.1f} ms '
          f'per step (nnx.State trees), {1e3 * r["wall_step_s_leaves"]:.1f} ms (flat leaves); XLA ops '
          f'{1e3 * r["op_seconds_per_step"]:.1f} ms summed over threads, {r["ops_per_step"]} ops')
    print(f'  {"part (named scope)":<34} {"ms/step":>8} {"share":>6}')
    for g in r['parts']:
      print(f'  {g["part"]:<34} {1e3 * g["seconds"]:>8.1f} {100 * g["share"]:>5.1f}%')
    print(f'  {"kind (JAX primitive)":<34} {"ms/step":>8} {"share":>6}')
    for g in r['groups'][:12]:
      print(f'  {g["kind"]:<34} {1e3 * g["seconds"]:>8.1f} {100 * g["share"]:>5.1f}%')
    print(f'  {"top op":<34} {"ms/step":>8}  shape')
    for o in r['top_ops'][:args.top]:
      print(f'  {o["op"][:34]:<34} {1e3 * o["seconds"]:>8.2f}  {o["shape"]}  {o["part"]}  {o["kind"]}')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'date': time.strftime('%Y-%m-%d'), 'device': jax.devices()[0].device_kind, 'results': results}, f,
              indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
