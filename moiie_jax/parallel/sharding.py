"""Shardings of parameters, optimizer state and batches, from parameter paths and the logical-axis rules.

`PARAM_RULES` is one table: a pattern on a parameter's dotted path (HF names, e.g.
`language_model.model.layers.1.mlp.experts.gate_proj.kernel`) -> the logical axes of its trailing dimensions.
Extra leading dimensions (the stacked layers of a scanned decoder) are 'layers'. `mesh.LOGICAL_RULES` then maps
logical axes to mesh axes. The decoder's own `nnx.with_partitioning` annotations (where the model has them) must
agree with this table; tests check that, so the table is the single source and covers the vision tower and the
connector too, which carry no annotations.

Layout (MaxText's): every weight's 'embed' dimension is sharded FSDP-style over `fsdp` x `expert`; expert weights
[E, D, F] put `expert` on E and `fsdp` on D; 'heads' / 'mlp' / 'vocab' go to `tensor`. Optimizer-state leaves
shaped like a parameter take its sharding; scalars (step counts) are replicated. Batches split their first
dimension over `data` x `fsdp` x `expert`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moiie_jax.models.config import ConfigError
from moiie_jax.parallel import mesh as mesh_lib
from moiie_jax.models.paths import path_names

# (pattern searched at the end of the dotted path, logical axes of the trailing dimensions). First match wins.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # Expert layers: experts stacked on a leading axis; routers score a handful of experts (replicated outputs).
    (r'experts\.(gate_proj|up_proj|fc1)\.kernel', ('expert', 'embed', 'mlp')),
    (r'experts\.(gate_proj|up_proj|fc1)\.bias', ('expert', 'mlp')),
    (r'experts\.gate_up_proj\.kernel', ('expert', 'embed', 'gate_up')),
    (r'experts\.gate_up_proj\.bias', ('expert', 'gate_up')),
    (r'experts\.(down_proj|fc2)\.kernel', ('expert', 'mlp', 'embed')),
    (r'experts\.(down_proj|fc2)\.bias', ('expert', 'embed')),
    (r'(gate|gate_vis)\.kernel', ('embed', None)),
    # Dense FFNs: decoder MLPs (SwiGLU; Phi-2's fc1, fc2), the SigLIP/CLIP MLP (fc1, fc2), the connector (linear_1,
    # linear_2).
    (r'(mlp\.(gate_proj|up_proj|fc1)|multi_modal_projector\.linear_1)\.kernel', ('embed', 'mlp')),
    (r'(mlp\.(gate_proj|up_proj|fc1)|multi_modal_projector\.linear_1)\.bias', ('mlp',)),
    (r'mlp\.gate_up_proj\.kernel', ('embed', 'gate_up')),
    (r'(mlp\.(down_proj|fc2)|multi_modal_projector\.linear_2)\.kernel', ('mlp', 'embed')),
    (r'(mlp\.(down_proj|fc2)|multi_modal_projector\.linear_2)\.bias', ('embed',)),
    # Attention (decoder and vision tower).
    (r'self_attn\.(q_proj|k_proj|v_proj)\.kernel', ('embed', 'heads')),
    (r'self_attn\.(q_proj|k_proj|v_proj)\.bias', ('heads',)),
    (r'self_attn\.qkv_proj\.kernel', ('embed', 'qkv')),
    (r'self_attn\.(o_proj|out_proj|dense)\.kernel', ('heads', 'embed')),
    (r'self_attn\.(o_proj|out_proj|dense)\.bias', ('embed',)),
    # Embeddings and the output head.
    (r'embed_tokens\.embedding', ('vocab', 'embed')),
    (r'lm_head\.kernel', ('embed', 'vocab')),
    (r'lm_head\.bias', ('vocab',)),
    (r'embeddings\.patch_embedding\.kernel', (None, None, None, 'embed')),
    (r'embeddings\.patch_embedding\.bias', ('embed',)),
    (r'embeddings\.position_embedding\.embedding', (None, 'embed')),
    (r'embeddings\.class_embedding', ('norm',)),
    # Norms: RMSNorm `weight`, LayerNorm `scale` / `bias`.
    (r'\w*norm\w*\.(weight|scale|bias)', ('norm',)),
)
_COMPILED = tuple((re.compile(f'(^|\\.)({pattern})$'), axes) for pattern, axes in PARAM_RULES)


def dotted(names: tuple[str, ...]) -> str:
  return '.'.join(names)


def logical_axes(names: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
  """Logical axes of the parameter at path `names` with `ndim` dimensions (leading extras are 'layers')."""
  path = dotted(names)
  for pattern, axes in _COMPILED:
    if pattern.search(path):
      if ndim < len(axes):
        raise ConfigError(f'parameter {path}: rank {ndim}, but its sharding rule names {len(axes)} axes {axes}')
      return ('layers',) * (ndim - len(axes)) + tuple(axes)
  raise ConfigError(f'parameter {path}: no sharding rule matches its path; add one to '
                    f'moiie_jax.parallel.sharding.PARAM_RULES')


def annotated_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axes a model module declared on a parameter (`nnx.with_partitioning`), or None."""
  meta = variable.get_metadata()
  axes = meta.get('out_sharding', meta.get('sharding_names', meta.get('sharding')))
  return None if axes is None else tuple(axes)


def param_specs(params: Any, mesh: Mesh) -> Any:
  """PartitionSpec of every parameter: a pytree shaped like `params` (an nnx.State, concrete or abstract)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, a: mesh_lib.spec_for(logical_axes(path_names(path), a.ndim), mesh, a.shape), params)


def param_shardings(params: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(opt_state: Any, params: Any, mesh: Mesh) -> Any:
  """Each optimizer-state leaf whose path ends with a parameter's path and has its shape (Adam moments, the
  accumulated gradient) takes that parameter's sharding; anything else (counts, schedules) is replicated."""
  by_path = {}
  for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = path_names(path)
    by_path[names] = (tuple(a.shape), mesh_lib.spec_for(logical_axes(names, a.ndim), mesh, a.shape))

  def spec(path, a):
    names, shape = path_names(path), tuple(getattr(a, 'shape', ()))
    for i in range(len(names)):
      hit = by_path.get(names[i:])
      if hit is not None and hit[0] == shape:
        return NamedSharding(mesh, hit[1])
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(spec, opt_state)


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, where: str = 'batch') -> dict[str, NamedSharding]:
  """[B, ...] arrays split over the batch axes; B must divide evenly (ConfigError naming the key otherwise)."""
  out = {}
  for key, value in batch.items():
    if value is None:
      continue
    mesh_lib.check_batch(value.shape[0], mesh, f'{where}[{key!r}]')
    out[key] = NamedSharding(mesh, mesh_lib.batch_spec(len(value.shape), mesh))
  return out


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(params: Any, mesh: Mesh) -> list[str]:
  """One line per parameter: path, shape, logical axes, mesh spec (for logs and debugging a layout)."""
  lines = []
  for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = path_names(path)
    axes = logical_axes(names, a.ndim)
    lines.append(f'{dotted(names)} {tuple(a.shape)} {axes} -> {mesh_lib.spec_for(axes, mesh, a.shape)}')
  return lines
