"""Training metrics to TensorBoard (tensorboardX: no TensorFlow needed), process 0 only.

Besides the scalar losses, learning rates, gradient norm and throughput, every logged step writes the routing
fractions of each MoE layer: the share of top-k slots that image and text tokens give to each expert and to the
vision / shared / language groups, the dropped-slot fraction and the router entropy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moiie_jax.models.config import LVLMConfig

MODALITIES = ('text', 'image')


def routing_scalars(moe_stats: Any, cfg: LVLMConfig) -> dict[str, float]:
  """Flat {tag: value} of the per-layer routing fractions of stats stacked on a leading layer axis."""
  moe = cfg.llm.moe
  tokens = np.asarray(moe_stats.tokens_per_expert, np.float64).reshape(-1, 2, moe.n_experts)  # [L, 2, E]
  dropped = np.asarray(moe_stats.dropped_fraction, np.float64).reshape(-1)
  entropy = np.asarray(moe_stats.router_entropy, np.float64).reshape(-1, 2)
  groups = {'vision': slice(0, moe.n_vision), 'shared': slice(moe.n_vision, moe.n_vision + moe.n_shared),
            'language': slice(moe.n_vision + moe.n_shared, moe.n_experts)}
  out = {}
  for j, layer in enumerate(cfg.llm.moe_layers):
    out[f'routing/layer{layer:02d}/dropped_fraction'] = float(dropped[j])
    for m, name in enumerate(MODALITIES):
      total = tokens[j, m].sum()
      if total == 0:
        continue
      share = tokens[j, m] / total
      out[f'routing/layer{layer:02d}/{name}/entropy'] = float(entropy[j, m])
      for e in range(moe.n_experts):
        out[f'routing/layer{layer:02d}/{name}/expert{e}'] = float(share[e])
      for group, sl in groups.items():
        if sl.stop > sl.start:
          out[f'routing/layer{layer:02d}/{name}/{group}'] = float(share[sl].sum())
  return out


class MetricWriter:
  """Writes scalars (and routing fractions) to TensorBoard event files under `logdir`.

  purge_step: TensorBoard hides the events of steps >= this one written earlier (by a run killed after its last
  checkpoint, whose steps a resumed run writes again).
  """

  def __init__(self, logdir: str, enabled: bool = True, purge_step: int | None = None):
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(logdir, purge_step=purge_step)

  def write(self, step: int, scalars: dict[str, float], moe_stats: Any = None, cfg: LVLMConfig | None = None):
    if self._writer is None:
      return
    for tag, value in scalars.items():
      self._writer.add_scalar(tag, value, step)
    if moe_stats is not None and cfg is not None:
      for tag, value in routing_scalars(moe_stats, cfg).items():
        self._writer.add_scalar(tag, value, step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
