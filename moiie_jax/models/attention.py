"""Causal self-attention with grouped K/V heads (HF `LlamaAttention` / `Phi3Attention`), RoPE and a KV cache.

Parameters carry HF names: `q_proj`, `k_proj`, `v_proj` and the output projection `o_proj` (Phi-2: `dense`), with
biases as the family has them (`LLMConfig.qkv_bias`, `out_bias`: LLaMA iff attention_bias, Phi-2 all, Qwen2 q/k/v,
StableLM q/k/v iff use_qkv_bias); Phi-3 one fused `qkv_proj` (kernel [D, (N + 2G) * H], columns q | k | v as in
HF) and `o_proj`, no biases. Partial rotary (Phi-2, StableLM, Phi-3) rotates the first dims of each head.

Grouped-query attention never repeats K/V: the N query heads are viewed as [G, R] (R = N / G query heads per
K/V head, head n = g * R + r as in HF's `repeat_kv`) and one einsum contracts them against the G K/V heads.
Scores are scaled like HF (q @ k^T * H^-0.5 in the compute dtype), masked, and softmaxed in float32.

Letters: B batch, T query tokens, S key slots, D model width, N query heads, G K/V heads, R query heads per K/V
head, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moiie_jax.models import rope
from moiie_jax.models.config import ConfigError, LLMConfig
from moiie_jax.models.linear import Linear


def logical(init, *axes: str):
  """`init` plus logical axis names (mapped to the mesh by the rules table); no sharding at creation time."""
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def attention_mask(q_slots: jax.Array, key_valid: jax.Array, sliding_window: int | None = None) -> jax.Array:
  """Which key slots each query may attend to: bool[B, T, S].

  q_slots: int32[T], the slot (cache index) of each query; key_valid: bool[B, S], the slots holding real tokens.
  Causality is over slots, not positions, as in HF (left padding shifts positions but not slots). With a sliding
  window w, HF keeps keys with q - k < w.
  """
  k_slots = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
  allowed = k_slots[None, :] <= q_slots[:, None]  # [T, S]
  if sliding_window is not None:
    allowed &= k_slots[None, :] > q_slots[:, None] - sliding_window
  return allowed[None] & key_valid[:, None, :]


def dot_product_attention(q_btnh: jax.Array, k_bgsh: jax.Array, v_bgsh: jax.Array, mask_bts: jax.Array,
                          scale: float) -> jax.Array:
  """Softmax(q k^T * scale) v over G K/V heads without repeating them; float32 softmax.

  q: [B, T, N, H]; k, v: [B, G, S, H] (the KV cache's layout); mask: bool[B, T, S] -> [B, T, N, H] in q's dtype.
  A query whose keys are all masked (a padding token) gets a uniform average rather than NaN; its output is never
  meaningful.

  Layout, for decoding: XLA's CPU matmuls want the right operand as [contracted, free], so q k^T with k as the
  right operand transposes all of k ([S, H] -> [H, S], O(S) bytes per layer and step). With few queries (R * T < H,
  i.e. decoding) the scores are computed as k q^T instead, k on the left as it lies, and the small [S, R * T]
  result is transposed. p v already has v as [contracted S, free H]. Prefill (many queries) keeps q k^T: there the
  transposed scores would be the bigger array.
  """
  b, t, n, h = q_btnh.shape
  g = k_bgsh.shape[1]
  r = n // g
  q_bgrth = q_btnh.reshape(b, t, g, r, h).transpose(0, 2, 3, 1, 4)  # small: this call's queries only
  batch = ((0, 1), (0, 1))
  if r * t < h:
    scores = jax.lax.dot_general(k_bgsh, q_bgrth, (((3,), (4,)), batch)).transpose(0, 1, 3, 4, 2)  # [B, G, S, R, T]
  else:
    scores = jax.lax.dot_general(q_bgrth, k_bgsh, (((4,), (3,)), batch))  # [B, G, R, T, S]
  scores = scores * jnp.asarray(scale, q_btnh.dtype)
  scores = scores.astype(jnp.float32)
  scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bgsh.dtype)
  out = jax.lax.dot_general(probs, v_bgsh, (((4,), (2,)), batch))  # [B, G, R, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def chunked_attention(q_btnh: jax.Array, k_bgsh: jax.Array, v_bgsh: jax.Array, mask_bts: jax.Array, scale: float,
                      chunk: int) -> jax.Array:
  """`dot_product_attention` a block of `chunk` queries at a time, each block recomputed in the backward pass.

  Same arguments and result. The whole-sequence version materialises float32 scores [B, N, T, S] and, for the
  backward pass, their softmax: at T = S = 4096, 32 heads and 2 sequences that is 4 GiB per buffer and several
  buffers per layer. Here only one block's [B, N, chunk, S] is alive at a time (a `lax.map` over query blocks,
  each block under `jax.checkpoint`, so the backward keeps q, k, v, not the probabilities). Exact: every query
  still sees every key of its row. T is padded up to a multiple of `chunk` (padded queries see no key; their rows
  are cut off).
  """
  b, t, n, h = q_btnh.shape
  s = mask_bts.shape[-1]
  blocks = -(-t // chunk)
  pad = blocks * chunk - t
  q_btnh = jnp.pad(q_btnh, ((0, 0), (0, pad), (0, 0), (0, 0)))
  mask_bts = jnp.pad(mask_bts, ((0, 0), (0, pad), (0, 0)))
  q_cbtnh = q_btnh.reshape(b, blocks, chunk, n, h).swapaxes(0, 1)  # [C, B, chunk, N, H]
  mask_cbts = mask_bts.reshape(b, blocks, chunk, s).swapaxes(0, 1)  # [C, B, chunk, S]
  block = jax.checkpoint(lambda qm: dot_product_attention(qm[0], k_bgsh, v_bgsh, qm[1], scale))
  out = jax.lax.map(block, (q_cbtnh, mask_cbts))  # [C, B, chunk, N, H]
  return out.swapaxes(0, 1).reshape(b, blocks * chunk, n, h)[:, :t]


def causal_block_attention(q_btnh: jax.Array, k_bgsh: jax.Array, v_bgsh: jax.Array, mask_bts: jax.Array,
                           scale: float, blocks: int) -> jax.Array:
  """`dot_product_attention` over this call's own tokens (S = T, query t at slot t), the queries split into
  `blocks` consecutive blocks, each against the keys up to its last query only.

  Same arguments and result. Causality masks every later key anyway, so a block skips them instead of computing
  and masking their scores: (blocks + 1) / (2 * blocks) of the score work (3/4 for two blocks), in the forward and
  the backward pass. Exact: every query keeps every key it may attend to; only the order of float sums changes. A
  query whose keys are all masked (left padding) averages over its block's keys instead of all T (its output is
  never meaningful either way). On a 2-core CPU the demo-shaped training step (32 rows of 88 tokens) runs 1.10x
  faster with 2 blocks than with 1 (`bench/train_step.py --compare causal_blocks`, bench/RESULTS.md).
  """
  t = q_btnh.shape[1]
  size = -(-t // blocks)
  outs = []
  for lo in range(0, t, size):
    hi = min(t, lo + size)
    outs.append(dot_product_attention(q_btnh[:, lo:hi], k_bgsh[:, :, :hi], v_bgsh[:, :, :hi],
                                      mask_bts[:, lo:hi, :hi], scale))
  return jnp.concatenate(outs, axis=1)


class Attention(nnx.Module):
  """Self-attention of one decoder layer."""

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = cfg.resolved_head_dim
    d, n, g, h = cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
    if cfg.fused_projections and cfg.attention_bias:
      raise ConfigError('LLMConfig.attention_bias=True: Phi-3 attention has no biases (HF ignores the flag)')
    init = nnx.initializers.normal(cfg.initializer_range)
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    bias_init = logical(nnx.initializers.zeros_init(), 'heads')
    if cfg.fused_projections:
      self.qkv_proj = Linear(d, (n + 2 * g) * h, use_bias=False, kernel_init=logical(init, 'embed', 'qkv'),
                                 **kw)
    else:
      proj = dict(use_bias=cfg.qkv_bias, kernel_init=logical(init, 'embed', 'heads'), bias_init=bias_init, **kw)
      self.q_proj = Linear(d, n * h, **proj)
      self.k_proj = Linear(d, g * h, **proj)
      self.v_proj = Linear(d, g * h, **proj)
    out = Linear(n * h, d, use_bias=cfg.out_bias, kernel_init=logical(init, 'heads', 'embed'),
                     bias_init=logical(nnx.initializers.zeros_init(), 'embed'), **kw)
    setattr(self, cfg.attn_out_name, out)  # `o_proj`, or Phi-2's `dense`

  def project_qkv(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: [B, T, D] -> q [B, T, N, H], k [B, T, G, H], v [B, T, G, H] (before RoPE)."""
    b, t, _ = x_btd.shape
    n, g, h = self.num_heads, self.num_kv_heads, self.head_dim
    if self.cfg.fused_projections:
      qkv = self.qkv_proj(x_btd)
      q, k, v = qkv[..., :n * h], qkv[..., n * h:(n + g) * h], qkv[..., (n + g) * h:]
    else:
      q, k, v = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
    return q.reshape(b, t, n, h), k.reshape(b, t, g, h), v.reshape(b, t, g, h)

  def __call__(self, x_btd: jax.Array, cos: jax.Array, sin: jax.Array, mask_bts: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None = None, layer: int | jax.Array | None = None,
               cache_index: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attention output and, with a cache, the updated cache.

    x: [B, T, D]; cos, sin: [B, T, R] (rope.rope_cos_sin); mask: bool[B, T, S] (attention_mask).
    Without a cache S = T, the keys are this call's tokens, and the second output is None. With kv = (k, v), the
    whole stacked cache of every layer, [L, B, G, S, H], this layer's K (after RoPE) and V are written at
    [layer, :, :, cache_index:cache_index + T] and attention runs over all S slots of layer `layer` (an int, or a
    traced int32[] inside a scan); returns (y [B, T, D], (k, v) updated, [L, B, G, S, H]).

    Why the whole stack: one dynamic_update_slice on the array the caller carries (a while_loop's, a scan's
    carry) updates it in place. Taking one layer's [B, G, S, H] out and writing it back into the stack instead
    copies the whole cache every step. (XLA:CPU still materialises this layer's slice once for the matmuls: one
    O(S) read and write per layer and step, about what attention reads anyway.)
    """
    b, t, _ = x_btd.shape
    q, k, v = self.project_qkv(x_btd)
    q = rope.apply_rope(q, cos, sin)
    k = rope.apply_rope(k, cos, sin)
    if kv is None:
      keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, G, T, H]
      new_kv = None
    else:
      k_cache, v_cache = kv
      zero = jnp.zeros((), jnp.int32)
      start = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3)[None].astype(k_cache.dtype), start)
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3)[None].astype(v_cache.dtype), start)
      if isinstance(layer, int):
        keys, values = k_cache[layer], v_cache[layer]
      else:
        keys = jax.lax.dynamic_index_in_dim(k_cache, layer, 0, keepdims=False)
        values = jax.lax.dynamic_index_in_dim(v_cache, layer, 0, keepdims=False)
      new_kv = (k_cache, v_cache)
    keys, values, scale = keys.astype(q.dtype), values.astype(q.dtype), self.head_dim ** -0.5
    chunk = self.cfg.attention_chunk
    with jax.named_scope('attention_core'):  # scores, mask, softmax, p v: a profile's label (no computation)
      if chunk and t > chunk:  # training and long prefills: bounded score memory
        out = chunked_attention(q, keys, values, mask_bts, scale, chunk)
      elif kv is None and self.cfg.attention_causal_blocks > 1:  # keys = these queries' tokens: skip later ones
        out = causal_block_attention(q, keys, values, mask_bts, scale, self.cfg.attention_causal_blocks)
      else:
        out = dot_product_attention(q, keys, values, mask_bts, scale)
    y = getattr(self, self.cfg.attn_out_name)(out.reshape(b, t, self.num_heads * self.head_dim))
    return y, new_kv
