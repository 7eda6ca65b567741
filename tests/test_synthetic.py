"""The synthetic demo data: deterministic from its seed, answers true to the drawn pixels, chance level, tokenizer."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from moiie_jax.data import conversations as C
from moiie_jax.data import images as I
from moiie_jax.data import pipeline as P
from moiie_jax.data import synthetic as S


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  return S.make_demo_dataset(str(tmp_path_factory.mktemp('demo')), seed=7, n_train=40, n_eval=60, image_size=32,
                             n_captions=20)


def _digest(root):
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_same_seed_same_files_other_seed_differs(demo, tmp_path):
  again = S.make_demo_dataset(str(tmp_path / 'a'), seed=7, n_train=40, n_eval=60, image_size=32, n_captions=20)
  want = _digest(demo.root)
  got = _digest(again.root)
  want.pop('metadata.json'), got.pop('metadata.json')  # holds the (different) output paths
  assert got == want and len(got) > 120
  assert again.eval_questions == demo.eval_questions
  other = S.make_demo_dataset(str(tmp_path / 'b'), seed=8, n_train=40, n_eval=60, image_size=32, n_captions=20)
  assert _digest(other.root)['train.json'] != want['train.json']


def _analyse(path):
  """Reads the scene back from the pixels: (colour, shape, count, positions) by nearest colour and flood fill."""
  img = np.asarray(Image.open(path).convert('RGB')).astype(int)
  size = img.shape[0]
  mask = np.abs(img - 255).sum(-1) > 60
  colours = {name: np.abs(img[mask] - np.array(rgb)).sum(-1) for name, rgb in S.COLORS.items()}
  colour = min(colours, key=lambda c: np.median(colours[c]))
  seen = np.zeros_like(mask)
  blobs = []
  for y, x in zip(*np.nonzero(mask)):
    if seen[y, x]:
      continue
    stack, pixels = [(y, x)], []
    seen[y, x] = True
    while stack:
      cy, cx = stack.pop()
      pixels.append((cy, cx))
      for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
        if 0 <= ny < size and 0 <= nx < size and mask[ny, nx] and not seen[ny, nx]:
          seen[ny, nx] = True
          stack.append((ny, nx))
    blobs.append(np.array(pixels))
  blobs = [b for b in blobs if len(b) > 4]  # anti-aliasing specks
  positions, fills = [], []
  for b in blobs:
    cy, cx = b.mean(0) / size
    positions.append(min(S.POSITIONS, key=lambda p: (S.POSITIONS[p][0] - cx) ** 2 + (S.POSITIONS[p][1] - cy) ** 2))
    h, w = np.ptp(b[:, 0]) + 1, np.ptp(b[:, 1]) + 1
    fills.append(len(b) / (h * w))
  fill = float(np.mean(fills))
  # Filled fraction of the bounding box: square ~1, circle ~pi/4, triangle ~1/2.
  shape = 'square' if fill > 0.88 else 'circle' if fill > 0.65 else 'triangle'
  return colour, shape, len(blobs), sorted(positions)


def test_answers_and_captions_match_the_pixels(demo):
  count_words = {w: i + 1 for i, w in enumerate(S.COUNT_WORDS)}
  checked = 0
  for path in (demo.train_json, demo.eval_json):
    with open(path) as f:
      records = json.load(f)
    for r in records:
      colour, shape, count, positions = _analyse(os.path.join(demo.image_folder, r['image']))
      msgs = r['conversations']
      for q, a in zip(msgs[::2], msgs[1::2]):
        qtype = next(t for t, qs in S.QUESTIONS.items() if any(q['value'].replace('<image>\n', '').startswith(x)
                                                                 for x in qs))
        truth = {'color': colour, 'shape': shape, 'count': count, 'position': positions[0] if count == 1 else None}
        answer = count_words[a['value']] if qtype == 'count' else a['value']
        assert answer == truth[qtype], (r['id'], q['value'], a['value'], truth)
        checked += 1
  assert checked > 150
  with open(demo.captions_json) as f:
    for r in json.load(f):
      colour, shape, count, positions = _analyse(os.path.join(demo.image_folder, r['image']))
      caption = r['conversations'][1]['value']
      assert colour in caption and shape in caption and all(p in caption for p in positions), (r['id'], caption)


def test_chance_level_and_question_variety(demo):
  types = [q['type'] for q in demo.eval_questions]
  want = np.mean([1 / len(S.ANSWERS[t]) for t in types])
  assert demo.chance_level == pytest.approx(want)
  assert 1 / 6 < demo.chance_level < 1 / 3 and set(types) == set(S.ANSWERS)
  assert demo.chance_by_type == {'color': 1 / 6, 'shape': 1 / 3, 'count': 1 / 3, 'position': 1 / 5}
  with open(demo.train_json) as f:
    questions = {m['value'] for r in json.load(f) for m in r['conversations'][::2]}
  assert len(questions) > 15  # several phrasings per type
  assert S.load_demo_metadata(demo.root) == demo


def test_tokenizer_covers_the_data_and_matches_hf(demo):
  from transformers import PreTrainedTokenizerFast
  ours = C.TextTokenizer.from_pretrained(demo.tokenizer_dir)
  hf = PreTrainedTokenizerFast.from_pretrained(demo.tokenizer_dir)
  assert ours.image_token_in_vocab and ours.eos_token == '</s>' and ours.pad_token == '<pad>'
  unk = ours.token_id('<unk>')
  template = C.get_template(S.TEMPLATE)
  for path in (demo.train_json, demo.eval_json):
    with open(path) as f:
      for r in json.load(f):
        msgs = r['conversations']
        text, _ = template.render([(q['value'], a['value']) for q, a in zip(msgs[::2], msgs[1::2])], '</s>')
        ids = ours.encode(text)
        assert unk not in ids, text
        assert ids == hf(text).input_ids


@pytest.mark.parametrize('split, template', [('train', 'demo'), ('captions', 'plain')])
def test_demo_goes_through_the_real_pipeline(demo, split, template):
  path = demo.train_json if split == 'train' else demo.captions_json
  cfg = P.DataConfig(json_path=path, image_folder=demo.image_folder, tokenizer_path=demo.tokenizer_dir,
                     template=template, max_length=80, length_buckets=(48, 64), num_image_tokens=4,
                     image=I.siglip_config(16), batch_size=8, shuffle=False, num_epochs=1, drop_remainder=False,
                     with_index=True)
  it = P.make_iterator(cfg, process_index=0, process_count=1)
  with open(path) as f:
    records = json.load(f)
  n = 0
  for batch in it:
    longest = batch['attention_mask'].sum(1).max()
    assert batch['input_ids'].shape[1] == min(b for b in (48, 64, 80) if b >= longest)  # smallest bucket that fits
    for row in range(8):
      index = batch['index'][row]
      if index < 0:
        continue
      labels = batch['labels'][row]
      answers = [m['value'] for m in records[index]['conversations'][1::2]]
      assert it.tokenizer.decode(labels[labels >= 0], skip_special_tokens=False) == ' </s> '.join(answers) + ' </s>'
      assert (batch['input_ids'][row] == it.image_token_id).sum() == 4
      n += 1
  assert n == len(records) and it.stats()['skipped'] == 0
