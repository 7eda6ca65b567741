"""Where each token of one conversation went: per MoE layer and token, the routing weight every expert received,
and the expert group (vision / shared / language) that got most of it. This is the data of the web chat's routing
view (tokens coloured by group, per layer or averaged over layers; image tokens as a heat map over the patch grid),
and a per-token complement to the aggregate pathway statistics of `evaluate/routing.py`.

The model runs the whole sequence (prompt and answer) once, dropless, with its MoE blocks recording their combine
weights (`MoEBlock.record_routing`); a scanned checkpoint is run as the same layers looped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from moiie_jax.evaluate.routing import expert_labels
from moiie_jax.infer.generate import bucket_length, inference_model
from moiie_jax.models.lvlm import LVLM
from moiie_jax.models.moe import MoEBlock

GROUPS = ('vision', 'shared', 'language')


@dataclasses.dataclass
class TokenRouting:
  """weights float32[L, T, E] (MoE layer, token, expert: combine weights, summing to 1 over a routed token's
  experts); modality int32[T] (1 image); layers: the MoE layers' decoder indices; experts: the paper's labels
  ('V', 'S1', 'S2', 'L'); groups: each expert's group."""
  weights: np.ndarray
  modality: np.ndarray
  layers: tuple[int, ...]
  experts: tuple[str, ...]
  groups: tuple[str, ...]

  def group_weights(self, layer: int | None = None) -> np.ndarray:
    """float32[T, 3]: each token's weight on the vision, shared and language experts at MoE layer `layer` (an
    index into `layers`), or averaged over the MoE layers when None."""
    w = self.weights.mean(axis=0) if layer is None else self.weights[layer]
    return np.stack([w[:, [e for e, g in enumerate(self.groups) if g == name]].sum(axis=1) for name in GROUPS], -1)

  def top_groups(self, layer: int | None = None) -> list[str]:
    """The group with the most weight, per token."""
    return [GROUPS[i] for i in np.argmax(self.group_weights(layer), axis=-1)]


def moe_blocks(model: LVLM) -> list[tuple[int, MoEBlock]]:
  return [(i, layer.mlp) for i, layer in enumerate(model.language_model.model.layers)
          if isinstance(layer.mlp, MoEBlock)]


def _looped(model: LVLM) -> LVLM:
  """The same model with its decoder layers looped (a scanned model stacks them, and a stack records nothing)."""
  import dataclasses as dc  # pylint: disable=import-outside-toplevel
  from moiie_jax.convert import hf, upcycle  # pylint: disable=import-outside-toplevel
  cfg = model.cfg
  looped_cfg = dc.replace(cfg, llm=dc.replace(cfg.llm, scan_layers=False))
  flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  flat = upcycle.relayout_lvlm(flat, cfg.llm, looped_cfg.llm)
  abstract = nnx.eval_shape(lambda: LVLM(looped_cfg, rngs=nnx.Rngs(0)))
  nnx.update(abstract, hf.build_state(abstract, flat, 'token routing'))
  return abstract


def routing_model(model: LVLM) -> LVLM:
  """The model token_routing runs: looped (a scanned model's layers relaid, a copy) and dropless (every routed
  token's weights sum to 1). Returned as it is when it already is both, so a server prepares it once."""
  if model.cfg.llm.scan_layers:
    model = _looped(model)
  return inference_model(model, 0.0)


@nnx.jit
def _modality(model: LVLM, ids, pixels):
  return model(ids, pixels).modality


def token_routing(model: LVLM, input_ids: np.ndarray, pixel_values: np.ndarray | None = None) -> TokenRouting | None:
  """The routing of one sequence: input_ids int[T] (image placeholders expanded, as the model sees them),
  pixel_values float32[H, W, C] or None. None for a dense model (it has no experts)."""
  moe = model.cfg.llm.moe
  if not moe.is_moe:
    return None
  model = routing_model(model)
  blocks = moe_blocks(model)
  ids = np.asarray(input_ids, np.int32).reshape(1, -1)
  t = ids.shape[1]
  # Padded on the right up to the generation buckets' length, so that a chat compiles one program per bucket: the
  # decoder is causal and routing is per token, so the real tokens' weights do not see the padding.
  ids = np.pad(ids, ((0, 0), (0, bucket_length(t) - t)))
  pixels = None if pixel_values is None else np.asarray(pixel_values, np.float32)[None]
  for _, block in blocks:
    block.record_routing = True
  try:
    out = _modality(model, ids, pixels)
    recorded = nnx.pop(model, nnx.Intermediate)
  finally:
    for _, block in blocks:
      block.record_routing = False
  layers = recorded['language_model']['model']['layers']
  weights = np.stack([np.asarray(layers[i]['mlp']['routing'].get_value()[-1])[0, :t] for i, _ in blocks])
  labels = expert_labels(moe.n_vision, moe.n_shared, moe.n_language)
  groups = ['vision'] * moe.n_vision + ['shared'] * moe.n_shared + ['language'] * moe.n_language
  return TokenRouting(weights=weights, modality=np.asarray(out)[0, :t], layers=tuple(i for i, _ in blocks),
                      experts=tuple(labels), groups=tuple(groups))
