"""Orbax I/O of parameter trees, shared by conversion and training (it sits below both, on `models.paths` alone).

`save_params` / `restore_params` write and read one pytree of arrays (an NNX params state) as an Orbax folder,
atomically, checking every leaf against the requested structure on restore. The tree helpers here (typed PRNG keys
stored as key data, leaf-by-leaf checks that name the parameter path) are also what `train.checkpoint.Checkpointer`
builds its multi-item training checkpoints on.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moiie_jax.models.paths import key_name


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable or does not match the requested state; the message names what."""


def is_key(x: Any) -> bool:
  dtype = getattr(x, 'dtype', None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def is_leaf_item(value: Any) -> bool:
  return isinstance(value, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def is_json(value: Any) -> bool:
  # No arrays anywhere: plain Python data (whether json.dumps accepts it is checked at save time).
  return not any(is_leaf_item(x) for x in jax.tree.leaves(value))


def item_kind(value: Any) -> str:
  if is_leaf_item(value):
    return 'leaf'
  return 'json' if is_json(value) else 'tree'


def _names(path: tuple) -> tuple[str, ...]:
  return tuple(key_name(k) for k in path)  # `value` kept: the stored metadata's paths end in it too


def _show(names: tuple[str, ...]) -> str:
  # nnx.Variable leaves end in `.value`; the parameter path reads better without it.
  return '.'.join(names[:-1] if len(names) > 1 and names[-1] == 'value' else names)


def encode_keys(tree: Any) -> Any:
  """Typed PRNG keys -> their uint32 key data; everything else unchanged."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def _key_data_abstract(x: Any) -> tuple[jax.ShapeDtypeStruct, Any]:
  impl = []

  def data(k):
    impl.append(jax.random.key_impl(k))  # works on tracers, so also for a ShapeDtypeStruct template
    return jax.random.key_data(k)

  return jax.eval_shape(data, x), impl[0]


def restore_template(tree: Any) -> Any:
  """The restore template: key leaves become their key-data shape (no sharding: keys are small, restored whole)."""
  return jax.tree.map(lambda x: _key_data_abstract(x)[0] if is_key(x) else x, tree)


def decode_keys(template: Any, restored: Any) -> Any:
  """Re-wraps key data where the template holds a key, on the template's sharding when it has one."""

  def fix(t, r):
    if not is_key(t):
      return r
    key = jax.random.wrap_key_data(r, impl=_key_data_abstract(t)[1])
    sharding = getattr(t, 'sharding', None)
    return key if sharding is None else jax.device_put(key, sharding)

  return jax.tree.map(fix, template, restored)


def check_tree(where: str, stored_tree: Any, template: Any) -> None:
  """Raises CheckpointError naming every missing, unexpected or mis-shaped/mis-typed leaf of `template`."""
  stored = {_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(stored_tree)[0] if hasattr(x, 'shape')}
  wanted = dict((_names(p), x) for p, x in jax.tree_util.tree_flatten_with_path(template)[0])
  problems = [f'missing from the checkpoint: {_show(n)}' for n in wanted if n not in stored]
  problems += [f'in the checkpoint but not in the model/state: {_show(n)}' for n in stored if n not in wanted]
  for names, want in wanted.items():
    have = stored.get(names)
    if have is None or not hasattr(want, 'shape'):  # python scalars: presence is enough
      continue
    if tuple(have.shape) != tuple(want.shape):
      problems.append(f'{_show(names)}: stored shape {tuple(have.shape)}, expected {tuple(want.shape)}')
    elif have.dtype is not None and np.dtype(have.dtype) != np.dtype(want.dtype):
      problems.append(f'{_show(names)}: stored dtype {np.dtype(have.dtype)}, expected {np.dtype(want.dtype)}')
  if problems:
    more = f' (and {len(problems) - 20} more)' if len(problems) > 20 else ''
    raise CheckpointError(f'{where} does not match the requested state:\n  ' + '\n  '.join(problems[:20]) + more)


@contextlib.contextmanager
def quiet_orbax():
  """Orbax's (absl) warnings silenced for the duration."""
  logger = logging.getLogger('absl')
  before = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(before)


def _require_checkpoint(path: epath.Path) -> None:
  if not path.exists():
    unfinished = sorted(p.name for p in path.parent.glob(f'{path.name}.orbax-checkpoint-tmp*')) \
        if path.parent.exists() else []
    hint = f' (an unfinished save was left at {unfinished[0]})' if unfinished else ''
    raise CheckpointError(f'params checkpoint folder {path} does not exist{hint}')
  if not (path / '_METADATA').exists():
    raise CheckpointError(f'{path} is not an Orbax params checkpoint (no _METADATA file in it)')


def save_params(path: str | epath.PathLike, state: Any, force: bool = False) -> None:
  """Saves a pytree of arrays (an NNX params state) to the folder `path`, atomically; blocks until written.

  Raises if `path` exists, unless `force` (then it is replaced).
  """
  path = epath.Path(path)
  if path.exists() and not force:
    raise CheckpointError(f'save_params: {path} already exists (pass force=True to replace it)')
  if is_leaf_item(state) or is_json(state):
    raise CheckpointError(f'save_params: expected a pytree of arrays for {path}, got {type(state).__name__}')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, encode_keys(state), force=force)


def save_params_in_groups(path: str | epath.PathLike, groups: Iterable[Any]) -> None:
  """Saves the union of `groups` (disjoint pytrees of arrays, e.g. nnx.States of a model's layers) as one Orbax
  params checkpoint at `path`, writing each group as it comes (Orbax's partial save), so that only one group is in
  memory at a time. `restore_params` reads it like a `save_params` checkpoint."""
  from orbax.checkpoint.experimental.v1 import partial  # pylint: disable=import-outside-toplevel
  path = epath.Path(path)
  if path.exists():
    raise CheckpointError(f'save_params_in_groups: {path} already exists')
  staging = path.parent / (path.name + '.groups')
  for group in groups:
    partial.save(staging, encode_keys(group))
  partial.finalize(staging)
  (staging / 'state').rename(path)  # the pytree Orbax wrote; the rest is its session's bookkeeping
  if (staging / '_CHECKPOINT_METADATA').exists():  # what a save_params folder holds beside the pytree
    (staging / '_CHECKPOINT_METADATA').copy(path / '_CHECKPOINT_METADATA')
  staging.rmtree()


def restore_params(path: str | epath.PathLike, abstract_state: Any) -> Any:
  """Restores `save_params` output into the structure/shardings of `abstract_state` (e.g. from nnx.eval_shape).

  Every leaf is checked first: a missing, unexpected or mis-shaped/mis-typed parameter is a CheckpointError that
  names its path.
  """
  path = epath.Path(path)
  _require_checkpoint(path)
  template = restore_template(abstract_state)
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    stored = getattr(getattr(metadata, 'item_metadata', None), 'tree', None)
    if stored is None:
      raise CheckpointError(f'{path} is not an Orbax params checkpoint (its metadata cannot be read)')
    check_tree(f'params checkpoint {path}', stored, template)
    restored = checkpointer.restore(path, template)
  return decode_keys(abstract_state, restored)
