"""Sharding hints for activations, through a hook that a higher layer installs (models/ imports nothing above it).

Without hints XLA's sharding propagation picks each activation's layout from the parameters around it. Under FSDP
the parameters are split on their embedding dimension, and in a dense decoder (nothing else anchors the batch
layout: MoE layers do, through their shard_map) propagation can keep the residual stream split that way too; then
every matmul's output is a partial sum, all-reduced over the whole slice (Phi-3 dense stage 2 on v5p-64: 2 TB of
all-reduce per chip and micro-step, against 19 GB for MoIIE). MaxText pins activations with logical constraints;
here `parallel.dispatch.expert_parallel` installs a hook that pins [B, ...] activations to the batch axes, and the
decoder (embeddings, each layer's residual stream, logits) and the vision tower (each layer) call `batch_sharded`. Outside a mesh (one device,
tests, generation) nothing is installed and `batch_sharded` returns its input.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax

Hook = Callable[[jax.Array], jax.Array]
_HOOK: contextvars.ContextVar[Hook | None] = contextvars.ContextVar('moiie_activation_sharding', default=None)


def batch_sharded(x: jax.Array) -> jax.Array:
  """x [B, ...] laid out with B split over the mesh's batch axes, when a hook is active; else x unchanged."""
  hook = _HOOK.get()
  return x if hook is None else hook(x)


@contextlib.contextmanager
def constraining(hook: Hook | None):
  """While active (at trace time), `batch_sharded` applies `hook`. Enter it inside the traced function."""
  token = _HOOK.set(hook)
  try:
    yield hook
  finally:
    _HOOK.reset(token)
