"""Reading Hugging Face checkpoint folders and building a checked NNX state from converted tensors.

The per-architecture key maps live beside this file (`llm_keys.py`, `vision_keys.py`); this module holds what
they share: the folder reader (safetensors, sharded or not, and PyTorch `.bin`), and `build_state`, which checks
every converted path and shape against `nnx.eval_shape` of the target model. Nothing here guesses: a missing,
unexpected or mis-shaped key is a `ConvertError` that names it.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import struct
import tempfile
from typing import Any, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from moiie_jax.convert.errors import ConvertError

Path = tuple  # a flat NNX state path, e.g. ('language_model', 'model', 'layers', 0, 'mlp', 'gate_proj', 'kernel')

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                 'pytorch_model.bin.index.json')


def read_config(folder: str) -> dict[str, Any]:
  """The folder's config.json as a dict; a clear error when the folder is not an HF checkpoint."""
  if not os.path.isdir(folder):
    raise ConvertError(f'{folder}: not a directory (expected a Hugging Face checkpoint folder)')
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise ConvertError(f'{folder}: no config.json, so this is not a Hugging Face checkpoint folder')
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConvertError(f'{path}: not valid JSON ({e})') from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file's tensors as read-only views of one memory map of the file (numpy alone; bf16 via
  ml_dtypes, which safetensors' numpy loader lacks): nothing is read until a tensor's values are used, and the
  pages read stay the page cache's (`release` drops them from this process)."""
  try:
    with open(path, 'rb') as f:
      (header_len,) = struct.unpack('<Q', f.read(8))
      header = json.loads(f.read(header_len))
    size = os.path.getsize(path)
  except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError) as e:
    raise ConvertError(f'{path}: not a readable safetensors file ({e})') from e
  data_len = size - 8 - header_len
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + header_len) if data_len > 0 else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    dtype = _SAFETENSORS_DTYPES.get(info['dtype'])
    if dtype is None:
      raise ConvertError(f'{path}: tensor {name} has unsupported dtype {info["dtype"]}')
    start, end = info['data_offsets']
    expected = int(np.prod(info['shape'], dtype=np.int64)) * np.dtype(dtype).itemsize
    if end > data_len:
      raise ConvertError(f'{path}: truncated: tensor {name} needs data bytes {start}..{end} but the file holds '
                         f'{max(data_len, 0)} after its header (an interrupted download or copy?)')
    if end - start != expected:
      raise ConvertError(f'{path}: tensor {name} has {end - start} bytes for shape {info["shape"]} '
                         f'{info["dtype"]} ({expected} expected): the header is inconsistent')
    out[name] = data[start:end].view(dtype).reshape(info['shape'])
  return out


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # only needed for legacy .bin checkpoints
  except ImportError as e:
    raise ConvertError(f'{path}: reading PyTorch .bin checkpoints needs torch (pip install torch), or convert '
                       f'the folder to safetensors first') from e
  try:
    try:  # memory-mapped (torch >= 2.1 files): tensors are read when used
      state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError:  # an old file layout that cannot be mapped: read whole
      state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types for a bad file
    raise ConvertError(f'{path}: not a readable PyTorch checkpoint ({e})') from e
  out = {}
  for name, tensor in state.items():
    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: the same bits, viewed (no copy)
      out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[name] = tensor.numpy()
  return out


def release(arrays: Iterable[Any]) -> None:
  """Drops from this process the pages of the memory maps behind `arrays` (views `read_tensors` returned): they
  were read into the page cache and mapped here, counting as this process's memory until released."""
  maps = {}
  for a in arrays:
    while isinstance(a, np.ndarray) and not isinstance(a, np.memmap):
      a = a.base
    if isinstance(a, np.memmap) and getattr(a, '_mmap', None) is not None:
      maps[id(a._mmap)] = a._mmap  # pylint: disable=protected-access
  for m in maps.values():
    try:
      m.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError, AttributeError):
      pass  # a platform without madvise keeps the pages mapped: only the memory figure differs


class Stacked:
  """np.stack(arrays) made when its values are asked for (`np.asarray`), so a conversion can hold the stacked
  layers or experts of every parameter without a copy of each until it writes that parameter."""

  def __init__(self, arrays):
    self.arrays = list(arrays)
    first = self.arrays[0]
    self.shape = (len(self.arrays),) + tuple(np.shape(first))
    self.dtype = np.dtype(getattr(first, 'dtype', np.float32))
    self.ndim = len(self.shape)

  def __array__(self, dtype=None, copy=None):
    out = np.empty(self.shape, dtype or self.dtype)
    for i, a in enumerate(self.arrays):
      out[i] = a  # cast per slice: no stacked copy in the source dtype
    return out

  def sources(self) -> list:
    return self.arrays


def stack(arrays) -> Stacked:
  return Stacked(arrays)


def read_tensors(folder: str) -> dict[str, np.ndarray]:
  """All weights of an HF checkpoint folder by their HF names (safetensors preferred over .bin)."""
  read_config(folder)
  for index_name, reader in (('model.safetensors.index.json', _read_safetensors),
                             ('pytorch_model.bin.index.json', _read_torch_bin)):
    index_path = os.path.join(folder, index_name)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      tensors = {}
      for shard in shards:
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
          raise ConvertError(f'{index_path}: lists shard {shard}, which is missing from {folder}')
        tensors.update(reader(shard_path))
      return tensors
  for name, reader in (('model.safetensors', _read_safetensors), ('pytorch_model.bin', _read_torch_bin)):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return reader(path)
  raise ConvertError(f'{folder}: has config.json but no weights (expected one of {list(_WEIGHT_FILES)})')


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  """A .safetensors file (numpy only; bf16 via ml_dtypes), as the format defines: an 8-byte header length, the JSON
  header of dtype, shape and byte offsets, then the tensors' bytes in header order. The header comes from shapes
  and dtypes alone and each tensor is written as it is made contiguous, so the values may be views (transposes of
  a loaded model) and at most one tensor's bytes are copied at a time."""
  names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
  header, offset = {}, 0
  for name in sorted(tensors):
    dtype, shape = np.dtype(tensors[name].dtype), tuple(np.shape(tensors[name]))
    if dtype not in names:
      raise ConvertError(f'{path}: tensor {name} has dtype {dtype}, which safetensors cannot hold')
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {'dtype': names[dtype], 'shape': list(shape), 'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # the data starts 8-aligned
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(raw)))
    f.write(raw)
    for name in sorted(tensors):
      f.write(np.ascontiguousarray(tensors[name]).reshape(-1).view(np.uint8).data)


@contextlib.contextmanager
def atomic_folder(out_dir: str, overwrite: bool = False):
  """Yields a temporary folder beside `out_dir` to fill; renames it to `out_dir` when the block ends normally and
  removes it on any error, so `out_dir` is never left half written. A non-empty `out_dir` is refused unless
  `overwrite`."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ConvertError(f'{out_dir}: already exists and is not empty (pass --overwrite to replace it)')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + '.tmp-', dir=parent)
  try:
    yield tmp
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def copy_files(src_dir: str | None, names: Iterable[str], dst_dir: str) -> list[str]:
  """Copies those of `names` that exist in `src_dir` into `dst_dir`; returns the names copied."""
  copied = []
  for name in names if src_dir else ():
    if os.path.isfile(os.path.join(src_dir, name)):
      shutil.copy(os.path.join(src_dir, name), os.path.join(dst_dir, name))
      copied.append(name)
  return copied


def write_shards(folder: str, tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[str]:
  """model.safetensors, or model-0000i-of-0000n.safetensors shards of at most max_shard_bytes each (a larger
  tensor gets a shard of its own) plus model.safetensors.index.json, as save_pretrained writes them."""
  shards: list[list[str]] = [[]]
  size = 0
  nbytes_of = lambda t: int(np.prod(np.shape(t), dtype=np.int64)) * np.dtype(t.dtype).itemsize
  for name in sorted(tensors):
    nbytes = nbytes_of(tensors[name])
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  if len(shards) == 1:
    write_safetensors(os.path.join(folder, 'model.safetensors'), tensors)
    return ['model.safetensors']
  files = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  weight_map = {}
  for file, names in zip(files, shards):
    write_safetensors(os.path.join(folder, file), {n: tensors[n] for n in names})
    weight_map.update({n: file for n in names})
  total = sum(nbytes_of(t) for t in tensors.values())
  with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2, sort_keys=True)
  return files


def write_folder(out_dir: str, hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
                 copy_from: str | None = None, files: Iterable[str] = (), extra_json: Mapping[str, Any] | None = None,
                 max_shard_bytes: int = 5 * 2 ** 30, overwrite: bool = False) -> str:
  """An HF-style folder written atomically (`atomic_folder`): config.json, the tensors as safetensors (sharded
  above max_shard_bytes), `files` copied from `copy_from`, then `extra_json` {file name: JSON value} (which
  replaces a copied file of that name). Returns its absolute path."""
  with atomic_folder(out_dir, overwrite) as tmp:
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(dict(hf_config), f, indent=2, sort_keys=True)
    write_shards(tmp, tensors, max_shard_bytes)
    copy_files(copy_from, files, tmp)
    for name, value in (extra_json or {}).items():
      with open(os.path.join(tmp, name), 'w') as f:
        json.dump(value, f, indent=2, sort_keys=True)
  return os.path.abspath(out_dir)


def _name(path: Path) -> str:
  return '.'.join(str(p) for p in path)


def flat_abstract(model_or_state: Any) -> dict[Path, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of an (abstract) NNX model's parameters."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  return {tuple(path): var.get_value() if hasattr(var, 'get_value') else var.value
          for path, var in nnx.to_flat_state(state)}


def check_paths(flat: Mapping[Path, Any], abstract: Mapping[Path, Any], where: str) -> None:
  """Raises a ConvertError naming every missing, unexpected or mis-shaped parameter (first few of each)."""
  def listing(paths: Iterable[Path]) -> str:
    names = sorted(_name(p) for p in paths)
    more = f' (and {len(names) - 8} more)' if len(names) > 8 else ''
    return ', '.join(names[:8]) + more

  missing = set(abstract) - set(flat)
  unexpected = set(flat) - set(abstract)
  if missing:
    raise ConvertError(f'{where}: missing parameters for {listing(missing)}')
  if unexpected:
    raise ConvertError(f'{where}: unexpected parameters {listing(unexpected)}')
  for path in sorted(flat, key=_name):
    got, want = tuple(np.shape(flat[path])), tuple(abstract[path].shape)
    if got != want:
      raise ConvertError(f'{where}: {_name(path)} has shape {got}, the model expects {want}')


def build_state(abstract_model: Any, flat: Mapping[Path, np.ndarray], where: str) -> nnx.State:
  """An nnx.State of `abstract_model`'s parameters filled from `flat`, cast to each parameter's dtype.

  `abstract_model` comes from `nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))`; `where` names the
  source (a folder) in errors.
  """
  state = nnx.state(abstract_model, nnx.Param)
  abstract = flat_abstract(state)
  check_paths(flat, abstract, where)
  items = []
  for path, var in nnx.to_flat_state(state):
    path = tuple(path)
    var = var.replace(jax.numpy.asarray(np.asarray(flat[path], dtype=abstract[path].dtype)))
    items.append((path, var))
  return nnx.from_flat_state(items)


def take(tensors: dict[str, np.ndarray], key: str, where: str) -> np.ndarray:
  """Pops `key` from `tensors`; a clear error naming key and source when it is missing."""
  if key not in tensors:
    raise ConvertError(f'{where}: missing tensor {key}')
  return tensors.pop(key)


def reject_leftovers(tensors: Mapping[str, np.ndarray], where: str) -> None:
  """Every tensor must have been consumed by a key map: a leftover is an unexpected key."""
  if tensors:
    names = sorted(tensors)
    more = f' (and {len(names) - 8} more)' if len(names) > 8 else ''
    raise ConvertError(f'{where}: unexpected tensors {", ".join(names[:8])}{more}')
