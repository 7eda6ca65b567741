"""Grouped matmul: rows sorted by group, each group through its own weight matrix, with three backends.

`grouped_matmul(x, w, group_sizes, impl=...)` computes, for every group g, rows [start_g, start_g + sizes[g]) of x
times w[g], where start_g = sum(sizes[:g]); rows at or past sum(sizes) are padding: their outputs are 0 and they
receive no gradient. Backends (`MoEConfig.grouped_matmul`):

  'scan'        a loop over (row tile, group) visits: each tile of R rows is visited once per group it overlaps
                (at most ceil(M/R) + G - 1 visits, only the occupied ones run), w[g] is read by a dynamic slice, so
                no [M, K, N] or per-tile copy of the weights is ever made; a custom VJP keeps x, w and the sizes as
                residuals and accumulates dW in float32 in place. Right on every platform, fast on none but a CPU.
  'ragged_dot'  `jax.lax.ragged_dot`, differentiated by JAX: the GPU path (XLA's grouped GEMM). On a CPU it is a
                dense expansion over the groups, exact but G times the work.
  'megablox'    the Pallas TPU kernels of `jax.experimental.pallas.ops.tpu.megablox`: `gmm` forward, and its own
                custom VJP (`gmm` with transpose_rhs for dX, `tgmm` for dW). Only the row tiles a group occupies are
                computed. Off a TPU it runs in Pallas interpret mode (slow; for tests).
  'auto'        by the target platform: TPU -> megablox, GPU -> ragged_dot, anything else -> scan.

The target platform is `jax.default_backend()` unless a `target_platform(...)` context says otherwise: compiling
ahead of time for a TPU slice on a CPU host must pick (and lower, not interpret) the TPU kernel. Like every
context read at trace time it must be entered inside the traced function (jit's cache does not key on it);
`parallel.dispatch.expert_parallel` enters it for its mesh's platform.

M rows, K contraction width, N output width, G groups, R rows per tile.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from moiie_jax.models.config import GROUPED_MATMULS, ConfigError

__all__ = ['GROUPED_MATMULS', 'MEGABLOX_TILES', 'grouped_matmul', 'resolve', 'target_platform', 'platform']

# Preferred megablox tiles (rows, contraction, output), MaxText's defaults; each is cut to fit the problem.
MEGABLOX_TILES = (512, 1024, 1024)
_BACKEND_BY_PLATFORM = {'tpu': 'megablox', 'gpu': 'ragged_dot'}
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar('moiie_gmm_platform', default=None)


# ------------------------------------------------------------------------------------------------ platform
def _canonical(name: str) -> str:
  name = name.lower()
  return 'gpu' if name in ('cuda', 'rocm') else name


@contextlib.contextmanager
def target_platform(name: str | None):
  """While active (at trace time), 'auto' and megablox's interpret switch act for `name` ('tpu', 'gpu', 'cpu';
  None = `jax.default_backend()`) instead of the host's default backend."""
  token = _PLATFORM.set(None if name is None else _canonical(name))
  try:
    yield name
  finally:
    _PLATFORM.reset(token)


def platform() -> str:
  """The platform the traced computation is compiled for."""
  return _PLATFORM.get() or _canonical(jax.default_backend())


def resolve(impl: str) -> str:
  """The backend `impl` stands for on the target platform ('auto' -> megablox | ragged_dot | scan)."""
  if impl not in GROUPED_MATMULS:
    raise ConfigError(f'grouped_matmul={impl!r}: expected one of {list(GROUPED_MATMULS)}')
  return _BACKEND_BY_PLATFORM.get(platform(), 'scan') if impl == 'auto' else impl


# ------------------------------------------------------------------------------------------------ the function
def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, impl: str = 'auto',
                   tile_rows: int | None = None) -> jax.Array:
  """x: [M, K] rows sorted by group; w: [G, K, N]; group_sizes: int[G] (sum <= M) -> [M, N] in x's dtype.

  Rows past sum(group_sizes) give 0 and get no gradient. `tile_rows` (R) is the scan backend's row tile; None
  picks a power of two near M / (8G) in [8, 512] (see `scan_tile`). x and w must share a dtype.
  """
  if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != (w.shape[0],):
    raise ValueError(f'grouped_matmul: expected x [M, K], w [G, K, N], group_sizes [G]; got x {x.shape}, '
                     f'w {w.shape}, group_sizes {group_sizes.shape}')
  x, w, sizes = _vary_alike(x, w, group_sizes.astype(jnp.int32))
  backend = resolve(impl)
  if backend == 'scan':
    return _scan_gmm(x, w, sizes, tile_rows or scan_tile(x.shape[0], w.shape[0]))
  if backend == 'ragged_dot':
    return jax.lax.ragged_dot(x, w, sizes, preferred_element_type=x.dtype)
  return _megablox(x, w, sizes, interpret=platform() != 'tpu')


# ------------------------------------------------------------------------------------------------ scan
def scan_tile(m: int, g: int) -> int:
  """The scan backend's rows per tile for M rows in G groups: ~M / (8G), a power of two in [8, 512]. A tile that straddles a group boundary is visited once
  per group, so the wasted rows are at most (G - 1) * R ~ M / 8, while tiles stay large enough for a matmul."""
  target = max(1.0, m / (8 * g))
  return int(min(512, max(8, 2 ** round(math.log2(target)))))


def _visits(sizes: jax.Array, tile: int):
  """The (tile, group) pairs that hold rows, group by group: per group its first tile, its first and one-past-last
  visit, its first and one-past-last row."""
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first = starts // tile
  count = jnp.where(sizes > 0, (ends + tile - 1) // tile - first, 0)
  visit_ends = jnp.cumsum(count)
  return first, visit_ends - count, visit_ends, starts, ends


def _loop(sizes: jax.Array, tile: int, init, step):
  """Runs step(carry, group, first_row_of_tile, row_mask [R]) over the occupied (tile, group) visits, in order.

  A while loop with a data-dependent trip count: unoccupied tiles and empty groups cost nothing.
  """
  first, visit_starts, visit_ends, starts, ends = _visits(sizes, tile)

  def body(v, carry):
    g = jnp.sum(visit_ends <= v).astype(jnp.int32)  # the group of visit v (visits run group by group)
    row0 = (first[g] + v - visit_starts[g]) * tile
    rows = row0 + jnp.arange(tile)
    return step(carry, g, row0, (rows >= starts[g]) & (rows < ends[g]))

  return jax.lax.fori_loop(0, visit_ends[-1], body, init)


def _vary_alike(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Inside shard_map: each array made to vary over every mesh axis any of them varies over, by adding a zero that
  does (XLA drops the add; its transpose is the psum that dW needs). A custom VJP must return cotangents typed like
  its inputs, and dW, a sum over rows that vary over the token axes, varies over them even where W does not; a
  loop's carry must keep its type. Outside shard_map nothing varies and this changes nothing."""
  zero = jax.lax.full_like(sum(a.reshape(-1)[0].astype(jnp.float32) for a in arrays if a.size), 0, jnp.float32, ())
  return tuple(a + zero.astype(a.dtype) for a in arrays)


def _pad_rows(a: jax.Array, tile: int) -> jax.Array:
  extra = -a.shape[0] % tile
  return jnp.pad(a, ((0, extra), (0, 0))) if extra else a


def _tile_product(a_pad: jax.Array, w: jax.Array, sizes: jax.Array, tile: int, transpose: bool) -> jax.Array:
  """Rows of a_pad [Mp, A] through w[g] ([A, B], or w[g].T when transposed), written only where a group owns them."""
  width = w.shape[1] if transpose else w.shape[2]

  def step(out, g, row0, mask):
    a_t = jax.lax.dynamic_slice_in_dim(a_pad, row0, tile)  # [R, A]
    w_g = jax.lax.dynamic_index_in_dim(w, g, keepdims=False)  # [K, N]: a slice, not a gathered copy
    prod = a_t @ (w_g.T if transpose else w_g)
    prev = jax.lax.dynamic_slice_in_dim(out, row0, tile)
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mask[:, None], prod.astype(out.dtype), prev), row0, 0)

  return _loop(sizes, tile, jax.lax.full_like(a_pad, 0, jnp.result_type(a_pad, w), (a_pad.shape[0], width)), step)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _scan_gmm(x: jax.Array, w: jax.Array, sizes: jax.Array, tile: int) -> jax.Array:
  """The scan backend (see the module docstring). x: [M, K], w: [G, K, N], sizes: int32[G] -> [M, N]."""
  return _tile_product(_pad_rows(x, tile), w, sizes, tile, transpose=False)[:x.shape[0]]


def _scan_gmm_fwd(x, w, sizes, tile):
  return _scan_gmm(x, w, sizes, tile), (x, w, sizes)


def _scan_gmm_bwd(tile, res, g):
  x, w, sizes = res
  g_pad, x_pad = _pad_rows(g, tile), _pad_rows(x, tile)
  dx = _tile_product(g_pad, w, sizes, tile, transpose=True)[:x.shape[0]]

  def accumulate(dw, e, row0, mask):
    x_t = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(x_pad, row0, tile), 0)  # [R, K], its group's rows
    g_t = jax.lax.dynamic_slice_in_dim(g_pad, row0, tile)  # [R, N]
    upd = jnp.dot(x_t.T, g_t, preferred_element_type=jnp.float32)  # [K, N]
    return jax.lax.dynamic_update_index_in_dim(dw, jax.lax.dynamic_index_in_dim(dw, e, keepdims=False) + upd, e, 0)

  dw = _loop(sizes, tile, jax.lax.full_like(w, 0, jnp.float32), accumulate)
  return dx.astype(x.dtype), dw.astype(w.dtype), None


_scan_gmm.defvjp(_scan_gmm_fwd, _scan_gmm_bwd)


# ------------------------------------------------------------------------------------------------ megablox
def _fit(dim: int, preferred: int) -> int:
  """A tile for a contraction/output dimension: the whole dimension when it fits (always a legal block), else the
  largest multiple of 128 (the TPU lane width) <= preferred that divides it, else `preferred` (megablox masks a
  ragged last contraction tile, and Pallas clips a ragged last output tile)."""
  if dim <= preferred:
    return dim
  for t in range(preferred - preferred % 128, 0, -128):
    if dim % t == 0:
      return t
  return preferred


@dataclasses.dataclass(frozen=True)
class _Tiles:
  """megablox's `tiling` callable: (m, k, n) -> (tm, tk, tn) for each of its three products (forward gmm, the
  transposed gmm for dX, tgmm for dW), which see the dimensions in different roles. m is already a multiple of
  min(preferred_m, m) (see `_megablox`); frozen so that it hashes as a static argument."""
  preferred: tuple[int, int, int] = MEGABLOX_TILES

  def __call__(self, m: int, k: int, n: int) -> tuple[int, int, int]:
    tm, tk, tn = self.preferred
    return min(tm, m), _fit(k, tk), _fit(n, tn)


def _megablox(x: jax.Array, w: jax.Array, sizes: jax.Array, *, interpret: bool) -> jax.Array:
  """The megablox backend. Rows are padded to a multiple of the row tile (the whole padded M up to 512 rows, a
  multiple of 8: TPU sublanes); the kernel leaves rows past sum(sizes) unwritten, so they are masked on the way out,
  and x is masked on the way in so that the garbage its dX holds there never reaches the caller."""
  from jax.experimental.pallas.ops.tpu import megablox  # pylint: disable=import-outside-toplevel  (Pallas: lazily)
  m = x.shape[0]
  tm = min(MEGABLOX_TILES[0], -(-m // 8) * 8)
  x_pad = _pad_rows(x, tm)
  owned = (jnp.arange(x_pad.shape[0]) < jnp.sum(sizes))[:, None]
  y = megablox.gmm(jnp.where(owned, x_pad, 0), w, sizes, x.dtype, _Tiles(), None, None, False, interpret)
  return jnp.where(owned, y, 0)[:m]
