"""Rotary position embeddings, computed exactly as Hugging Face's LLaMA and Phi-3 code computes them.

We keep HF's `rotate_half` layout (the two halves of the rotary dims form the pairs, not interleaved neighbours), so
checkpoints load without permuting q/k. The inverse frequencies are built once per config on the host, in float32
with the same operations as `transformers.modeling_rope_utils`, and become constants of the traced program.

RoPE variants (the `rope_type` of HF's `rope_parameters` / `rope_scaling`):
  default   LLaMA: all head dims rotate; the others (Phi-3, Phi-2 0.4, StableLM-2 0.25, Qwen2 1.0): the first
            int(head_dim * partial_rotary_factor) dims rotate.
  linear    inverse frequencies divided by `factor`.
  llama3    LLaMA-3.1 smooth low/high-frequency interpolation (`factor`, `low_freq_factor`, `high_freq_factor`,
            `original_max_position_embeddings`).
  longrope  Phi-3 (aliases `su`, and `yarn` for Phi-3, as HF's Phi3Config renames them): `short_factor` while
            max(position)+1 <= original_max_position_embeddings, `long_factor` beyond; cos/sin scaled by the
            attention factor. As in HF, the choice is made per call from the largest position in the call, so a
            KV cache filled with short factors is stale once decoding crosses the threshold (HF's generate then
            recomputes the prompt; a caller of ours must do the same).
Any other type (dynamic, yarn for LLaMA, ...) raises NotImplementedError naming it.

Letters: B batch, T tokens, N heads, H head dim, R rotary dims (R <= H).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from moiie_jax.models.config import LLMConfig

_SUPPORTED = {'llama': ('default', 'linear', 'llama3', 'longrope'), 'phi3': ('default', 'longrope'),
              'phi': ('default', 'linear'), 'stablelm': ('default', 'linear'), 'qwen2': ('default', 'linear')}
_ALIASES = {'llama': {'su': 'longrope'}, 'phi3': {'su': 'longrope', 'yarn': 'longrope'}}


@dataclasses.dataclass(frozen=True, eq=False)
class RopeSpec:
  """Host-side RoPE constants of one config.

  inv_freq: float32[R/2] (the short factors for longrope); long_inv_freq: float32[R/2] or None;
  switch_len: for longrope, the long factors apply when max(position)+1 > switch_len; attention_scaling multiplies
  cos and sin.
  """
  rope_type: str
  inv_freq: np.ndarray
  long_inv_freq: np.ndarray | None = None
  switch_len: int | None = None
  attention_scaling: float = 1.0

  @property
  def rotary_dim(self) -> int:
    return 2 * self.inv_freq.shape[0]


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
  # HF: 1 / (base ** (arange(0, dim, 2).float() / dim)), all in float32.
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (np.float32(1.0) / np.power(np.float32(base), exponent, dtype=np.float32)).astype(np.float32)


def _llama3_inv_freq(inv_freq: np.ndarray, params: dict) -> np.ndarray:
  """HF `_compute_llama3_parameters`, step by step in float32."""
  factor = params['factor']
  low_freq_factor = params['low_freq_factor']
  high_freq_factor = params['high_freq_factor']
  old_context_len = params['original_max_position_embeddings']
  low_freq_wavelen = old_context_len / low_freq_factor
  high_freq_wavelen = old_context_len / high_freq_factor
  f32 = np.float32
  wavelen = (f32(2 * math.pi) / inv_freq).astype(f32)
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq).astype(f32)
  smooth = ((f32(old_context_len) / wavelen - f32(low_freq_factor)) / f32(high_freq_factor - low_freq_factor))
  smoothed = ((f32(1) - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(f32)


def _required(params: dict, key: str, rope_type: str):
  if key not in params or params[key] is None:
    raise ValueError(f'LLMConfig.rope_scaling: rope_type={rope_type!r} needs the field {key!r}; got keys '
                     f'{sorted(params)}')
  return params[key]


@functools.lru_cache(maxsize=64)
def rope_spec(cfg: LLMConfig) -> RopeSpec:
  """The RoPE constants HF derives from the same config (see the module docstring for the variants)."""
  params = cfg.rope_scaling_dict or {}
  rope_type = params.get('rope_type', params.get('type', 'default')) or 'default'
  rope_type = _ALIASES.get(cfg.architecture, {}).get(rope_type, rope_type)
  supported = _SUPPORTED.get(cfg.architecture, ())
  if rope_type not in supported:
    raise NotImplementedError(f'LLMConfig.rope_scaling: rope_type={rope_type!r} is not implemented for '
                              f'architecture={cfg.architecture!r}; supported: {list(supported)}')
  base = float(params.get('rope_theta', cfg.rope_theta))
  head_dim = cfg.resolved_head_dim
  partial = float(params.get('partial_rotary_factor', cfg.partial_rotary_factor))
  if cfg.architecture == 'llama':
    # HF's LLaMA always rotates the whole head (its apply_rotary_pos_emb has no pass-through part); its default
    # RoPE ignores partial_rotary_factor and the scaled ones would fail on a shape mismatch.
    if rope_type != 'default' and partial != 1.0:
      raise NotImplementedError(f'LLMConfig.partial_rotary_factor={partial} with rope_type={rope_type!r}: '
                                f'LLaMA rotates the full head; only 1.0 is supported')
    dim = head_dim
  else:
    dim = int(head_dim * partial)
  if dim < 2:
    raise ValueError(f'LLMConfig: head_dim={head_dim} * partial_rotary_factor={partial} leaves {dim} rotary dims')
  inv_freq = _base_inv_freq(base, dim)

  if rope_type == 'default':
    return RopeSpec('default', inv_freq)
  if rope_type == 'linear':
    return RopeSpec('linear', (inv_freq / np.float32(_required(params, 'factor', rope_type))).astype(np.float32))
  if rope_type == 'llama3':
    for key in ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'):
      _required(params, key, rope_type)
    return RopeSpec('llama3', _llama3_inv_freq(inv_freq, params))

  # longrope. HF gives the top-level original_max_position_embeddings priority over the one in rope_parameters.
  original = cfg.original_max_position_embeddings or params.get('original_max_position_embeddings')
  if not original:
    raise ValueError('LLMConfig.original_max_position_embeddings: rope_type=longrope needs it (or the same key in '
                     'rope_scaling)')
  short = np.asarray(_required(params, 'short_factor', rope_type), np.float32)
  long = np.asarray(_required(params, 'long_factor', rope_type), np.float32)
  for name, factors in (('short_factor', short), ('long_factor', long)):
    if factors.shape != (dim // 2,):
      raise ValueError(f'LLMConfig.rope_scaling.{name}: expected {dim // 2} numbers (rotary dims / 2), got '
                       f'{factors.shape[0] if factors.ndim == 1 else factors.shape}')
  factor = params.get('factor')
  if factor is None:
    factor = cfg.max_position_embeddings / original
  attention_factor = params.get('attention_factor')
  if attention_factor is None:
    attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  base_pow = np.power(np.float32(base), exponent, dtype=np.float32)
  short_inv = (np.float32(1.0) / (short * base_pow)).astype(np.float32)
  long_inv = (np.float32(1.0) / (long * base_pow)).astype(np.float32)
  return RopeSpec('longrope', short_inv, long_inv, int(original), float(attention_factor))


def rope_cos_sin(cfg: LLMConfig, positions: jax.Array, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """cos, sin: dtype[B, T, R] for positions int32[B, T] (HF `RotaryEmbedding.forward`)."""
  spec = rope_spec(cfg)
  inv_freq = jnp.asarray(spec.inv_freq)
  if spec.long_inv_freq is not None:
    # One choice for the whole call, from its largest position, as HF's longrope update does.
    use_long = jnp.max(positions) + 1 > spec.switch_len
    inv_freq = jnp.where(use_long, jnp.asarray(spec.long_inv_freq), inv_freq)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, R]
  cos = jnp.cos(emb) * spec.attention_scaling
  sin = jnp.sin(emb) * spec.attention_scaling
  return cos.astype(dtype), sin.astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [B, T, N, H]; cos, sin: [B, T, R]. Rotates the first R dims of each head, passes the rest through."""
  rot = cos.shape[-1]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
  if rot == x.shape[-1]:
    return x * cos + rotate_half(x) * sin
  x_rot, x_pass = x[..., :rot], x[..., rot:]
  return jnp.concatenate([x_rot * cos + rotate_half(x_rot) * sin, x_pass], axis=-1)
