"""The study's outputs: the table (mean and 95% interval per column over seeds, arms as rows) as Markdown and JSON,
and the loss curves of all arms in one figure."""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

# Student's t, two-sided 95%, by degrees of freedom (n seeds - 1): the interval of a mean over few seeds.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
  """(mean, half-width of the 95% interval), the half-width None for one value."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return math.nan, None
  if x.size == 1:
    return float(x[0]), None
  half = T95.get(x.size - 1, 1.96) * x.std(ddof=1) / math.sqrt(x.size)
  return float(x.mean()), float(half)


def _cell(values: Sequence[float], digits: int = 3) -> str:
  m, h = mean_ci(values)
  return f'{m:.{digits}f}' if h is None else f'{m:.{digits}f} ± {h:.{digits}f}'


def table(runs: dict[str, list[dict]], kinds: Sequence[str], chance: dict[str, float],
          chance_all: float | None = None) -> dict:
  """{'columns', 'rows': {arm: {column: {'mean', 'ci95', 'values'}}}} from each arm's per-seed results."""
  columns = [*kinds, 'all', 'final_loss']
  rows = {}
  for arm, results in runs.items():
    row = {}
    for col in columns:
      values = [r['final_loss'] if col == 'final_loss' else r['accuracy'][col] for r in results]
      m, h = mean_ci(values)
      row[col] = {'mean': m, 'ci95': h, 'values': values}
    rows[arm] = row
  chance = dict(chance)
  if chance_all is not None:
    chance['all'] = chance_all
  return {'columns': columns, 'rows': rows, 'chance': chance}


def markdown(tab: dict, title: str, seeds: Sequence[int], notes: Sequence[str] = ()) -> str:
  cols = tab['columns']
  head = ' | '.join(['arm', *(c.replace('_', ' ') for c in cols), 'seeds'])
  lines = [f'# {title}', '', f'Held-out exact-match accuracy per question kind: mean ± 95% interval (Student\'s t) '
           f'over seeds {", ".join(map(str, seeds))}; final loss is the last logged stage-2 training loss.', '',
           f'| {head} |', '|' + '---|' + '---:|' * (len(cols) + 1)]
  for arm, row in tab['rows'].items():
    n = len(next(iter(row.values()))['values'])
    lines.append('| ' + ' | '.join([arm, *(_cell(row[c]['values'], 4 if c == 'final_loss' else 3) for c in cols),
                                    str(n)]) + ' |')
  chance = tab['chance']
  lines.append('| chance | ' + ' | '.join(f'{chance[c]:.3f}' if c in chance else '' for c in cols) + ' | |')
  lines += ['', *notes]
  return '\n'.join(lines) + '\n'


def plot_losses(curves: dict[str, list[tuple[list[int], list[float]]]], path: str) -> str:
  """One figure: each arm's stage-2 loss against step (its seeds' mean, the range shaded)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
  for arm, runs in curves.items():
    n = min(len(s) for s, _ in runs)
    if n == 0:
      continue
    steps = np.asarray(runs[0][0][:n])
    losses = np.asarray([l[:n] for _, l in runs])
    ax.plot(steps, losses.mean(0), label=arm)
    if len(runs) > 1:
      ax.fill_between(steps, losses.min(0), losses.max(0), alpha=0.2)
  ax.set_xlabel('stage-2 step')
  ax.set_ylabel('training loss')
  ax.set_yscale('log')
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def write_json(obj, path: str) -> str:
  """Atomically: a killed study never leaves half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
  return path


def write_text(text: str, path: str) -> str:
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)
  return path
