"""The device mesh, the one table mapping logical axes to mesh axes, and the multi-host plumbing.

Mesh axes, outermost first: `data` (pure data parallelism), `fsdp` (data parallelism whose parameters and
optimizer state are sharded, gathered per layer), `expert` (expert parallelism; it also acts as FSDP for the
non-expert weights and as data parallelism for the tokens outside the expert layers, as in MaxText), `tensor`
(the heads / FFN / vocabulary dimensions). Sizes come from a config (`mesh.data=2, mesh.expert=4`); -1 means
"all the devices the other axes leave". The mesh has Auto axes (`jax.sharding.Mesh`, not `jax.make_mesh`, whose
Explicit axes make `shard_map` refuse unsharded inputs).

`LOGICAL_RULES` is the only place that knows how the model's logical axes ('batch', 'embed', 'expert', ...)
land on the mesh; `spec_for` applies it to one array. Changing the parallel layout edits this table, never model
code.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize` when asked to (flag or the
`MOIIE_DISTRIBUTED` environment variable), `global_batch` assembles each host's rows into global arrays with
`jax.make_array_from_process_local_data`, and `is_main_process` says who writes logs.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moiie_jax.models.config import ConfigError

AXES = ('data', 'fsdp', 'expert', 'tensor')

# Logical axis -> mesh axes, in the order they split the dimension. A mesh axis is used at most once per array:
# expert weights ('expert', 'embed', 'mlp') put `expert` on their expert dimension, so their 'embed' keeps `fsdp`
# only, while every other weight's 'embed' is sharded over `fsdp` and `expert` together (MaxText's layout).
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('expert', ('expert',)),
    ('embed', ('fsdp', 'expert')),
    ('vocab', ('tensor',)),
    ('heads', ('tensor',)),
    ('qkv', ('tensor',)),
    ('mlp', ('tensor',)),
    ('gate_up', ('tensor',)),
    ('norm', ()),
    ('layers', ()),
)
_RULES = dict(LOGICAL_RULES)


# ------------------------------------------------------------------------------------------------------ the mesh
def _get(config: Any, name: str, default: Any) -> Any:
  if config is None:
    return default
  if isinstance(config, Mapping) or hasattr(config, 'get'):
    value = config.get(name, default)
  else:
    value = getattr(config, name, default)
  return default if value is None else value


def mesh_shape(config: Any, n_devices: int) -> dict[str, int]:
  """Axis sizes from `config` (a mapping or ConfigDict with some of `AXES`; missing = 1, one may be -1).

  Raises ConfigError naming the axis when a size is invalid or the sizes do not multiply to `n_devices`.
  """
  if config is not None and (isinstance(config, Mapping) or hasattr(config, 'keys')):
    unknown = sorted(set(config.keys()) - set(AXES))
    if unknown:
      raise ConfigError(f'mesh: unknown axes {unknown}; expected some of {list(AXES)}')
  sizes = {}
  for axis in AXES:
    size = _get(config, axis, 1)
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ConfigError(f'mesh.{axis}={size!r}: expected a positive int, or -1 for the remaining devices')
    sizes[axis] = int(size)
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ConfigError(f'mesh: only one axis may be -1, got {rest}')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    if n_devices % fixed:
      raise ConfigError(f'mesh.{rest[0]}=-1: the other axes use {fixed} devices, which does not divide the '
                        f'{n_devices} devices available')
    sizes[rest[0]] = n_devices // fixed
  total = math.prod(sizes.values())
  if total != n_devices:
    layout = ' x '.join(f'{a}={s}' for a, s in sizes.items())
    more = 'more than' if total > n_devices else 'fewer than'
    raise ConfigError(f'mesh: {layout} needs {total} devices, {more} the {n_devices} available '
                      f'(set one axis to -1 to use all of them)')
  return sizes


def make_mesh(config: Any = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh over all devices of all processes (`jax.devices()`) with axes `AXES`, sized by `config`.

  Devices are laid out by `mesh_utils.create_device_mesh` (physical topology on TPU); on CPU/GPU, in the order of
  `jax.devices()`, which lists process 0's devices first, so the outer axes (`data`, `fsdp`) span hosts and the
  inner ones (`expert`, `tensor`) stay within a host when they fit.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.array(devices, dtype=object).reshape(shape)
  return Mesh(grid, AXES)


def axis_size(mesh: Mesh, axis: str) -> int:
  return int(mesh.shape.get(axis, 1))


# ------------------------------------------------------------------------------------------------ logical axes
def mesh_axes(logical: str | None) -> tuple[str, ...]:
  """Mesh axes of one logical axis (None -> replicated). An unknown name is an error naming it."""
  if logical is None:
    return ()
  if logical not in _RULES:
    raise ConfigError(f'logical axis {logical!r} has no rule in parallel.mesh.LOGICAL_RULES; known: '
                      f'{sorted(_RULES)}')
  return _RULES[logical]


def spec_for(logical_axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None) -> P:
  """PartitionSpec of an array whose dimensions carry `logical_axes`.

  Each mesh axis is used once (first dimension wins); mesh axes of size 1 or absent from the mesh are left out;
  with `shape`, trailing mesh axes that do not divide the dimension are dropped (a 3-way router output stays
  replicated rather than failing), so every parameter gets a valid layout.
  """
  used: set[str] = set()
  out = []
  for i, logical in enumerate(logical_axes):
    axes = [a for a in mesh_axes(logical) if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
    if shape is not None:
      while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    used.update(axes)
    out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes that split the batch (and hence the tokens of an expert layer), size-1 axes included."""
  return tuple(a for a in mesh_axes('batch') if a in mesh.shape)


def batch_shards(mesh: Mesh) -> int:
  return math.prod(axis_size(mesh, a) for a in batch_axes(mesh))


def batch_spec(ndim: int, mesh: Mesh) -> P:
  """[B, ...] split over the batch axes, the rest replicated."""
  return P(batch_axes(mesh), *([None] * (ndim - 1)))


def check_batch(batch_size: int, mesh: Mesh, where: str = 'batch') -> None:
  """The global batch must split evenly over the batch axes (data x fsdp x expert)."""
  shards = batch_shards(mesh)
  if batch_size % shards:
    layout = ' x '.join(f'{a}={axis_size(mesh, a)}' for a in batch_axes(mesh))
    raise ConfigError(f'{where}: batch size {batch_size} is not divisible by the {shards} batch shards of the mesh '
                      f'({layout}); use a global batch that is a multiple of {shards}')


# ------------------------------------------------------------------------------------------------ multi-host
def initialize_distributed(enabled: bool | None = None, *, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` when `enabled` (default: env `MOIIE_DISTRIBUTED` is 1/true).

  Arguments left None come from `MOIIE_COORDINATOR` (host:port), `MOIIE_NUM_PROCESSES`, `MOIIE_PROCESS_ID`, or,
  when those are unset too, from JAX's own cluster detection (TPU pods, SLURM, Open MPI). On CPU the collectives
  go through gloo. Must run before any other JAX call. Returns whether it initialised.
  """
  if enabled is None:
    enabled = os.environ.get('MOIIE_DISTRIBUTED', '').lower() in ('1', 'true', 'yes')
  if not enabled:
    return False
  coordinator_address = coordinator_address or os.environ.get('MOIIE_COORDINATOR')
  if num_processes is None and os.environ.get('MOIIE_NUM_PROCESSES'):
    num_processes = int(os.environ['MOIIE_NUM_PROCESSES'])
  if process_id is None and os.environ.get('MOIIE_PROCESS_ID'):
    process_id = int(os.environ['MOIIE_PROCESS_ID'])
  platforms = os.environ.get('JAX_PLATFORMS', '') or str(jax.config.jax_platforms or '')
  if 'cpu' in platforms.split(','):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return True


def is_main_process() -> bool:
  """Only process 0 writes logs, metrics and exported files."""
  return jax.process_index() == 0


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Each host's rows (numpy, [B / processes, ...]) -> global arrays [B, ...] split over the batch axes.

  Every process passes its own rows, in process order; the global batch size is checked against the mesh.
  """
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    sharding = NamedSharding(mesh, batch_spec(value.ndim, mesh))
    rows = value.shape[0] * jax.process_count()
    check_batch(rows, mesh, f'batch[{key!r}] (global: {value.shape[0]} rows x {jax.process_count()} processes)')
    out[key] = jax.make_array_from_process_local_data(sharding, value, (rows,) + value.shape[1:])
  return out
