"""XLA:CPU flags (and C allocator settings) for training: the step's time under each candidate, side by side.

    python bench/cpu_flags.py [--configs tiny] [--steps 10] [--rounds 2] [--only NAME,...] [--out FILE]

Each candidate runs `bench/train_step.py` in its own process (flags are read once, when XLA starts) with XLA_FLAGS
set to the candidate's flags and, for the allocator candidates, its environment variables (glibc reads
GLIBC_TUNABLES once, at process start); candidates take turns for `--rounds` rounds, so a noisy neighbour slows
them alike. The table gives each candidate's median step time (over rounds of the per-round medians), the system
time and minor page faults per step, its compile time and its speed-up over the baseline (no extra flags) measured
in the same run; the loss after the timed steps is printed too, so a flag that changes the numbers shows. JSON in
bench/results/cpu_flags.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> extra XLA flags. Exact math unless the name says otherwise.
CANDIDATES = {
    'baseline': '',
    'single_thread_eigen': '--xla_cpu_multi_thread_eigen=false',
    'xnnpack': '--xla_cpu_use_xnnpack=true',
    'onednn': '--xla_cpu_use_onednn=true',
    'ynn_dot': '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
    'ynn_dot_eltwise': ('--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,'
                        'LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE'),
    'xnn_graph_greedy': '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY',
    'concurrency_scheduler': '--xla_cpu_enable_concurrency_optimized_scheduler=true',
    'no_fusion_emitters': '--xla_cpu_use_fusion_emitters=false',
    'opt_preset_fast_runtime': '--xla_cpu_opt_preset=FAST_RUNTIME',
    'single_thread_fast_runtime': '--xla_cpu_multi_thread_eigen=false --xla_cpu_opt_preset=FAST_RUNTIME',
    'concurrency_fast_runtime': ('--xla_cpu_enable_concurrency_optimized_scheduler=true '
                                 '--xla_cpu_opt_preset=FAST_RUNTIME'),
    # Not an XLA flag: transparent huge pages for the mmaps glibc serves XLA's per-call temporaries from (one
    # buffer of ~160 MB per step at the demo's shape, zero-filled page by page otherwise; bench/RESULTS.md).
    'malloc_hugetlb': '',
}
# Extra environment of a candidate (the flags above go to XLA_FLAGS).
CANDIDATE_ENV = {'malloc_hugetlb': {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}}


def run_one(name: str, flags: str, config: str, steps: int) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + flags).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env.update(CANDIDATE_ENV.get(name, {}))
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'row.json')
    proc = subprocess.run([sys.executable, os.path.join(HERE, 'train_step.py'), '--configs', config,
                           '--steps', str(steps), '--out', out], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
      last = (proc.stderr.strip().splitlines() or ['?'])[-1]
      return {'candidate': name, 'flags': flags, 'error': last[:300]}
    with open(out) as f:
      row = json.load(f)['rows'][0]
  row.update(candidate=name, flags=flags)
  return row


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--configs', default='tiny')
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--rounds', type=int, default=2)
  ap.add_argument('--only', default='', help='comma-separated candidate names (baseline is always run)')
  ap.add_argument('--out', default=os.path.join(HERE, 'results', 'cpu_flags.json'))
  args = ap.parse_args()
  names = list(CANDIDATES) if not args.only else ['baseline'] + [n for n in args.only.split(',') if n != 'baseline']
  unknown = [n for n in names if n not in CANDIDATES]
  if unknown:
    raise SystemExit(f'cpu_flags: unknown candidate(s) {unknown}; expected some of {list(CANDIDATES)}')
  summary = []
  for config in args.configs.split(','):
    per = {n: [] for n in names}
    for _ in range(args.rounds):
      for n in names:
        per[n].append(run_one(n, CANDIDATES[n], config, args.steps))
    base = np.median([r['step_seconds_median'] for r in per['baseline'] if 'error' not in r])
    for n in names:
      ok = [r for r in per[n] if 'error' not in r]
      if not ok:
        summary.append({'config': config, 'candidate': n, 'flags': CANDIDATES[n], 'env': CANDIDATE_ENV.get(n, {}),
                        'error': per[n][0]['error']})
        continue
      sec = float(np.median([r['step_seconds_median'] for r in ok]))
      summary.append({'config': config, 'candidate': n, 'flags': CANDIDATES[n], 'env': CANDIDATE_ENV.get(n, {}),
                      'step_seconds': sec,
                      'step_seconds_min': float(min(r['step_seconds_min'] for r in ok)),
                      'compile_seconds': float(np.median([r['compile_seconds'] for r in ok])),
                      'sys_seconds_per_step': float(np.median([r['sys_seconds_per_step'] for r in ok])),
                      'minor_faults_per_step': float(np.median([r['minor_faults_per_step'] for r in ok])),
                      'speedup_vs_baseline': float(base / sec), 'final_loss': ok[-1].get('final_loss'),
                      'rounds': [r['step_seconds_median'] for r in ok]})
  print(f'{"config":<6} {"candidate":<24} {"step s":>8} {"min s":>8} {"sys s":>7} {"faults":>8} {"compile s":>9} '
        f'{"x base":>7} {"loss":>10}')
  for s in summary:
    if 'error' in s:
      print(f'{s["config"]:<6} {s["candidate"]:<24} error: {s["error"][:80]}')
      continue
    loss = '-' if s['final_loss'] is None else f'{s["final_loss"]:.6f}'
    print(f'{s["config"]:<6} {s["candidate"]:<24} {s["step_seconds"]:>8.3f} {s["step_seconds_min"]:>8.3f} '
          f'{s["sys_seconds_per_step"]:>7.3f} {s["minor_faults_per_step"]:>8.0f} {s["compile_seconds"]:>9.1f} '
          f'{s["speedup_vs_baseline"]:>7.2f} {loss:>10}')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  tmp = args.out + '.tmp'
  with open(tmp, 'w') as f:
    json.dump({'date': time.strftime('%Y-%m-%d'), 'machine_cores': os.cpu_count(), 'rows': summary}, f, indent=2)
  os.replace(tmp, args.out)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
