"""The grain input pipeline: image preprocessing vs HF, determinism, sharding, resumable state, worker processes,
error handling (skip counted / fail naming the record) and the tfds ArrayRecord builder."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from moiie_jax.data import images as I
from moiie_jax.data import pipeline as P
from moiie_jax.data import synthetic

N_GOOD = 20
BAD_KINDS = {'corrupt_image': 2, 'missing_image': 1, 'malformed': 5, 'too_long': 1}


def _bad_records(folder):
  """One record per error case, with its kind; image files written into `folder`."""
  with open(os.path.join(folder, 'train_00000.png'), 'rb') as f:
    png = f.read()
  with open(os.path.join(folder, 'garbage.png'), 'wb') as f:
    f.write(b'this is not an image at all')
  with open(os.path.join(folder, 'truncated.png'), 'wb') as f:
    f.write(png[:len(png) // 2])

  def qa(q='<image>\nWhat color is the shape?', a='red'):
    return [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]

  return [
      ('corrupt_image', {'id': 'bad_garbage', 'image': 'garbage.png', 'conversations': qa()}),
      ('corrupt_image', {'id': 'bad_truncated', 'image': 'truncated.png', 'conversations': qa()}),
      ('missing_image', {'id': 'bad_missing', 'image': 'nope.png', 'conversations': qa()}),
      ('malformed', {'id': 'bad_nokey', 'image': 'train_00000.png'}),
      ('malformed', {'id': 'bad_order', 'image': 'train_00000.png', 'conversations': qa()[::-1]}),
      ('malformed', {'id': 'bad_noimage', 'conversations': qa()}),
      ('malformed', {'id': 'bad_noplaceholder', 'image': 'train_00000.png', 'conversations': qa('What color?')}),
      ('too_long', {'id': 'bad_long', 'image': 'train_00000.png', 'conversations': qa(a='red ' * 200)}),
  ]


def _write_jsonl(path, records, raw_lines=()):
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
    for line in raw_lines:
      f.write(line + '\n')
  return path


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('pipeline'))
  demo = synthetic.make_demo_dataset(os.path.join(root, 'demo'), seed=0, n_train=N_GOOD, n_eval=4, n_captions=4)
  with open(demo.train_json) as f:
    good = json.load(f)
  bad = _bad_records(demo.image_folder)
  records = good[:10] + [r for _, r in bad] + good[10:]
  # The 5th malformed record: a line that is not JSON at all.
  path = _write_jsonl(os.path.join(root, 'mixed.jsonl'), records, raw_lines=['{"id": "bad_json", "conv'])
  return {'demo': demo, 'mixed': path, 'good_index': set(range(10)) | set(range(10 + len(bad), len(records))),
          'bad': bad, 'root': root}


def _config(data, **kw):
  demo = data['demo']
  base = dict(json_path=data['mixed'], image_folder=demo.image_folder, tokenizer_path=demo.tokenizer_dir,
              template='demo', max_length=96, num_image_tokens=4, image=I.siglip_config(16), batch_size=4,
              with_index=True, seed=0)
  base.update(kw)
  return P.DataConfig(**base)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b, keys=None):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in keys or x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize('hw', [(50, 37), (37, 50), (23, 81), (375, 500)])
@pytest.mark.parametrize('pad', [False, True])
def test_image_preprocessing_matches_hf(hw, pad):
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
  img = Image.fromarray(np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8))
  big = hw == (375, 500)
  size_s, size_c = (384, 336) if big else (24, 20)
  cases = [(I.siglip_config(size_s, pad), SiglipImageProcessorPil(size={'height': size_s, 'width': size_s})),
           (I.clip_config(size_c, pad), CLIPImageProcessorPil(size={'shortest_edge': size_c},
                                                             crop_size={'height': size_c, 'width': size_c}))]
  for cfg, hf in cases:
    src = I.expand2square(img, cfg.fill_color) if pad else img  # HF has no pad option: LLaVA pads before it
    want = hf(src, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)  # CHW -> HWC
    got = I.preprocess(img, cfg)
    assert got.shape == (cfg.height, cfg.width, 3) and got.dtype == np.float32
    # Same PIL resampling on uint8; measured max |diff| 2.4e-7 (float rounding only).
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_expand2square_pads_with_llava_mean_colour():
  cfg = I.clip_config(8, pad_to_square=True)
  assert cfg.fill_color == (122, 116, 104)  # the colour LLaVA/Bunny hard-code for CLIP
  img = Image.new('RGB', (6, 3), (255, 0, 0))
  sq = np.asarray(I.expand2square(img, cfg.fill_color))
  assert sq.shape == (6, 6, 3)
  assert (sq[1:4] == (255, 0, 0)).all() and (sq[0] == cfg.fill_color).all() and (sq[4:] == cfg.fill_color).all()


# -------------------------------------------------------------------------------------------- order and state
def test_order_is_determined_by_the_seed(data):
  a = _take(P.make_iterator(_config(data), process_index=0, process_count=1), 3)
  b = _take(P.make_iterator(_config(data), process_index=0, process_count=1), 3)
  _assert_batches_equal(a, b)
  c = _take(P.make_iterator(_config(data, seed=1), process_index=0, process_count=1), 3)
  assert [x['index'].tolist() for x in a] != [x['index'].tolist() for x in c]
  batch = a[0]
  assert batch['input_ids'].shape == (4, 96) and batch['input_ids'].dtype == np.int32
  assert batch['pixel_values'].shape == (4, 16, 16, 3) and batch['has_image'].all()
  assert (batch['attention_mask'].sum(1) == (batch['input_ids'] != 1).sum(1)).all()  # pad id 1 (<pad>)


def test_two_processes_get_disjoint_shards_covering_each_epoch(data):
  seen, stats = [], []
  for p in range(2):
    it = P.make_iterator(_config(data, num_epochs=2, drop_remainder=False), process_index=p, process_count=2)
    idx = np.concatenate([b['index'] for b in it])
    seen.append(idx[idx >= 0].tolist())
    stats.append(it.stats())
  both = sorted(seen[0] + seen[1])
  assert both == sorted(list(data['good_index']) * 2)  # every good record exactly once per epoch
  for kind, n in BAD_KINDS.items():
    assert stats[0][kind] + stats[1][kind] == 2 * n, kind
  # Within one epoch the shards are disjoint: the first epoch's elements of each process.
  per_epoch = [P.make_iterator(_config(data, num_epochs=1, drop_remainder=False), process_index=p,
                               process_count=2) for p in range(2)]
  first = [set(np.concatenate([b['index'] for b in it]).tolist()) - {-1} for it in per_epoch]
  assert not first[0] & first[1] and first[0] | first[1] == data['good_index']


def test_last_partial_batch_is_filled_with_inert_rows(data):
  it = P.make_iterator(_config(data, num_epochs=1, drop_remainder=False, shuffle=False), process_index=0,
                       process_count=1)
  batches = list(it)
  assert len(batches) == -(-N_GOOD // 4) and it.stats()['examples'] == N_GOOD
  last = batches[-1]
  filler = last['index'] < 0
  assert filler.sum() == 4 * len(batches) - N_GOOD
  assert (last['labels'][filler] == -100).all() and (last['attention_mask'][filler].sum(1) == 1).all()
  assert not last['has_image'][filler].any()


def test_state_round_trip_resumes_exactly(data):
  it = P.make_iterator(_config(data), process_index=0, process_count=1)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able, as Orbax stores it
  want = _take(it, 4)  # crosses the epoch boundary (20 good records = 5 batches)
  fresh = P.make_iterator(_config(data), process_index=0, process_count=1)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), want)
  assert fresh.stats() == it.stats()
  with pytest.raises(ValueError, match='different settings'):
    P.make_iterator(_config(data, seed=3), process_index=0, process_count=1).set_state(state)


def test_worker_processes_same_batches_counts_and_state(data):
  ref_it = P.make_iterator(_config(data), process_index=0, process_count=1)
  ref = _take(ref_it, 6)
  with P.make_iterator(_config(data, worker_count=2), process_index=0, process_count=1) as it:
    got = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    got += _take(it, 3)
    stats = it.stats()
  _assert_batches_equal(got, ref)
  assert stats == ref_it.stats() and stats['skipped'] >= sum(BAD_KINDS.values())  # 6 batches > 1 epoch
  with P.make_iterator(_config(data, worker_count=2), process_index=0, process_count=1) as it:
    it.set_state(state)
    _assert_batches_equal(_take(it, 3), ref[3:])


# ------------------------------------------------------------------------------------------------------ errors
def test_skip_counts_every_error_kind(data):
  it = P.make_iterator(_config(data, num_epochs=1, drop_remainder=False), process_index=0, process_count=1)
  n = sum(int((b['index'] >= 0).sum()) for b in it)
  stats = it.stats()
  assert n == N_GOOD and stats['examples'] == N_GOOD
  assert {k: stats[k] for k in BAD_KINDS} == BAD_KINDS and stats['skipped'] == sum(BAD_KINDS.values())


@pytest.mark.parametrize('case', range(8))
def test_fail_names_record_and_file(data, case, tmp_path):
  kind, record = data['bad'][case]
  path = _write_jsonl(str(tmp_path / 'one.jsonl'), [record])
  it = P.make_iterator(_config(data, json_path=path, on_error='fail', batch_size=1), process_index=0,
                       process_count=1)
  with pytest.raises(P.DataError) as info:
    next(it)
  msg = str(info.value)
  assert msg.startswith(kind) and repr(record['id']) in msg and path in msg
  if kind in ('corrupt_image', 'missing_image'):
    assert record['image'] in msg


def test_no_usable_record_stops_instead_of_reading_forever(data):
  # The source repeats forever (num_epochs=None, as in training) and max_length drops every record: this used to
  # loop in __next__ for ever; now it stops after twice the data, with the skip counts.
  it = P.make_iterator(_config(data, max_length=8, num_epochs=None), process_index=0, process_count=1)
  with pytest.raises(P.NoUsableDataError, match=r'no usable record.*too_long=\d+.*max_length=8') as info:
    next(it)
  assert isinstance(info.value, P.DataError) and it.stats()['examples'] == 0
  assert it.stats()['skipped'] == 2 * it.num_records
  with pytest.raises(StopIteration):
    next(it)


def test_fail_in_worker_process_raises_in_main(data, tmp_path):
  _, record = data['bad'][0]
  with open(data['demo'].train_json) as f:
    good = json.load(f)[:3]
  path = _write_jsonl(str(tmp_path / 'w.jsonl'), good + [record])
  with P.make_iterator(_config(data, json_path=path, on_error='fail', shuffle=False, num_epochs=1, batch_size=2,
                                worker_count=1), process_index=0, process_count=1) as it:
    next(it)
    with pytest.raises(P.DataError, match="'bad_garbage'.*garbage.png"):
      next(it)


def test_bad_config_is_rejected_with_the_field_name(data):
  with pytest.raises(ValueError, match='on_error'):
    _config(data, on_error='ignore').validate()
  with pytest.raises(ValueError, match='exactly one of json_path'):
    _config(data, tfds_dir='x').validate()
  with pytest.raises(ValueError, match='unknown keys'):
    P.DataConfig.from_dict({'json_path': 'x', 'tokenizer_path': 'y', 'batchsize': 3})
  cfg = P.DataConfig.from_dict({'json_path': 'x', 'tokenizer_path': 'y', 'image': {'height': 8, 'width': 8},
                                'length_buckets': [64]})
  assert cfg.image.height == 8 and cfg.length_buckets == (64,)


# -------------------------------------------------------------------------------------------------------- tfds
def test_tfds_array_record_round_trip(data):
  import tensorflow_datasets as tfds

  from moiie_jax.data import tfds_builder
  data_dir = os.path.join(data['root'], 'tfds')
  shutil.rmtree(data_dir, ignore_errors=True)
  path, stats = tfds_builder.build_tfds_dataset(data['mixed'], data['demo'].image_folder, data_dir)
  # The builder skips what it can see without a tokenizer: bad JSON/structure and bad images.
  assert stats == {'examples': N_GOOD + BAD_KINDS['too_long'], 'malformed': BAD_KINDS['malformed'],
                   'corrupt_image': BAD_KINDS['corrupt_image'], 'missing_image': BAD_KINDS['missing_image']}
  source = tfds.data_source(tfds_builder.NAME, data_dir=data_dir)['train']
  assert len(source) == N_GOOD + 1
  with open(data['demo'].train_json) as f:
    good = json.load(f)
  first = source[0]
  assert json.loads(first['record']) == good[0]
  with open(os.path.join(data['demo'].image_folder, good[0]['image']), 'rb') as f:
    assert first['image_bytes'] == f.read()  # stored as on disk, not re-encoded
  # Through the pipeline: the same examples as from the JSON file, in the same order.
  kw = dict(shuffle=False, num_epochs=1, drop_remainder=False)
  from_tfds = list(P.make_iterator(_config(data, json_path=None, tfds_dir=path, **kw), process_index=0,
                                   process_count=1))
  from_json = list(P.make_iterator(_config(data, **kw), process_index=0, process_count=1))
  _assert_batches_equal(from_tfds, from_json, keys=['input_ids', 'labels', 'attention_mask', 'pixel_values'])
  # Sharded: process 0 reads the even positions, which include the too-long record (position 10).
  it = P.make_iterator(_config(data, json_path=None, tfds_dir=path, **kw), process_index=0, process_count=2)
  assert sum(int((b['index'] >= 0).sum()) for b in it) == N_GOOD // 2 and it.stats()['too_long'] == 1


def test_unexpected_exception_is_fatal_even_when_skipping(data, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError('bug in preprocessing')
  monkeypatch.setattr(I, 'preprocess', broken)
  it = P.make_iterator(_config(data, on_error='skip'), process_index=0, process_count=1)
  with pytest.raises(P.DataError, match='unexpected error.*RuntimeError: bug in preprocessing'):
    next(it)


def test_config_for_model_matches_the_model_contract():
  from moiie_jax.models.config import LLMConfig, LVLMConfig, VisionConfig
  model = LVLMConfig(llm=LLMConfig(vocab_size=100, pad_token_id=3),
                     vision=VisionConfig(architecture='clip', image_size=28, patch_size=14), image_token_id=99)
  cfg = P.DataConfig.for_model(model, json_path='x.json', tokenizer_path='tok', max_length=64)
  assert (cfg.num_image_tokens, cfg.image_token_id, cfg.pad_token_id) == (4, 99, 3)
  assert cfg.image == I.clip_config(28)
