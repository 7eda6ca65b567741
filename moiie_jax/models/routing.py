"""Token routing for the expert layers: modality masks, routers, top-k, capacity slots, statistics, aux loss.

Experts live in one stacked array ordered [vision..., shared..., language...] (see `MoEConfig`). A layer has at
most two routers, kept as two rows everywhere below:
  row 0, `gate`:     the textual router (moiie: shared ∪ language; modality: language) or vanilla's single router;
  row 1, `gate_vis`: the visual router (moiie: vision ∪ shared; modality: vision); empty for vanilla.
Each router scores a contiguous range of global expert indices, so its probabilities are padded into the global
index space with `-inf` logits outside the range (the MaxText/vmoe way of restricting a token to a group).

N routed positions (B*T flattened), D model width, E experts (global), K top-k, S slots (E*C with capacity C, or
Q*R: Q blocks of R rows in the dropless grouped layout).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moiie_jax.models.config import MoEConfig

TEXT, IMAGE = 0, 1  # modality rows of the statistics; router rows use the same order (gate, gate_vis)


def router_ranges(moe: MoEConfig) -> tuple[tuple[int, int], tuple[int, int]]:
  """Global expert ranges [start, stop) scored by (`gate`, `gate_vis`); (0, 0) when a router is absent."""
  nv, ns, nl = moe.n_vision, moe.n_shared, moe.n_language
  if moe.variant == 'vanilla':
    return (0, ns), (0, 0)
  if moe.variant == 'modality':
    return (nv, nv + nl), (0, nv)
  if moe.variant == 'moiie':
    return (nv, nv + ns + nl), (0, nv + ns)
  raise ValueError(f'MoEConfig.variant={moe.variant!r} has no routers')


def router_sizes(moe: MoEConfig) -> np.ndarray:
  """E_r of (`gate`, `gate_vis`): how many experts each router scores (0 when absent)."""
  return np.array([stop - start for start, stop in router_ranges(moe)], np.float32)


def routing_masks(modality: jax.Array, valid: jax.Array, rule: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Which positions are routed as vision, which are routed at all, which count in statistics and loss.

  modality: int[B, T] (1 image, 0 text); valid: bool/int[B, T] (the attention mask).
  Returns bool[B, T] each: (vision, routed, counted).
  'all_image': every valid image token is vision; padding is neither routed nor counted.
  'official' (the MoIIE code's CogVLM rule): vision iff the token and the next one are image tokens, so the
  last token of each image and all padding are routed as text. Padding still goes through the experts, but the
  loss applies the attention mask as the official code does, so padding is not counted (nor in any statistic).
  """
  image = modality.astype(jnp.int32) == 1
  valid = valid.astype(bool)
  if rule == 'all_image':
    return image & valid, valid, valid
  if rule == 'official':
    next_image = jnp.concatenate([image[:, 1:], jnp.zeros_like(image[:, :1])], axis=1)
    return image & next_image, jnp.ones_like(valid), valid
  raise ValueError(f'MoEConfig.modality_rule={rule!r}: expected all_image or official')


def token_masks(modality: jax.Array, valid: jax.Array, moe: MoEConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`routing_masks` under the layer's gate: DeepSpeed's gate (`MoEConfig.gate='deepspeed'`) routes every position
  of the flattened batch, padding included, as MoE-LLaVA does (padding then takes expert capacity)."""
  vision, routed, counted = routing_masks(modality, valid, moe.modality_rule)
  if moe.gate == 'deepspeed':
    routed = jnp.ones_like(routed)
  return vision, routed, counted


@struct.dataclass
class Routing:
  """One layer's routing decisions over N flattened positions."""
  experts: jax.Array  # int32[N, K], global expert index of each choice, best first
  weights: jax.Array  # float32[N, K], combine weights (renormalised over the K when configured)
  probs: jax.Array  # float32[N, E], router probabilities in global index (0 outside the router's range)
  lse: jax.Array  # float32[N], logsumexp of the router's logits (for the z-loss)
  row: jax.Array  # int32[N], which router routed the position (0 gate, 1 gate_vis)


def route(x: jax.Array, gate_kernel: jax.Array, gate_vis_kernel: jax.Array | None, vision: jax.Array,
          moe: MoEConfig) -> Routing:
  """Scores each position with its modality's router and picks its top-k allowed experts.

  x: [N, D] (any float dtype; the routers run in float32); gate_kernel: [D, E_0]; gate_vis_kernel: [D, E_1] or
  None (vanilla); vision: bool[N].
  """
  e_total = moe.n_experts
  (t0, t1), (v0, v1) = router_ranges(moe)
  x = x.astype(jnp.float32)

  def padded_logits(kernel, start, stop):  # [N, E], -inf outside [start, stop)
    logits = jnp.einsum('ND,DE->NE', x, kernel.astype(jnp.float32))
    return jnp.pad(logits, ((0, 0), (start, e_total - stop)), constant_values=-jnp.inf)

  logits = padded_logits(gate_kernel, t0, t1)
  if gate_vis_kernel is None:
    row = jnp.zeros(vision.shape, jnp.int32)
  else:
    logits = jnp.where(vision[:, None], padded_logits(gate_vis_kernel, v0, v1), logits)
    row = vision.astype(jnp.int32)
  probs = jax.nn.softmax(logits, axis=-1)
  lse = jax.nn.logsumexp(logits, axis=-1)
  # Top-k on logits, not probabilities: a far-behind allowed expert may underflow to probability 0 and tie with
  # the disallowed ones, while its logit stays above -inf.
  if moe.gate == 'deepspeed' and moe.gate_noise == 'gumbel':
    experts = _gumbel_top2(x, logits, moe.gate_noise_seed)
  else:
    _, experts = jax.lax.top_k(logits, moe.top_k)
  weights = jnp.take_along_axis(probs, experts, axis=-1)
  if moe.renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(experts=experts.astype(jnp.int32), weights=weights, probs=probs, lse=lse, row=row)


def combine_weights(r: Routing, kept: jax.Array, moe: MoEConfig) -> jax.Array:
  """float32[N, K]: the weights that combine each position's kept expert outputs.

  Mixtral-style gate: the router's top-k weights as `route` gave them (a dropped choice just contributes 0).
  DeepSpeed's top-2 gate renormalises after the drop: p_k * kept_k / max(sum of the kept p, eps), so a token that
  lost its second expert gives weight 1 to its first (and one that lost both gives nothing).
  """
  if moe.gate != 'deepspeed':
    return r.weights
  p = jnp.take_along_axis(r.probs, r.experts, axis=-1) * kept.astype(jnp.float32)
  return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)


def _gumbel_top2(x: jax.Array, logits: jax.Array, seed: int) -> jax.Array:
  """DeepSpeed's noisy top-2: the first choice is the argmax of the logits, the second the argmax of logits +
  Gumbel noise with the first masked. int32[N, 2].

  The noise key is fold_in(key(seed), the bits of sum(x)): the same batch and seed give the same draws, another
  batch (or layer, whose input differs) other draws, and no RNG state has to be threaded through the model.
  """
  fingerprint = jax.lax.bitcast_convert_type(jnp.sum(x, dtype=jnp.float32), jnp.int32)
  key = jax.random.fold_in(jax.random.key(seed), fingerprint)
  first = jnp.argmax(logits, axis=-1)
  noisy = logits + jax.random.gumbel(key, logits.shape, jnp.float32)
  noisy = jnp.where(jax.nn.one_hot(first, logits.shape[-1], dtype=bool), -jnp.inf, noisy)
  return jnp.stack([first, jnp.argmax(noisy, axis=-1)], axis=-1)


def _ranks(experts: jax.Array, routed: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array]:
  """Rank of each (position, choice) among its expert's choices, K-major, and each expert's choice count.

  experts: int32[N, K]; routed: bool[N]. K-major: every position's first choice, in position order, ranks before
  any second choice. No [N, E, C] one-hot: ranks come from a cumsum over an int [K*N, E] one-hot.
  Returns (rank int32[K, N], counts int32[E]).
  """
  n, k = experts.shape
  onehot = jax.nn.one_hot(experts.T, n_experts, dtype=jnp.int32) * routed.astype(jnp.int32)[None, :, None]
  cum = jnp.cumsum(onehot.reshape(k * n, n_experts), axis=0)  # [K*N, E]
  rank = jnp.sum((cum.reshape(k, n, n_experts) - 1) * onehot, axis=-1)  # [K, N]
  return rank, cum[-1]


def _slot_maps(slot_kn: jax.Array, kept_kn: jax.Array, n_slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(a2s int32[N, K], s2a int32[S], kept bool[N, K]) from each choice's slot [K, N] and whether it is kept."""
  k, n = slot_kn.shape
  a2s = jnp.where(kept_kn, slot_kn, n_slots).T.astype(jnp.int32)  # [N, K]
  choice = jnp.arange(n * k, dtype=jnp.int32)
  # Dropped choices all write to the extra row n_slots, which is cut off.
  s2a = jnp.full((n_slots + 1,), n * k, jnp.int32).at[a2s.reshape(-1)].set(choice)[:n_slots]
  return a2s, s2a, kept_kn.T


def assign_slots(experts: jax.Array, routed: jax.Array, n_experts: int,
                 capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gives each (position, choice) a row in its expert's buffer of `capacity` rows, first choices first.

  experts: int32[N, K]; routed: bool[N] (unrouted positions take no slot). A choice whose expert is already
  full (rank >= capacity) is dropped.
  Returns (a2s int32[N, K]: slot e*C + rank of each choice, S = E*C when dropped or unrouted;
           s2a int32[S]: the choice n*K + k filling each slot, N*K when empty;
           kept bool[N, K]).
  """
  rank, _ = _ranks(experts, routed, n_experts)
  kept = routed[None, :] & (rank < capacity)
  return _slot_maps(experts.T * capacity + rank, kept, n_experts * capacity)


def assign_grouped(experts: jax.Array, routed: jax.Array, n_experts: int, block: int,
                   n_blocks: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Dropless layout: choices sorted by expert into Q blocks of R rows, every block holding one expert's rows.

  Expert e's rows start at the sum of the earlier experts' counts, each rounded up to a multiple of R. Returns
  (a2s, s2a, kept) as `assign_slots` with S = Q*R (kept = routed), and block_expert int32[Q] (trailing unused
  blocks name the last expert; their rows are empty).
  """
  rank, counts = _ranks(experts, routed, n_experts)
  padded = -(-counts // block) * block
  ends = jnp.cumsum(padded)
  starts = ends - padded  # [E]
  kept = jnp.broadcast_to(routed[None, :], rank.shape)
  a2s, s2a, kept = _slot_maps(starts[experts.T] + rank, kept, n_blocks * block)
  block_expert = jnp.searchsorted(ends, jnp.arange(n_blocks) * block, side='right')
  return a2s, s2a, kept, jnp.minimum(block_expert, n_experts - 1).astype(jnp.int32)


@struct.dataclass
class MoEStats:
  """Routing statistics of one MoE layer (arrays only, so a stack of layers is one MoEStats).

  Router rows (0 `gate`, 1 `gate_vis`) and modality rows (0 text, 1 image) are in global expert index; a
  router's entries outside its range are 0. Only counted positions (see `routing_masks`) enter any field.
  """
  slot_counts: jax.Array  # float32[2, E], top-k choices given to each expert, per router (before capacity)
  prob_sums: jax.Array  # float32[2, E], sum of router probabilities, per router
  num_tokens: jax.Array  # float32[2], positions routed by each router
  z_sum: jax.Array  # float32[2], sum of logsumexp(logits)^2, per router
  tokens_per_expert: jax.Array  # float32[2, E], per routing modality (text, image): positions choosing e
  weight_per_expert: jax.Array  # float32[2, E], per routing modality: sum of combine weights given to e
  dropped_fraction: jax.Array  # float32[], choices dropped by capacity / all choices
  router_entropy: jax.Array  # float32[2], mean entropy (nats) of the router distribution, per modality


def token_weights(r: Routing, kept: jax.Array, moe: MoEConfig) -> jax.Array:
  """float32[N, E]: the combine weight each position gives each expert (0 for experts not chosen or dropped)."""
  onehot = jax.nn.one_hot(r.experts, r.probs.shape[-1], dtype=jnp.float32)  # [N, K, E]
  return jnp.einsum('NK,NKE->NE', combine_weights(r, kept, moe), onehot)


def routing_stats(r: Routing, vision: jax.Array, counted: jax.Array, kept: jax.Array, routed: jax.Array,
                  moe: MoEConfig) -> MoEStats:
  """vision, counted, routed: bool[N]; kept: bool[N, K].

  Under DeepSpeed's gate (moe.gate='deepspeed') the balance-loss fields (slot_counts, prob_sums, num_tokens,
  z_sum) and the dropped fraction cover every routed position (padding included, as DeepSpeed's gate sees the
  flattened batch) and slot_counts counts first choices only, so that `aux_loss` gives GShard's
  E * sum_e mean_gate_e * first_choice_fraction_e. The per-modality fields count `counted` positions either way.
  """
  e_total = r.probs.shape[-1]
  gshard = moe.gate == 'deepspeed'
  c = (routed if gshard else counted).astype(jnp.float32)
  onehot = jax.nn.one_hot(r.experts, e_total, dtype=jnp.float32)  # [N, K, E]
  chosen = jnp.sum(onehot, axis=1)  # [N, E]
  weight = token_weights(r, kept, moe)
  by_router = jax.nn.one_hot(r.row, 2, dtype=jnp.float32) * c[:, None]  # [N, 2]
  counted_f = counted.astype(jnp.float32)
  by_modality = jax.nn.one_hot(vision.astype(jnp.int32), 2, dtype=jnp.float32) * counted_f[:, None]  # [N, 2]
  logp = jnp.log(jnp.where(r.probs > 0, r.probs, 1.0))
  entropy = -jnp.sum(r.probs * logp, axis=-1)  # [N]
  n_modality = jnp.sum(by_modality, axis=0)
  n_choices = jnp.sum(c) * r.experts.shape[1]
  return MoEStats(
      slot_counts=jnp.einsum('NR,NE->RE', by_router, onehot[:, 0] if gshard else chosen),
      prob_sums=jnp.einsum('NR,NE->RE', by_router, r.probs),
      num_tokens=jnp.sum(by_router, axis=0),
      z_sum=jnp.einsum('NR,N->R', by_router, jnp.square(r.lse)),
      tokens_per_expert=jnp.einsum('NM,NE->ME', by_modality, chosen),
      weight_per_expert=jnp.einsum('NM,NE->ME', by_modality, weight),
      dropped_fraction=jnp.sum(c[:, None] * (1.0 - kept)) / jnp.maximum(n_choices, 1.0),
      router_entropy=jnp.einsum('NM,N->M', by_modality, entropy) / jnp.maximum(n_modality, 1.0),
  )


def _stacked(stats: MoEStats | Sequence[MoEStats]) -> MoEStats:
  """Any of: a list of per-layer stats, stats stacked on leading axes (scan: [L, ...], or [blocks, L, ...]), or one
  layer's stats -> stats with exactly one leading layer axis."""
  if isinstance(stats, (list, tuple)):
    if not stats:
      raise ValueError('aux_loss: got an empty list of MoEStats (a model with no MoE layer has no aux loss)')
    stats = jax.tree.map(lambda *a: jnp.stack(a), *stats)
  lead = stats.slot_counts.ndim - 2  # slot_counts is [2, E] per layer
  return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[lead:]), stats)


def _losses(slot_counts, prob_sums, num_tokens, z_sum, sizes):
  """Per-router balance loss E_r * sum_e f_e P_e, summed over routers, and the z-loss; leading axes kept."""
  n = jnp.maximum(num_tokens, 1.0)
  f = slot_counts / n[..., None]
  p = prob_sums / n[..., None]
  aux = jnp.sum(sizes * jnp.sum(f * p, axis=-1), axis=-1)
  z = jnp.sum(z_sum / n, axis=-1)
  return aux, z


def aux_loss(stats: MoEStats | Sequence[MoEStats], moe: MoEConfig) -> tuple[jax.Array, jax.Array]:
  """(balance loss, z-loss), both float32[], unweighted: add `moe.aux_loss_coef * aux + moe.z_loss_coef * z`.

  The balance loss is the Hugging Face Mixtral loss applied to each router separately and summed (the official
  MoIIE code's visual + textual losses): E_r * sum_e f_e P_e with f_e = top-k choices of e / tokens (sum_e f_e = k)
  and P_e the mean probability of e, over that router's counted tokens; it equals k per router when routing is
  perfectly uniform. Under DeepSpeed's gate f_e counts first choices only (GShard's loss, 1 when uniform; see
  `routing_stats`). 'global' scope sums counts and probabilities over all layers first (HF on concatenated
  logits); 'per_layer' averages the per-layer losses; 'sum' adds them (DeepSpeed / MoE-LLaVA). The z-loss is mean
  logsumexp(logits)^2, summed over routers (averaged over layers, or summed under 'sum').
  """
  s = _stacked(stats)
  sizes = jnp.asarray(router_sizes(moe))
  if moe.aux_loss_scope == 'global':
    return _losses(*(jnp.sum(a, axis=0) for a in (s.slot_counts, s.prob_sums, s.num_tokens, s.z_sum)), sizes)
  if moe.aux_loss_scope in ('per_layer', 'sum'):
    aux, z = _losses(s.slot_counts, s.prob_sums, s.num_tokens, s.z_sum, sizes)
    reduce = jnp.sum if moe.aux_loss_scope == 'sum' else jnp.mean
    return reduce(aux), reduce(z)
  raise ValueError(f'MoEConfig.aux_loss_scope={moe.aux_loss_scope!r}: expected global, per_layer or sum')


def layer_aux_loss(stats: MoEStats, moe: MoEConfig) -> tuple[jax.Array, jax.Array]:
  """(balance loss, z-loss) of one layer's stats (scope does not matter for one layer)."""
  return _losses(stats.slot_counts, stats.prob_sums, stats.num_tokens, stats.z_sum, jnp.asarray(router_sizes(moe)))


def weighted_aux_loss(stats: MoEStats | Sequence[MoEStats], moe: MoEConfig) -> jax.Array:
  """The term the training loss adds: aux_loss_coef * balance + z_loss_coef * z."""
  aux, z = aux_loss(stats, moe)
  return moe.aux_loss_coef * aux + moe.z_loss_coef * z
