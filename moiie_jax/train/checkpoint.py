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
import errno
import json
import logging
import os
import re
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moiie_jax.store.params import (CheckpointError, check_tree, decode_keys, encode_keys, is_key,  # noqa: F401
                                    item_kind, quiet_orbax, restore_params, restore_template, save_params)

_MANIFEST = 'manifest'
# File-system errors a save can hit, by the text TensorStore and Orbax put in the messages they re-raise them with.
_IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


class CheckpointSaveError(CheckpointError):
  """A save failed on the file system (disk full, read-only, permission). The message names the cause, the step and
  the folder; finished checkpoints before it are intact (an unfinished save leaves only a tmp folder)."""


def io_cause(error: BaseException | None) -> str | None:
  """'No space left on device' (or another file-system error's text) when `error` or an exception in its chain is
  one; None otherwise. Orbax and TensorStore re-raise OS errors as ValueError and friends, so the text counts too."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _IO_ERRNOS:
      return os.strerror(error.errno)
    text = str(error)
    for code in _IO_ERRNOS:
      if os.strerror(code) in text:
        return os.strerror(code)
    error = error.__cause__ or error.__context__
  return None


class _QuietIOErrors(logging.Filter):
  """Orbax's background writer logs a file-system failure with its whole traceback (hundreds of lines) before the
  error reaches `save`/`wait`, which report it in one line: drop those records, keep every other one."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or 'orbax' not in record.pathname:
      return True
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      return True
    return io_cause(RuntimeError(message)) is None


_QUIET_IO_ERRORS = _QuietIOErrors()
_ITEM_NAME = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')


def _no_replica_slicing_on_cpus() -> None:
  """On CPU devices, saves jax.Arrays without Orbax's replica-parallel slicing.

  Orbax's default splits each replicated array into one slice per replica so that the replicas' devices (or
  hosts) write a part each. CPU devices of one process share one memory, so the split only adds a slice op and a
  write per replica and array: with 8 CPU devices (the tests' mesh) a 300-array training state took 1.9 s to save
  with it and 0.8 s without. Orbax already turns it off for GPUs (JAX_PLATFORMS=cuda/gpu); TPUs keep the default.
  The checkpoint's format is the same either way. Registered once, process-wide (Orbax's handler registry is global).
  """
  if jax.default_backend() != 'cpu':
    return
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, '_use_replica_parallel', False):
    absl_log = logging.getLogger('absl')
    quiet = lambda record: 'overriding' not in record.getMessage()  # Orbax warns on every override
    absl_log.addFilter(quiet)
    try:
      ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                                              override=True)
    finally:
      absl_log.removeFilter(quiet)


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
    _no_replica_slicing_on_cpus()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._kinds: dict[str, str] = {}  # Orbax binds an item name to one handler for the manager's lifetime
    self._pending: int | None = None  # the step an async save is still writing
    for name in ('absl', 'orbax'):
      if _QUIET_IO_ERRORS not in logging.getLogger(name).filters:
        logging.getLogger(name).addFilter(_QUIET_IO_ERRORS)

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
      kinds[name] = item_kind(value)
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
        args[name] = ocp.args.StandardSave({'value': encode_keys(value)})
      else:
        args[name] = ocp.args.StandardSave(encode_keys(value))
    args[_MANIFEST] = ocp.args.JsonSave({'kinds': kinds, 'format': 1})
    self.wait()  # the previous async save's failure is that save's, and is reported with its step
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    if saved:
      self._pending = step
    return saved

  def _save_error(self, step: int | None, error: Exception) -> Exception:
    cause = io_cause(error)
    if cause is None:
      return error
    return CheckpointSaveError(f'{cause} while saving step {step} to {self.directory}')

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
    with quiet_orbax():  # reading the manifest alone makes Orbax warn about every other item
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
      if value is not None and item_kind(value) != kind:
        raise CheckpointError(f'{where}: item {name!r} was saved as a {kind} but the template is a {item_kind(value)}')
      if kind == 'json':
        args[name] = ocp.args.JsonRestore()
        continue
      args[name] = ocp.args.StandardRestore(None if value is None else
                                            restore_template({'value': value} if kind == 'leaf' else value))
    with quiet_orbax():  # Orbax warns about each stored item a partial read leaves out; ours are checked above
      if abstract_state is not None:
        self._check(step, where, template, kinds)
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    out = {}
    for name, value in template.items():
      item = restored[name]
      if kinds[name] != 'json' and value is not None:
        item = decode_keys({'value': value} if kinds[name] == 'leaf' else value, item)
      out[name] = item['value'] if kinds[name] == 'leaf' else item
    return out

  def _check(self, step, where, template, kinds) -> None:
    for name, value in template.items():
      if kinds[name] == 'json' or value is None:
        continue
      # Read by a handler of our own: the manager's item_metadata is None for an item it has not saved or restored
      # in this process, which is every item of a run that resumes.
      try:
        stored = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / name).tree
      except Exception:  # pylint: disable=broad-except
        stored = None  # no metadata (older format): Orbax still rejects a wrong shape, without the path
      if stored is not None:
        template = restore_template({'value': value} if kinds[name] == 'leaf' else value)
        check_tree(f'{where} item {name!r}', stored, template)

  def _await_tmp_cleanup(self) -> None:
    # Orbax 0.12.8 removes unfinished tmp folders in a background thread at start-up and neither
    # wait_until_finished() nor close() waits for it (only the next save does); a process that restores and exits
    # would kill it half-way. Guarded: the hook is private.
    await_cleanup = getattr(self._manager, '_maybe_await_cleanup_tmp_directory', None)
    if await_cleanup is not None:
      await_cleanup()

  def wait(self) -> None:
    """Blocks until an async save has been written and renamed into place.

    Raises CheckpointSaveError naming the step when that save failed on the file system."""
    step, self._pending = self._pending, None
    try:
      self._await_tmp_cleanup()
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      error = self._save_error(step, e)
      if error is e:
        raise
      raise error from e

  def close(self) -> None:
    """Waits for pending saves and releases the background threads."""
    self._await_tmp_cleanup()
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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
