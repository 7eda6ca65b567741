"""Parameter paths as plain names: the one spelling that sharding rules, optimizer groups and checkpoints share."""

from __future__ import annotations

from typing import Any


def key_name(key: Any) -> str:
  """One jax key-path entry as a string (DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey)."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path: tuple) -> tuple[str, ...]:
  """A jax key path as plain names, without the trailing `value` that an `nnx.Variable` adds."""
  names = tuple(key_name(k) for k in path)
  return names[:-1] if names and names[-1] == 'value' else names
