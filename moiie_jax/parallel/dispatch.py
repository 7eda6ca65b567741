"""Expert parallelism: the MoE layer inside `jax.shard_map`, tokens exchanged by two fixed-capacity all_to_alls.

Layout: the E experts are split over the mesh's `expert` axis (E / ep consecutive experts per device, so the
[vision..., shared..., language...] order of `MoEConfig` spreads every group over the axis); the tokens are split
over the batch axes (`data`, `fsdp`, `expert`). Each device

  1. routes its N_l = B_l * T tokens with the replicated routers (`routing.route`: a token only ever picks experts
     its modality's router scores, so it only ever travels to those experts),
  2. packs each expert's choices into a buffer of C_l = ceil(cf * N_l * K / E) rows (`routing.assign_slots`,
     first choices first): [E, C_l, D], viewed as [ep, E/ep, C_l, D],
  3. all_to_all over `expert`: row block j goes to the j-th device of the axis, which owns experts
     [j E/ep, (j+1) E/ep) and receives [ep sources, E/ep, C_l, D],
  4. runs its E/ep experts as one batched matmul over all sources' rows ([E/ep, ep * C_l, D]),
  5. all_to_all back, and combines each token's K outputs with its router weights.

Capacity semantics: capacity is per token group, a group being one device's tokens (one batch shard), as in
GShard and MaxText; a single global capacity would need every device to reserve room for all of an expert's
slots and multiply the traffic by the number of groups. `grouped_moe` is the same computation on one device
(MoEBlock's own capacity path applied to each batch shard): the oracle of the tight-capacity tests. With ample
capacity (or dropless, cf <= 0, then C_l = N_l) nothing is dropped and the result equals the dropless reference.
Routing statistics are summed over the groups (psum), so the aux loss is the global one either way.

Hook into the model: `expert_parallel(plan)` installs `dispatch` as the model's MoE hook (`moe.dispatching`), so
while it is active at trace time every `MoEBlock.__call__` runs here instead of its single-device path
(`MoEBlock.local`); parameters and their paths do not change, and the model code names no mesh and imports
nothing of this package.

B batch, T tokens, N = B*T positions, D model width, E experts, K top-k, C capacity, P = ep (expert-axis size),
L = E / P local experts. `_l` marks per-device sizes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from moiie_jax.models import moe as moe_lib
from moiie_jax.models.config import ConfigError, MoEConfig
from moiie_jax.models.routing import MoEStats, assign_slots, route, routing_masks, routing_stats
from moiie_jax.parallel import mesh as mesh_lib

# The position<->slot gathers with inverse-gather VJPs (no scatter-add of D-wide rows), shared with MoEBlock.
_dispatch_rows = moe_lib._dispatch  # pylint: disable=protected-access
_collect_rows = moe_lib._collect  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Where the expert layer runs: the mesh, its expert axis and the axes that split the tokens."""
  mesh: Mesh
  expert_axis: str = 'expert'
  token_axes: tuple[str, ...] | None = None  # None: `mesh_lib.batch_axes(mesh)`

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
  n_l, k, e, ep = (b // groups) * t, moe.top_k, moe.n_experts, plan.ep
  cf = moe.capacity_factor if capacity_factor is None else capacity_factor
  c_l = moe_lib.expert_capacity(moe, n_l, cf)
  expert_def, expert_state = nnx.split(block.experts)
  gate = block.gate.kernel[...]
  gate_vis = None if block.gate_vis is None else block.gate_vis.kernel[...]
  axis, tokens = plan.expert_axis, plan.tokens

  def local(x_l, modality_l, valid_l, expert_state_l, gate_l, gate_vis_l):
    """One device: x_l [B_l, T, D], its tokens' flags, its E/P experts, the replicated routers."""
    vision, routed, counted = (m.reshape(n_l) for m in routing_masks(modality_l, valid_l, moe.modality_rule))
    x2 = x_l.reshape(n_l, d)
    r = route(x2, gate_l, gate_vis_l, vision, moe)
    a2s, s2a, kept = assign_slots(r.experts, routed, e, c_l)
    s2n = jnp.where(s2a < n_l * k, s2a // k, n_l)  # position filling each slot, n_l = empty
    buf = _dispatch_rows(x2, s2n, a2s).reshape(ep, e // ep, c_l, d)  # [P, L, C, D], block j for device j
    buf = jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)  # [P sources, L, C, D]
    rows = buf.transpose(1, 0, 2, 3).reshape(e // ep, ep * c_l, d)  # [L, P*C, D]: one matmul per local expert
    out = nnx.merge(expert_def, expert_state_l)(rows)
    out = out.reshape(e // ep, ep, c_l, d).transpose(1, 0, 2, 3)  # [P sources, L, C, D]
    out = jax.lax.all_to_all(out, axis, 0, 0, tiled=True).reshape(e * c_l, d)  # [S, D], back in slot order
    picked = _collect_rows(out, a2s, s2a)  # [N_l, K, D], 0 for dropped choices
    y = jnp.einsum('NK,NKD->ND', r.weights.astype(picked.dtype), picked)
    stats = routing_stats(r, vision, counted, kept)
    stats = combine_stats(stats, lambda a: jax.lax.psum(a, tokens), k) if tokens else stats
    return y.reshape(-1, t, d), stats

  experts_spec = jax.tree.map(lambda a: P(axis, *([None] * (a.ndim - 1))), expert_state)
  rows_spec = P(tokens or None)
  fn = jax.shard_map(local, mesh=plan.mesh,
                     in_specs=(rows_spec, rows_spec, rows_spec, experts_spec, P(), None if gate_vis is None else P()),
                     out_specs=(rows_spec, P()))
  return fn(x, modality, valid, expert_state, gate, gate_vis)


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
  """While active (at trace time), MoE blocks dispatch with `plan`.

  An int G instead of a plan runs `grouped_moe` with G groups on one device (the tests' oracle). Enter it inside
  the jitted function so that every trace sees it (jit's cache does not key on context variables).
  """
  hook = None
  if plan is not None:
    hook = lambda block, x, modality, valid, cf: dispatch(block, x, modality, valid, plan, capacity_factor=cf)
  token = _ACTIVE.set(plan)
  try:
    with moe_lib.dispatching(hook):
      yield plan
  finally:
    _ACTIVE.reset(token)


def active() -> ExpertParallel | int | None:
  return _ACTIVE.get()


def dispatch(block: moe_lib.MoEBlock, x: jax.Array, modality: jax.Array, valid: jax.Array,
             plan: ExpertParallel | int, *, capacity_factor: float | None = None) -> tuple[jax.Array, MoEStats]:
  """What `MoEBlock.__call__` runs under `expert_parallel(plan)`: the mesh dispatch, or `grouped_moe` for an int."""
  if isinstance(plan, int):
    return grouped_moe(block, x, modality, valid, plan, capacity_factor=capacity_factor)
  return moe_forward(block, x, modality, valid, plan, capacity_factor=capacity_factor)
