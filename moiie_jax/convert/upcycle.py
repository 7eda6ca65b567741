"""Sparse upcycling: a dense decoder's FFNs become identical experts, routers start fresh (Komatsuzaki et al.).

As the official MoIIE code does: every MoE layer's dense `mlp.*` weights are copied into each of its experts
(`mlp.experts.*`, stacked on a leading expert axis) and its routers `mlp.gate` / `mlp.gate_vis` are initialised
normal with std `MoEConfig.router_init_std` or the model's `initializer_range`. With identical experts and
renormalised top-k weights, the upcycled layer computes exactly the dense FFN.

Flat states are {path tuple: array} as `nnx.to_flat_state` gives them. Where each decoder layer lives (its own
module, or one slice of a scanned stack) comes from `moiie_jax.models.decoder.layer_location`, for the dense
source layout and the MoE target layout alike, so the layers are unstacked, rewritten and restacked without
per-layout code here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from moiie_jax.convert.errors import ConvertError
from moiie_jax.models.config import LLMConfig, MoEConfig
from moiie_jax.models.decoder import layer_location
from moiie_jax.models.routing import router_ranges

Path = tuple
MLP_NAMES = ('gate_proj', 'up_proj', 'gate_up_proj', 'down_proj', 'fc1', 'fc2')


def upcycle_experts(dense_mlp_params: Mapping[str, Any], moe_cfg: MoEConfig,
                    n_experts: int | None = None) -> dict[str, dict[str, np.ndarray]]:
  """{'gate_proj': {'kernel': [D, F], 'bias'?: [F]}, ...} -> the same names with E copies stacked: [E, D, F], [E, F].

  n_experts defaults to `moe_cfg.n_experts`. Accepts SwiGLU (`gate_proj`, `up_proj`, `down_proj`), Phi-3
  (`gate_up_proj`, `down_proj`) or Phi-2 (`fc1`, `fc2`) names; anything else is an error naming it.
  """
  n = moe_cfg.n_experts if n_experts is None else n_experts
  if n < 1:
    raise ConvertError(f'upcycle_experts: n_experts={n}; need at least one expert')
  unknown = sorted(set(dense_mlp_params) - set(MLP_NAMES))
  if unknown or not ({'down_proj'} <= set(dense_mlp_params) or {'fc1', 'fc2'} <= set(dense_mlp_params)):
    raise ConvertError(f'upcycle_experts: expected dense MLP params {list(MLP_NAMES)} (down_proj, or fc1 and fc2, '
                       f'required); got {sorted(dense_mlp_params)}')
  out = {}
  for name, leaves in dense_mlp_params.items():
    out[name] = {leaf: np.repeat(np.asarray(value)[None], n, axis=0) for leaf, value in leaves.items()}
  return out


def init_routers(cfg: LLMConfig, rng: jax.Array, dtype: Any = None) -> dict[str, dict[str, np.ndarray]]:
  """Fresh router kernels of one MoE layer: {'gate': {'kernel': [D, E_gate]}, 'gate_vis': ...} (no gate_vis for
  vanilla), normal with std `router_init_std` or `initializer_range`."""
  moe = cfg.moe
  std = moe.router_init_std or cfg.initializer_range
  dtype = np.dtype(dtype or cfg.param_dtype)
  out = {}
  for name, (start, stop), key in zip(('gate', 'gate_vis'), router_ranges(moe), jax.random.split(rng)):
    if name == 'gate_vis' and moe.variant == 'vanilla':
      continue
    kernel = std * jax.random.normal(key, (cfg.hidden_size, stop - start), 'float32')
    out[name] = {'kernel': np.asarray(kernel).astype(dtype)}
  return out


def upcycle_block(dense_mlp_params: Mapping[str, Any], cfg: LLMConfig, rng: jax.Array) -> dict[str, Any]:
  """A dense MLP's nested params -> a nested pure dict for `MoEBlock(cfg)` (experts + fresh routers)."""
  cfg.moe.validate()
  return {'experts': upcycle_experts(dense_mlp_params, cfg.moe), **init_routers(cfg, rng)}


def _layer_location(cfg: LLMConfig, i: int) -> tuple[Path, int | None]:
  prefix, index = layer_location(cfg, i)
  return tuple(prefix), index


def unstack_layers(flat: Mapping[Path, np.ndarray], cfg: LLMConfig) -> tuple[list[dict[Path, np.ndarray]], dict]:
  """A decoder's flat parameters in the layer layout of `cfg` -> (per layer {path inside the layer: array},
  the parameters outside the layers)."""
  source = [_layer_location(cfg, i) for i in range(cfg.num_hidden_layers)]
  stack_sizes = {}
  for prefix, index in source:
    if index is not None:
      stack_sizes[prefix] = stack_sizes.get(prefix, 0) + 1
  remaining = dict(flat)
  per_layer = []
  for i, (prefix, index) in enumerate(source):
    inside = {p[len(prefix):]: v for p, v in flat.items() if p[:len(prefix)] == prefix}
    if not inside:
      raise ConvertError(f'no decoder parameters under {".".join(map(str, prefix))} (layer {i})')
    for p, v in inside.items():
      if index is not None and (np.ndim(v) == 0 or np.shape(v)[0] != stack_sizes[prefix]):
        raise ConvertError(f'{".".join(map(str, prefix + p))} has shape {np.shape(v)}, but the layout '
                           f'(scan_layers={cfg.scan_layers}) stacks {stack_sizes[prefix]} layers on its leading axis; '
                           f'is source_scan_layers right?')
    for p in inside:
      remaining.pop(prefix + p, None)
    per_layer.append({p: np.asarray(v) if index is None else np.asarray(v)[index] for p, v in inside.items()})
  return per_layer, remaining


def stack_layers(per_layer: list[dict[Path, np.ndarray]], rest: Mapping[Path, np.ndarray],
                 cfg: LLMConfig) -> dict[Path, np.ndarray]:
  """The inverse of `unstack_layers`: per-layer parameters placed (stacked where scanned) in the layout of `cfg`."""
  out = dict(rest)
  stacks: dict[Path, dict[int, dict[Path, np.ndarray]]] = {}
  for i, layer in enumerate(per_layer):
    prefix, index = _layer_location(cfg, i)
    if index is None:
      out.update({prefix + p: v for p, v in layer.items()})
    else:
      stacks.setdefault(prefix, {})[index] = layer
  for prefix, members in stacks.items():
    if sorted(members) != list(range(len(members))):
      raise ConvertError(f'layer_location gives stack {".".join(map(str, prefix))} the indices '
                         f'{sorted(members)}; expected 0..{len(members) - 1}')
    keys = members[0].keys()
    for j, layer in members.items():
      if layer.keys() != keys:
        raise ConvertError(f'layers stacked under {".".join(map(str, prefix))} differ in parameters '
                           f'(slot {j}: {sorted(set(layer.keys()) ^ set(keys))})')
    for p in keys:
      out[prefix + p] = np.stack([members[j][p] for j in range(len(members))])
  return out


def relayout(flat: Mapping[Path, np.ndarray], source: LLMConfig, target: LLMConfig) -> dict[Path, np.ndarray]:
  """A decoder's flat parameters moved from `source`'s layer layout (looped or scanned) to `target`'s; the two
  configs must describe the same layers (only `scan_layers` and other execution fields may differ)."""
  return stack_layers(*unstack_layers(flat, source), target)


LM_ROOT = ('language_model',)


def language_model_params(flat: Mapping[Path, np.ndarray]) -> dict[Path, np.ndarray]:
  """The language model's parameters of an LVLM's flat parameters, paths relative to it."""
  return {p[1:]: v for p, v in flat.items() if p[:1] == LM_ROOT}


def relayout_lvlm(flat: Mapping[Path, np.ndarray], source: LLMConfig, target: LLMConfig) -> dict[Path, np.ndarray]:
  """An LVLM's flat parameters with its language model's layers moved from `source`'s layout to `target`'s."""
  out = {p: v for p, v in flat.items() if p[:1] != LM_ROOT}
  out.update({LM_ROOT + p: v for p, v in relayout(language_model_params(flat), source, target).items()})
  return out


def looped_language_model(flat: Mapping[Path, np.ndarray], llm: LLMConfig) -> tuple[LLMConfig, dict[Path, np.ndarray]]:
  """(`llm` with looped layers, the LVLM's language-model parameters in that layout): what every exporter writes
  from, whichever layout the checkpoint was saved in."""
  lm = language_model_params(flat)
  if not llm.scan_layers:
    return llm, lm
  looped = dataclasses.replace(llm, scan_layers=False)
  return looped, relayout(lm, llm, looped)


def upcycle(dense_flat: Mapping[Path, np.ndarray], cfg: LLMConfig, rng: jax.Array, *,
            source_scan_layers: bool | None = None) -> dict[Path, np.ndarray]:
  """A dense decoder's flat parameters -> the flat parameters of the MoE decoder `cfg` (the MoE target config).

  The dense layout is that of `cfg` with `moe.variant='dense'` and `scan_layers=source_scan_layers` (default: the
  target's), so a looped dense checkpoint can become a scanned MoE model in the same pass. For each layer in
  `cfg.moe_layers`, the dense `mlp.<name>.<kernel|bias>` become `mlp.experts.<name>.<kernel|bias>` stacked E
  times and fresh `mlp.gate.kernel` (and `mlp.gate_vis.kernel`) are added; every other parameter is carried
  unchanged. Layers are moved between scanned stacks and single modules as the two layouts require. `rng` is a
  jax PRNG key; layer i's routers use `fold_in(rng, i)`, so the result does not depend on the layout.
  """
  cfg.validate()
  if not cfg.moe.is_moe:
    raise ConvertError('upcycle: the target config has moe.variant=dense; nothing to upcycle')
  scan = cfg.scan_layers if source_scan_layers is None else source_scan_layers
  dense_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, variant='dense'), scan_layers=scan)
  try:
    per_layer, rest = unstack_layers(dense_flat, dense_cfg)
  except ConvertError as e:
    raise ConvertError(f'upcycle: {e}') from None
  for i in sorted(set(cfg.moe_layers)):
    layer = per_layer[i]
    mlp = {}
    for p in [p for p in layer if p[:1] == ('mlp',)]:
      if len(p) != 3 or p[1] not in MLP_NAMES:
        raise ConvertError(f'upcycle: layer {i} has an unexpected MLP parameter {".".join(map(str, p))}')
      mlp.setdefault(p[1], {})[p[2]] = layer.pop(p)
    if not mlp:
      raise ConvertError(f'upcycle: layer {i} has no dense mlp.* parameters to upcycle')
    for name, leaves in upcycle_experts(mlp, cfg.moe).items():
      for leaf, value in leaves.items():
        layer[('mlp', 'experts', name, leaf)] = value
    dtype = next(iter(mlp.values()))['kernel'].dtype
    for name, leaves in init_routers(cfg, jax.random.fold_in(rng, i), dtype).items():
      layer[('mlp', name, 'kernel')] = leaves['kernel']
  try:
    return stack_layers(per_layer, rest, cfg)
  except ConvertError as e:
    raise ConvertError(f'upcycle: {e}') from None
