"""A persistent XLA compilation cache in a git-ignored folder, so reruns skip compilation."""

import os

import jax


def enable(path: str | None = None) -> str:
  """Turns the cache on (idempotent). `path` defaults to $MOIIE_JAX_CACHE or `.jax_cache` in the repo root."""
  path = path or os.environ.get('MOIIE_JAX_CACHE') or os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.jax_cache')
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path
