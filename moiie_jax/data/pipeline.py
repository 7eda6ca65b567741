"""The training input pipeline (grain): records -> examples -> fixed-shape numpy batches, checkpointable.

  source (LLaVA JSON/JSONL + image folder, or a tfds ArrayRecord dataset)
    .shuffle(seed)                  global shuffle, reseeded every epoch
    .repeat(num_epochs)             None = forever (multi-host training should stop by step count)
    [process_index::process_count]  each process reads a disjoint shard; together they cover every epoch
    .map(ExampleBuilder)            validate, template + tokenise, truncate, load + preprocess the image
    .to_iter_dataset().mp_prefetch  optional worker processes; order stays deterministic
  DataIterator                      in this process: counts/skips or raises on bad records, pads and batches

Bad records never crash a worker: ExampleBuilder returns an error marker and the iterator, in the main process,
either skips it (counted in `stats()`, a warning for the first few of each kind) or raises `DataError` naming the
record id and file (`on_error='fail'`). Batching happens after that filter, so every batch is full.

Batch (per process), B = batch_size, T = max_length (or the smallest `length_buckets` entry that fits):
  input_ids int32[B, T] (right-padded with pad_token_id), labels int32[B, T] (unshifted, -100 = no loss),
  attention_mask int32[B, T], pixel_values float32[B, H, W, C] (zeros without an image), has_image bool[B],
  and index int64[B] (the source record; -1 for filler rows) when `with_index`.
The last batch of a finite run with drop_remainder=False is filled with rows holding one masked-out pad token.

`DataIterator.get_state()` is a JSON-able dict (grain's iterator state, the counters and the settings it depends
on); save it with Orbax (`ocp.args.JsonSave`) next to the model, per process, and `set_state` it after building
the same pipeline to resume exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import traceback
from typing import Any, Iterator, Mapping

import grain
import numpy as np

from moiie_jax.data import conversations as conv_lib
from moiie_jax.data import images as image_lib
from moiie_jax.data.records import ERROR_KINDS, LlavaJsonSource, RecordError, decode_record

log = logging.getLogger(__name__)

ON_ERROR = ('skip', 'fail')
INTERNAL_ERROR = 'internal_error'  # an exception that is not a data error: raised whatever on_error says
STATE_VERSION = 1


class DataError(RuntimeError):
  """A bad record under on_error='fail'; the message names the record id and its file."""


class NoUsableDataError(DataError):
  """Every record read, over the whole data twice, was rejected: no batch can ever be made (the message counts the
  skips by reason). Raised instead of reading an endlessly repeated source forever."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything the input pipeline needs; `from_dict` builds it from a ConfigDict's `.to_dict()`."""
  # Records: a LLaVA JSON/JSONL file + image folder, or a dataset written by tfds_builder.
  json_path: str | None = None
  image_folder: str | None = None
  tfds_dir: str | None = None
  split: str = 'train'
  # Text.
  tokenizer_path: str = ''  # a checkpoint folder with tokenizer.json, or the file
  template: str = 'phi3'  # phi3 | llama3 | plain | demo
  max_length: int = 4096
  truncation: str = 'drop'  # drop | cut_text
  length_buckets: tuple[int, ...] = ()  # pad to the smallest bucket that fits the batch; () = max_length
  num_image_tokens: int = 729  # LVLMConfig.num_image_tokens
  image_token_id: int | None = None  # LVLMConfig.image_token_id; None = the tokenizer's `<image>` id
  pad_token_id: int | None = None  # None = the tokenizer's pad token (EOS when it has none)
  # Images.
  image: image_lib.ImageConfig = image_lib.ImageConfig()
  # Iteration.
  batch_size: int = 1  # per process
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  drop_remainder: bool = True
  worker_count: int = 0  # grain worker processes; 0 = threads in this process
  worker_buffer_size: int = 2
  read_threads: int = 2
  read_buffer_size: int = 8
  on_error: str = 'skip'  # skip | fail
  max_warnings: int = 5  # warnings per error kind before going quiet (counts continue)
  with_index: bool = False

  def validate(self) -> None:
    if (self.json_path is None) == (self.tfds_dir is None):
      raise ValueError(f'DataConfig: set exactly one of json_path ({self.json_path!r}) and tfds_dir '
                       f'({self.tfds_dir!r})')
    if not self.tokenizer_path:
      raise ValueError('DataConfig.tokenizer_path is empty: expected a checkpoint folder with tokenizer.json')
    conv_lib.get_template(self.template)
    if self.truncation not in conv_lib.TRUNCATION_MODES:
      raise ValueError(f'DataConfig.truncation={self.truncation!r}: expected one of '
                       f'{list(conv_lib.TRUNCATION_MODES)}')
    if self.on_error not in ON_ERROR:
      raise ValueError(f'DataConfig.on_error={self.on_error!r}: expected one of {list(ON_ERROR)}')
    for name in ('max_length', 'batch_size', 'num_image_tokens'):
      if getattr(self, name) < 1:
        raise ValueError(f'DataConfig.{name}={getattr(self, name)}: must be >= 1')
    if self.num_image_tokens >= self.max_length:
      raise ValueError(f'DataConfig: num_image_tokens={self.num_image_tokens} leaves no room for text in '
                       f'max_length={self.max_length}')
    if any(b < 1 or b > self.max_length for b in self.length_buckets):
      raise ValueError(f'DataConfig.length_buckets={self.length_buckets}: each must be in [1, {self.max_length}]')
    if self.worker_count < 0:
      raise ValueError(f'DataConfig.worker_count={self.worker_count}: must be >= 0')
    if not 0 <= self.seed < 2**32:
      raise ValueError(f'DataConfig.seed={self.seed}: must be in [0, 2**32)')
    self.image.validate()

  @classmethod
  def for_model(cls, model: Any, *, pad_to_square: bool = False, **fields: Any) -> DataConfig:
    """A config whose image recipe, image token id and count match an `LVLMConfig`; `fields` set the rest."""
    image = image_lib.config_for_tower(model.vision.architecture, model.vision.input_size, pad_to_square)
    cfg = cls(**{'image': image, 'num_image_tokens': model.num_image_tokens, 'image_token_id': model.image_token_id,
                 'pad_token_id': model.llm.pad_token_id, **fields})
    cfg.validate()
    return cfg

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ValueError(f'DataConfig: unknown keys {unknown}; expected some of {sorted(names)}')
    kwargs = dict(data)
    if isinstance(kwargs.get('image'), Mapping):
      kwargs['image'] = image_lib.ImageConfig.from_dict(dict(kwargs['image']))
    if 'length_buckets' in kwargs:
      kwargs['length_buckets'] = tuple(kwargs['length_buckets'])
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------------------------ examples
class ExampleBuilder:
  """grain map: raw element {'record', 'index', 'where', 'image_bytes'} -> example dict or error marker.

  Picklable; the tokenizer is loaded once per process on first use.
  """

  def __init__(self, config: DataConfig):
    self.config = config
    self.template = conv_lib.get_template(config.template)
    self._tokenizer: conv_lib.TextTokenizer | None = None
    self._image_token_id: int | None = None

  def __getstate__(self) -> dict:
    return {'config': self.config, 'template': self.template}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state['config'])

  def setup(self) -> ExampleBuilder:
    """Loads the tokenizer and checks the special tokens (run once in the main process to fail early)."""
    if self._tokenizer is None:
      tok = conv_lib.TextTokenizer.from_pretrained(self.config.tokenizer_path)
      if self.template.sep2 is not None and not self.template.plain:
        # The answer's end token is a loss target and the stop token at inference: it must be one special token.
        tok.single_token_id(self.template.sep2, f'sep2 of template {self.template.name!r}')
      image_token_id = self.config.image_token_id
      if image_token_id is None:
        if not tok.image_token_in_vocab:
          raise ValueError(f'{tok.source}: the tokenizer has no {conv_lib.IMAGE_PLACEHOLDER} token; set '
                           f'DataConfig.image_token_id (LVLMConfig.image_token_id)')
        image_token_id = tok.image_placeholder_id
      self._image_token_id = image_token_id
      self._tokenizer = tok
    return self

  @property
  def tokenizer(self) -> conv_lib.TextTokenizer:
    return self.setup()._tokenizer

  @property
  def image_token_id(self) -> int:
    return self.setup()._image_token_id

  @property
  def pad_token_id(self) -> int:
    return self.config.pad_token_id if self.config.pad_token_id is not None else self.tokenizer.pad_id

  def __call__(self, element: Mapping[str, Any]) -> dict[str, Any]:
    # Never raise in a worker: return a marker the main process skips or raises on.
    try:
      return self.build(element)
    except RecordError as e:
      return {'_error': e.kind, '_message': str(e), '_index': int(element['index'])}
    except Exception as e:  # a bug or an unforeseen input: always fatal, with the record and traceback
      detail = ''.join(traceback.format_exception(e))
      return {'_error': INTERNAL_ERROR, '_message': f'record #{element.get("index")} in {element.get("where")}: '
                                                    f'{type(e).__name__}: {e}\n{detail}',
              '_index': int(element.get('index', -1))}

  def build(self, element: Mapping[str, Any]) -> dict[str, Any]:
    cfg = self.config
    where, index = element['where'], int(element['index'])
    conv = decode_record(element['record'], where, index)
    ids, labels = conv_lib.encode_conversation(
        conv, self.template, self.tokenizer, num_image_tokens=cfg.num_image_tokens,
        image_token_id=self.image_token_id, where=where)
    # Text first: an over-long sample is rejected before its image is decoded.
    ids, labels = conv_lib.truncate(ids, labels, cfg.max_length, image_token_id=self.image_token_id,
                                    mode=cfg.truncation, record_id=conv.id, where=where)
    if conv.has_image:
      if element.get('image_bytes') is not None:
        source, name = element['image_bytes'], f'{where}:{conv.image}'
      elif cfg.image_folder is None:
        raise RecordError('missing_image', conv.id, where, f'image {conv.image!r} but DataConfig.image_folder '
                          f'is not set')
      else:
        source = name = os.path.join(cfg.image_folder, conv.image)
      try:
        pixels = image_lib.load_and_preprocess(source, cfg.image, name)
      except image_lib.ImageError as e:
        raise RecordError(e.kind, conv.id, where, str(e)) from e
    else:
      pixels = image_lib.blank(cfg.image)
    return {'input_ids': ids, 'labels': labels, 'attention_mask': np.ones_like(ids), 'pixel_values': pixels,
            'has_image': np.bool_(conv.has_image), 'index': np.int64(index)}


# ------------------------------------------------------------------------------------------------------- batches
def collate(examples: list[Mapping[str, Any]], batch_size: int, length: int, pad_token_id: int,
            image_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
  """Right-pads examples to [batch_size, length]; rows past len(examples) are filler (see module docstring)."""
  input_ids = np.full((batch_size, length), pad_token_id, np.int32)
  labels = np.full((batch_size, length), conv_lib.IGNORE_INDEX, np.int32)
  attention_mask = np.zeros((batch_size, length), np.int32)
  # A filler row keeps one attended token so that no attention row is fully masked (NaN-free softmax).
  attention_mask[len(examples):, 0] = 1
  pixel_values = np.zeros((batch_size, *image_shape), np.float32)
  has_image = np.zeros((batch_size,), bool)
  index = np.full((batch_size,), -1, np.int64)
  for row, ex in enumerate(examples):
    n = len(ex['input_ids'])
    input_ids[row, :n] = ex['input_ids']
    labels[row, :n] = ex['labels']
    attention_mask[row, :n] = 1
    pixel_values[row] = ex['pixel_values']
    has_image[row] = ex['has_image']
    index[row] = ex['index']
  return {'input_ids': input_ids, 'labels': labels, 'attention_mask': attention_mask,
          'pixel_values': pixel_values, 'has_image': has_image, 'index': index}


def _make_source(config: DataConfig):
  if config.json_path is not None:
    return LlavaJsonSource(config.json_path, config.image_folder)
  from moiie_jax.data import tfds_builder  # tensorflow-datasets is imported only when used
  return tfds_builder.TfdsRecordSource(config.tfds_dir, config.split)


def _ensure_absl_flags() -> None:
  """grain's worker processes read absl flags; outside absl.app.run they are unparsed and would raise."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def build_dataset(config: DataConfig, process_index: int = 0, process_count: int = 1,
                  builder: ExampleBuilder | None = None, source: Any = None) -> grain.IterDataset:
  """The grain pipeline of this process (elements: examples or error markers, in a seed-determined order)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  source = _make_source(config) if source is None else source
  if len(source) == 0:
    raise ValueError(f'{config.json_path or config.tfds_dir}: no records')
  ds = grain.MapDataset.source(source)
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(config.num_epochs)
  ds = ds[process_index::process_count]
  ds = ds.map(builder or ExampleBuilder(config))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                            prefetch_buffer_size=config.read_buffer_size))
  if config.worker_count > 0:
    _ensure_absl_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                     per_worker_buffer_size=config.worker_buffer_size))
  return ds


class DataIterator:
  """Batches of one process; checkpointable with get_state/set_state; bad records counted in stats()."""

  def __init__(self, config: DataConfig, process_index: int = 0, process_count: int = 1):
    config.validate()
    self.config = config
    self.process_index, self.process_count = process_index, process_count
    self.builder = ExampleBuilder(config).setup()
    self.pad_token_id = self.builder.pad_token_id
    self.image_token_id = self.builder.image_token_id
    source = _make_source(config)
    self.num_records = len(source)  # records in the source, all processes together (bad ones included)
    self._dataset = build_dataset(config, process_index, process_count, self.builder, source)
    self._it = iter(self._dataset)
    self._stats: collections.Counter = collections.Counter()
    self._batches = 0
    self._done = False
    # Rejected elements in a row. Two passes' worth of this process's share holds a whole epoch however the
    # reshuffle at the epoch boundary falls, so that many in a row means no record of the data is usable.
    self._rejected_in_a_row = 0
    self._max_rejected_in_a_row = 2 * max(1, -(-self.num_records // process_count))

  @property
  def tokenizer(self) -> conv_lib.TextTokenizer:
    return self.builder.tokenizer

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def _on_error(self, element: Mapping[str, Any]) -> None:
    kind, message = element['_error'], element['_message']
    if kind == INTERNAL_ERROR:
      raise DataError(f'unexpected error while preparing a record: {message}')
    if self.config.on_error == 'fail':
      raise DataError(f'{kind}: {message} (on_error=fail; set on_error=skip to skip such records)')
    self._stats[kind] += 1
    self._stats['skipped'] += 1
    count = self._stats[kind]
    if count <= self.config.max_warnings:
      log.warning('skipping %s record (%d so far): %s', kind, count, message)
      if count == self.config.max_warnings:
        log.warning('no further %s warnings; counts continue in DataIterator.stats()', kind)

  def _length(self, longest: int) -> int:
    fits = [b for b in sorted(self.config.length_buckets) if b >= longest]
    return fits[0] if fits else self.config.max_length

  def __next__(self) -> dict[str, np.ndarray]:
    if self._done:
      raise StopIteration
    examples = []
    while len(examples) < self.config.batch_size:
      try:
        element = next(self._it)
      except StopIteration:
        self._done = True
        if examples and not self.config.drop_remainder:
          break
        raise
      if '_error' in element:
        self._on_error(element)
        self._rejected_in_a_row += 1
        if self._rejected_in_a_row >= self._max_rejected_in_a_row:
          self._done = True
          raise NoUsableDataError(self._no_usable_message())
        continue
      self._rejected_in_a_row = 0
      examples.append(element)
    self._stats['examples'] += len(examples)
    self._batches += 1
    cfg = self.config
    batch = collate(examples, cfg.batch_size, self._length(max(len(e['input_ids']) for e in examples)),
                    self.pad_token_id, (cfg.image.height, cfg.image.width, 3))
    if not cfg.with_index:
      del batch['index']
    return batch

  def _no_usable_message(self) -> str:
    cfg = self.config
    stats = self.stats()
    reasons = ', '.join(f'{kind}={stats[kind]}' for kind in ERROR_KINDS if stats[kind])
    return (f'{cfg.json_path or cfg.tfds_dir}: no usable record: the last {self._rejected_in_a_row} records read '
            f'(the {self.num_records} records twice over) were all rejected; skipped {stats["skipped"]}: {reasons} '
            f'(max_length={cfg.max_length}, truncation={cfg.truncation})')

  def stats(self) -> dict[str, int]:
    """Counts of this process: examples, batches, skipped and each error kind seen."""
    out = {kind: 0 for kind in ERROR_KINDS}
    out.update(self._stats)
    out.setdefault('examples', 0)
    out.setdefault('skipped', 0)
    out['batches'] = self._batches
    return out

  def _fingerprint(self) -> dict[str, Any]:
    cfg = self.config
    return {'process_index': self.process_index, 'process_count': self.process_count, 'seed': cfg.seed,
            'worker_count': cfg.worker_count, 'batch_size': cfg.batch_size, 'shuffle': cfg.shuffle,
            'num_epochs': cfg.num_epochs, 'source': cfg.json_path or cfg.tfds_dir}

  def get_state(self) -> dict[str, Any]:
    """JSON-able state after the last batch returned."""
    return {'version': STATE_VERSION, 'grain': json.dumps(self._it.get_state()), 'stats': dict(self._stats),
            'batches': self._batches, 'done': self._done, **self._fingerprint()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if state.get('version') != STATE_VERSION:
      raise ValueError(f'data iterator state version {state.get("version")!r}, expected {STATE_VERSION}')
    mismatched = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
    # A different source path is allowed (data moved); anything that changes the order is not.
    mismatched.pop('source', None)
    if mismatched:
      raise ValueError(f'data iterator state was saved with different settings (saved, now): {mismatched}; the '
                       f'order of examples would differ')
    grain_state = json.loads(state['grain'])
    if isinstance(grain_state, dict) and isinstance(grain_state.get('future_states'), dict):
      grain_state['future_states'] = {int(k): v for k, v in grain_state['future_states'].items()}
    self._it.set_state(grain_state)
    self._stats = collections.Counter(state.get('stats', {}))
    self._batches = int(state.get('batches', 0))
    self._done = bool(state.get('done', False))

  def close(self) -> None:
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()

  def __enter__(self) -> DataIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def make_iterator(config: DataConfig | Mapping[str, Any], *, process_index: int | None = None,
                  process_count: int | None = None) -> DataIterator:
  """The batch iterator of this process; process_index/count default to jax.process_index()/process_count()."""
  if not isinstance(config, DataConfig):
    config = DataConfig.from_dict(config)
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return DataIterator(config, process_index, process_count)
