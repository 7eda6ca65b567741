"""Grouped matmul: rows sorted by group, each group through its own weight matrix, with four backends.

`grouped_matmul(x, w, group_sizes, impl=...)` computes, for every group g, rows [start_g, start_g + sizes[g]) of x
times w[g], where start_g = sum(sizes[:g]); rows at or past sum(sizes) are padding: their outputs are 0 and they
receive no gradient. Backends (`MoEConfig.grouped_matmul`):

  'scan'        a loop over each group's rows in tiles that start at the group's first row: its whole tiles of
                R rows (no masking: every row is the group's), then what is left in tiles of r <= R rows, masked to
                the group (at most G * (r - 1) wasted rows, against (G - 1) * R for tiles on a fixed grid, and the
                products over R rows: dW's contraction is R deep); w[g] is read by a dynamic slice, so no [M, K, N]
                or per-tile copy of the weights is ever made; a custom VJP keeps x, w and the sizes as residuals and
                accumulates dW in float32 in place. Right on every platform; the CPU's path, and on a GPU at
                full size faster than ragged_dot (bench/RESULTS.md, 2026-12-04).
  'ragged_dot'  `jax.lax.ragged_dot`, differentiated by JAX: the GPU path (XLA's grouped GEMM). On a CPU it is a
                dense expansion over the groups, exact but G times the work.
  'megablox'    the Pallas TPU kernels of `jax.experimental.pallas.ops.tpu.megablox`: `gmm` forward, and its own
                custom VJP (`gmm` with transpose_rhs for dX, `tgmm` for dW). Only the row tiles a group occupies are
                computed. Off a TPU it runs in Pallas interpret mode (slow; for tests).
  'mosaic_gpu'  Hopper's Pallas Mosaic-GPU kernels of `jax.experimental.pallas.ops.gpu` (wgmma): `ragged_dot_mgpu`
                forward and (transpose_rhs) for dX, `transposed_ragged_dot_mgpu` for dW, in a custom VJP; bf16 or
                fp16 operands, K and N multiples of 128. Opt-in: an H100/H200 only (no interpret mode elsewhere).
  'auto'        by the target platform: TPU -> megablox, GPU -> ragged_dot, anything else -> scan.

`grouped_ffn(x, w_in, b_in, w_out, b_out, group_sizes, act)` runs a whole expert FFN on the scan backend, every
projection of a row tile in one loop body (forward and backward), so its [R, F] activations stay in cache; the
same products as `grouped_matmul` per projection (the same values, to the bit but for the biases' gradients).

The target platform is `jax.default_backend()` unless a `target_platform(...)` context says otherwise: compiling
ahead of time for a TPU slice on a CPU host must pick (and lower, not interpret) the TPU kernel. Like every
context read at trace time it must be entered inside the traced function (jit's cache does not key on it);
`parallel.dispatch.expert_parallel` enters it for its mesh's platform.

M rows, K contraction width, N output width, G groups, R rows per whole tile, r per remainder tile.
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

from moiie_jax.models.config import GROUPED_MATMULS, ConfigError

__all__ = ['GROUPED_MATMULS', 'MEGABLOX_TILES', 'Tiles', 'grouped_ffn', 'grouped_matmul', 'is_hopper', 'platform',
           'resolve', 'scan_tiles', 'target_platform', 'tiles_as']

# Preferred megablox tiles (rows, contraction, output), MaxText's defaults; each is cut to fit the problem.
MEGABLOX_TILES = (512, 1024, 1024)
_BACKEND_BY_PLATFORM = {'tpu': 'megablox', 'gpu': 'ragged_dot'}
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar('moiie_gmm_platform', default=None)
_TILES: contextvars.ContextVar[Tiles | None] = contextvars.ContextVar('moiie_gmm_tiles', default=None)


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
                   tile_rows: int | tuple[int, int] | None = None) -> jax.Array:
  """x: [M, K] rows sorted by group; w: [G, K, N]; group_sizes: int[G] (sum <= M) -> [M, N] in x's dtype.

  Rows past sum(group_sizes) give 0 and get no gradient. `tile_rows` is the scan backend's (R, r), or one number
  for both; None picks them from M and G (see `scan_tiles`). x and w must share a dtype.
  """
  if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != (w.shape[0],):
    raise ValueError(f'grouped_matmul: expected x [M, K], w [G, K, N], group_sizes [G]; got x {x.shape}, '
                     f'w {w.shape}, group_sizes {group_sizes.shape}')
  x, w, sizes = _vary_alike(x, w, group_sizes.astype(jnp.int32))
  backend = resolve(impl)
  if backend == 'scan':
    if not x.shape[0]:
      return jnp.zeros((0, w.shape[2]), x.dtype)
    return _scan_gmm(x, w, sizes, _tiles(tile_rows, x.shape[0], w.shape[0]))
  if backend == 'ragged_dot':
    return jax.lax.ragged_dot(x, w, sizes, preferred_element_type=x.dtype)
  if backend == 'mosaic_gpu':
    _check_mosaic_gpu(x, w)
    return _mosaic_gmm(x, w, sizes) if x.shape[0] else jnp.zeros((0, w.shape[2]), x.dtype)
  return _megablox(x, w, sizes, interpret=platform() != 'tpu')


# ------------------------------------------------------------------------------------------------ scan
@dataclasses.dataclass(frozen=True)
class Tiles:
  """The scan backend's row tiles: `whole` (R) rows per tile that lies inside one group, `rest` (r <= R) per tile of
  what is left of a group after its whole tiles. Frozen: a static argument."""
  whole: int
  rest: int

  def __post_init__(self):
    if not 1 <= self.rest <= self.whole:
      raise ValueError(f'scan tiles: expected 1 <= rest <= whole rows, got whole={self.whole}, rest={self.rest}')


def scan_tiles(m: int, g: int) -> Tiles:
  """The scan backend's tiles for M rows in G groups on the target platform: R ~ M / (2G), a power of two in
  [8, 1024], and r = R / 4 (at least 8). Whole tiles make the products R rows deep (dW's contraction); a group's
  last R - 1 rows at most go through tiles of r, which waste under r rows per group. At the full default shape (8192
  rows in 4 groups) R = 1024, r = 256 (bench/RESULTS.md, 2026-12-03 sixth); at test sizes R = r = 8 (one loop).
  On a GPU, where each tile is a kernel launch, R ~ M / G up to 4096: at the Phi-3-mini layer (16384 rows in 4
  groups) R = 4096, r = 1024 ran 1.39x faster than 1024 + 256 on an H200 (bench/RESULTS.md, 2026-12-04)."""
  per_group, cap = (m / g, 4096) if platform() == 'gpu' else (m / (2 * g), 1024)
  whole = int(min(cap, max(8, 2 ** round(math.log2(max(1.0, per_group))))))
  return Tiles(whole, max(8, whole // 4))


@contextlib.contextmanager
def tiles_as(tiles: Tiles | None):
  """While active (at trace time, like `target_platform`), the scan backend uses `tiles` wherever no tile_rows
  are passed (None: `scan_tiles`' choice). For benchmarks comparing tile sizes on the same model."""
  token = _TILES.set(tiles)
  try:
    yield tiles
  finally:
    _TILES.reset(token)


def _tiles(tile_rows: int | tuple[int, int] | None, m: int, g: int) -> Tiles:
  """The tiles for M >= 1 rows: as asked (or chosen), cut to M rows (a tile never reaches past the array)."""
  if tile_rows is None:
    tiles = _TILES.get() or scan_tiles(m, g)
  else:
    tiles = Tiles(*((tile_rows, tile_rows) if isinstance(tile_rows, int) else tile_rows))
  return Tiles(min(tiles.whole, m), min(tiles.rest, m))


def _loop(sizes: jax.Array, m: int, tiles: Tiles, init, step):
  """Runs step(carry, group, first_row, rows, row_mask) over every group's rows of an array of M rows, in tiles
  that start at the group's first row: its whole tiles of R rows (row_mask None: all the group's), then its
  remaining rows in tiles of r (row_mask bool[r]: which rows are the group's). `rows` is the tile's (static) row
  count. A remainder tile that would reach past row M starts at M - r instead, its mask shifted along (so no array
  is ever padded: rows the mask leaves out are neither used nor written).

  Two while loops with data-dependent trip counts: empty groups cost nothing. With R == r there is one loop.
  """
  ends = jnp.cumsum(sizes)
  starts = ends - sizes

  def visits(counts, first_rows, rows):
    """(number of visits, v -> (group, first row of visit v)) for `counts` tiles of `rows` rows per group, each
    group's from its `first_rows`; visits run group by group."""
    visit_ends = jnp.cumsum(counts)

    def locate(v):
      g = jnp.sum(visit_ends <= v).astype(jnp.int32)
      return g, first_rows[g] + (v - visit_ends[g] + counts[g]) * rows

    return visit_ends[-1], locate

  carry, rest_starts = init, starts
  if tiles.whole > tiles.rest:
    n_whole = sizes // tiles.whole
    n_visits, locate = visits(n_whole, starts, tiles.whole)

    def whole_tile(v, carry):
      g, row0 = locate(v)
      return step(carry, g, row0, tiles.whole, None)

    carry = jax.lax.fori_loop(0, n_visits, whole_tile, carry)
    rest_starts = starts + n_whole * tiles.whole
  n_visits, locate = visits((ends - rest_starts + tiles.rest - 1) // tiles.rest, rest_starts, tiles.rest)

  def rest_tile(v, carry):
    g, row0 = locate(v)
    start = jnp.minimum(row0, m - tiles.rest)
    rows = start + jnp.arange(tiles.rest)
    return step(carry, g, start, tiles.rest, (rows >= row0) & (rows < ends[g]))

  return jax.lax.fori_loop(0, n_visits, rest_tile, carry)


def _vary_alike(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Inside shard_map: each array made to vary over every mesh axis any of them varies over, by adding a zero that
  does (XLA drops the add; its transpose is the psum that dW needs). A custom VJP must return cotangents typed like
  its inputs, and dW, a sum over rows that vary over the token axes, varies over them even where W does not; a
  loop's carry must keep its type. Outside shard_map nothing varies and this changes nothing."""
  zero = jax.lax.full_like(sum(a.reshape(-1)[0].astype(jnp.float32) for a in arrays if a.size), 0, jnp.float32, ())
  return tuple(a + zero.astype(a.dtype) for a in arrays)


def _take(a: jax.Array, row0, rows: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(a, row0, rows)


def _mask(a: jax.Array, mask: jax.Array | None) -> jax.Array:
  """a's rows where mask holds, 0 elsewhere (a itself for a whole tile)."""
  return a if mask is None else jnp.where(mask[:, None], a, 0)


def _put(out: jax.Array, value: jax.Array, row0, mask: jax.Array | None) -> jax.Array:
  """Writes value [rows, ...] into out's rows from row0 where mask holds (all of them for None), keeping the rest."""
  value = value.astype(out.dtype)
  if mask is not None:
    value = jnp.where(mask[:, None], value, _take(out, row0, value.shape[0]))
  return jax.lax.dynamic_update_slice_in_dim(out, value, row0, 0)


def _add_at(acc: jax.Array, g, value: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(acc, jax.lax.dynamic_index_in_dim(acc, g, keepdims=False) + value, g, 0)


def _tile_product(a: jax.Array, w: jax.Array, sizes: jax.Array, tiles: Tiles, transpose: bool) -> jax.Array:
  """Rows of a [M, A] through w[g] ([A, B], or w[g].T when transposed), written only where a group owns them."""
  width = w.shape[1] if transpose else w.shape[2]

  def step(out, g, row0, rows, mask):
    a_t = _take(a, row0, rows)  # [rows, A]
    w_g = jax.lax.dynamic_index_in_dim(w, g, keepdims=False)  # [K, N]: a slice, not a gathered copy
    return _put(out, a_t @ (w_g.T if transpose else w_g), row0, mask)

  return _loop(sizes, a.shape[0], tiles, jax.lax.full_like(a, 0, jnp.result_type(a, w), (a.shape[0], width)), step)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _scan_gmm(x: jax.Array, w: jax.Array, sizes: jax.Array, tiles: Tiles) -> jax.Array:
  """The scan backend (see the module docstring). x: [M, K], w: [G, K, N], sizes: int32[G] -> [M, N]."""
  return _tile_product(x, w, sizes, tiles, transpose=False)


def _scan_gmm_fwd(x, w, sizes, tiles):
  return _scan_gmm(x, w, sizes, tiles), (x, w, sizes)


def _scan_gmm_bwd(tiles, res, g):
  x, w, sizes = res
  dx = _tile_product(g, w, sizes, tiles, transpose=True)

  def accumulate(dw, e, row0, rows, mask):
    x_t = _mask(_take(x, row0, rows), mask)  # [rows, K], its group's rows
    return _add_at(dw, e, jnp.dot(x_t.T, _take(g, row0, rows), preferred_element_type=jnp.float32))  # [K, N]

  dw = _loop(sizes, x.shape[0], tiles, jax.lax.full_like(w, 0, jnp.float32), accumulate)
  return dx.astype(x.dtype), dw.astype(w.dtype), None


_scan_gmm.defvjp(_scan_gmm_fwd, _scan_gmm_bwd)


# ------------------------------------------------------------------------------------------------ fused FFN (scan)
def grouped_ffn(x: jax.Array, w_in: tuple[jax.Array, ...], b_in: tuple[jax.Array | None, ...], w_out: jax.Array,
                b_out: jax.Array | None, group_sizes: jax.Array, act: Callable[..., jax.Array], *,
                tile_rows: int | tuple[int, int] | None = None) -> jax.Array:
  """A whole expert FFN per group on the scan backend: y = act(x w_in[0][g] + b_in[0][g], ...) w_out[g] + b_out[g].

  x: [M, D] rows sorted by group; w_in: [G, D, F_i] each (SwiGLU's gate and up, Phi-3's joined gate_up, or
  fc1), b_in: [G, F_i] or None each; act: the activation, (*[R, F_i]) -> [R, F], elementwise over rows;
  w_out: [G, F, D], b_out: [G, D] or None -> [M, D]; rows past sum(group_sizes) give 0 and get no gradient.

  The same products as `grouped_matmul` per projection, tile by tile, but one loop runs every projection of a
  tile while its [R, F] activations are in cache, forward and backward, instead of one loop per projection with
  [M, F] activations and their gradients passing through memory between them. Same values as the projections
  one by one (the same [R, ...] products and elementwise operations), except the biases' gradients, summed per
  tile here. A custom VJP keeps x, the weights and the pre-activations ([M, F_i] each, as autodiff of the
  separate form would) as residuals.
  """
  if x.ndim != 2 or w_out.ndim != 3 or any(w.shape[:2] != (w_out.shape[0], x.shape[1]) for w in w_in):
    raise ValueError(f'grouped_ffn: expected x [M, D], w_in [G, D, F_i], w_out [G, F, D]; got x {x.shape}, '
                     f'w_in {[w.shape for w in w_in]}, w_out {w_out.shape}')
  if not x.shape[0]:
    return jnp.zeros((0, w_out.shape[2]), jnp.result_type(x, w_out))
  tiles = _tiles(tile_rows, x.shape[0], w_out.shape[0])
  leaves, tree = jax.tree.flatten((x, tuple(w_in), tuple(b_in), w_out, b_out, group_sizes.astype(jnp.int32)))
  x, w_in, b_in, w_out, b_out, sizes = jax.tree.unflatten(tree, _vary_alike(*leaves))  # absent biases stay None
  return _fused_ffn(x, w_in, b_in, w_out, b_out, sizes, act, tiles)


def _pre_activations(x_t, w_in, b_in, g):
  pre = []
  for w, b in zip(w_in, b_in):
    a = x_t @ jax.lax.dynamic_index_in_dim(w, g, keepdims=False)
    pre.append(a if b is None else a + jax.lax.dynamic_index_in_dim(b, g, keepdims=False).astype(a.dtype))
  return pre


def _ffn_forward(x, w_in, b_in, w_out, b_out, sizes, act, tiles, keep: bool):
  """(y [M, D], pre-activations [M, F_i] each if keep else ())."""
  dtype = jnp.result_type(x, w_out)
  y = jax.lax.full_like(x, 0, dtype, (x.shape[0], w_out.shape[2]))
  kept = tuple(jax.lax.full_like(x, 0, dtype, (x.shape[0], w.shape[2])) for w in w_in) if keep else ()

  def step(carry, g, row0, rows, mask):
    y, kept = carry
    pre = _pre_activations(_take(x, row0, rows), w_in, b_in, g)
    out = act(*pre) @ jax.lax.dynamic_index_in_dim(w_out, g, keepdims=False)
    if b_out is not None:
      out = out + jax.lax.dynamic_index_in_dim(b_out, g, keepdims=False).astype(out.dtype)
    kept = tuple(_put(k, a, row0, mask) for k, a in zip(kept, pre))
    return _put(y, out, row0, mask), kept

  return _loop(sizes, x.shape[0], tiles, (y, kept), step)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fused_ffn(x, w_in, b_in, w_out, b_out, sizes, act, tiles):
  return _ffn_forward(x, w_in, b_in, w_out, b_out, sizes, act, tiles, keep=False)[0]


def _fused_ffn_fwd(x, w_in, b_in, w_out, b_out, sizes, act, tiles):
  y, kept = _ffn_forward(x, w_in, b_in, w_out, b_out, sizes, act, tiles, keep=True)
  return y, (x, w_in, b_in, w_out, b_out, sizes, kept)


def _fused_ffn_bwd(act, tiles, res, dy):
  x, w_in, b_in, w_out, b_out, sizes, kept = res
  f32 = jnp.float32
  zeros = lambda a: None if a is None else jax.lax.full_like(a, 0, f32)
  init = (jax.lax.full_like(x, 0, x.dtype), tuple(zeros(w) for w in w_in), tuple(zeros(b) for b in b_in),
          zeros(w_out), zeros(b_out))

  def step(carry, g, row0, rows, mask):
    dx, dw_in, db_in, dw_out, db_out = carry
    dy_t = _mask(_take(dy, row0, rows), mask)  # other groups' rows give no gradient here
    x_t = _mask(_take(x, row0, rows), mask)
    h, act_vjp = jax.vjp(act, *(_take(k, row0, rows) for k in kept))
    dw_out = _add_at(dw_out, g, jnp.dot(_mask(h, mask).T, dy_t, preferred_element_type=f32))
    if db_out is not None:
      db_out = _add_at(db_out, g, jnp.sum(dy_t.astype(f32), axis=0))
    dh = dy_t @ jax.lax.dynamic_index_in_dim(w_out, g, keepdims=False).T
    d_pre = act_vjp(dh.astype(h.dtype))
    dx_t = None
    dw_in, db_in = list(dw_in), list(db_in)
    for i, (w, da) in enumerate(zip(w_in, d_pre)):
      dw_in[i] = _add_at(dw_in[i], g, jnp.dot(x_t.T, da, preferred_element_type=f32))
      if db_in[i] is not None:
        db_in[i] = _add_at(db_in[i], g, jnp.sum(da.astype(f32), axis=0))
      part = da @ jax.lax.dynamic_index_in_dim(w, g, keepdims=False).T
      dx_t = part if dx_t is None else dx_t + part
    return _put(dx, dx_t, row0, mask), tuple(dw_in), tuple(db_in), dw_out, db_out

  dx, dw_in, db_in, dw_out, db_out = _loop(sizes, x.shape[0], tiles, init, step)
  cast = lambda d, like: None if d is None else d.astype(like.dtype)
  return (dx, tuple(cast(d, w) for d, w in zip(dw_in, w_in)),
          tuple(cast(d, b) for d, b in zip(db_in, b_in)), cast(dw_out, w_out), cast(db_out, b_out), None)


_fused_ffn.defvjp(_fused_ffn_fwd, _fused_ffn_bwd)


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


def _in_groups(rows: int, sizes: jax.Array) -> jax.Array:
  """bool[rows, 1]: which rows belong to a group (the rest, past sum(sizes), are padding the kernels leave)."""
  return (jnp.arange(rows) < jnp.sum(sizes))[:, None]


def _megablox(x: jax.Array, w: jax.Array, sizes: jax.Array, *, interpret: bool) -> jax.Array:
  """The megablox backend. Rows are padded to a multiple of the row tile (the whole padded M up to 512 rows, a
  multiple of 8: TPU sublanes); the kernel leaves rows past sum(sizes) unwritten, so they are masked on the way out,
  and x is masked on the way in so that the garbage its dX holds there never reaches the caller."""
  from jax.experimental.pallas.ops.tpu import megablox  # pylint: disable=import-outside-toplevel  (Pallas: lazily)
  m = x.shape[0]
  tm = min(MEGABLOX_TILES[0], -(-m // 8) * 8)
  x_pad = jnp.pad(x, ((0, -m % tm), (0, 0)))
  owned = _in_groups(x_pad.shape[0], sizes)
  y = megablox.gmm(jnp.where(owned, x_pad, 0), w, sizes, x.dtype, _Tiles(), None, None, False, interpret)
  return jnp.where(owned, y, 0)[:m]


# ------------------------------------------------------------------------------------------------ mosaic_gpu
# Blocks 128 x 128 x 64 in 4 pipeline stages: the fastest of five settings of the forward kernel on an H200 at the
# Phi-3-mini layer (bench/RESULTS.md, 2026-12-04).
_MOSAIC_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4)
_MOSAIC_ROWS = 128  # rows are padded to a multiple of this (zero rows belong to no group)
_HOPPER = ('H100', 'H200', 'H800', 'H20', 'GH200')  # device kinds with sm_90a (wgmma)


def is_hopper(device_kind: str) -> bool:
  """Whether a `jax.devices()[0].device_kind` is a Hopper GPU, which the mosaic_gpu kernels need."""
  return any(h in device_kind for h in _HOPPER)


def _check_mosaic_gpu(x: jax.Array, w: jax.Array) -> None:
  kind = jax.devices()[0].device_kind if jax.default_backend() == 'gpu' else None
  if platform() != 'gpu' or (kind is not None and not is_hopper(kind)):
    raise ConfigError(f"grouped_matmul='mosaic_gpu': runs on a Hopper GPU (H100/H200) only, its kernels having no "
                      f'interpret mode; the target platform is {platform()}' + (f' ({kind})' if kind else ''))
  if x.dtype not in (jnp.bfloat16, jnp.float16) or w.dtype != x.dtype:
    raise ConfigError(f"grouped_matmul='mosaic_gpu': expected bfloat16 or float16 operands of one dtype "
                      f'(model.dtype and param_dtype), got x {x.dtype}, w {w.dtype}')
  if x.shape[1] % 128 or w.shape[2] % 128:
    raise ConfigError(f"grouped_matmul='mosaic_gpu': expected K and N multiples of 128, got x {x.shape}, "
                      f'w {w.shape}')


def _mosaic_product(a: jax.Array, w: jax.Array, sizes: jax.Array, transpose_rhs: bool) -> jax.Array:
  """a [M, K] times w[g] ([G, K, N]; with transpose_rhs w[g]^T, w given as [G, N, K]) per group -> [M, out]; rows
  past sum(sizes) are 0."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # pylint: disable=import-outside-toplevel
  m = a.shape[0]
  width = w.shape[1] if transpose_rhs else w.shape[2]
  a = jnp.pad(a, ((0, -m % _MOSAIC_ROWS), (0, 0)))
  grid_block_n = next(b for b in (4, 2, 1) if width % (b * _MOSAIC_BLOCKS['block_n']) == 0)
  y = ragged_dot_mgpu.ragged_dot(a, w, group_sizes=sizes, transpose_rhs=transpose_rhs, grid_block_n=grid_block_n,
                                 **_MOSAIC_BLOCKS)
  return jnp.where(_in_groups(a.shape[0], sizes), y, 0)[:m]  # rows of no group: not the kernel's to write


@jax.custom_vjp
def _mosaic_gmm(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
  return _mosaic_product(x, w, sizes, transpose_rhs=False)


def _mosaic_gmm_fwd(x, w, sizes):
  return _mosaic_gmm(x, w, sizes), (x, w, sizes)


def _mosaic_gmm_bwd(res, g):
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu  # pylint: disable=import-outside-toplevel
  x, w, sizes = res
  g = g.astype(x.dtype)
  dx = _mosaic_product(g, w, sizes, transpose_rhs=True)  # [M, K]: g [M, N] times w[g]^T
  pad = ((0, -x.shape[0] % _MOSAIC_ROWS), (0, 0))
  # dW[g] = x_g^T g_g: the kernel contracts over the rows of each group ([M, K] and [M, N] -> [G, K, N]).
  dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(jnp.pad(x, pad), jnp.pad(g, pad), group_sizes=sizes,
                                                        grid_block_n=1, **_MOSAIC_BLOCKS)
  return dx, dw.astype(w.dtype), None


_mosaic_gmm.defvjp(_mosaic_gmm_fwd, _mosaic_gmm_bwd)
