"""Writing a converted model in bounded memory: one group of parameters (a decoder or tower layer, the embeddings,
the head, the connector) at a time.

The readers (`hf.read_tensors`) hand out memory-mapped views and the key maps only rename, transpose (views) and
stack lazily (`hf.Stacked`), so a converted model exists as a checked {path: view} map that holds no copy of the
weights. `LazyParams.groups` makes each group's arrays in the output dtype (a bf16 checkpoint stored as bf16 never
passes through fp32; each parameter is cast once to the target model's dtype), hands them to the writer and drops the source pages it read; `store.params.
save_params_in_groups` writes them into one Orbax checkpoint as they come. Peak memory is about the largest group,
whatever the model's size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from flax import nnx

from moiie_jax.convert import hf

Path = tuple


def group_key(path: Path) -> Path:
  """The group a parameter is written with: its path up to the first layer index (one decoder or tower layer),
  else its first two names (('language_model', 'model') holds the embeddings and the final norm)."""
  for i, name in enumerate(path):
    if isinstance(name, int):
      return tuple(path[:i + 1])
  return tuple(path[:2])


def _sources(value: Any) -> list:
  return value.sources() if isinstance(value, hf.Stacked) else [value]


@dataclasses.dataclass
class LazyParams:
  """A converted model's parameters, checked against the target model but not yet read.

  abstract: the target's nnx.Param state of ShapeDtypeStructs; flat: {path: array, memory-mapped view or
  hf.Stacked}. One use: `groups` hands each value over once (and forgets it).
  """
  abstract: nnx.State
  flat: dict[Path, Any]
  cfg: Any = None  # the config `abstract` was made from

  @classmethod
  def build(cls, abstract_model: Any, flat: Mapping[Path, Any], where: str, cfg: Any = None) -> LazyParams:
    abstract = nnx.state(abstract_model, nnx.Param)
    hf.check_paths(flat, hf.flat_abstract(abstract), where)
    return cls(abstract, dict(flat), cfg)

  def retarget(self, cfg: Any, abstract_model: Callable[[Any], Any]) -> LazyParams:
    """The same parameters written with the dtypes of `cfg`'s model (same paths and shapes; e.g. param_dtype
    bfloat16); `abstract_model(cfg)` is traced only when cfg differs from the one these were built for."""
    if cfg == self.cfg:
      return self
    abstract = nnx.state(abstract_model(cfg), nnx.Param)
    hf.check_paths(self.flat, hf.flat_abstract(abstract), 'retarget')
    return LazyParams(abstract, self.flat, cfg)

  def groups(self) -> Iterator[nnx.State]:
    """nnx.States of numpy arrays in the abstract model's dtypes, one per group, in the model's order."""
    by_group: dict[Path, list] = {}
    for path, var in nnx.to_flat_state(self.abstract):
      by_group.setdefault(group_key(tuple(path)), []).append((tuple(path), var))
    for items in by_group.values():
      out = []
      for path, var in items:
        value = self.flat.pop(path)
        array = np.ascontiguousarray(np.asarray(value, dtype=var.get_value().dtype))
        out.append((path, var.replace(array)))
        hf.release(_sources(value))  # the source pages this parameter was read from
        del value
      yield nnx.from_flat_state(out)
