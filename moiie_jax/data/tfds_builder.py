"""LLaVA JSON + image folder -> a tensorflow-datasets ArrayRecord dataset, for fast random access on pods.

A pod's hosts read a shared file system (or GCS) poorly as hundreds of thousands of small image files; one
ArrayRecord dataset with the encoded images inside gives grain O(1) random access by index. Build it once:

  path, stats = build_tfds_dataset('llava_v1_5_mix665k.json', 'images/', data_dir='gs://bucket/tfds')

and read it with `DataConfig(tfds_dir=path)` (through `TfdsRecordSource`), `tfds.builder_from_directory(path)
.as_data_source()`, or `tfds.data_source('llava_conversations', data_dir=...)` with this module imported.

Each example stores the record's JSON (validated at build time) and the image file's bytes exactly as on disk
(JPEGs are not re-encoded); `tfds.features.Image` is not used because it would re-encode every image, and it needs
PIL images or PNG bytes without TensorFlow. Bad records are skipped (counted) or fail at build time per
`on_error`, and checked again when read. No TensorFlow is needed (tfds.load is not used).
"""

from __future__ import annotations

import collections
import json
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from moiie_jax.data import images as image_lib
from moiie_jax.data.records import RecordError, _iter_raw, decode_record

log = logging.getLogger(__name__)

NAME = 'llava_conversations'


class LlavaConversations(tfds.core.GeneratorBasedBuilder):
  """LLaVA conversations with their images; one split per build (default 'train'), in file order."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'LLaVA JSON records + raw image bytes.'}

  # tfds locates a builder's code (for checksums) with `importlib_resources` when the builder lives in a package;
  # that backport is not a dependency here, and this builder downloads nothing, so point it at this file.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, json_path: str | None = None, image_folder: str | None = None, split: str = 'train',
               on_error: str = 'skip', **kwargs: Any):
    if on_error not in ('skip', 'fail'):
      raise ValueError(f'on_error={on_error!r}: expected skip or fail')
    self._json_path = json_path
    self._image_folder = image_folder
    self._split = split
    self._on_error = on_error
    self.build_stats: collections.Counter = collections.Counter()
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='LLaVA-format conversations (JSON per record) with the encoded image bytes.',
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'record': tfds.features.Text(),  # the record's JSON, as in the source file
            'image': tfds.features.Text(),  # relative image path ('' without an image), for messages
            'image_bytes': tfds.features.Tensor(shape=(), dtype=np.object_),  # b'' without an image
        }),
        # Keep file order: index i of the dataset is record i of the JSON (minus skipped ones).
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager
    if self._json_path is None:
      raise ValueError(f'{NAME}: json_path is needed to build the dataset (reading needs only data_dir)')
    return {self._split: self._generate_examples()}

  def _skip_or_fail(self, err: RecordError) -> None:
    if self._on_error == 'fail':
      raise RecordError(err.kind, err.record_id, err.where, err.detail)
    self.build_stats[err.kind] += 1
    if self.build_stats[err.kind] <= 5:
      log.warning('tfds build: skipping %s record: %s', err.kind, err)

  def _generate_examples(self):
    where = self._json_path
    for index, raw in enumerate(_iter_raw(where)):
      try:
        conv = decode_record(raw, where, index)
        image_bytes = b''
        if conv.has_image:
          if self._image_folder is None:
            raise RecordError('missing_image', conv.id, where, f'image {conv.image!r} but no image_folder given')
          path = os.path.join(self._image_folder, conv.image)
          try:
            image_lib.load_image(path)  # decodes fully: corrupt files are caught now, not during training
            with open(path, 'rb') as f:
              image_bytes = f.read()
          except image_lib.ImageError as e:
            raise RecordError(e.kind, conv.id, where, str(e)) from e
      except RecordError as e:
        self._skip_or_fail(e)
        continue
      self.build_stats['examples'] += 1
      raw_text = raw.decode('utf-8') if isinstance(raw, bytes) else raw
      yield index, {'id': conv.id, 'record': raw_text, 'image': conv.image or '', 'image_bytes': image_bytes}


def build_tfds_dataset(json_path: str, image_folder: str | None, data_dir: str, *, split: str = 'train',
                       on_error: str = 'skip') -> tuple[str, dict[str, int]]:
  """Writes the ArrayRecord dataset under data_dir; returns (dataset folder, build counts)."""
  builder = LlavaConversations(json_path=json_path, image_folder=image_folder, split=split, on_error=on_error,
                               data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return os.fspath(builder.data_dir), dict(builder.build_stats)


class TfdsRecordSource:
  """grain RandomAccessDataSource over a built dataset; elements as LlavaJsonSource's (with image_bytes).

  The tfds data source is opened lazily in each process (it is not pickled to workers).
  """

  def __init__(self, dataset_dir: str, split: str = 'train'):
    self.dataset_dir = os.fspath(dataset_dir)
    self.split = split
    self._source = None
    self._len = len(self._data())

  def _data(self):
    if self._source is None:
      if not os.path.isfile(os.path.join(self.dataset_dir, 'dataset_info.json')):
        raise ValueError(f'{self.dataset_dir}: not a tfds dataset folder (no dataset_info.json); build it with '
                         f'build_tfds_dataset')
      sources = tfds.builder_from_directory(self.dataset_dir).as_data_source()
      if self.split not in sources:
        raise ValueError(f'{self.dataset_dir}: no split {self.split!r}; it has {sorted(sources)}')
      self._source = sources[self.split]
    return self._source

  def __getstate__(self) -> dict:
    return {'dataset_dir': self.dataset_dir, 'split': self.split, '_len': self._len, '_source': None}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    ex = self._data()[index]
    image_bytes = ex['image_bytes']
    return {'record': ex['record'], 'index': index, 'where': f'{self.dataset_dir}[{self.split}]',
            'image_bytes': image_bytes if (ex['image'] and image_bytes) else None}

  def __repr__(self) -> str:
    return f'TfdsRecordSource({self.dataset_dir!r}, split={self.split!r}, {self._len} records)'


def read_record(dataset_dir: str, index: int, split: str = 'train') -> dict[str, Any]:
  """One decoded example (record dict + image bytes) of a built dataset, for inspection."""
  ex = TfdsRecordSource(dataset_dir, split)._data()[index]
  return {'record': json.loads(ex['record']), 'image_bytes': ex['image_bytes']}
