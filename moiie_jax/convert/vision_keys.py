"""Key maps between HF SigLIP/CLIP vision towers (and LLaVA's projector) and our NNX parameter paths.

Our paths are the flat-state paths of `VisionTower` (`nnx.to_flat_state(nnx.state(tower, nnx.Param))`), e.g.
('vision_model', 'encoder', 'layers', 0, 'self_attn', 'q_proj', 'kernel'), and of `MultiModalProjector`, e.g.
('linear_1', 'kernel'). An LVLM converter prepends ('vision_tower',) / ('multi_modal_projector',).

The table is generated from `nnx.eval_shape` of the target model, so every key and shape is checked against the
model itself. Per leaf the rules are renames plus one transpose each:
  Linear kernel [in, out]            <- HF weight [out, in]
  Conv kernel [P, P, C, D] (HWIO)    <- HF Conv2d weight [D, C, P, P] (OIHW)
  LayerNorm scale, Embed embedding   <- HF weight
  bias, CLIP's class_embedding       <- same name, as is

HF layouts accepted under `prefix` (the HF name after `prefix`, an optional `vision_model.` and then):
  transformers 5 SiglipVisionModel/CLIPVisionModel files:  embeddings.*, encoder.*, post_layernorm.* (prefix '')
  older tower files, SiglipModel/CLIPModel files:  vision_model.embeddings.* ... (prefix '' or 'vision_model.')
  LLaVA:  vision_tower.vision_model.* on disk, model.vision_tower.* in transformers 5 memory  (prefix 'vision_tower.'
          or 'model.vision_tower.')
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import nnx

from moiie_jax.convert.errors import ConvertError
from moiie_jax.convert.hf import flat_abstract
from moiie_jax.models.config import VisionConfig
from moiie_jax.models.connector import MultiModalProjector
from moiie_jax.models.vision import VisionTower

Path = tuple

# HF keys we skip on purpose. Each pattern is searched in the key relative to `prefix` and, for keys outside the
# prefix that a strict call checks, in the full key.
IGNORED_KEY_PATTERNS: tuple[str, ...] = (
    r'^text_model\.',  # the text half of SiglipModel / CLIPModel
    r'^logit_scale$',
    r'^logit_bias$',
    r'^visual_projection\.',  # CLIP's contrastive projections
    r'^text_projection\.',
    r'^(vision_model\.)?head\.',  # SigLIP's attention-pooling head: LLaVA reads patch tokens, not the pooled vector
    r'(^|\.)position_ids$',  # arange buffers some older checkpoints saved
)
_IGNORED = tuple(re.compile(p) for p in IGNORED_KEY_PATTERNS)

# Our leaf name -> HF leaf name.
_LEAF_TO_HF = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias',
               'class_embedding': None}  # None: the parameter itself is the HF key's last part


def is_ignored(key: str) -> bool:
  """Whether `key` matches one of IGNORED_KEY_PATTERNS."""
  return any(p.search(key) for p in _IGNORED)


def _to_ours(ndim: int) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
  """(HF -> ours, ours -> HF) array transforms for a kernel of `ndim` dims."""
  if ndim == 2:
    return (lambda w: w.T), (lambda w: w.T)
  if ndim == 4:
    return (lambda w: w.transpose(2, 3, 1, 0)), (lambda w: w.transpose(3, 2, 0, 1))
  raise AssertionError(f'no kernel transform for {ndim} dims')


def _identity(w: np.ndarray) -> np.ndarray:
  return w


def _table(abstract: Mapping[Path, Any]) -> dict[str, tuple[Path, tuple, Callable, Callable]]:
  """{HF name: (our path, HF shape, HF -> ours, ours -> HF)} for every parameter of an abstract model."""
  table = {}
  for path, value in abstract.items():
    leaf = path[-1]
    if leaf not in _LEAF_TO_HF:
      raise AssertionError(f'no HF name rule for parameter {path}')
    parts = [str(p) for p in path]
    if _LEAF_TO_HF[leaf] is not None:
      parts[-1] = _LEAF_TO_HF[leaf]
    shape = tuple(value.shape)
    if leaf == 'kernel':
      fwd, back = _to_ours(len(shape))
      hf_shape = tuple(back(np.empty(shape, np.bool_)).shape)
    else:
      fwd, back, hf_shape = _identity, _identity, shape
    table['.'.join(parts)] = (tuple(path), hf_shape, fwd, back)
  return table


@functools.lru_cache(maxsize=16)
def _vision_table(cfg: VisionConfig) -> dict[str, tuple[Path, tuple, Callable, Callable]]:
  """The tower's table, HF names relative to `vision_model.` (configs are frozen, hence hashable and cacheable)."""
  abstract = flat_abstract(nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0))))
  table = _table(abstract)
  # Drop the leading 'vision_model.': HF names are matched after stripping it (it is optional in HF files).
  return {name.removeprefix('vision_model.'): entry for name, entry in table.items()}


def _listing(names) -> str:
  names = sorted(names)
  more = f' (and {len(names) - 8} more)' if len(names) > 8 else ''
  return ', '.join(names[:8]) + more


def vision_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: VisionConfig, prefix: str = '', *,
                          strict: bool | None = None) -> dict[Path, np.ndarray]:
  """Our flat VisionTower params from HF tensors under `prefix`, transposed to our layouts (dtypes kept).

  Every tensor under `prefix` must map to a parameter or match IGNORED_KEY_PATTERNS; every parameter must be
  present with the shape `cfg` implies. Keys outside `prefix` belong to another converter (LLaVA's language
  model) and are skipped, unless `strict`, when they too must match IGNORED_KEY_PATTERNS. strict=None means
  strict for the prefixes of standalone tower/contrastive checkpoints ('' and 'vision_model.').
  Raises ConvertError naming the offending HF key.
  """
  table = _vision_table(cfg)
  if strict is None:
    strict = prefix in ('', 'vision_model.')
  found: dict[str, str] = {}  # HF name relative to vision_model. -> full key
  for key in tensors:
    if not key.startswith(prefix):
      if strict and not is_ignored(key):
        raise ConvertError(f'{key}: unexpected tensor outside the vision tower prefix {prefix!r} (not in '
                           f'IGNORED_KEY_PATTERNS)')
      continue
    rel = key[len(prefix):]
    if is_ignored(rel):
      continue
    name = rel.removeprefix('vision_model.')
    if name not in table:
      raise ConvertError(f'{key}: unexpected tensor for a {cfg.architecture} vision tower with '
                         f'{cfg.num_hidden_layers} layers (expected names like {prefix}embeddings.*, '
                         f'{prefix}encoder.layers.N.*, optionally under {prefix}vision_model.)')
    if name in found:
      raise ConvertError(f'{key} and {found[name]}: two tensors for the same parameter')
    found[name] = key
  missing = set(table) - set(found)
  if missing:
    raise ConvertError(f'vision tower (prefix {prefix!r}): missing tensors {_listing(prefix + n for n in missing)}')
  out = {}
  for name, key in found.items():
    path, hf_shape, fwd, _ = table[name]
    array = np.asarray(tensors[key])
    if array.shape != hf_shape:
      raise ConvertError(f'{key}: shape {array.shape}, expected {hf_shape} for VisionConfig(architecture='
                         f'{cfg.architecture}, hidden_size={cfg.hidden_size}, intermediate_size='
                         f'{cfg.intermediate_size}, patch_size={cfg.patch_size}, image_size={cfg.image_size}, '
                         f'num_channels={cfg.num_channels})')
    out[path] = fwd(array)
  return out


def flat_params(params: Any) -> dict[Path, np.ndarray]:
  """{path: numpy array} from an nnx.State, an nnx.Module or a flat {path: array} mapping."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if isinstance(params, nnx.State):
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
  return {tuple(p): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v) for p, v in params.items()}


def _export(flat: Mapping[Path, np.ndarray], table: Mapping[str, tuple], prefix: str,
            what: str) -> dict[str, np.ndarray]:
  by_path = {entry[0]: (name, entry) for name, entry in table.items()}
  unexpected = set(flat) - set(by_path)
  missing = set(by_path) - set(flat)
  if unexpected:
    raise ConvertError(f'{what}: unexpected parameters {_listing(".".join(map(str, p)) for p in unexpected)}')
  if missing:
    raise ConvertError(f'{what}: missing parameters {_listing(".".join(map(str, p)) for p in missing)}')
  out = {}
  for path, (name, (_, hf_shape, _, back)) in by_path.items():
    array = back(np.asarray(flat[path]))
    if array.shape != hf_shape:
      raise ConvertError(f'{what}: {".".join(map(str, path))} gives HF shape {array.shape}, expected {hf_shape}')
    out[prefix + name] = array  # a view where the layout changes: copied when written
  return out


def vision_params_to_hf(params: Any, cfg: VisionConfig, prefix: str = '') -> dict[str, np.ndarray]:
  """HF tensors {prefix + 'embeddings....': array} from VisionTower params (a flat {path: array}, State or module).

  prefix '' gives a transformers 5 SiglipVisionModel/CLIPVisionModel file; 'vision_model.' the older tower and
  SiglipModel/CLIPModel layout; 'vision_tower.vision_model.' a llava-hf file. Ignored HF tensors (SigLIP's head)
  are not produced.
  """
  return _export(flat_params(params), _vision_table(cfg), prefix, f'vision tower export ({cfg.architecture})')


# ------------------------------------------------------------------------------------------------ connector
_CONNECTOR_NAMES = ('linear_1.weight', 'linear_1.bias', 'linear_2.weight', 'linear_2.bias')


def _connector_table(vision_width: int, llm_width: int, bias: bool) -> dict[str, tuple]:
  abstract = flat_abstract(nnx.eval_shape(
      lambda: MultiModalProjector(vision_width, llm_width, bias=bias, rngs=nnx.Rngs(0))))
  return _table(abstract)


def connector_params_from_hf(tensors: Mapping[str, np.ndarray], prefix: str = 'multi_modal_projector.', *,
                             vision_width: int | None = None, llm_width: int | None = None,
                             bias: bool | None = None) -> dict[Path, np.ndarray]:
  """Our flat MultiModalProjector params ({('linear_1', 'kernel'): [V, D], ...}) from HF tensors under `prefix`.

  Widths and bias are read from the tensors; pass them (cfg.vision.hidden_size, cfg.llm.hidden_size,
  cfg.multimodal_projector_bias) to have them checked. Keys outside `prefix` are skipped; an unknown key under
  it, a missing one or a wrong shape is a ConvertError naming the key.
  """
  under = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
  unknown = [k for rel, k in under.items() if rel not in _CONNECTOR_NAMES]
  if unknown:
    raise ConvertError(f'connector: unexpected tensors {_listing(unknown)} (expected {prefix}linear_{{1,2}}.'
                       f'{{weight,bias}})')
  for name in ('linear_1.weight', 'linear_2.weight'):
    if name not in under:
      raise ConvertError(f'connector: missing tensor {prefix}{name}')
  w1 = np.asarray(tensors[under['linear_1.weight']])
  if w1.ndim != 2:
    raise ConvertError(f'{under["linear_1.weight"]}: shape {w1.shape}, expected [llm_width, vision_width]')
  has_bias = 'linear_1.bias' in under or 'linear_2.bias' in under
  if bias is not None and bias != has_bias:
    raise ConvertError(f'connector (prefix {prefix!r}): multimodal_projector_bias={bias} but the checkpoint '
                       f'{"has" if has_bias else "has no"} {prefix}linear_*.bias tensors')
  want_v = vision_width if vision_width is not None else w1.shape[1]
  want_d = llm_width if llm_width is not None else w1.shape[0]
  table = _connector_table(want_v, want_d, has_bias)
  out = {}
  for name, (path, hf_shape, fwd, _) in table.items():
    if name not in under:
      raise ConvertError(f'connector: missing tensor {prefix}{name}')
    array = np.asarray(tensors[under[name]])
    if array.shape != hf_shape:
      raise ConvertError(f'{prefix}{name}: shape {array.shape}, expected {hf_shape} (vision width {want_v}, '
                         f'LLM width {want_d})')
    out[path] = fwd(array)
  return out


def connector_params_to_hf(params: Any, prefix: str = 'multi_modal_projector.') -> dict[str, np.ndarray]:
  """HF tensors {prefix + 'linear_1.weight': [D, V], ...} from MultiModalProjector params (flat, State or module)."""
  flat = flat_params(params)
  if ('linear_1', 'kernel') not in flat:
    raise ConvertError(f'connector export: no ("linear_1", "kernel") among {_listing(map(str, flat))}')
  v, d = np.shape(flat[('linear_1', 'kernel')])
  table = _connector_table(v, d, ('linear_1', 'bias') in flat)
  return _export(flat, table, prefix, 'connector export')


def image_side_params(tower: Mapping[str, np.ndarray], projector: Mapping[str, np.ndarray], cfg: Any,
                      vision_dir: str | None, missing: str, notes: list[str]) -> dict[Path, np.ndarray]:
  """An LVLM checkpoint's tower and connector as our flat params ('vision_tower', ...), ('multi_modal_projector',
  ...). tower: its keys from `vision_model.` on (strict), or, when it holds none, the tensors of `vision_dir` (a
  note says so); neither is a ConvertError with the message `missing`. projector: `linear_{1,2}.{weight,bias}`
  keys, checked against cfg (an LVLMConfig: the connector takes cfg.vision.feature_size channels)."""
  from moiie_jax.convert import hf  # pylint: disable=import-outside-toplevel
  if tower:
    vision = vision_params_from_hf(tower, cfg.vision, strict=True)
  elif vision_dir:
    vision = vision_params_from_hf(hf.read_tensors(vision_dir), cfg.vision)
    notes.append(f'vision tower weights from {vision_dir} (none in the checkpoint)')
  else:
    raise ConvertError(missing)
  flat = {('vision_tower',) + p: v for p, v in vision.items()}
  flat.update({('multi_modal_projector',) + p: v for p, v in connector_params_from_hf(
      projector, prefix='', vision_width=cfg.vision.feature_size, llm_width=cfg.llm.hidden_size, bias=True).items()})
  return flat
