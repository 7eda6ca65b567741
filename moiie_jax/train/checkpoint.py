"""Orbax checkpoints: the training state (`Checkpointer`), model params alone (`save_params`) and SIGTERM.

A training checkpoint is one Orbax step folder with one sub-item per entry of the state dict:

  params, opt_state, ...  pytrees of arrays (an nnx.State, an optax state)    -> StandardSave, one OCDBT store each
  rng, step, ...          a single array or PRNG key                          -> StandardSave of {'value': x}
  data, meta, ...         JSON-able values (a data-iterator state, run info)  -> JsonSave
  manifest                (reserved) which of the three kinds each item is, so a restore needs no template

Typed PRNG keys are stored as their key data (uint32) and re-wrapped on restore with the implementation the template
names. Orbax makes every save atomic: it writes `<step>.orbax-checkpoint-tmp` and renames it once all items
are written, so a save killed half-way leaves only a tmp folder, which `latest_step` ignores and which a new
`Checkpointer` deletes. Restores are checked leaf by leaf against the stored metadata first, so a wrong shape or
dtype is an error that names the item and parameter path (Orbax alone would cast dtypes silently).

Async saves (the default) copy device arrays to host before `save` returns, so the step may donate its buffers
right after; the write itself runs in the background until the next `save`, `wait` or `close`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_MANIFEST = 'manifest'
_ITEM_NAME = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable or does not match the requested state; the message names what."""


def _is_key(x: Any) -> bool:
  dtype = getattr(x, 'dtype', None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_leaf_item(value: Any) -> bool:
  return isinstance(value, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _is_json(value: Any) -> bool:
  # No arrays anywhere: plain Python data (whether json.dumps accepts it is checked at save time).
  return not any(_is_leaf_item(x) for x in jax.tree.leaves(value))


def _kind(value: Any) -> str:
  if _is_leaf_item(value):
    return 'leaf'
  return 'json' if _is_json(value) else 'tree'


def _names(path: tuple) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _show(names: tuple[str, ...]) -> str:
  # nnx.Variable leaves end in `.value`; the parameter path reads better without it.
  return '.'.join(names[:-1] if len(names) > 1 and names[-1] == 'value' else names)


def _encode(tree: Any) -> Any:
  """Typed PRNG keys -> their uint32 key data; everything else unchanged."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _key_data_abstract(x: Any) -> tuple[jax.ShapeDtypeStruct, Any]:
  impl = []

  def data(k):
    impl.append(jax.random.key_impl(k))  # works on tracers, so also for a ShapeDtypeStruct template
    return jax.random.key_data(k)

  return jax.eval_shape(data, x), impl[0]


def _abstract(tree: Any) -> Any:
  """The restore template: key leaves become their key-data shape (no sharding: keys are small, restored whole)."""
  return jax.tree.map(lambda x: _key_data_abstract(x)[0] if _is_key(x) else x, tree)


def _decode(template: Any, restored: Any) -> Any:
  """Re-wraps key data where the template holds a key, on the template's sharding when it has one."""

  def fix(t, r):
    if not _is_key(t):
      return r
    key = jax.random.wrap_key_data(r, impl=_key_data_abstract(t)[1])
    sharding = getattr(t, 'sharding', None)
    return key if sharding is None else jax.device_put(key, sharding)

  return jax.tree.map(fix, template, restored)


def _check_tree(where: str, stored_tree: Any, template: Any) -> None:
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
def _quiet_orbax():
  """Orbax's (absl) warnings silenced for the duration."""
  logger = logging.getLogger('absl')
  before = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(before)


class Checkpointer:
  """Periodic, atomic, optionally async training checkpoints in `{directory}/<step>`.

  Args:
    directory: the checkpoint folder, e.g. `{workdir}/checkpoints` (local path or gs://...); created if missing.
    max_to_keep: finished checkpoints kept; older ones are deleted after each save. None keeps all.
    async_: write in a background thread (see the module docstring).
    save_interval_steps: `save` skips steps that are not a multiple of this unless `force=True`.
  """

  def __init__(self, directory: str | epath.PathLike, max_to_keep: int | None = 3, async_: bool = True,
               save_interval_steps: int = 1):
    if max_to_keep is not None and max_to_keep < 1:
      raise CheckpointError(f'Checkpointer(max_to_keep={max_to_keep}): expected >= 1 or None (keep all)')
    if save_interval_steps < 1:
      raise CheckpointError(f'Checkpointer(save_interval_steps={save_interval_steps}): expected >= 1')
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._kinds: dict[str, str] = {}  # Orbax binds an item name to one handler for the manager's lifetime

  def save(self, step: int, state: dict[str, Any], force: bool = False) -> bool:
    """Saves `state` (item name -> pytree, array/key or JSON-able value) as checkpoint `step`.

    Returns False when the step was skipped by `save_interval_steps` (and not forced). Raises if `step` exists.
    """
    if not isinstance(state, dict) or not state:
      raise CheckpointError(f'Checkpointer.save: expected a non-empty dict of items, got {type(state).__name__}')
    if not force and not self._manager.should_save(step):
      return False
    kinds, args = {}, {}
    for name, value in state.items():
      if name == _MANIFEST or not _ITEM_NAME.match(str(name)):
        raise CheckpointError(f'Checkpointer.save: item name {name!r} is reserved or not an identifier')
      kinds[name] = _kind(value)
      if self._kinds.setdefault(name, kinds[name]) != kinds[name]:
        raise CheckpointError(f'Checkpointer.save: item {name!r} was saved as a {self._kinds[name]} earlier, now '
                              f'it is a {kinds[name]}; an item keeps its kind')
      if kinds[name] == 'json':
        try:
          json.dumps(value)
        except (TypeError, ValueError) as e:
          raise CheckpointError(f'Checkpointer.save: item {name!r} is not JSON-serialisable: {e}') from None
        args[name] = ocp.args.JsonSave(value)
      elif kinds[name] == 'leaf':
        args[name] = ocp.args.StandardSave({'value': _encode(value)})
      else:
        args[name] = ocp.args.StandardSave(_encode(value))
    args[_MANIFEST] = ocp.args.JsonSave({'kinds': kinds, 'format': 1})
    return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

  def latest_step(self) -> int | None:
    """The newest finished checkpoint (unfinished tmp folders never count), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, step: int | None = None, abstract_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restores checkpoint `step` (default: the latest) into the structure, shardings and dtypes of the template.

    `abstract_state` maps item names to templates: `nnx.eval_shape`/`jax.eval_shape` results or concrete values
    for pytrees and keys (None: the stored form). The result holds the templated items plus every JSON item (small:
    data-iterator state, step, metadata); array items without a template are not read. With `abstract_state=None`
    every item comes back in its stored form (pytrees as nested dicts, keys as key data).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f'no finished checkpoint in {self.directory}')
    elif step not in self._manager.all_steps():
      raise CheckpointError(f'no checkpoint for step {step} in {self.directory}; have {self.all_steps()}')
    with _quiet_orbax():  # reading the manifest alone makes Orbax warn about every other item
      kinds = self._manager.restore(step, args=ocp.args.Composite(
          **{_MANIFEST: ocp.args.JsonRestore()}))[_MANIFEST]['kinds']
    where = f'checkpoint {self.directory / str(step)}'
    template = dict(abstract_state) if abstract_state is not None else {}
    for name in template:
      if name not in kinds:
        raise CheckpointError(f'{where} has no item {name!r}; it has {sorted(kinds)}')
    for name, kind in kinds.items():
      if name not in template and (abstract_state is None or kind == 'json'):
        template[name] = None
    args = {}
    for name, value in template.items():
      kind = kinds[name]
      if value is not None and _kind(value) != kind:
        raise CheckpointError(f'{where}: item {name!r} was saved as a {kind} but the template is a {_kind(value)}')
      if kind == 'json':
        args[name] = ocp.args.JsonRestore()
        continue
      args[name] = ocp.args.StandardRestore(None if value is None else
                                            _abstract({'value': value} if kind == 'leaf' else value))
    with _quiet_orbax():  # Orbax warns about each stored item a partial read leaves out; ours are checked above
      if abstract_state is not None:
        self._check(step, where, template, kinds)
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    out = {}
    for name, value in template.items():
      item = restored[name]
      if kinds[name] != 'json' and value is not None:
        item = _decode({'value': value} if kinds[name] == 'leaf' else value, item)
      out[name] = item['value'] if kinds[name] == 'leaf' else item
    return out

  def _check(self, step, where, template, kinds) -> None:
    try:
      metadata = self._manager.item_metadata(step)
    except Exception:  # pylint: disable=broad-except
      return  # no metadata (older format): Orbax still rejects a wrong shape, without the path
    for name, value in template.items():
      if kinds[name] == 'json' or value is None:
        continue
      item = metadata.get(name) if hasattr(metadata, 'get') else None
      stored = getattr(item, 'tree', None)
      if stored is not None:
        _check_tree(f'{where} item {name!r}', stored, _abstract({'value': value} if kinds[name] == 'leaf' else value))

  def _await_tmp_cleanup(self) -> None:
    # Orbax 0.12.8 removes unfinished tmp folders in a background thread at start-up and neither
    # wait_until_finished() nor close() waits for it (only the next save does); a process that restores and exits
    # would kill it half-way. Guarded: the hook is private.
    await_cleanup = getattr(self._manager, '_maybe_await_cleanup_tmp_directory', None)
    if await_cleanup is not None:
      await_cleanup()

  def wait(self) -> None:
    """Blocks until an async save has been written and renamed into place."""
    self._await_tmp_cleanup()
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the background threads."""
    self._await_tmp_cleanup()
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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
  if _is_leaf_item(state) or _is_json(state):
    raise CheckpointError(f'save_params: expected a pytree of arrays for {path}, got {type(state).__name__}')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, _encode(state), force=force)


def restore_params(path: str | epath.PathLike, abstract_state: Any) -> Any:
  """Restores `save_params` output into the structure/shardings of `abstract_state` (e.g. from nnx.eval_shape).

  Every leaf is checked first: a missing, unexpected or mis-shaped/mis-typed parameter is a CheckpointError that
  names its path.
  """
  path = epath.Path(path)
  _require_checkpoint(path)
  template = _abstract(abstract_state)
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    stored = getattr(getattr(metadata, 'item_metadata', None), 'tree', None)
    if stored is None:
      raise CheckpointError(f'{path} is not an Orbax params checkpoint (its metadata cannot be read)')
    _check_tree(f'params checkpoint {path}', stored, template)
    restored = checkpointer.restore(path, template)
  return _decode(abstract_state, restored)


def install_preemption_handler(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Callable[[], bool]:
  """Catches SIGTERM (a TPU/GPU preemption notice); returns `preempted()`, True once the signal has arrived.

  The loop calls `preempted()` after each step and, when True, saves (`force=True`), waits and exits. The handler
  only sets a flag, so the step in flight finishes. With several processes `preempted()` is True on all of them as
  soon as any one got the signal (one tiny all-gather per call), because the save that follows is collective.
  Must be called from the main thread.
  """
  received = threading.Event()

  def handler(signum, frame):  # pylint: disable=unused-argument
    received.set()

  for sig in signals:
    signal.signal(sig, handler)

  def preempted() -> bool:
    flag = received.is_set()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
    return flag

  return preempted
