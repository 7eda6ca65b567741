"""`Linear`: `nnx.Linear` that multiplies flattened [N, D] rows when compiling for a CPU.

XLA:CPU runs the backward pass of a [B, T, D] x [D, F] product markedly slower than the same product on the
flattened [B*T, D] rows (~2.4x for the weight gradient in the training issue's measurement; 1.46x for forward and
backward together at [8, 256, 512] x [512, 1408] on this 2-core machine). On the CPU (the target platform,
`gmm.platform()`) `Linear` flattens the leading dimensions around the matmul; elsewhere it is `nnx.Linear` as is
(the TPU and GPU compilers handle both forms alike, and the ahead-of-time TPU compiles stay what they were). Same
parameters, same names, same math; `flattening(False)` turns it off (the benchmark's side-by-side row).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from flax import nnx

from moiie_jax.models import gmm

_FLATTEN: contextvars.ContextVar[bool | None] = contextvars.ContextVar('moiie_flatten_matmuls', default=None)


def flatten() -> bool:
  """Whether `Linear` flattens its input rows here: by default on the CPU."""
  on = _FLATTEN.get()
  return gmm.platform() == 'cpu' if on is None else on


@contextlib.contextmanager
def flattening(on: bool | None):
  """While active (at trace time), `Linear` flattens (True), does not (False), or decides by platform (None)."""
  token = _FLATTEN.set(on)
  try:
    yield on
  finally:
    _FLATTEN.reset(token)


class Linear(nnx.Linear):
  """nnx.Linear; inputs [..., D] with more than one leading dimension are multiplied as [N, D] rows on a CPU."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if inputs.ndim <= 2 or out_sharding is not None or not flatten():
      return super().__call__(inputs, out_sharding)
    lead = inputs.shape[:-1]
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))  # [N, F]
    return y.reshape(*lead, y.shape[-1])
