"""Token pathways: where each modality's routing goes, per MoE layer and expert group (the paper's Figure 4).

Input, summed over an evaluation set by the caller (`RoutingStats` does the summing):
  slot_counts: float[L, M, E]  top-k slots given to each expert (a token routed top-2 fills two slots)
  weight_sums: float[L, M, E]  routing weights summed over tokens (weights renormalised to 1 per token, so the
                               total per layer and modality is the number of tokens)
L MoE layers, M = 2 modalities in the order `MODALITIES` = (text, image), E experts laid out
[vision..., shared..., language...] as in `MoEConfig` (a vanilla MoE has only shared experts, a modality MoE no
shared ones). `summarize` turns both into shares that sum to 1 per layer and modality (0 everywhere, with
`has_tokens` False, where a layer saw no token of that modality); `plot_pathways` draws the figures.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure  # object API only: renders with Agg, never touches pyplot's global state
from matplotlib.patches import Patch

MODALITIES = ('text', 'image')
GROUPS = ('vision', 'shared', 'language')
GROUP_COLORS = {'vision': '#3b75af', 'shared': '#7f5fa8', 'language': '#e1812c'}
METRICS = ('weight', 'slots')


def expert_labels(n_vision: int, n_shared: int, n_language: int) -> list[str]:
  """'V', 'S1', 'S2', 'L' ... as the paper names experts (no index when a group has one expert)."""
  labels = []
  for prefix, n in (('V', n_vision), ('S', n_shared), ('L', n_language)):
    labels += [prefix] if n == 1 else [f'{prefix}{i + 1}' for i in range(n)]
  return labels


def _shares(values: np.ndarray, bounds: list[tuple[int, int]]) -> tuple[dict, list[float], float]:
  """values: float64[E] -> (group shares, expert shares, total); all shares 0 when the total is 0."""
  total = float(values.sum())
  expert = values / total if total > 0 else np.zeros_like(values)
  groups = {g: float(expert[a:b].sum()) for g, (a, b) in zip(GROUPS, bounds)}
  return groups, [float(x) for x in expert], total


def summarize(slot_counts: np.ndarray, weight_sums: np.ndarray, layer_ids: Sequence[int], n_vision: int,
              n_shared: int, n_language: int) -> dict:
  """Routing shares per layer and modality, per expert group and per expert, for slots and routing weight.

  Args:
    slot_counts: float[L, 2, E] top-k slot counts, modalities (text, image).
    weight_sums: float[L, 2, E] summed routing weights.
    layer_ids: the L decoder-layer indices of the MoE layers (for labels).
    n_vision, n_shared, n_language: expert group sizes, E = their sum, experts ordered [V..., S..., L...].
  Returns:
    A JSON-ready dict: 'layers' (one entry per layer with, per modality, 'n_slots', 'weight_total', 'has_tokens',
    'slot_share' / 'weight_share' per group and 'expert_slot_share' / 'expert_weight_share' per expert), the same
    under 'overall' for all layers together, and the layout ('layer_ids', 'expert_labels', 'expert_groups', ...).
  """
  slots = np.asarray(slot_counts, dtype=np.float64)
  weights = np.asarray(weight_sums, dtype=np.float64)
  n_experts = n_vision + n_shared + n_language
  for name, arr in (('slot_counts', slots), ('weight_sums', weights)):
    if arr.ndim != 3 or arr.shape[1] != len(MODALITIES) or arr.shape[2] != n_experts:
      raise ValueError(f'{name}: expected shape [L, {len(MODALITIES)}, {n_experts}] (layers, modalities '
                       f'{MODALITIES}, n_vision + n_shared + n_language experts), got {list(arr.shape)}')
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
      raise ValueError(f'{name}: expected finite, non-negative values')
  if slots.shape != weights.shape:
    raise ValueError(f'slot_counts {list(slots.shape)} and weight_sums {list(weights.shape)} differ in shape')
  if len(layer_ids) != slots.shape[0]:
    raise ValueError(f'layer_ids: {len(layer_ids)} ids for {slots.shape[0]} layers')
  if min(n_vision, n_shared, n_language) < 0 or n_experts == 0:
    raise ValueError(f'expert counts n_vision={n_vision}, n_shared={n_shared}, n_language={n_language}: '
                     'expected non-negative counts with at least one expert')
  bounds = [(0, n_vision), (n_vision, n_vision + n_shared), (n_vision + n_shared, n_experts)]

  def entry(s: np.ndarray, w: np.ndarray) -> dict:
    slot_share, expert_slot_share, n_slots = _shares(s, bounds)
    weight_share, expert_weight_share, weight_total = _shares(w, bounds)
    return {'n_slots': n_slots, 'weight_total': weight_total, 'has_tokens': bool(n_slots > 0 or weight_total > 0),
            'slot_share': slot_share, 'weight_share': weight_share,
            'expert_slot_share': expert_slot_share, 'expert_weight_share': expert_weight_share}

  layers = []
  for i, layer in enumerate(layer_ids):
    layers.append({'layer': int(layer), **{m: entry(slots[i, j], weights[i, j]) for j, m in enumerate(MODALITIES)}})
  overall = {m: entry(slots[:, j].sum(0), weights[:, j].sum(0)) for j, m in enumerate(MODALITIES)}
  groups_of_experts = ['vision'] * n_vision + ['shared'] * n_shared + ['language'] * n_language
  return {'layer_ids': [int(x) for x in layer_ids], 'modalities': list(MODALITIES), 'groups': list(GROUPS),
          'n_vision': n_vision, 'n_shared': n_shared, 'n_language': n_language,
          'expert_labels': expert_labels(n_vision, n_shared, n_language), 'expert_groups': groups_of_experts,
          'layers': layers, 'overall': overall}


class RoutingStats:
  """Sums per-batch routing statistics (float[L, 2, E] each) over an evaluation set, in float64."""

  def __init__(self):
    self.slot_counts = None
    self.weight_sums = None

  def add(self, slot_counts: np.ndarray, weight_sums: np.ndarray) -> None:
    s, w = np.asarray(slot_counts, np.float64), np.asarray(weight_sums, np.float64)
    if self.slot_counts is None:
      self.slot_counts, self.weight_sums = s.copy(), w.copy()
    elif s.shape != self.slot_counts.shape or w.shape != self.weight_sums.shape:
      raise ValueError(f'routing stats of shape {list(s.shape)} / {list(w.shape)} do not match the running sum '
                       f'{list(self.slot_counts.shape)}')
    else:
      self.slot_counts += s
      self.weight_sums += w

  def summarize(self, layer_ids: Sequence[int], n_vision: int, n_shared: int, n_language: int) -> dict:
    if self.slot_counts is None:
      raise ValueError('RoutingStats.summarize: no statistics were added')
    return summarize(self.slot_counts, self.weight_sums, layer_ids, n_vision, n_shared, n_language)


def write_json(summary: dict, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  return path


def group_shares(summary: dict, metric: str = 'weight') -> np.ndarray:
  """float[L, 2, 3]: share of `metric` ('weight' or 'slots') per layer, modality (text, image) and group."""
  key = {'weight': 'weight_share', 'slots': 'slot_share'}[metric]
  return np.array([[[layer[m][key][g] for g in GROUPS] for m in MODALITIES] for layer in summary['layers']])


def expert_shares(summary: dict, metric: str = 'weight') -> np.ndarray:
  """float[L, 2, E]: share of `metric` per layer, modality (text, image) and expert."""
  key = {'weight': 'expert_weight_share', 'slots': 'expert_slot_share'}[metric]
  return np.array([[layer[m][key] for m in MODALITIES] for layer in summary['layers']])


def format_table(summary: dict, metric: str = 'weight') -> str:
  """A plain-text table of the group shares in percent, one line per layer."""
  shares = group_shares(summary, metric)
  lines = [f'{"layer":>5} | {"image V / S / L (%)":^22} | {"text V / S / L (%)":^22}']
  for layer, row in zip(summary['layer_ids'], shares):
    cells = [' / '.join(f'{100 * x:5.1f}' for x in row[MODALITIES.index(m)]) for m in ('image', 'text')]
    lines.append(f'{layer:>5} | {cells[0]:^22} | {cells[1]:^22}')
  return '\n'.join(lines)


def _plot_groups(summary: dict, metric: str, path: str) -> None:
  shares = group_shares(summary, metric)  # [L, 2, 3]
  n_layers = shares.shape[0]
  fig = Figure(figsize=(max(6.0, 0.55 * n_layers + 2.0), 4.0))
  ax = fig.subplots()
  x = np.arange(n_layers)
  width = 0.38
  # Image tokens on the left (plain), text tokens on the right (hatched), groups stacked V, S, L from the bottom.
  for offset, modality, hatch in ((-width / 2 - 0.01, 'image', None), (width / 2 + 0.01, 'text', '//')):
    bottom = np.zeros(n_layers)
    for g_idx, group in enumerate(GROUPS):
      values = shares[:, MODALITIES.index(modality), g_idx]
      ax.bar(x + offset, values, width, bottom=bottom, color=GROUP_COLORS[group], hatch=hatch,
             edgecolor='white', linewidth=0.5)
      bottom += values
  ax.set_xticks(x, [str(layer) for layer in summary['layer_ids']])
  ax.set_xlabel('MoE layer (left bar: image tokens, right bar, hatched: text tokens)')
  ax.set_ylabel(f'share of routing {"weight" if metric == "weight" else "slots"}')
  ax.set_ylim(0, 1)
  ax.set_xlim(-0.6, n_layers - 0.4)
  handles = [Patch(color=GROUP_COLORS[g], label=f'{g} experts') for g in GROUPS]
  handles += [Patch(facecolor='white', edgecolor='gray', label='image tokens'),
              Patch(facecolor='white', edgecolor='gray', hatch='//', label='text tokens')]
  ax.legend(handles=handles, loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
  ax.set_title('Token pathways per layer')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _plot_experts(summary: dict, metric: str, path: str) -> None:
  shares = expert_shares(summary, metric)  # [L, 2, E]
  n_layers, _, n_experts = shares.shape
  labels = summary['expert_labels']
  vmax = max(float(shares.max()), 1e-9)
  fig = Figure(figsize=(2.0 + 2 * max(2.5, 0.6 * n_experts), max(3.0, 0.35 * n_layers + 1.5)))
  axes = fig.subplots(1, 2, sharey=True)
  image = None
  for ax, modality in zip(axes, ('image', 'text')):
    data = shares[:, MODALITIES.index(modality), :]
    image = ax.imshow(data, aspect='auto', cmap='viridis', vmin=0.0, vmax=vmax, interpolation='nearest')
    ax.set_xticks(np.arange(n_experts), labels)
    ax.set_yticks(np.arange(n_layers), [str(layer) for layer in summary['layer_ids']])
    ax.set_xlabel('expert')
    ax.set_title(f'{modality} tokens')
    edges = np.cumsum([summary['n_vision'], summary['n_shared']])
    for edge in edges:
      if 0 < edge < n_experts:
        ax.axvline(edge - 0.5, color='white', linewidth=1.5)
    if n_layers * n_experts <= 256:
      for (r, c), value in np.ndenumerate(data):
        ax.text(c, r, f'{100 * value:.0f}', ha='center', va='center', fontsize=7,
                color='black' if value > 0.6 * vmax else 'white')
  axes[0].set_ylabel('MoE layer')
  fig.colorbar(image, ax=list(axes), label=f'share of routing {metric} per layer')
  fig.savefig(path, dpi=120)


def plot_pathways(summary: dict, out_dir: str, metrics: Sequence[str] = METRICS) -> list[str]:
  """Writes, per metric ('weight', 'slots'), 'routing_groups_<metric>.png' (stacked V/S/L bars per layer, image and
  text side by side) and 'routing_experts_<metric>.png' (layers x experts heat map, one panel per modality)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for metric in metrics:
    if metric not in METRICS:
      raise ValueError(f'plot_pathways metric {metric!r}: expected one of {list(METRICS)}')
    paths.append(os.path.join(out_dir, f'routing_groups_{metric}.png'))
    _plot_groups(summary, metric, paths[-1])
    paths.append(os.path.join(out_dir, f'routing_experts_{metric}.png'))
    _plot_experts(summary, metric, paths[-1])
  return paths
