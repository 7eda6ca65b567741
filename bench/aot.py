"""Full-size recipes compiled for TPU slices and GPU hosts on this CPU machine: do they fit, and how fast would they go?

    python bench/aot.py                         # every recipe x topology below (hours on 2 cores: resumable)
    python bench/aot.py --only phi3-s2-moiie --topologies v5p-64
    python bench/aot.py --table                 # print the table of what is done, compile nothing

Each (recipe, topology) runs `python -m moiie_jax.aot` in its own process (one libtpu client and one compile at a
time; memory returned between them) and keeps its JSON report in bench/results/aot/NAME@TOPOLOGY.json, so a rerun
skips what is done (`--force` redoes it). The table (also bench/results/aot.json) gives per recipe and topology:
per-chip GiB against the chip's HBM, fits, model TFLOPs per step, the roofline step-time estimate and the MFU it
implies (assumptions: moiie_jax/parallel/topology.py; a TPU memory figure is the XLA:TPU compiler's own, a GPU
host's is the TPU compiler's on an 8-chip stand-in and so an estimate). Two derived rows:

  MoIIE vs Dense at equal activated FLOPs: (t_moiie / F_moiie) / (t_dense / F_dense) with t the estimated step
  time and F the model FLOPs per step (which count only activated experts); target <= 1.15.
  all-to-all bytes vs the minimum, for the expert-parallel row: the HLO's all-to-all bytes per chip against what
  the routed rows need, 2 exchanges (there and back) x 2 (forward and backward) x MoE layers x N_l * K rows of D
  bf16 values x (ep - 1) / ep leaving the chip; at capacity factor 1 the two are equal up to capacity rounding;
  target <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, 'bench', 'results', 'aot')

# name -> (recipe spec, extra --config overrides). Defaults everywhere: no mesh flags.
RECIPES = {
    'phi3-s1': ('configs/phi3_mini_moiie.py:stage=1', []),
    'phi3-s2-moiie': ('configs/phi3_mini_moiie.py:stage=2', []),
    'phi3-s2-dense': ('configs/phi3_mini_moiie.py:stage=2,variant=dense', []),
    'phi3-s2-vanilla': ('configs/phi3_mini_moiie.py:stage=2,variant=vanilla', []),
    'phi3-s2-modality': ('configs/phi3_mini_moiie.py:stage=2,variant=modality', []),
    'phi3-s2-moiie-8e': ('configs/phi3_mini_moiie.py:stage=2,experts=8', []),
    'phi3-s2-moiie-all': ('configs/phi3_mini_moiie.py:stage=2,placement=all', []),
    'llama3-s2-moiie': ('configs/llama3_8b_moiie.py:stage=2', []),
    'moe-llava-s3': ('configs/moe_llava.py', []),
    # The paper's stage 2 with S2 features (the tower on 14 tiles per image, a 3456-wide connector).
    'phi3-s2-moiie-s2': ('configs/phi3_mini_moiie.py:stage=2,s2=on', []),
    # Expert parallelism (capacity 1.0, so all-to-all bytes can be set against the routed rows' minimum).
    'phi3-s2-moiie-ep4': ('configs/phi3_mini_moiie.py:stage=2',
                          ['--config.mesh.expert=4', '--config.model.moe.capacity_factor=1.0']),
}
TOPOLOGIES = ('v5p-64', 'v4-64', '8xh100')


def path(name: str, topo: str) -> str:
  return os.path.join(OUT_DIR, f'{name}@{topo}.json')


def run(name: str, topo: str, timeout: int) -> dict:
  spec, extra = RECIPES[name]
  out = path(name, topo)
  cmd = [sys.executable, '-m', 'moiie_jax.aot', f'--config={spec}', f'--topology={topo}', f'--out={out}', *extra]
  t0 = time.time()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    report = {'error': f'compile did not finish within {timeout} s'}
  else:
    if proc.returncode in (0, 1) and os.path.isfile(out):
      with open(out) as f:
        return json.load(f)
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    report = {'error': lines[-1] if lines else f'exit {proc.returncode}'}
  report.update(topology=topo, wall_s=time.time() - t0)
  with open(out + '.tmp', 'w') as f:
    json.dump(report, f, indent=1)
  os.replace(out + '.tmp', out)
  return report


def _gib(x) -> str:
  return '-' if x is None else f'{x / 2 ** 30:.1f}'


def row(name: str, r: dict) -> dict:
  mem, roof, flops = r.get('memory', {}), r.get('roofline', {}), r.get('flops', {})
  return {'recipe': name, 'topology': r.get('topology'), 'mesh': r.get('mesh'), 'gib_per_chip': mem.get('total'),
          'hbm': mem.get('hbm'), 'fits': r.get('fits'), 'model_tflops': flops.get('model', 0) / 1e12 or None,
          'step_s': roof.get('estimate_s'), 'mfu': roof.get('mfu'), 'compile_s': r.get('compile_seconds'),
          'error': r.get('error'), 'note': r.get('note')}


def derived(reports: dict) -> dict:
  out = {}
  for topo in TOPOLOGIES:
    moiie, dense = reports.get(('phi3-s2-moiie', topo)), reports.get(('phi3-s2-dense', topo))
    if moiie and dense and moiie.get('roofline') and dense.get('roofline'):
      per = lambda r: r['roofline']['estimate_s'] / r['flops']['model']
      out[f'moiie_vs_dense_per_flop@{topo}'] = per(moiie) / per(dense)
    ep = reports.get(('phi3-s2-moiie-ep4', topo))
    if ep and ep.get('collectives'):
      sys.path.insert(0, ROOT)
      from moiie_jax.train import recipe  # pylint: disable=import-outside-toplevel
      llm = recipe.model_config(recipe.load(RECIPES['phi3-s2-moiie-ep4'][0])).llm
      a2a = ep['collectives']['bytes_per_chip'].get('all-to-all', 0.0)
      n_l = ep['global_batch'] * ep['seq_len'] / ep['chips']  # tokens per chip per micro-step
      ep_size = ep['mesh']['expert']
      minimum = 2 * 2 * len(llm.moe_layers) * n_l * llm.moe.top_k * llm.hidden_size * 2 * (ep_size - 1) / ep_size
      out[f'all_to_all_vs_minimum@{topo}'] = a2a / minimum if minimum else None
  return out


def table(reports: dict) -> str:
  head = (f'{"recipe":<20} {"topology":<8} {"GiB/chip":>9} {"HBM":>6} {"fits":>5} {"TFLOP/step":>11} '
          f'{"est. step":>10} {"MFU":>6} {"compile":>8}')
  lines = [head, '-' * len(head)]
  for (name, topo), r in sorted(reports.items(), key=lambda kv: (list(RECIPES).index(kv[0][0]), kv[0][1])):
    x = row(name, r)
    if x['error']:
      lines.append(f'{name:<20} {topo:<8} error: {x["error"][:80]}')
      continue
    fits = {True: 'yes', False: 'NO', None: '-'}[x['fits']]
    step = '-' if x['step_s'] is None else f'{x["step_s"]:.2f} s'
    mfu = '-' if x['mfu'] is None else f'{100 * x["mfu"]:.0f}%'
    comp = '-' if x['compile_s'] is None else f'{x["compile_s"]:.0f} s'
    tf = '-' if x['model_tflops'] is None else f'{x["model_tflops"]:.0f}'
    lines.append(f'{name:<20} {topo:<8} {_gib(x["gib_per_chip"]):>9} {_gib(x["hbm"]):>6} {fits:>5} {tf:>11} '
                 f'{step:>10} {mfu:>6} {comp:>8}')
  for key, value in derived(reports).items():
    lines.append(f'{key}: {value:.3f}' if value is not None else f'{key}: -')
  return '\n'.join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--only', nargs='*', default=list(RECIPES), choices=list(RECIPES))
  p.add_argument('--topologies', nargs='*', default=list(TOPOLOGIES))
  p.add_argument('--force', action='store_true', help='recompile entries that have a report')
  p.add_argument('--table', action='store_true', help='print the table of finished entries and exit')
  p.add_argument('--timeout', type=int, default=3600, help='seconds per compile')
  a = p.parse_args()
  os.makedirs(OUT_DIR, exist_ok=True)
  if not a.table:
    for name in a.only:
      for topo in a.topologies:
        if os.path.isfile(path(name, topo)) and not a.force:
          continue
        r = run(name, topo, a.timeout)
        print(f'{name}@{topo}: {row(name, r)}', flush=True)
  reports = {}
  for name in RECIPES:
    for topo in TOPOLOGIES:
      if os.path.isfile(path(name, topo)):
        with open(path(name, topo)) as f:
          reports[(name, topo)] = json.load(f)
  print(table(reports))
  summary = {'rows': [row(n, r) for (n, _), r in reports.items()], 'derived': derived(reports),
             'date': time.strftime('%Y-%m-%d')}
  with open(os.path.join(ROOT, 'bench', 'results', 'aot.json'), 'w') as f:
    json.dump(summary, f, indent=1, default=str)


if __name__ == '__main__':
  main()
