"""The decoder LLM: HF `LlamaModel` / `Phi3Model` / `PhiModel` / `StableLmModel` / `Qwen2Model` (`Decoder`) and
their `...ForCausalLM` (`CausalLM`), with a KV cache. What differs between the families is read from the
`LLMConfig` properties (norm_kind, parallel_residual, mlp_kind, biases, names).

Parameter paths follow HF: `model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, `model.layers.{i}.mlp.*`,
`model.layers.{i}.input_layernorm`, `model.norm` (Phi-2: `model.final_layernorm`), `lm_head` (absent when
embeddings are tied; Phi-2's has a bias). A parallel-residual layer (Phi-2) has no `post_attention_layernorm`. With
cfg.scan_layers the layers are stacked instead: the layers repeat with a period p (1 when all layers are of one
kind, 2 when MoE layers interleave with dense ones), `model.layers.{j}` for j < p is one stacked DecoderLayer whose
arrays carry a leading axis of L / p blocks, and layer i lives at member i % p, index i // p. `layer_location` is
the one place that knows this; the converter and the upcycler ask it.

Logical axis names on parameters (mapped to the mesh by the parallel rules table): 'vocab', 'embed', 'heads',
'qkv' (Phi-3 fused q|k|v), 'mlp', 'gate_up' (Phi-3 fused gate|up), 'norm', and 'layers' for the scanned axis.

KV cache convention (`CausalLM.init_cache`, then `cache=` on each call):
  * the cache holds K/V for S = max_len slots per layer, k and v each one array [L, B, G, S, H]; `cache.index` is
    the next slot to write. A call with T tokens writes slots [index, index + T) and returns a cache whose index
    is index + T. Every layer writes its T new slots into the stacked arrays in place (one dynamic_update_slice on
    the arrays carried through the layers, and through the scan as carry, not xs), so a decoding step never copies
    the whole cache; the [G, S, H] order lets both attention products read a layer's cache without a transpose.
  * `attention_mask` then has shape [B, S] (the whole cache): 1 where a slot holds a real token, 0 for padding.
    Slots at or beyond index + T are never attended (causality over slots), so a caller may mark them 1 in advance:
    for a left-padded prompt mask m [B, T0], pass concat([m, ones[B, S - T0]]) on every call. Omitted, all
    written slots count as real.
  * positions default to cumsum(attention_mask) - 1 (clipped at 0) over the whole cache, read at the written
    slots, so left padding works without passing positions.

Letters: B batch, T tokens, S key slots (cache length), D model width, V vocabulary, L layers, G K/V heads,
H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moiie_jax.models import partitioning
from moiie_jax.models import rope
from moiie_jax.models import attention as attn
from moiie_jax.models.attention import Attention, logical
from moiie_jax.models.config import ConfigError, LLMConfig
from moiie_jax.models.mlp import MLP
from moiie_jax.models.linear import Linear

# LLMConfig.remat_policy -> what jax.checkpoint saves of a layer for the backward pass.
# Every policy also keeps what an expert exchange received (partitioning.EXCHANGED): recomputing it would repeat the
# all-to-alls (ICI traffic) to save N*K*D values per MoE layer; without expert parallelism nothing carries the name.
_EXCHANGED = jax.checkpoint_policies.save_only_these_names(partitioning.EXCHANGED)
REMAT_POLICIES = {
    'full': _EXCHANGED,
    'minimal': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _EXCHANGED),
    'dots': jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.dots_saveable, _EXCHANGED),
}


# ------------------------------------------------------------------------------------------------ layer layout
def layer_kinds(cfg: LLMConfig) -> tuple[str, ...]:
  """'moe' or 'dense' for each decoder layer."""
  moe = set(cfg.moe_layers)
  return tuple('moe' if i in moe else 'dense' for i in range(cfg.num_hidden_layers))


def layer_period(cfg: LLMConfig) -> int:
  """The smallest p dividing L such that layer i and layer i % p are of the same kind (what scanning stacks)."""
  kinds = layer_kinds(cfg)
  n = len(kinds)
  period = next(p for p in range(1, n + 1) if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)))
  if period == n and n > 2:
    raise ConfigError(f'LLMConfig.scan_layers=True: the MoE layers {list(cfg.moe_layers)} of {n} decoder layers do '
                      f'not repeat with a period that divides {n}, so the layers cannot be stacked for nnx.scan; '
                      f'set scan_layers=False')
  return period


def layer_location(cfg: LLMConfig, i: int) -> tuple[tuple, int | None]:
  """Where layer i's parameters live in the flat paths of `nnx.state(CausalLM(cfg))`.

  Returns (prefix, stack_index): looped, (('model', 'layers', i), None); scanned, (('model', 'layers', i % p),
  i // p), where stack_index indexes the leading axis of every array under the prefix.
  """
  if not 0 <= i < cfg.num_hidden_layers:
    raise ValueError(f'layer index {i} is outside [0, {cfg.num_hidden_layers}) (LLMConfig.num_hidden_layers)')
  if not cfg.scan_layers:
    return ('model', 'layers', i), None
  p = layer_period(cfg)
  return ('model', 'layers', i % p), i // p


# ------------------------------------------------------------------------------------------------ pytrees
@struct.dataclass
class KVCache:
  """k, v: [L, B, G, S, H] (RoPE already applied to k); index: int32[], the next slot to write."""
  k: jax.Array
  v: jax.Array
  index: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[3]


@struct.dataclass
class LayerInputs:
  """What every layer of one call shares, computed once by the Decoder.

  cos, sin: [B, T, R]; mask: bool[B, T, S]; modality: int32[B, T] (1 image, 0 text); valid: bool[B, T] (real
  tokens of this call); cache_index: int32[] or None.
  """
  cos: jax.Array
  sin: jax.Array
  mask: jax.Array
  modality: jax.Array
  valid: jax.Array
  cache_index: jax.Array | None = None


@struct.dataclass
class CausalLMOutput:
  logits: jax.Array  # float32[B, T, V]
  hidden_states: jax.Array  # [B, T, D], after the final norm
  moe_stats: object = None  # per-MoE-layer stats stacked on a leading axis in layer order, or None
  cache: KVCache | None = None


# ------------------------------------------------------------------------------------------------ modules
class RMSNorm(nnx.Module):
  """HF `LlamaRMSNorm`: normalise in float32, cast back to the input dtype, then multiply by `weight`."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = jnp.dtype(dtype)
    self.weight = nnx.Param(logical(nnx.initializers.ones_init(), 'norm')(None, (dim,), jnp.dtype(param_dtype)))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
  """torch `nn.LayerNorm` with HF names (`weight`, `bias`): two-pass mean and variance in float32."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = jnp.dtype(dtype)
    self.weight = nnx.Param(logical(nnx.initializers.ones_init(), 'norm')(None, (dim,), jnp.dtype(param_dtype)))
    self.bias = nnx.Param(logical(nnx.initializers.zeros_init(), 'norm')(None, (dim,), jnp.dtype(param_dtype)))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
    return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def make_norm(cfg: LLMConfig) -> RMSNorm | LayerNorm:
  """The family's norm (`LLMConfig.norm_kind`) of width hidden_size."""
  cls = LayerNorm if cfg.norm_kind == 'layer' else RMSNorm
  return cls(cfg.hidden_size, cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


class DecoderLayer(nnx.Module):
  """Pre-norm residual block, the MLP a MoEBlock on MoE layers. Sequential: x + attn(norm(x)), then
  + mlp(post_attention_layernorm(x)); parallel (Phi-2): x + attn(norm(x)) + mlp(norm(x)), one norm."""

  def __init__(self, cfg: LLMConfig, layer_idx: int, *, rngs: nnx.Rngs):
    self.layer_idx = layer_idx
    self.is_moe = layer_idx in cfg.moe_layers
    self.parallel = cfg.parallel_residual
    self.self_attn = Attention(cfg, rngs=rngs)
    if self.is_moe:
      from moiie_jax.models import moe  # pylint: disable=g-import-not-at-top  (written separately; dense needs none)
      self.mlp = moe.MoEBlock(cfg, rngs=rngs)
    else:
      self.mlp = MLP(cfg, rngs=rngs)
    self.input_layernorm = make_norm(cfg)
    self.post_attention_layernorm = None if self.parallel else make_norm(cfg)

  def __call__(self, x_btd: jax.Array, inputs: LayerInputs, kv: tuple[jax.Array, jax.Array] | None = None,
               layer: int | jax.Array | None = None):
    """x: [B, T, D]; kv: the whole stacked cache (k, v) [L, B, G, S, H] or None; layer: this layer's index in it.

    Returns (x [B, T, D], MoE stats or None, the cache (k, v) with this layer's K/V written, or None).
    """
    x_btd = partitioning.batch_sharded(x_btd)
    normed = self.input_layernorm(x_btd)
    # Named scopes (the HF module names) label the compiled ops, so a profile splits the time by part
    # (bench/step_profile.py, xprof); they change no computation.
    with jax.named_scope('self_attn'):
      h, kv = self.self_attn(normed, inputs.cos, inputs.sin, inputs.mask, kv, layer, inputs.cache_index)
    if self.parallel:  # the MLP reads the same normed input; both outputs join the residual together
      x_btd, h = partitioning.batch_sharded(x_btd + h), normed
    else:
      x_btd = partitioning.batch_sharded(x_btd + h)
      h = self.post_attention_layernorm(x_btd)
    if self.is_moe:
      with jax.named_scope('moe'):
        h, stats = self.mlp(h, inputs.modality, inputs.valid)
    else:
      with jax.named_scope('mlp'):
        h, stats = self.mlp(h), None
    return partitioning.batch_sharded(x_btd + h), stats, kv


def _stacked_layers(cfg: LLMConfig, member: int, blocks: int, rngs: nnx.Rngs) -> DecoderLayer:
  """`blocks` independently initialised copies of layer `member`, stacked on a leading 'layers' axis."""

  @nnx.split_rngs(splits=blocks)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def make(r: nnx.Rngs) -> DecoderLayer:
    return DecoderLayer(cfg, member, rngs=r)

  return make(rngs)


def _run_layer(layer: DecoderLayer, x_btd, inputs: LayerInputs, kv, index):
  return layer(x_btd, inputs, kv, index)


def _stack(trees: list, interleave: bool = False):
  """Stacks per-layer stats pytrees on a new leading axis (interleave: members' [blocks] stacks -> layer order)."""
  if not trees:
    return None
  if interleave:
    return jax.tree.map(lambda *xs: jnp.stack(xs, axis=1).reshape((-1,) + xs[0].shape[1:]), *trees)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class Decoder(nnx.Module):
  """HF `LlamaModel` & co.: embeddings, L decoder layers (looped or scanned), the final norm (`norm`, Phi-2's
  `final_layernorm`)."""

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  embedding_init=logical(nnx.initializers.normal(cfg.initializer_range),
                                                         'vocab', 'embed'), rngs=rngs)
    kinds = layer_kinds(cfg)
    self.moe_members = ()
    if cfg.scan_layers:
      self.period = layer_period(cfg)
      blocks = cfg.num_hidden_layers // self.period
      self.layers = nnx.List([_stacked_layers(cfg, j, blocks, rngs) for j in range(self.period)])
      self.moe_members = tuple(j for j in range(self.period) if kinds[j] == 'moe')
    else:
      self.period = None
      self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)])
    setattr(self, cfg.final_norm_name, make_norm(cfg))

  # -------------------------------------------------------------------------------------------- inputs
  def layer_inputs(self, batch: int, length: int, attention_mask, positions, modality,
                   cache: KVCache | None) -> LayerInputs:
    """Mask, RoPE tables and per-token flags shared by all layers (see the module docstring's convention)."""
    cfg = self.cfg
    if cache is None:
      index = None
      want = (batch, length)
      q_slots = jnp.arange(length, dtype=jnp.int32)
    else:
      index = jnp.asarray(cache.index, jnp.int32)
      want = (batch, cache.max_len)
      q_slots = index + jnp.arange(length, dtype=jnp.int32)
      if not isinstance(index, jax.core.Tracer) and int(index) + length > cache.max_len:
        raise ValueError(f'KV cache overflow: writing {length} tokens at slot {int(index)} of a cache of '
                         f'{cache.max_len} slots (CausalLM.init_cache max_len)')
    if attention_mask is None:
      key_valid = jnp.broadcast_to(jnp.arange(want[1]) < q_slots[-1] + 1, want)
    else:
      if tuple(attention_mask.shape) != want:
        raise ValueError(f'attention_mask: expected shape {want} ([B, T] without a cache, [B, cache max_len] with '
                         f'one), got {tuple(attention_mask.shape)}')
      key_valid = attention_mask.astype(bool)
    if positions is None:
      all_positions = jnp.maximum(jnp.cumsum(key_valid.astype(jnp.int32), axis=1) - 1, 0)
      positions = all_positions if index is None else jax.lax.dynamic_slice_in_dim(all_positions, index, length, 1)
    elif tuple(positions.shape) != (batch, length):
      raise ValueError(f'positions: expected shape {(batch, length)}, got {tuple(positions.shape)}')
    valid = key_valid if index is None else jax.lax.dynamic_slice_in_dim(key_valid, index, length, 1)
    if modality is None:
      modality = jnp.zeros((batch, length), jnp.int32)
    elif tuple(modality.shape) != (batch, length):
      raise ValueError(f'modality: expected shape {(batch, length)}, got {tuple(modality.shape)}')
    cos, sin = rope.rope_cos_sin(cfg, positions, jnp.dtype(cfg.dtype))
    mask = attn.attention_mask(q_slots, key_valid, cfg.sliding_window)
    return LayerInputs(cos=cos, sin=sin, mask=mask, modality=modality, valid=valid, cache_index=index)

  # -------------------------------------------------------------------------------------------- layers
  def _looped(self, x, inputs: LayerInputs, cache: KVCache | None, run):
    stats = []
    kv = None if cache is None else (cache.k, cache.v)
    for i, layer in enumerate(self.layers):
      x, layer_stats, kv = run(layer, x, inputs, kv, i)
      if layer_stats is not None:
        stats.append(layer_stats)
    return x, _stack(stats), kv

  def _scanned(self, x, inputs: LayerInputs, cache: KVCache | None, run):
    p = self.period

    # The cache rides in the carry, not in xs: each layer updates the stacked arrays in place at its own index
    # (block * p + member). As xs/ys, scan would slice a layer's cache out and write it back, copying it all.
    @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=(nnx.Carry, 0),
              transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def body(carry, members, inputs):
      x, kv, block = carry
      stats = []
      for j, layer in enumerate(members):
        x, layer_stats, kv = run(layer, x, inputs, kv, None if kv is None else block * p + j)
        stats.append(layer_stats)
      return (x, kv, block + 1), tuple(stats)

    kv = None if cache is None else (cache.k, cache.v)
    (x, kv, _), stats = body((x, kv, jnp.zeros((), jnp.int32)), self.layers, inputs)
    moe = [stats[j] for j in self.moe_members]  # each stacked over blocks: [L/p, ...]
    moe_stats = moe[0] if len(moe) == 1 else _stack(moe, interleave=True)
    return x, moe_stats, kv

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
               modality: jax.Array | None = None, cache: KVCache | None = None):
    """Final hidden states [B, T, D], the MoE stats (or None) and the updated cache (or None).

    input_ids: int32[B, T] or inputs_embeds: [B, T, D] (exactly one); attention_mask: int[B, T], or int[B, S]
    with a cache (module docstring); positions: int32[B, T]; modality: int32[B, T], 1 image / 0 text, only read
    by MoE layers.
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError('Decoder: pass exactly one of input_ids and inputs_embeds')
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(self.cfg.dtype))
    x = partitioning.batch_sharded(x)
    batch, length = x.shape[:2]
    inputs = self.layer_inputs(batch, length, attention_mask, positions, modality, cache)
    run = nnx.remat(_run_layer, policy=REMAT_POLICIES[self.cfg.remat_policy]) if self.cfg.remat else _run_layer
    if self.cfg.scan_layers:
      x, moe_stats, new_kv = self._scanned(x, inputs, cache, run)
    else:
      x, moe_stats, new_kv = self._looped(x, inputs, cache, run)
    if cache is not None:
      cache = KVCache(k=new_kv[0], v=new_kv[1], index=inputs.cache_index + length)
    return getattr(self, self.cfg.final_norm_name)(x), moe_stats, cache


class CausalLM(nnx.Module):
  """HF `LlamaForCausalLM` / `Phi3ForCausalLM`: `model` (Decoder) and `lm_head` (absent when tied)."""

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    rope.rope_spec(cfg)  # an unsupported RoPE variant fails here, not at the first call
    self.cfg = cfg
    self.model = Decoder(cfg, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, use_bias=cfg.lm_head_bias,
                                dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                                kernel_init=logical(nnx.initializers.normal(cfg.initializer_range), 'embed', 'vocab'),
                                bias_init=logical(nnx.initializers.zeros_init(), 'vocab'), rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated); dtype defaults to cfg.dtype."""
    cfg = self.cfg
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.resolved_head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), index=jnp.zeros((), jnp.int32))

  def logits(self, hidden_btd: jax.Array) -> jax.Array:
    """float32[B, T, V] from final hidden states [B, T, D]."""
    if self.cfg.tie_word_embeddings:
      embedding = self.model.embed_tokens.embedding[...].astype(hidden_btd.dtype)
      out = jnp.einsum('BTD,VD->BTV', hidden_btd, embedding)
    else:
      out = self.lm_head(hidden_btd)
    return partitioning.batch_sharded(out.astype(jnp.float32))

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
               modality: jax.Array | None = None, cache: KVCache | None = None) -> CausalLMOutput:
    """See `Decoder.__call__` for the arguments and the module docstring for the cache convention."""
    hidden, moe_stats, cache = self.model(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                          positions=positions, modality=modality, cache=cache)
    return CausalLMOutput(logits=self.logits(hidden), hidden_states=hidden, moe_stats=moe_stats, cache=cache)
