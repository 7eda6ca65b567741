"""S2 multi-scale image features ("scaling on scales"), as the official MoIIE fine-tuning computes them (`--use_s2`).

The image arrives at the largest scale S (1152 for the official 384, 768, 1152). For each scale s it is
bicubic-resized to s x s (torch's `F.interpolate(mode='bicubic', align_corners=False)`, no antialiasing) and cut
into (s / t)^2 tiles of the tower's size t = the smallest scale; the tower runs on every tile (all scales' tiles
of an image in one batch); each scale's tile features are put back together into an (s / t * g)-square map (g x g
patches per tile) and area-pooled (`mode='area'`, a block mean here since every scale is a multiple of t) to the
g x g grid; the scales' maps are concatenated on channels: g^2 tokens of len(scales) * D channels.

Letters: B batch, S input size, t tile size, n tiles per side, g patches per tile side, D tower width, C channels.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # torch's bicubic kernel coefficient (PIL and TF use -0.5)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """The four cubic-convolution weights of taps at offsets -1, 0, 1, 2 for fractional positions t: [N] -> [N, 4]."""
  a = _CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Source indices int32[out, 4] and weights float32[out, 4] of torch's bicubic resize along one axis
  (align_corners=False: source position (i + 0.5) * in / out - 0.5, not clamped; taps clamped to the edge)."""
  # In float32 as torch computes them for float32 images (float64 positions move the weights by ~1e-7).
  f32 = np.float32
  real = f32(in_size / out_size) * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
  base = np.floor(real)
  idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None], 0, in_size - 1)
  return idx.astype(np.int32), _cubic_weights((real - base).astype(f32)).astype(f32)


def resize_bicubic(x: jax.Array, size: int) -> jax.Array:
  """x: float[B, H, W, C] -> float32[B, size, size, C], rows then columns, four taps each."""
  x = x.astype(jnp.float32)
  for axis in (1, 2):
    if x.shape[axis] == size:
      continue  # torch's resize to the same size is the identity (weights 0, 1, 0, 0)
    idx, w = bicubic_taps(x.shape[axis], size)
    taps = jnp.take(x, jnp.asarray(idx.reshape(-1)), axis=axis)  # the axis becomes size * 4
    taps = taps.reshape(x.shape[:axis] + (size, 4) + x.shape[axis + 1:])
    shape = [1] * taps.ndim
    shape[axis], shape[axis + 1] = size, 4
    x = jnp.sum(taps * jnp.asarray(w).reshape(shape), axis=axis + 1)
  return x


def to_tiles(x: jax.Array, tile: int) -> jax.Array:
  """x: [B, S, S, C] with S = n * tile -> [B, n * n, tile, tile, C], tiles in row-major order."""
  b, s, _, c = x.shape
  n = s // tile
  x = x.reshape(b, n, tile, n, tile, c).transpose(0, 1, 3, 2, 4, 5)  # [B, n, n, t, t, C]
  return x.reshape(b, n * n, tile, tile, c)


def from_tiles(y: jax.Array, n: int) -> jax.Array:
  """y: [B, n * n, g * g, D] (each tile's patch tokens, row-major) -> the whole map [B, n * g, n * g, D]."""
  b, _, gg, d = y.shape
  g = math.isqrt(gg)
  y = y.reshape(b, n, n, g, g, d).transpose(0, 1, 3, 2, 4, 5)  # [B, n, g, n, g, D]
  return y.reshape(b, n * g, n * g, d)


def area_pool(x: jax.Array, size: int) -> jax.Array:
  """x: [B, M, M, D] with M = k * size -> float32[B, size, size, D], the mean of each k x k block."""
  b, m, _, d = x.shape
  k = m // size
  if k * size != m:
    raise ValueError(f'S2 area pooling: a {m}-square map does not split evenly into {size}-square blocks')
  return x.astype(jnp.float32).reshape(b, size, k, size, k, d).mean(axis=(2, 4))


def multiscale_features(tower: Callable[[jax.Array], jax.Array], pixel_values: jax.Array,
                        scales: Sequence[int]) -> jax.Array:
  """tower: [N, t, t, C] -> [N, g * g, D] with t = min(scales); pixel_values: float32[B, S, S, C], S = max(scales).

  Returns [B, g * g, len(scales) * D] in the tower's dtype (pooled in float32, as the official code does).
  """
  scales = sorted(scales)
  tile, b = scales[0], pixel_values.shape[0]
  tiles = [to_tiles(resize_bicubic(pixel_values, s), tile) for s in scales]  # [B, n_s^2, t, t, C] each
  counts = [t.shape[1] for t in tiles]
  # All scales' tiles of an image side by side in one tower batch, image-major (a batch shard keeps its tiles).
  batch = jnp.concatenate(tiles, axis=1)  # [B, sum n_s^2, t, t, C]
  feats = tower(batch.reshape((-1,) + batch.shape[2:]))  # [B * sum n_s^2, g * g, D]
  feats = feats.reshape((b, sum(counts)) + feats.shape[1:])
  g = math.isqrt(feats.shape[2])
  out, start = [], 0
  for count in counts:
    whole = from_tiles(feats[:, start:start + count], math.isqrt(count))  # [B, n g, n g, D]
    out.append(area_pool(whole, g).reshape(b, g * g, -1).astype(feats.dtype))
    start += count
  return jnp.concatenate(out, axis=-1)  # [B, g^2, len(scales) * D]
