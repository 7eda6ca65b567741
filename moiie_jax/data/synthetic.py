"""The embedded demo data: coloured shapes, questions about them, and a tokenizer, generated from a seed.

Each image (RGB, image_size^2, white background) holds 1 to 3 copies of one shape (circle, square, triangle) in one
colour, at distinct positions (left, right, top, bottom, center). Questions ask for the colour, the shape, the count
or (single-object images only) the position, in several phrasings; every answer is one word. Splits:

  captions.json  stage 1: "<image>" + "a red circle on the left" (the plain template)
  train.json     stage 2: several question turns per image
  eval.json      held out (new images): one question per record; metadata lists its type and answer

Everything is written as LLaVA JSON + an image folder, plus a WordLevel tokenizer trained on the generated text
(tokenizer.json, tokenizer_config.json) so the demo loads data and tokenizer exactly as for real checkpoints.
Chance level of the eval set = mean over its questions of 1 / |answers of that question's type|.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import tokenizers
from PIL import Image, ImageDraw
from tokenizers import models, pre_tokenizers, processors, trainers

from moiie_jax.data.conversations import get_template
from moiie_jax.data.records import write_records

COLORS = {'red': (220, 30, 30), 'green': (30, 160, 40), 'blue': (30, 60, 220), 'yellow': (235, 200, 20),
          'purple': (140, 40, 170), 'orange': (245, 130, 20)}
SHAPES = ('circle', 'square', 'triangle')
# Centre of each position as fractions of the image side (x, y).
POSITIONS = {'left': (0.18, 0.5), 'right': (0.82, 0.5), 'top': (0.5, 0.18), 'bottom': (0.5, 0.82),
             'center': (0.5, 0.5)}
# Object radius and jitter as fractions of the image side: neighbours (0.32 apart) never touch.
RADIUS, JITTER = 0.10, 0.02
COUNT_WORDS = ('one', 'two', 'three')
BACKGROUND = (255, 255, 255)
SPECIAL_TOKENS = ('<unk>', '<pad>', '<s>', '</s>', '<image>')
TEMPLATE = 'demo'

ANSWERS = {'color': tuple(COLORS), 'shape': SHAPES, 'count': COUNT_WORDS, 'position': tuple(POSITIONS)}
QUESTIONS = {
    'color': ('What color is the shape?', 'Which colour is the object?', 'What is the color of the shape in the '
              'image?', 'Tell me the colour of the object.'),
    'shape': ('What shape is shown?', 'Which shape is in the image?', 'What kind of shape is this?',
              'Name the shape.'),
    'count': ('How many shapes are there?', 'How many objects can you see?', 'Count the shapes.',
              'What is the number of shapes?'),
    'position': ('Where is the shape?', 'Where is the object located?', 'In which part of the image is the shape?',
                 'What is the position of the shape?'),
}
SUFFIXES = ('', ' Answer with one word.', ' Answer the question using a single word.')


@dataclasses.dataclass(frozen=True)
class Scene:
  """What an image shows: `count` copies of `shape` in `color` at `positions`."""
  color: str
  shape: str
  positions: tuple[str, ...]

  @property
  def count(self) -> int:
    return len(self.positions)

  def answer(self, qtype: str) -> str:
    if qtype == 'color':
      return self.color
    if qtype == 'shape':
      return self.shape
    if qtype == 'count':
      return COUNT_WORDS[self.count - 1]
    if qtype == 'position':
      if self.count != 1:
        raise ValueError('position questions are asked about single-object images only')
      return self.positions[0]
    raise ValueError(f'question type {qtype!r}: expected one of {sorted(ANSWERS)}')

  def caption(self) -> str:
    noun = self.shape if self.count == 1 else self.shape + 's'
    where = ' and '.join(f'the {p}' if p != 'center' else 'the center' for p in self.positions)
    article = 'a' if self.count == 1 else COUNT_WORDS[self.count - 1]
    prep = 'in' if self.positions == ('center',) else 'on' if self.count == 1 else 'at'
    return f'{article} {self.color} {noun} {prep} {where}'

  def question_types(self) -> tuple[str, ...]:
    return ('color', 'shape', 'count', 'position') if self.count == 1 else ('color', 'shape', 'count')


def random_scene(rng: np.random.Generator) -> Scene:
  count = int(rng.choice([1, 1, 2, 3]))  # single objects half the time: they carry the position questions
  positions = tuple(str(p) for p in rng.choice(list(POSITIONS), size=count, replace=False))
  return Scene(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), positions)


def draw(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
  """Renders a scene; small seeded jitter in position and size keeps images distinct."""
  return draw_objects([(scene.color, scene.shape, p) for p in scene.positions], size, rng)


def draw_objects(objects, size: int, rng: np.random.Generator) -> Image.Image:
  """Renders (colour, shape, position) objects on a white square, in order, with seeded jitter."""
  img = Image.new('RGB', (size, size), BACKGROUND)
  canvas = ImageDraw.Draw(img)
  for color_name, shape, pos in objects:
    color = COLORS[color_name]
    fx, fy = POSITIONS[pos]
    cx = (fx + rng.uniform(-JITTER, JITTER)) * size
    cy = (fy + rng.uniform(-JITTER, JITTER)) * size
    r = size * RADIUS * rng.uniform(0.9, 1.05)
    if shape == 'circle':
      canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == 'square':
      s = r * 0.9
      canvas.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    else:
      canvas.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=color)
  return img


def _question(rng: np.random.Generator, qtype: str) -> str:
  return str(rng.choice(QUESTIONS[qtype])) + str(rng.choice(SUFFIXES))


@dataclasses.dataclass(frozen=True)
class DemoDataset:
  """Paths and facts of a generated demo dataset (also saved as metadata.json)."""
  root: str
  train_json: str
  captions_json: str
  eval_json: str
  image_folder: str
  tokenizer_dir: str
  template: str
  image_size: int
  seed: int
  answers: dict[str, tuple[str, ...]]
  eval_questions: tuple[dict[str, str], ...]  # {'id', 'type', 'question', 'answer', 'image'}
  chance_level: float
  chance_by_type: dict[str, float]
  vocab_size: int
  # The study task's (make_study_dataset): chance per question kind; eval questions then carry a 'kind'.
  chance_by_kind: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _scene_records(rng, n, prefix, image_folder, image_size, make_turns):
  records = []
  for i in range(n):
    scene = random_scene(rng)
    name = f'{prefix}_{i:05d}.png'
    draw(scene, image_size, rng).save(os.path.join(image_folder, name), format='PNG')
    records.append(make_turns(scene, name, f'{prefix}_{i:05d}'))
  return records


def _train_tokenizer(texts: list[str], out_dir: str) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token='<unk>'))
  # Whitespace splits words from punctuation ("USER:" -> "USER", ":"), keeping character offsets.
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1))
  bos = tok.token_to_id('<s>')
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A $B', special_tokens=[('<s>', bos)])
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, 'tokenizer.json'))
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<s>', 'eos_token': '</s>',
            'pad_token': '<pad>', 'unk_token': '<unk>', 'add_bos_token': True, 'model_max_length': 4096}
  with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, 'special_tokens_map.json'), 'w') as f:
    json.dump({k: config[k] for k in ('bos_token', 'eos_token', 'pad_token', 'unk_token')}, f, indent=2)
  return tok


def _rendered(splits: dict[str, list[dict]]) -> list[str]:
  """Every conversation of the splits as the template renders it (the tokenizer's corpus)."""
  template = get_template(TEMPLATE)
  texts = []
  for records in splits.values():
    for r in records:
      turns = [(r['conversations'][i]['value'], r['conversations'][i + 1]['value'])
               for i in range(0, len(r['conversations']), 2)]
      texts.append(template.render(turns, '</s>')[0])
  return texts


def make_demo_dataset(out_dir: str, seed: int = 0, n_train: int = 512, n_eval: int = 128, image_size: int = 32,
                      n_captions: int | None = None, turns_per_image: int = 3) -> DemoDataset:
  """Generates the demo data under out_dir (deterministic in `seed`); returns its paths and metadata."""
  if min(n_train, n_eval) < 1 or image_size < 16:
    raise ValueError(f'make_demo_dataset: n_train={n_train}, n_eval={n_eval} must be >= 1 and '
                     f'image_size={image_size} >= 16')
  n_captions = n_train if n_captions is None else n_captions
  image_folder = os.path.join(out_dir, 'images')
  os.makedirs(image_folder, exist_ok=True)
  # Independent streams per split, so n_train does not change the eval images.
  rng_cap, rng_train, rng_eval = (np.random.default_rng([seed, k]) for k in range(3))

  def caption_record(scene, name, rid):
    return {'id': rid, 'image': name, 'conversations': [
        {'from': 'human', 'value': '<image>\nDescribe the image briefly.'},
        {'from': 'gpt', 'value': scene.caption()}]}

  def train_record(scene, name, rid):
    qtypes = list(scene.question_types())
    rng_train.shuffle(qtypes)
    conversation = []
    for t, qtype in enumerate(qtypes[:turns_per_image]):
      q = _question(rng_train, qtype)
      conversation += [{'from': 'human', 'value': ('<image>\n' + q) if t == 0 else q},
                       {'from': 'gpt', 'value': scene.answer(qtype)}]
    return {'id': rid, 'image': name, 'conversations': conversation}

  eval_questions = []

  def eval_record(scene, name, rid):
    qtype = str(rng_eval.choice(scene.question_types()))
    q = _question(rng_eval, qtype)
    eval_questions.append({'id': rid, 'type': qtype, 'question': q, 'answer': scene.answer(qtype), 'image': name})
    return {'id': rid, 'image': name, 'conversations': [
        {'from': 'human', 'value': '<image>\n' + q}, {'from': 'gpt', 'value': scene.answer(qtype)}]}

  splits = {'captions': _scene_records(rng_cap, n_captions, 'cap', image_folder, image_size, caption_record),
            'train': _scene_records(rng_train, n_train, 'train', image_folder, image_size, train_record),
            'eval': _scene_records(rng_eval, n_eval, 'eval', image_folder, image_size, eval_record)}
  paths = {name: os.path.join(out_dir, f'{name}.json') for name in splits}
  for name, records in splits.items():
    write_records(paths[name], records)

  # Tokenizer corpus: every rendered conversation (template words included) and every possible answer/phrase.
  texts = _rendered(splits)
  texts += [' '.join(v) for v in ANSWERS.values()] + [q + s for qs in QUESTIONS.values() for q in qs
                                                       for s in SUFFIXES]
  texts += [Scene(c, s, (p,)).caption() for c in COLORS for s in SHAPES for p in POSITIONS]
  texts += [f'{w} {c} {s}s' for w in COUNT_WORDS for c in COLORS for s in SHAPES]
  tokenizer_dir = os.path.join(out_dir, 'tokenizer')
  tok = _train_tokenizer(texts, tokenizer_dir)

  chance_by_type = {t: 1 / len(a) for t, a in ANSWERS.items()}
  chance = float(np.mean([chance_by_type[q['type']] for q in eval_questions]))
  ds = DemoDataset(root=out_dir, train_json=paths['train'], captions_json=paths['captions'], eval_json=paths['eval'],
                   image_folder=image_folder, tokenizer_dir=tokenizer_dir, template=TEMPLATE, image_size=image_size,
                   seed=seed, answers=dict(ANSWERS), eval_questions=tuple(eval_questions), chance_level=chance,
                   chance_by_type=chance_by_type, vocab_size=tok.get_vocab_size(with_added_tokens=True))
  with open(os.path.join(out_dir, 'metadata.json'), 'w') as f:
    json.dump(ds.to_json(), f, indent=1)
  return ds


def load_demo_metadata(out_dir: str) -> DemoDataset:
  """The DemoDataset of an already generated folder."""
  path = os.path.join(out_dir, 'metadata.json')
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: no demo metadata ({e}); run make_demo_dataset first') from e
  data['answers'] = {k: tuple(v) for k, v in data['answers'].items()}
  data['eval_questions'] = tuple(data['eval_questions'])
  return DemoDataset(**data)


# --------------------------------------------------------------------------------------------- the study's task
# Three kinds of question, so that the study's arms can differ in how they serve each modality:
#   visual   fine visual attributes of a single object (its colour or its shape): the image alone answers
#   text     arithmetic stated in words ("What is three plus four?"): the text alone answers; the image is noise
#   binding  two objects of different colours, shapes and places; the question names one by one attribute and asks
#            for another ("What color is the square?", "Where is the red object?"): text and image together
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten')
KINDS = ('visual', 'text', 'binding')
STUDY_ANSWERS = {'color': tuple(COLORS), 'shape': SHAPES, 'number': NUMBER_WORDS, 'position': tuple(POSITIONS)}
STUDY_QUESTIONS = {
    ('visual', 'color'): ('What color is the shape?', 'Which colour is the object?'),
    ('visual', 'shape'): ('What shape is shown?', 'Which shape is in the image?'),
    ('text', 'plus'): ('What is {a} plus {b}?', 'Add {a} and {b}.'),
    ('text', 'minus'): ('What is {a} minus {b}?', 'Take {b} from {a}.'),
    ('binding', 'color'): ('What color is the {shape}?', 'Which colour does the {shape} have?'),
    ('binding', 'shape'): ('What shape is the {color} object?', 'Which shape is {color}?'),
    ('binding', 'position'): ('Where is the {color} {shape}?', 'In which part of the image is the {shape}?'),
}


def _study_objects(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
  """n objects with pairwise different colours, shapes and positions."""
  colors = rng.choice(list(COLORS), size=n, replace=False)
  shapes = rng.choice(list(SHAPES), size=n, replace=False)
  places = rng.choice(list(POSITIONS), size=n, replace=False)
  return [(str(c), str(s), str(p)) for c, s, p in zip(colors, shapes, places)]


def _study_caption(objects) -> str:
  parts = [f'{"an" if c[0] in "aeiou" else "a"} {c} {s} {"in" if p == "center" else "on"} the {p}'
           for c, s, p in objects]
  return ' and '.join(parts)


def _study_question(rng: np.random.Generator, kind: str, objects) -> tuple[str, str, str]:
  """(question, answer, type) of one kind about the objects (one for visual, two for binding)."""
  if kind == 'visual':
    qtype = str(rng.choice(['color', 'shape']))
    color, shape, _ = objects[0]
    return str(rng.choice(STUDY_QUESTIONS['visual', qtype])), color if qtype == 'color' else shape, qtype
  if kind == 'text':
    op = str(rng.choice(['plus', 'minus']))
    a, b = (int(x) for x in rng.integers(0, 6, size=2))
    if op == 'minus' and b > a:
      a, b = b, a
    answer = NUMBER_WORDS[a + b if op == 'plus' else a - b]
    q = str(rng.choice(STUDY_QUESTIONS['text', op])).format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b])
    return q, answer, 'number'
  color, shape, place = objects[int(rng.integers(len(objects)))]
  qtype = str(rng.choice(['color', 'shape', 'position']))
  q = str(rng.choice(STUDY_QUESTIONS['binding', qtype])).format(color=color, shape=shape)
  return q, {'color': color, 'shape': shape, 'position': place}[qtype], qtype


def make_study_dataset(out_dir: str, seed: int = 0, n_train: int = 1500, n_eval: int = 300,
                       image_size: int = 32) -> DemoDataset:
  """The study's task under out_dir (deterministic in `seed`), in the demo's layout: captions.json (stage 1: every
  object described), train.json (stage 2: a visual or binding question and a text question per image) and
  eval.json (held out: n_eval questions, a third of each kind, each record with its 'kind'; `eval_questions` carry
  'kind' and 'type')."""
  if min(n_train, n_eval) < len(KINDS) or image_size < 16:
    raise ValueError(f'make_study_dataset: n_train={n_train} and n_eval={n_eval} must be >= {len(KINDS)} and '
                     f'image_size={image_size} >= 16')
  image_folder = os.path.join(out_dir, 'images')
  os.makedirs(image_folder, exist_ok=True)
  rng_cap, rng_train, rng_eval = (np.random.default_rng([seed, 100 + k]) for k in range(3))
  eval_questions: list[dict[str, str]] = []

  def records(rng, n, prefix, make):
    out = []
    for i in range(n):
      kind = KINDS[i % len(KINDS)]  # eval: a third of each kind; train: image kinds alternate
      objects = _study_objects(rng, 2 if kind == 'binding' else 1)
      name = f'{prefix}_{i:05d}.png'
      draw_objects(objects, image_size, rng).save(os.path.join(image_folder, name), format='PNG')
      out.append({'id': f'{prefix}_{i:05d}', 'image': name, 'conversations': make(rng, kind, objects, name)})
    return out

  def caption(rng, kind, objects, name):
    return [{'from': 'human', 'value': '<image>\nDescribe the image briefly.'},
            {'from': 'gpt', 'value': _study_caption(objects)}]

  def train(rng, kind, objects, name):
    image_kind = 'binding' if len(objects) == 2 else 'visual'
    turns = []
    for k in ([image_kind, 'text'] if rng.random() < 0.5 else ['text', image_kind]):
      q, a, _ = _study_question(rng, k, objects)
      turns += [{'from': 'human', 'value': ('<image>\n' + q) if not turns else q}, {'from': 'gpt', 'value': a}]
    return turns

  def held_out(rng, kind, objects, name):
    q, a, qtype = _study_question(rng, kind, objects)
    eval_questions.append({'id': name[:-4], 'kind': kind, 'type': qtype, 'question': q, 'answer': a, 'image': name})
    return [{'from': 'human', 'value': '<image>\n' + q}, {'from': 'gpt', 'value': a}]

  def with_kind(recs):  # eval.json carries each question's kind, as the study's data=files form expects
    return [{**r, 'kind': q['kind']} for r, q in zip(recs, eval_questions)]

  # Training images alternate one and two objects (i % 3 picks kinds: visual, text -> one object, binding -> two).
  splits = {'captions': records(rng_cap, n_train, 'cap', caption), 'train': records(rng_train, n_train, 'train', train),
            'eval': with_kind(records(rng_eval, n_eval, 'eval', held_out))}
  paths = {name: os.path.join(out_dir, f'{name}.json') for name in splits}
  for name, recs in splits.items():
    write_records(paths[name], recs)
  texts = _rendered(splits) + [' '.join(v) for v in STUDY_ANSWERS.values()]
  texts += [q.format(a='zero', b='one', color='red', shape='circle') for qs in STUDY_QUESTIONS.values() for q in qs]
  tokenizer_dir = os.path.join(out_dir, 'tokenizer')
  tok = _train_tokenizer(texts, tokenizer_dir)
  chance_by_type = {t: 1 / len(a) for t, a in STUDY_ANSWERS.items()}
  chance_by_kind = {k: float(np.mean([chance_by_type[q['type']] for q in eval_questions if q['kind'] == k]))
                    for k in KINDS}
  ds = DemoDataset(root=out_dir, train_json=paths['train'], captions_json=paths['captions'], eval_json=paths['eval'],
                   image_folder=image_folder, tokenizer_dir=tokenizer_dir, template=TEMPLATE, image_size=image_size,
                   seed=seed, answers=dict(STUDY_ANSWERS), eval_questions=tuple(eval_questions),
                   chance_level=float(np.mean([chance_by_type[q['type']] for q in eval_questions])),
                   chance_by_type=chance_by_type, vocab_size=tok.get_vocab_size(with_added_tokens=True),
                   chance_by_kind=chance_by_kind)
  with open(os.path.join(out_dir, 'metadata.json'), 'w') as f:
    json.dump(ds.to_json(), f, indent=1)
  return ds
