"""Expert parallelism: the MoE layer inside `jax.shard_map`, tokens exchanged between the devices of the expert axis.

Layout: the E experts are split over the mesh's `expert` axis (E / ep consecutive experts per device, so the
[vision..., shared..., language...] order of `MoEConfig` spreads every group over the axis); the tokens are split
over the batch axes (`data`, `fsdp`, `expert`). Each device routes its N_l = B_l * T tokens with the replicated
routers (`routing.route`: a token only ever picks experts its modality's router scores, so it only ever travels to
those experts), sends each choice to the device holding its expert, runs its E/ep experts on what it receives,
sends the results back and combines each token's K outputs with its router weights. Three exchanges:

  * capacity (capacity_factor > 0, or dropless on a CPU): each expert's choices packed into a buffer of
    C_l = ceil(cf * N_l * K / E) rows (`routing.assign_slots`, first choices first; dropless: C_l = N_l, a row per
    token for every expert, E times the work of the choices), [E, C_l, D] viewed as [ep, E/ep, C_l, D]; one
    all_to_all over `expert` (row block j to the j-th device, which receives [ep sources, E/ep, C_l, D]); its experts
    as one batched matmul over all sources' rows ([E/ep, ep * C_l, D]); all_to_all back.
  * ragged (dropless, ep > 1, TPU or GPU): the choices sorted by expert (hence by destination device) and sent with
    `jax.lax.ragged_all_to_all`, sized by the actual counts (an all_gather of every device's per-expert counts
    gives all offsets); the receiver sorts its rows by local expert and runs one grouped matmul (`models.gmm`), then
    the reverse ragged exchange. Its receive buffer has a static size, the worst case P * N_l * min(K, E/ep) rows
    (every token of every source sends all the choices it can to this device: a token picks distinct experts, at
    most E/ep of them here), so nothing is ever dropped; that is never more than the capacity exchange's E * N_l
    rows, and the traffic and the megablox kernel's work follow the real counts, not the buffer. (A smaller bound,
    a factor of N_l * K, would need an overflow rule, i.e. drops: it would no longer be dropless.) ragged_all_to_all
    does not compile for XLA:CPU, so a CPU mesh keeps the capacity exchange.
  * local (ep = 1): no exchange at all: `MoEBlock.local` on each token shard (the grouped dropless path when
    dropless, not an [E, N_l, D] buffer).

Capacity semantics: capacity is per token group, a group being one device's tokens (one batch shard), as in
GShard and MaxText; a single global capacity would need every device to reserve room for all of an expert's
slots and multiply the traffic by the number of groups. `grouped_moe` is the same computation on one device
(MoEBlock's own path applied to each batch shard): the oracle of the tight-capacity tests. With ample capacity or
dropless nothing is dropped and the result equals the dropless reference. Routing statistics are summed over the
groups (psum), so the aux loss is the global one either way.

Hook into the model: `expert_parallel(plan)` installs `dispatch` as the model's MoE hook (`moe.dispatching`), so
while it is active at trace time every `MoEBlock.__call__` runs here instead of its single-device path
(`MoEBlock.local`); parameters and their paths do not change, and the model code names no mesh and imports
nothing of this package. It also sets the grouped matmul's target platform (`gmm.target_platform`) to the mesh's,
so that a TPU mesh gets the TPU kernel even when compiled ahead of time on a CPU host.

B batch, T tokens, N = B*T positions, D model width, E experts, K top-k, C capacity, P = ep (expert-axis size),
L = E / P local experts, U = P * N_l * min(K, L) rows of the ragged receive buffer. `_l` marks per-device sizes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moiie_jax.models import gmm
from moiie_jax.models import moe as moe_lib
from moiie_jax.models import partitioning
from moiie_jax.models.config import ConfigError, MoEConfig
from moiie_jax.models.routing import (MoEStats, assign_grouped, assign_slots, combine_weights, route,
                                      routing_stats, token_masks)
from moiie_jax.parallel import mesh as mesh_lib

# The position<->slot gathers with inverse-gather VJPs (no scatter-add of D-wide rows), shared with MoEBlock.
_dispatch_rows = moe_lib._dispatch  # pylint: disable=protected-access
_collect_rows = moe_lib._collect  # pylint: disable=protected-access


DROPLESS_EXCHANGES = ('ragged', 'capacity')
RaggedAllToAll = Callable[..., jax.Array]  # jax.lax.ragged_all_to_all's signature


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Where the expert layer runs: the mesh, its expert axis and the axes that split the tokens.

  dropless_exchange: how a dropless layer (capacity_factor <= 0) exchanges rows over an expert axis > 1:
  'ragged' (sized by the counts) or 'capacity' (C_l = N_l); None picks ragged on TPU and GPU meshes and capacity on
  a CPU mesh, where ragged_all_to_all does not compile. ragged_all_to_all: the collective the ragged exchange uses
  (tests pass an emulation built from all_gather to run it on CPU devices).
  """
  mesh: Mesh
  expert_axis: str = 'expert'
  token_axes: tuple[str, ...] | None = None  # None: `mesh_lib.batch_axes(mesh)`
  dropless_exchange: str | None = None
  ragged_all_to_all: RaggedAllToAll = jax.lax.ragged_all_to_all

  @property
  def tokens(self) -> tuple[str, ...]:
    return mesh_lib.batch_axes(self.mesh) if self.token_axes is None else tuple(self.token_axes)

  @property
  def ep(self) -> int:
    return mesh_lib.axis_size(self.mesh, self.expert_axis)

  @property
  def groups(self) -> int:
    """Token groups (devices along the token axes), each with its own capacity."""
    return math.prod(mesh_lib.axis_size(self.mesh, a) for a in self.tokens)

  @property
  def platform(self) -> str:
    """The mesh's platform ('tpu', 'gpu', 'cpu'): what the layer is compiled for, whatever the host is."""
    name = self.mesh.devices.flat[0].platform.lower()
    return 'gpu' if name in ('cuda', 'rocm') else name

  def exchange(self, capacity_factor: float) -> str:
    """'local' (expert axis of size 1), 'ragged' or 'capacity': see the module docstring."""
    if self.ep == 1:
      return 'local'
    if capacity_factor > 0:
      return 'capacity'
    choice = self.dropless_exchange
    if choice is not None and choice not in DROPLESS_EXCHANGES:
      raise ConfigError(f'ExpertParallel.dropless_exchange={choice!r}: expected one of {list(DROPLESS_EXCHANGES)} '
                        f'or None (by platform)')
    if choice is None:
      choice = 'capacity' if self.platform == 'cpu' else 'ragged'
    if choice == 'ragged' and self.platform == 'cpu' and self.ragged_all_to_all is jax.lax.ragged_all_to_all:
      raise ConfigError('ExpertParallel.dropless_exchange=ragged on a CPU mesh: XLA:CPU does not implement '
                        'ragged-all-to-all; use capacity (or None)')
    return choice


def check_experts(moe: MoEConfig, plan: ExpertParallel) -> None:
  """The experts must split evenly over the expert axis."""
  if plan.expert_axis not in plan.mesh.shape:
    raise ConfigError(f'mesh: no axis named {plan.expert_axis!r} (axes: {list(plan.mesh.axis_names)})')
  if moe.n_experts % plan.ep:
    raise ConfigError(f'MoEConfig: {moe.n_experts} experts (n_vision={moe.n_vision} + n_shared={moe.n_shared} + '
                      f'n_language={moe.n_language}) do not split over mesh.{plan.expert_axis}={plan.ep}; the number '
                      f'of experts must be divisible by the expert axis size')


# ------------------------------------------------------------------------------------------------ statistics
_ADDITIVE = ('slot_counts', 'prob_sums', 'num_tokens', 'z_sum', 'tokens_per_expert', 'weight_per_expert')


def combine_stats(stats: MoEStats, total: Callable[[jax.Array], jax.Array], top_k: int) -> MoEStats:
  """Statistics of several token groups from each group's own: sums stay sums, ratios are re-weighted.

  `total` sums an array over the groups (a psum inside shard_map, a sum over a leading axis outside). The
  dropped fraction's denominator is K * counted positions = K * sum(num_tokens); a modality's position count is
  sum_e tokens_per_expert / K (each position picks K distinct experts).
  """
  summed = {name: total(getattr(stats, name)) for name in _ADDITIVE}
  choices = jnp.sum(stats.num_tokens, axis=-1) * top_k
  dropped = total(stats.dropped_fraction * jnp.maximum(choices, 1.0))
  per_modality = jnp.sum(stats.tokens_per_expert, axis=-1) / top_k  # [..., 2]
  entropy = total(stats.router_entropy * jnp.maximum(per_modality, 1.0))
  all_choices = jnp.sum(summed['num_tokens'], axis=-1) * top_k
  all_modality = jnp.sum(summed['tokens_per_expert'], axis=-1) / top_k
  return MoEStats(**summed, dropped_fraction=dropped / jnp.maximum(all_choices, 1.0),
                  router_entropy=entropy / jnp.maximum(all_modality, 1.0))


# ------------------------------------------------------------------------------------------------ the dispatch
def moe_forward(block: moe_lib.MoEBlock, x: jax.Array, modality: jax.Array, valid: jax.Array, plan: ExpertParallel, *,
                capacity_factor: float | None = None) -> tuple[jax.Array, MoEStats]:
  """`MoEBlock.__call__` with the experts spread over `plan.expert_axis` (see the module docstring).

  x: [B, T, D] (B divisible by the token groups); modality: int[B, T]; valid: bool/int[B, T].
  Returns (y [B, T, D] in the compute dtype, MoEStats over all tokens), like MoEBlock.
  """
  moe = block.moe
  check_experts(moe, plan)
  b, t, d = x.shape
  groups = plan.groups
  if b % groups:
    raise ConfigError(f'expert layer: batch size {b} is not divisible by the {groups} token groups of the mesh axes '
                      f'{list(plan.tokens)}')
  n_l = (b // groups) * t
  cf = moe.capacity_factor if capacity_factor is None else capacity_factor
  with gmm.target_platform(plan.platform):  # traced below: the grouped matmul is the mesh platform's
    return _moe_forward(block, x, modality, valid, plan, n_l, cf)


def _moe_forward(block: moe_lib.MoEBlock, x: jax.Array, modality: jax.Array, valid: jax.Array, plan: ExpertParallel,
                 n_l: int, cf: float) -> tuple[jax.Array, MoEStats]:
  moe = block.moe
  t, d = x.shape[1:]
  k, e, ep = moe.top_k, moe.n_experts, plan.ep
  exchange = plan.exchange(cf)
  axis, tokens = plan.expert_axis, plan.tokens
  rows_spec = P(tokens or None)
  total = (lambda a: jax.lax.psum(a, tokens)) if tokens else None
  # Pallas kernels (megablox, mosaic_gpu) give their outputs no varying mesh axes, which shard_map's type check
  # requires; without the check shard_map's transpose sums the replicated inputs' gradients itself (the same
  # gradients).
  check_vma = exchange == 'capacity' or cf > 0 or gmm.resolve(moe.grouped_matmul) not in ('megablox', 'mosaic_gpu')

  if exchange == 'local':
    block_def, block_state = nnx.split(block)

    def local(x_l, modality_l, valid_l, block_state_l):
      """One device, all experts: MoEBlock's own path on its token shard."""
      y, stats = nnx.merge(block_def, block_state_l).local(x_l, modality_l, valid_l, capacity_factor=cf)
      return y, (combine_stats(stats, total, k) if tokens else stats)

    fn = jax.shard_map(local, mesh=plan.mesh, in_specs=(rows_spec, rows_spec, rows_spec, P()),
                       out_specs=(rows_spec, P()), check_vma=check_vma)
    return fn(x, modality, valid, block_state)

  expert_def, expert_state = nnx.split(block.experts)
  gate = block.gate.kernel[...]
  gate_vis = None if block.gate_vis is None else block.gate_vis.kernel[...]
  c_l = moe_lib.expert_capacity(moe, n_l, cf)

  def sharded(x_l, modality_l, valid_l, expert_state_l, gate_l, gate_vis_l):
    """One device: x_l [B_l, T, D], its tokens' flags, its E/P experts, the replicated routers."""
    vision, routed, counted = (m.reshape(n_l) for m in token_masks(modality_l, valid_l, moe))
    x2 = x_l.reshape(n_l, d)
    r = route(x2, gate_l, gate_vis_l, vision, moe)
    experts = nnx.merge(expert_def, expert_state_l)
    if exchange == 'ragged':
      a2s, s2a, kept, _ = assign_grouped(r.experts, routed, e, 1, n_l * k)  # rows sorted by expert = by device
      s2n = jnp.where(s2a < n_l * k, s2a // k, n_l)  # position filling each row, n_l = empty
      rows = _dispatch_rows(x2, s2n, a2s)  # [N_l*K, D]
      out = _ragged_experts(rows, moe_lib.expert_counts(r.experts, routed, e), experts, plan,
                            ep * n_l * min(k, e // ep), moe.grouped_matmul)
    else:
      a2s, s2a, kept = assign_slots(r.experts, routed, e, c_l)
      s2n = jnp.where(s2a < n_l * k, s2a // k, n_l)  # position filling each slot, n_l = empty
      buf = _dispatch_rows(x2, s2n, a2s).reshape(ep, e // ep, c_l, d)  # [P, L, C, D], block j for device j
      buf = partitioning.exchanged(jax.lax.all_to_all(buf, axis, 0, 0, tiled=True))  # [P sources, L, C, D]
      rows = buf.transpose(1, 0, 2, 3).reshape(e // ep, ep * c_l, d)  # [L, P*C, D]: one matmul per local expert
      out = experts(rows)
      out = out.reshape(e // ep, ep, c_l, d).transpose(1, 0, 2, 3)  # [P sources, L, C, D]
      out = partitioning.exchanged(jax.lax.all_to_all(out, axis, 0, 0, tiled=True))
      out = out.reshape(e * c_l, d)  # [S, D], back in slot order
    picked = _collect_rows(out, a2s, s2a)  # [N_l, K, D], 0 for dropped choices
    y = jnp.einsum('NK,NKD->ND', combine_weights(r, kept, moe).astype(picked.dtype), picked)
    stats = routing_stats(r, vision, counted, kept, routed, moe)
    return y.reshape(-1, t, d), (combine_stats(stats, total, k) if tokens else stats)

  experts_spec = jax.tree.map(lambda a: P(axis, *([None] * (a.ndim - 1))), expert_state)
  fn = jax.shard_map(sharded, mesh=plan.mesh,
                     in_specs=(rows_spec, rows_spec, rows_spec, experts_spec, P(), None if gate_vis is None else P()),
                     out_specs=(rows_spec, P()), check_vma=check_vma)
  return fn(x, modality, valid, expert_state, gate, gate_vis)


def _exclusive_cumsum(a: jax.Array, axis: int = 0) -> jax.Array:
  return jnp.cumsum(a, axis=axis) - a


def _ragged_experts(rows: jax.Array, counts: jax.Array, experts: moe_lib.Experts, plan: ExpertParallel,
                    n_recv: int, impl: str) -> jax.Array:
  """The ragged exchange on one device (inside shard_map): rows there and back, its experts run in between.

  rows: [S_l, D], this device's choices sorted by expert (so by destination device), counts[e] of them for
  expert e (int32[E]); experts: this device's L experts; n_recv: U, the static size of the receive buffer.
  Returns [S_l, D]: each row's expert output, in the same order.
  """
  axis, p = plan.expert_axis, plan.ep
  e = counts.shape[0]
  me = jax.lax.axis_index(axis)
  every = jax.lax.all_gather(counts, axis).reshape(p, p, e // p)  # [source, destination, local expert]
  sent = jnp.sum(every, axis=-1)  # [source, destination]: rows each device sends each device
  # Forward: I send sent[me, j] rows from my offset excl_cumsum(sent[me])[j] to device j, where they land after the
  # rows of the sources before me; I receive sent[j, me] rows from each device j, source after source.
  send_sizes, recv_sizes = sent[me], sent[:, me]
  send_offsets = _exclusive_cumsum(send_sizes)
  land_offsets = _exclusive_cumsum(sent, axis=0)[me]
  recv_offsets = _exclusive_cumsum(recv_sizes)
  # The result is typed like `output`: zeros that vary over the mesh axes as the rows do (full_like keeps them).
  received = plan.ragged_all_to_all(rows, jax.lax.full_like(rows, 0, shape=(n_recv, rows.shape[1])), send_offsets,
                                    send_sizes, land_offsets, recv_sizes, axis_name=axis)  # [U, D], source-major
  received = partitioning.exchanged(received)
  # Received rows come in segments (source s, local expert l) in source-major order; the grouped matmul wants them
  # expert-major. Both reorderings are gathers with the inverse gather as VJP (a permutation, no scatter-add).
  segments = every[:, me, :]  # [P, L]
  from_source, to_expert = _expert_major(segments, n_recv)
  grouped = _dispatch_rows(received, from_source, to_expert[:, None])  # [U, D], expert-major
  out = experts(grouped, jnp.sum(segments, axis=0).astype(jnp.int32), impl=impl)  # [U, D]
  out = _dispatch_rows(out, to_expert, from_source[:, None])  # [U, D], source-major again
  # Back: each source's rows return to where they came from, i.e. to the source's own send offset for me.
  return_offsets = _exclusive_cumsum(sent, axis=1)[:, me]
  return partitioning.exchanged(plan.ragged_all_to_all(out, jnp.zeros_like(rows), recv_offsets, recv_sizes,
                                                       return_offsets, send_sizes, axis_name=axis))


def _expert_major(segments: jax.Array, n_rows: int) -> tuple[jax.Array, jax.Array]:
  """The permutation of a receive buffer from source-major to expert-major segments, both ways.

  segments: int[P, L], rows from source s for local expert l. Returns (from_source int32[U]: the source-major row
  that fills each expert-major position, to_expert int32[U]: the expert-major position of each source-major row),
  U = n_rows standing for "none" (unused rows).
  """
  p, l = segments.shape
  src_sizes = segments.reshape(-1)  # segments (s, l), source-major
  src_ends = jnp.cumsum(src_sizes)
  exp_starts = _exclusive_cumsum(segments.T.reshape(-1)).reshape(l, p)  # [L, P]: where segment (s, l) starts
  row = jnp.arange(n_rows, dtype=jnp.int32)
  seg = jnp.minimum(jnp.searchsorted(src_ends, row, side='right'), p * l - 1)  # each row's segment, s * L + l
  pos = exp_starts[seg % l, seg // l] + row - (src_ends[seg] - src_sizes[seg])
  to_expert = jnp.where(row < src_ends[-1], pos, n_rows).astype(jnp.int32)
  from_source = jnp.full((n_rows + 1,), n_rows, jnp.int32).at[to_expert].set(row)[:n_rows]
  return from_source, to_expert


def grouped_moe(block: moe_lib.MoEBlock, x: jax.Array, modality: jax.Array, valid: jax.Array, groups: int, *,
                capacity_factor: float | None = None) -> tuple[jax.Array, MoEStats]:
  """The single-device statement of `moe_forward`: MoEBlock's own path on each of `groups` batch shards.

  Capacity is per group, as on the mesh; statistics are combined over the groups. x: [B, T, D], B % groups == 0.
  """
  b, t, d = x.shape
  if b % groups:
    raise ConfigError(f'grouped_moe: batch size {b} is not divisible by groups={groups}')
  call = lambda x, m, v: block.local(x, m, v, capacity_factor=capacity_factor)
  split = lambda a: a.reshape((groups, b // groups) + a.shape[1:])  # [G, B/G, ...]: one group per device
  y, stats = jax.vmap(call)(split(x), split(modality), split(valid))
  return y.reshape(b, t, -1), combine_stats(stats, lambda a: jnp.sum(a, axis=0), block.moe.top_k)


# ------------------------------------------------------------------------------------------------ the model hook
_ACTIVE: contextvars.ContextVar[ExpertParallel | int | None] = contextvars.ContextVar('moiie_expert_parallel',
                                                                                      default=None)


@contextlib.contextmanager
def expert_parallel(plan: ExpertParallel | int | None):
  """While active (at trace time), MoE blocks dispatch with `plan`, and grouped matmuls target its mesh's platform.

  An int G instead of a plan runs `grouped_moe` with G groups on one device (the tests' oracle). Enter it inside
  the jitted function so that every trace sees it (jit's cache does not key on context variables).
  """
  hook = None
  if plan is not None:
    hook = lambda block, x, modality, valid, cf: dispatch(block, x, modality, valid, plan, capacity_factor=cf)
  # A mesh fixes the platform; an int plan (one device) leaves it to the caller's context or the default backend.
  target = gmm.target_platform(plan.platform) if isinstance(plan, ExpertParallel) else contextlib.nullcontext()
  # On a mesh, the [B, ...] activations of the decoder and the tower stay split over the batch axes (see
  # models/partitioning.py: without it a dense FSDP step all-reduces every matmul's output).
  pin = functools.partial(_batch_sharded, plan.mesh) if isinstance(plan, ExpertParallel) else None
  token = _ACTIVE.set(plan)
  try:
    with moe_lib.dispatching(hook), target, partitioning.constraining(pin):
      yield plan
  finally:
    _ACTIVE.reset(token)


def _batch_sharded(mesh: Mesh, x: jax.Array) -> jax.Array:
  """x [B, ...] constrained to B over the mesh's batch axes (those that divide B), the rest replicated."""
  spec = mesh_lib.spec_for(('batch',) + (None,) * (x.ndim - 1), mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active() -> ExpertParallel | int | None:
  return _ACTIVE.get()


def dispatch(block: moe_lib.MoEBlock, x: jax.Array, modality: jax.Array, valid: jax.Array,
             plan: ExpertParallel | int, *, capacity_factor: float | None = None) -> tuple[jax.Array, MoEStats]:
  """What `MoEBlock.__call__` runs under `expert_parallel(plan)`: the mesh dispatch, or `grouped_moe` for an int."""
  if isinstance(plan, int):
    return grouped_moe(block, x, modality, valid, plan, capacity_factor=capacity_factor)
  return moe_forward(block, x, modality, valid, plan, capacity_factor=capacity_factor)
