"""The expert layer: MoIIE and its rivals (vanilla, modality), with a dropless oracle and capacity dispatch.

Variants (`MoEConfig.variant`): `vanilla` has one router (`gate`) over shared experts for every token;
`modality` sends vision tokens to vision experts (`gate_vis`) and text to language experts (`gate`); `moiie` has
both routers, the visual one scoring vision ∪ shared experts and the textual one shared ∪ language experts.
Every expert is an FFN of the decoder MLP's kind and parameter layout (SwiGLU, or Phi-2's fc1 -> GELU -> fc2 with
biases), stacked on a leading expert axis.

Execution: `MoEBlock.__call__` gathers the tokens into expert-ordered rows, runs the experts as matmuls and gathers
the results back; the gathers have custom VJPs whose backward pass is the inverse gather, so neither direction
scatters D-wide rows. With a capacity (capacity_factor > 0) the rows form an [E, C, D] buffer and the experts run
as one batched matmul. Dropless (capacity_factor <= 0) packs the N*K choices into rows sorted by expert, without
padding (a dropless [E, C, D] buffer would need E*N rows), and runs each projection as one grouped matmul with the
experts' choice counts as group sizes (`models.gmm`: a blocked scan, `lax.ragged_dot` or the Pallas megablox
kernel, chosen by `MoEConfig.grouped_matmul`); on the scan backend the whole expert FFN runs per row tile
(`gmm.grouped_ffn`; `separate_projections()` turns that off). `moe_reference` is a plain dropless loop
over experts: the oracle for every path.

B batch, T tokens, N = B*T positions, D model width, F FFN width, E experts, C capacity, K top-k, S slots
(E*C, or N*K in the dropless grouped layout), M rows of a grouped matmul.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moiie_jax.models import gmm
from moiie_jax.models.attention import logical
from moiie_jax.models.config import ConfigError, LLMConfig, MoEConfig, capacity
from moiie_jax.models.mlp import gelu
from moiie_jax.models.routing import (MoEStats, assign_grouped, assign_slots, aux_loss, combine_weights,
                                      layer_aux_loss, route, router_ranges, routing_stats, token_masks,
                                      token_weights, weighted_aux_loss)

__all__ = ['Experts', 'MoEBlock', 'MoEStats', 'aux_loss', 'layer_aux_loss', 'moe_reference', 'weighted_aux_loss',
           'expert_capacity', 'expert_counts', 'separate_projections']


class StackedLinear(nnx.Module):
  """E linear maps stacked on a leading axis: kernel [E, in, out], optional bias [E, out] (logical axes named)."""

  def __init__(self, n: int, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool, std: float, param_dtype,
               rngs: nnx.Rngs):
    init = logical(nnx.initializers.normal(std), 'expert', *axes)
    self.kernel = nnx.Param(init(rngs.params(), (n, d_in, d_out), param_dtype))
    zeros = logical(nnx.initializers.zeros_init(), 'expert', axes[1])
    self.bias = nnx.Param(zeros(rngs.params(), (n, d_out), param_dtype)) if bias else None


class Experts(nnx.Module):
  """E FFNs with the dense MLP's names: `gate_proj`/`up_proj`/`down_proj`, Phi-3's `gate_up_proj`/`down_proj`, or
  Phi-2's `fc1`/`fc2` (GELU, biased)."""

  def __init__(self, cfg: LLMConfig, n: int, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    if cfg.fused_projections and cfg.mlp_bias:
      raise ConfigError('LLMConfig.mlp_bias=True: the Phi-3 MLP has no biases (HF ignores the flag)')
    kw = dict(bias=cfg.mlp_has_bias, std=cfg.initializer_range, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.fused = cfg.fused_projections
    self.dtype = jnp.dtype(cfg.dtype)
    self.gelu = cfg.hidden_act if cfg.mlp_kind == 'gelu' else None  # the activation's HF name, or None (SwiGLU)
    if self.gelu:
      self.fc1 = StackedLinear(n, d, f, ('embed', 'mlp'), **kw)
      self.fc2 = StackedLinear(n, f, d, ('mlp', 'embed'), **kw)
      return
    if self.fused:
      self.gate_up_proj = StackedLinear(n, d, 2 * f, ('embed', 'gate_up'), **kw)  # gate first, then up (Phi3MLP)
    else:
      self.gate_proj = StackedLinear(n, d, f, ('embed', 'mlp'), **kw)
      self.up_proj = StackedLinear(n, d, f, ('embed', 'mlp'), **kw)
    self.down_proj = StackedLinear(n, f, d, ('mlp', 'embed'), **kw)

  def __call__(self, h: jax.Array, group_sizes: jax.Array | None = None, *, impl: str = 'auto') -> jax.Array:
    """Capacity layout: h [E, C, D], expert e's rows in h[e]. Grouped layout: h [M, D] with rows sorted by expert,
    group_sizes int32[E] rows each (rows past their sum are padding and give 0), run by the `gmm` backend `impl`.
    Returns the same shape in the compute dtype."""
    h = h.astype(self.dtype)
    kernel = lambda p: p.kernel[...].astype(self.dtype)
    bias = lambda p: None if p.bias is None else p.bias[...].astype(self.dtype)
    if group_sizes is not None and gmm.resolve(impl) == 'scan' and _FUSED_SCAN.get():
      # The whole FFN per row tile, its [R, F] activations kept in cache (see gmm.grouped_ffn).
      ins, act, out = self.parts()
      return gmm.grouped_ffn(h, tuple(kernel(p) for p in ins), tuple(bias(p) for p in ins), kernel(out), bias(out),
                             group_sizes, act)
    if group_sizes is not None:
      # Each row's expert, for the biases; padding rows name the zero row E.
      row_expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(h.shape[0]), side='right')

    def proj(p: StackedLinear, a: jax.Array) -> jax.Array:
      w, b = kernel(p), bias(p)
      if group_sizes is None:
        out = jnp.einsum('ECD,EDF->ECF', a, w)
        return out if b is None else out + b[:, None, :]
      out = gmm.grouped_matmul(a, w, group_sizes, impl=impl)  # [M, F]
      return out if b is None else out + jnp.concatenate([b, jnp.zeros_like(b[:1])])[row_expert]

    return self.ffn(h, proj)

  def parts(self) -> tuple[tuple['StackedLinear', ...], Callable[..., jax.Array], 'StackedLinear']:
    """(input projections, the activation over their outputs, output projection) of this FFN kind."""
    if self.gelu:
      return (self.fc1,), gelu(self.gelu), self.fc2
    if self.fused:
      return (self.gate_up_proj,), _joined_swiglu, self.down_proj
    return (self.gate_proj, self.up_proj), _swiglu, self.down_proj

  def ffn(self, h: jax.Array, proj: Callable[['StackedLinear', jax.Array], jax.Array]) -> jax.Array:
    """The FFN of this kind, with `proj(p, a)` applying the stacked linear map p to a."""
    ins, act, out = self.parts()
    return proj(out, act(*(proj(p, h) for p in ins)))


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  return jax.nn.silu(gate) * up


def _joined_swiglu(gate_up: jax.Array) -> jax.Array:  # Phi-3's gate_up_proj output: gate first, then up
  return _swiglu(*jnp.split(gate_up, 2, axis=-1))


# Whether the grouped layout on the scan backend runs each expert's FFN fused per row tile (gmm.grouped_ffn, the
# default) or as one grouped matmul per projection; the latter for benchmarks and tests that compare the two.
_FUSED_SCAN: contextvars.ContextVar[bool] = contextvars.ContextVar('moiie_fused_scan', default=True)


@contextlib.contextmanager
def separate_projections():
  """While active (at trace time), the scan backend runs one grouped matmul per projection instead of fusing the
  expert FFN per row tile."""
  token = _FUSED_SCAN.set(False)
  try:
    yield
  finally:
    _FUSED_SCAN.reset(token)


# The two gathers between positions and slots. Choices and slots are in a partial one-to-one correspondence, so
# the transpose of "gather rows by one map" is "gather rows by the inverse map" (no scatter-add of rows).
@jax.custom_vjp
def _dispatch(x: jax.Array, s2n: jax.Array, a2s: jax.Array) -> jax.Array:
  """x: [N, D]; s2n: int32[S] position filling each slot (N = empty); a2s: int32[N, K] -> buffer [S, D]."""
  return jnp.concatenate([x, jnp.zeros_like(x[:1])])[s2n]


def _dispatch_fwd(x, s2n, a2s):
  return _dispatch(x, s2n, a2s), (s2n, a2s)


def _dispatch_bwd(res, g):
  s2n, a2s = res
  g = jnp.concatenate([g, jnp.zeros_like(g[:1])])
  return jnp.sum(g[a2s], axis=1), None, None  # [N, D]: each position's kept slots, summed


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _collect(y: jax.Array, a2s: jax.Array, s2a: jax.Array) -> jax.Array:
  """y: [S, D] expert outputs; a2s: int32[N, K] (S = dropped); s2a: int32[S] (N*K = empty) -> [N, K, D]."""
  return jnp.concatenate([y, jnp.zeros_like(y[:1])])[a2s]


def _collect_fwd(y, a2s, s2a):
  return _collect(y, a2s, s2a), (a2s, s2a)


def _collect_bwd(res, g):
  a2s, s2a = res
  g = g.reshape(-1, g.shape[-1])  # [N*K, D]
  return jnp.concatenate([g, jnp.zeros_like(g[:1])])[s2a], None, None


_collect.defvjp(_collect_fwd, _collect_bwd)


# The hook through which a higher layer (parallel/) runs the expert layer its own way: models/ imports nothing above
# it, so the hook is passed in. Called as hook(block, x, modality, valid, capacity_factor) -> (y, MoEStats).
Dispatch = Callable[['MoEBlock', jax.Array, jax.Array, jax.Array, 'float | None'], 'tuple[jax.Array, MoEStats]']
_DISPATCH: contextvars.ContextVar[Dispatch | None] = contextvars.ContextVar('moiie_moe_dispatch', default=None)


@contextlib.contextmanager
def dispatching(hook: Dispatch | None):
  """While active (at trace time), every `MoEBlock.__call__` runs `hook` instead of `MoEBlock.local`.

  Enter it inside the traced function: jit's cache does not key on context variables.
  """
  token = _DISPATCH.set(hook)
  try:
    yield hook
  finally:
    _DISPATCH.reset(token)


def expert_counts(experts: jax.Array, routed: jax.Array, n_experts: int) -> jax.Array:
  """Choices per expert: experts int32[N, K], routed bool[N] -> int32[E] (the grouped layout's group sizes)."""
  chosen = jnp.where(routed[:, None], experts, n_experts).reshape(-1)  # unrouted choices count in the extra bin
  return jnp.bincount(chosen, length=n_experts + 1)[:n_experts].astype(jnp.int32)


def expert_capacity(moe: MoEConfig, n_positions: int, capacity_factor: float) -> int:
  """Rows per expert buffer: ceil(cf * N * K / E) capped at N (a position picks an expert at most once), or N
  when cf <= 0 (the capacity layout's dropless bound)."""
  if capacity_factor <= 0:
    return n_positions
  return min(n_positions, max(moe.min_capacity, capacity(n_positions, moe.top_k, moe.n_experts, capacity_factor)))


class MoEBlock(nnx.Module):
  """A decoder FFN replaced by experts and one or two routers (official MoIIE names `gate`, `gate_vis`).

  Parameters: `experts.{gate_proj,up_proj,down_proj}.kernel` [E, D, F] / [E, F, D] (Phi-3: `gate_up_proj` [E, D, 2F];
  Phi-2: `fc1` [E, D, F], `fc2` [E, F, D]), optional `.bias` [E, F] / [E, D]; `gate.kernel` float [D, E_gate]
  (textual router, or vanilla's only router) and, unless vanilla, `gate_vis.kernel` [D, E_vis]; experts ordered
  [vision..., shared..., language...].

  Capacity: one buffer of C rows per expert, C = ceil(capacity_factor * N * K / E) with N = B*T positions (static,
  padding included) and E all experts of the layer. Every routed position places K choices among the E experts,
  so N*K/E is the mean load per expert; image and text share a shared expert's buffer. This is the standard
  formula for vanilla; for moiie/modality, whose routers score E_r < E experts each, it is the load of a layer
  whose group sizes match its modality mix, and the capacity factor is the headroom above that. (Sizing by
  E_r instead would enlarge every buffer by E/E_r, e.g. 4/3 for 1+2+1 experts, whatever the actual mix.)
  Slots go first choices first (K-major, in position order); an overflowing choice is dropped and contributes 0
  (the decoder's residual carries the token); the weights of the kept choices are not renormalised again.
  Positions that are routed take slots: under modality_rule='official' that includes padding (routed as text,
  as the official code does, though it is left out of the statistics and the loss).
  capacity_factor <= 0: dropless, in the grouped layout (or C = N when K = E, where that is no larger).
  """

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
    moe = cfg.moe
    moe.validate()
    if not moe.is_moe:
      raise ConfigError('MoEConfig.variant=dense: a dense layer has no experts; build the MLP instead')
    cfg.validate()  # the activation fits the MLP kind
    self.cfg = cfg
    self.moe = moe
    self.experts = Experts(cfg, moe.n_experts, rngs=rngs)
    (t0, t1), (v0, v1) = router_ranges(moe)
    # Router outputs are a handful of experts: replicated, not split over the expert axis.
    init = logical(nnx.initializers.normal(moe.router_init_std or cfg.initializer_range), 'embed', None)
    # Routers compute in float32 whatever the model dtype.
    router = dict(use_bias=False, kernel_init=init, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype),
                  rngs=rngs)
    self.gate = nnx.Linear(cfg.hidden_size, t1 - t0, **router)
    self.gate_vis = nnx.Linear(cfg.hidden_size, v1 - v0, **router) if moe.variant != 'vanilla' else None
    # Set on an inference model (looped layers, no expert parallelism) to keep each call's per-token routing as an
    # nnx.Intermediate `routing`: float32[B, T, E] combine weights (evaluate/token_routing.py reads it).
    self.record_routing = False

  def __call__(self, x: jax.Array, modality: jax.Array, valid: jax.Array, *,
               capacity_factor: float | None = None) -> tuple[jax.Array, MoEStats]:
    """x: [B, T, D]; modality: int[B, T] (1 image, 0 text); valid: bool/int[B, T] (attention mask).

    capacity_factor: None = `MoEConfig.capacity_factor`; <= 0 dropless. Returns (y [B, T, D] in the compute
    dtype, without the residual; 0 at unrouted padding), MoEStats). While a `dispatching(hook)` context is active
    (`parallel.dispatch.expert_parallel` enters one at trace time) the hook runs the layer instead, e.g. with the
    experts spread over a mesh.
    """
    hook = _DISPATCH.get()
    if hook is not None:
      return hook(self, x, modality, valid, capacity_factor)
    return self.local(x, modality, valid, capacity_factor=capacity_factor)

  def local(self, x: jax.Array, modality: jax.Array, valid: jax.Array, *,
            capacity_factor: float | None = None) -> tuple[jax.Array, MoEStats]:
    """`__call__` on this device alone, whatever mesh context is active."""
    moe = self.moe
    b, t, d = x.shape
    n, k, e = b * t, moe.top_k, moe.n_experts
    cf = moe.capacity_factor if capacity_factor is None else capacity_factor
    c = expert_capacity(moe, n, cf)
    vision, routed, counted = (m.reshape(n) for m in token_masks(modality, valid, moe))
    x2 = x.reshape(n, d)
    r = route(x2, self.gate.kernel[...], None if self.gate_vis is None else self.gate_vis.kernel[...], vision, moe)
    if cf <= 0 and k < e:  # dropless, grouped: N*K rows instead of the E*N of an [E, N, D] buffer
      a2s, s2a, kept, _ = assign_grouped(r.experts, routed, e, 1, n * k)  # R = 1: rows packed, sorted by expert
      sizes, shape = expert_counts(r.experts, routed, e), (n * k, d)
    else:
      a2s, s2a, kept = assign_slots(r.experts, routed, e, c)
      sizes, shape = None, (e, c, d)
    s2n = jnp.where(s2a < n * k, s2a // k, n)  # position filling each slot, n = empty
    buf = _dispatch(x2, s2n, a2s).reshape(shape)  # [E, C, D] or [N*K, D]
    out = self.experts(buf, sizes, impl=moe.grouped_matmul).reshape(-1, d)  # [S, D]
    picked = _collect(out, a2s, s2a)  # [N, K, D], 0 for dropped choices
    y = jnp.einsum('NK,NKD->ND', combine_weights(r, kept, moe).astype(picked.dtype), picked)
    if self.record_routing:
      self.sow(nnx.Intermediate, 'routing', token_weights(r, kept, moe).reshape(b, t, e))
    return y.reshape(b, t, d), routing_stats(r, vision, counted, kept, routed, moe)


def _ffn(experts: Experts, i: int, x: jax.Array) -> jax.Array:
  """Expert i on all positions, written out plainly. x: [N, D] -> [N, D]."""
  def lin(p, a):
    out = a @ p.kernel[...][i]
    return out if p.bias is None else out + p.bias[...][i]
  if experts.gelu:
    return lin(experts.fc2, gelu(experts.gelu)(lin(experts.fc1, x)))
  if experts.fused:
    gate, up = jnp.split(lin(experts.gate_up_proj, x), 2, axis=-1)
  else:
    gate, up = lin(experts.gate_proj, x), lin(experts.up_proj, x)
  return lin(experts.down_proj, jax.nn.silu(gate) * up)


def moe_reference(block: MoEBlock, x: jax.Array, modality: jax.Array, valid: jax.Array) -> jax.Array:
  """The dropless oracle, in float32: each router's own softmax and top-k, then every expert on every position,
  weighted by the position's gate for it. Shares no routing code with `MoEBlock.__call__`.

  x: [B, T, D]; modality, valid: int/bool[B, T]. Returns float32[B, T, D] (0 at unrouted padding).
  """
  moe = block.moe
  b, t, d = x.shape
  x2 = x.reshape(b * t, d).astype(jnp.float32)
  image = modality.astype(bool)
  if moe.modality_rule == 'official':
    nxt = jnp.concatenate([image[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
    is_vision, is_routed = (image & nxt).reshape(-1), jnp.ones(b * t, bool)
  else:
    is_vision, is_routed = (image & valid.astype(bool)).reshape(-1), valid.astype(bool).reshape(-1)
  if moe.gate == 'deepspeed':  # DeepSpeed's gate routes padding too
    is_routed = jnp.ones_like(is_routed)
  gates = jnp.zeros((b * t, moe.n_experts), jnp.float32)
  for router, (start, stop), members in ((block.gate, router_ranges(moe)[0], ~is_vision),
                                         (block.gate_vis, router_ranges(moe)[1], is_vision)):
    if router is None:
      continue
    if block.gate_vis is None:  # vanilla: the one router takes everything
      members = jnp.ones_like(members)
    probs = jax.nn.softmax(x2 @ router.kernel[...].astype(jnp.float32), axis=-1)  # [N, E_r]
    top_p, top_i = jax.lax.top_k(probs, moe.top_k)
    if moe.renormalize:
      top_p = top_p / top_p.sum(-1, keepdims=True)
    local = jnp.zeros_like(probs).at[jnp.arange(b * t)[:, None], top_i].set(top_p)  # [N, E_r]
    gates = gates.at[:, start:stop].add(jnp.where((members & is_routed)[:, None], local, 0.0))
  y = jnp.zeros_like(x2)
  for i in range(moe.n_experts):
    y = y + gates[:, i:i + 1] * _ffn(block.experts, i, x2).astype(jnp.float32)
  return y.reshape(b, t, d)
