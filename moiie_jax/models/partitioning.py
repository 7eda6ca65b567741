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
from jax import ad_checkpoint

Hook = Callable[[jax.Array], jax.Array]

# What an expert exchange received (the rows that arrived from other devices, and their results on the way back) is
# named so: the decoder's remat policies save it, so the backward pass's recomputation of the layer does not repeat
# the all-to-alls (with remat 'full' it otherwise sends every routed row 3 times instead of 2, forward and back).
EXCHANGED = 'moe_exchanged'


def exchanged(x: jax.Array) -> jax.Array:
  """x, named as an expert exchange's result (see EXCHANGED)."""
  return ad_checkpoint.checkpoint_name(x, EXCHANGED)
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
