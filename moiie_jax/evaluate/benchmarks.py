"""Benchmark registry: load a benchmark's data file, phrase its prompts, score predictions, write result files.

    bench = get_benchmark('pope')                        # or BENCHMARKS['pope']
    items = bench.load('pope_test.jsonl', 'coco/val2014')
    text, image = bench.prompt(items[0])                 # '<image>\\nIs there a dog ...?\\nAnswer the question ...'
    scores = bench.evaluate(items, predictions, out_dir) # score + write_predictions + '<name>_scores.json'

`predictions` is a list of raw model answers aligned with `items`, or a mapping from `Item.key` to the answer. An
answer None marks an item that failed (missing or unreadable image, prompt too long): every metric leaves it out
and the scores count it in `n_failed`, so a failure never scores as an answer.

Data files are JSONL, one question per line, mirroring the LLaVA evaluation question files (`question_id`, `image`,
`text`) plus the ground truth. On every line:
  question_id  int | str, unique in the file (aliases: MMBench `index`, MMMU `id`); MME's two questions of an
               image may share it (as in LLaVA's and lmms-lab's MME files)
  image        str, path relative to --images (or absolute); optional only for ScienceQA and MMMU
  question     str (alias `text`; an instruction LLaVA's question files append, e.g. 'Answer the question using a
               single word or phrase.', and a leading '<image>' line are stripped, so those files load as they are)
Per benchmark, the fields in addition (`?` = optional), then how the model's answer is read (-> ...):
  vqav2          answers?: list[str] (the 10 human answers, or VQA-style [{"answer": ...}]; none on test-dev)
                 -> a word or phrase, VQA accuracy after the EvalAI normalisation
  gqa            answer?: str -> a word or phrase, exact match after normalisation
  textvqa        answers?: list[str] (10), ocr_tokens?: list[str] -> a word or phrase, VQA accuracy
  pope           label: 'yes' | 'no' (alias answer), category: str (the split: 'random' | 'popular' |
                 'adversarial') -> 'no' if 'no'/'not' is a word of its first sentence, else 'yes'; F1, accuracy,
                 precision, recall, yes-ratio per split
  mme            answer: 'Yes' | 'No' (alias label), category: one of the 14 MME subtasks ('existence', ...,
                 'code_reasoning'); without it (or 'default'), the subtask is the first part of a question_id
                 'subtask/image'. LLaVA's llava_mme.jsonl loads as it is: it has no answers, which are then read
                 from MME_Benchmark_release_version's '<subtask>/[questions_answers_YN/]<image>.txt' files next to
                 the images (pass that folder as --images). lmms-lab/MME rows (question_id, question, answer,
                 category) load once exported to JSONL with `image` a path to the saved image file
                 -> 'yes'/'no' from the answer's start; acc and acc+ per subtask, perception and cognition sums
  mmbench        A, B, C, D (E?): str (MMBench TSV columns; or options: list[str]), answer?: letter, hint?: str,
                 category?: str, l2-category?: str -> an option letter (or an option's text); CircularEval accuracy
  seed_image     options: list[str] (or choice_a..choice_d), answer: letter, category?: str (question type)
                 -> an option letter; accuracy per question type
  scienceqa_img  choices: list[str] (alias options), answer: int index or letter, hint?: str (the context),
                 subject?: str; questions without an image are skipped (the IMG subset) -> an option letter
  ai2d           options: list[str], answer: int index or letter -> an option letter
  mmmu           options: list[str] (or its Python repr, as the HF dataset stores it), question_type:
                 'multiple-choice' | 'open', answer: str | list[str] (letter for multiple choice), subject?: str
                 (else taken from ids like 'validation_Art_12'); image = the question's image_1 -> a letter
                 (multiple choice) or a word, phrase or number (open), parsed as MMMU's eval_utils
A malformed line raises BenchmarkDataError naming the file, the line and the field. The server-format files carry
an empty answer for a failed item: rerun with --retry-errors before submitting them.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import os
import random
from collections import defaultdict
from typing import Any, Mapping, Sequence

from moiie_jax.evaluate import metrics
from moiie_jax.evaluate import prompts


class BenchmarkDataError(ValueError):
  """A benchmark data file is not in the expected format; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One question to ask the model. `key` is unique in a run (MMBench circular rounds share a question_id)."""
  key: str
  question_id: int | str
  question: str
  image: str | None
  answer: Any = None  # str | list[str] | None (no public ground truth)
  options: tuple[str, ...] = ()
  category: str | None = None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class _Row:
  """One parsed JSONL line with typed field access whose errors name the file, line and field."""

  def __init__(self, path: str, lineno: int, data: dict):
    self.path, self.lineno, self.data = path, lineno, data

  def error(self, message: str) -> BenchmarkDataError:
    return BenchmarkDataError(f'{self.path}, line {self.lineno}: {message}')

  def get(self, *names: str, types: type | tuple = object, required: bool = True, default: Any = None) -> Any:
    for name in names:
      value = self.data.get(name)
      if value is None or (isinstance(value, float) and value != value):  # None or NaN (pandas' empty cell)
        continue
      if not isinstance(value, types) or isinstance(value, bool):
        want = types.__name__ if isinstance(types, type) else ' or '.join(t.__name__ for t in types)
        raise self.error(f'field {name!r}: expected {want}, got {type(value).__name__} {value!r:.80}')
      return value
    if required:
      raise self.error(f'missing field {" / ".join(repr(n) for n in names)} (fields present: {sorted(self.data)})')
    return default

  def str_list(self, *names: str, required: bool = True) -> list[str] | None:
    value = self.get(*names, types=(list, str), required=required)
    if isinstance(value, str):
      try:
        value = ast.literal_eval(value)  # MMMU's HF data keeps option lists as their Python repr
      except (ValueError, SyntaxError):
        value = None
      if not isinstance(value, list):
        raise self.error(f'field {names[0]!r}: expected a list of strings or its Python repr')
    if value is None:
      return None
    value = [v['answer'] if isinstance(v, dict) and 'answer' in v else v for v in value]  # VQA annotation dicts
    if not value or not all(isinstance(v, str) for v in value):
      raise self.error(f'field {names[0]!r}: expected a non-empty list of strings, got {value!r:.80}')
    return value

  def question(self) -> str:
    return prompts.strip_instruction(self.get('question', 'text', types=str))


def read_jsonl(path: str) -> list[_Row]:
  """The non-blank lines of a JSONL file, each a JSON object."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'benchmark data file {path!r} does not exist')
  rows = []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        data = json.loads(line)
      except json.JSONDecodeError as e:
        hint = ' (the file looks like one JSON array; expected JSONL: one object per line)' if line[:1] == '[' else ''
        raise BenchmarkDataError(f'{path}, line {lineno}: not valid JSON: {e}{hint}') from None
      if not isinstance(data, dict):
        raise BenchmarkDataError(f'{path}, line {lineno}: expected a JSON object, got {type(data).__name__}')
      rows.append(_Row(path, lineno, data))
  if not rows:
    raise BenchmarkDataError(f'{path}: no questions in the file')
  return rows


def _options(row: _Row) -> list[str]:
  """Options from `options`/`choices`, else MMBench columns A, B, ... or SEED columns choice_a, choice_b, ..."""
  if any(row.data.get(k) is not None for k in ('options', 'choices')):
    return row.str_list('options', 'choices')
  for template in ('{}', 'choice_{}'):
    found = []
    for letter in prompts.letters(26):
      value = row.get(template.format(letter), template.format(letter.lower()), types=(str, int, float),
                      required=False)
      if value is None or (isinstance(value, str) and value.strip().lower() in ('nan', 'none', '')):
        break  # as LLaVA's get_options: options end at the first empty column
      found.append(str(value))
    if found:
      return found
  raise row.error('missing options: expected "options" (list of str), columns "A", "B", ... or "choice_a", ...')


def _answer_letter(row: _Row, n_options: int, required: bool = True) -> str | None:
  value = row.get('answer', types=(str, int), required=required)
  if value is None:
    return None
  keys = prompts.letters(n_options)
  letter = keys[value] if isinstance(value, int) and 0 <= value < n_options else str(value).strip().upper()
  if letter not in keys:
    raise row.error(f'field "answer": {value!r} is not one of the {n_options} options {keys} (or their index)')
  return letter


def _as_texts(items: Sequence[Item], predictions: Sequence[str | None] | Mapping[str, str | None]
              ) -> list[str | None]:
  """The answers aligned with `items`; None where the item failed."""
  if isinstance(predictions, Mapping):
    missing = [it.key for it in items if it.key not in predictions]
    if missing:
      raise KeyError(f'{len(missing)} of {len(items)} items have no prediction, e.g. key {missing[0]!r}')
    texts = [predictions[it.key] for it in items]
  else:
    texts = list(predictions)
    if len(texts) != len(items):
      raise ValueError(f'{len(texts)} predictions for {len(items)} items')
  bad = [i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)]
  if bad:
    raise TypeError(f'prediction {bad[0]} is {type(texts[bad[0]]).__name__}, expected the model\'s answer text '
                    f'(or None: the item failed)')
  return texts


def _counts(items: Sequence[Item], texts: Sequence[str | None]) -> dict:
  """n (items) and n_failed (items without an answer, left out of the metric)."""
  return {'n': len(items), 'n_failed': sum(t is None for t in texts)}


def _pct(x: float) -> float:
  return 100.0 * x


def write_json(obj: Any, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
  return path


class Benchmark:
  """Base class: subclasses define `_parse` (one row -> items), `_text` (the question turn) and `score`."""
  name = ''
  description = ''
  image_optional = False
  # MME: the two questions of an image share its question_id (LLaVA's and lmms-lab's files); the second gets the
  # key 'question_id#1', so that both are answered and scored.
  shared_question_ids = False

  def load(self, data_file: str, images_dir: str, check_images: bool = True) -> list[Item]:
    """Reads and validates `data_file`; image paths are resolved against `images_dir` and checked to exist."""
    items, seen, asked, uses = [], {}, {}, {}
    for row in read_jsonl(data_file):
      image = row.get('image', types=str, required=not self.image_optional) or None
      if image is None and not self.image_optional:
        raise row.error('field "image" is empty')
      if image is not None:
        image = os.path.join(images_dir, image)
        if check_images and not os.path.isfile(image):
          raise row.error(f'image {image!r} does not exist (field "image" is relative to images_dir={images_dir!r})')
      for item in self._parse(row, image):
        if self.shared_question_ids:
          if (item.key, item.question) in asked:
            raise row.error(f'question_id {item.question_id!r} with the same question already on line '
                            f'{asked[item.key, item.question]}')
          asked[item.key, item.question] = row.lineno
          n = uses[item.key] = uses.get(item.key, -1) + 1
          item = dataclasses.replace(item, key=f'{item.key}#{n}' if n else item.key)
        if item.key in seen:
          raise row.error(f'question_id {item.question_id!r} already used on line {seen[item.key]}')
        seen[item.key] = row.lineno
        items.append(item)
    return items

  def _parse(self, row: _Row, image: str | None) -> list[Item]:
    raise NotImplementedError

  def _item(self, row: _Row, image: str | None, **kwargs) -> Item:
    qid = row.get('question_id', 'index', 'id', types=(int, str))
    return Item(key=str(qid), question_id=qid, question=row.question(), image=image, **kwargs)

  def _text(self, item: Item) -> str:
    raise NotImplementedError

  def prompt(self, item: Item) -> tuple[str, str | None]:
    """(user turn with '<image>' placeholder line, image path or None)."""
    return prompts.with_image(self._text(item), item.image is not None), item.image

  def score(self, items: Sequence[Item], predictions: Sequence[str] | Mapping[str, str]) -> dict:
    raise NotImplementedError

  def _server_files(self, items: Sequence[Item], texts: list[str], out_dir: str) -> list[str]:
    return []

  def write_predictions(self, items: Sequence[Item], predictions: Sequence[str] | Mapping[str, str],
                        out_dir: str) -> list[str]:
    """Writes '<name>_answers.jsonl' (LLaVA answer-file fields) and the official server's format, if any."""
    answers = _as_texts(items, predictions)
    texts = ['' if t is None else t for t in answers]  # the server files need a line per question
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f'{self.name}_answers.jsonl')
    with open(path, 'w', encoding='utf-8') as f:
      for item, answer in zip(items, answers):
        row = {'question_id': item.question_id, 'prompt': self.prompt(item)[0], 'text': answer or ''}
        if 'round_id' in item.extra:
          row['round_id'] = item.extra['round_id']
        if answer is None:
          row['failed'] = True
        f.write(json.dumps(row, ensure_ascii=False) + '\n')
    return [path] + self._server_files(items, texts, out_dir)

  def evaluate(self, items: Sequence[Item], predictions: Sequence[str] | Mapping[str, str], out_dir: str) -> dict:
    """score + write_predictions + '<name>_scores.json'; returns the scores."""
    scores = self.score(items, predictions)
    self.write_predictions(items, predictions, out_dir)
    write_json(scores, os.path.join(out_dir, f'{self.name}_scores.json'))
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Open-ended VQA.


class VQAv2(Benchmark):
  name, description = 'vqav2', 'VQAv2 (10-answer VQA accuracy; test-dev goes to the EvalAI server)'

  def _parse(self, row, image):
    return [self._item(row, image, answer=row.str_list('answers', required=False))]

  def _text(self, item):
    return prompts.short_answer(item.question)

  def score(self, items, predictions):
    texts = _as_texts(items, predictions)
    counts = _counts(items, texts)
    if not any(it.answer for it in items):
      return {'benchmark': self.name, **counts, 'accuracy': None,
              'note': 'no ground-truth answers in the data: submit the server file'}
    scored = [(t, it.answer) for it, t in zip(items, texts) if it.answer and t is not None]
    answers = [a if isinstance(a, list) else [a] for _, a in scored]
    acc = [metrics.vqa_accuracy(t, a) for (t, _), a in zip(scored, answers)]
    return {'benchmark': self.name, **counts, 'n_scored': len(acc),
            'accuracy': _pct(sum(acc) / len(acc)) if acc else None}

  def _server_files(self, items, texts, out_dir):
    rows = [{'question_id': it.question_id, 'answer': metrics.normalize_vqa_answer(t)} for it, t in zip(items, texts)]
    return [write_json(rows, os.path.join(out_dir, f'{self.name}_submission.json'))]


class GQA(VQAv2):
  name, description = 'gqa', 'GQA testdev-balanced (exact match after VQA normalisation)'

  def _parse(self, row, image):
    return [self._item(row, image, answer=row.get('answer', types=str, required=False))]

  def score(self, items, predictions):
    scores = super().score(items, predictions)
    texts = _as_texts(items, predictions)
    # LLaVA's convert_gqa_for_eval.py + GQA's eval.py: prediction.rstrip('.').lower() == answer.
    plain = [t.rstrip('.').lower() == it.answer for it, t in zip(items, texts) if it.answer and t is not None]
    if plain:
      scores['accuracy_gqa_eval'] = _pct(sum(plain) / len(plain))
    return scores

  def _server_files(self, items, texts, out_dir):
    rows = [{'questionId': it.question_id, 'prediction': t.rstrip('.').lower()} for it, t in zip(items, texts)]
    return [write_json(rows, os.path.join(out_dir, f'{self.name}_testdev_balanced_predictions.json'))]


class TextVQA(VQAv2):
  name, description = 'textvqa', 'TextVQA val (10-answer VQA accuracy; OCR-token hint as LLaVA-1.5)'

  def __init__(self, use_ocr_tokens: bool = True):
    self.use_ocr_tokens = use_ocr_tokens

  def _parse(self, row, image):
    ocr = row.get('ocr_tokens', types=list, required=False) or []
    if not all(isinstance(t, str) for t in ocr):
      raise row.error('field "ocr_tokens": expected a list of strings')
    return [self._item(row, image, answer=row.str_list('answers', required=False), extra={'ocr_tokens': ocr})]

  def _text(self, item):
    return prompts.textvqa(item.question, item.extra['ocr_tokens'] if self.use_ocr_tokens else None)


class POPE(Benchmark):
  name, description = 'pope', 'POPE (accuracy, precision, recall, F1, yes-ratio per split; headline = mean F1)'

  def _parse(self, row, image):
    label = row.get('label', 'answer', types=str).strip().lower()
    if label not in ('yes', 'no'):
      raise row.error(f'field "label": expected "yes" or "no", got {label!r}')
    return [self._item(row, image, answer=label, category=row.get('category', types=str))]

  def _text(self, item):
    return prompts.short_answer(item.question)

  def score(self, items, predictions):
    texts = _as_texts(items, predictions)
    splits = defaultdict(lambda: ([], [], [0]))
    for it, t in zip(items, texts):
      preds, labels, failed = splits[it.category]
      if t is None:  # no answer: eval_pope.py would read '' as 'yes'; it is left out and counted instead
        failed[0] += 1
        continue
      preds.append(t)
      labels.append(it.answer)
    per_split = {}
    for split, (preds, labels, failed) in sorted(splits.items()):
      m = metrics.pope_metrics(preds, labels) if preds else {'n': 0}
      per_split[split] = {**{k: (_pct(v) if isinstance(v, float) else v) for k, v in m.items()}, 'n_failed': failed[0]}
    scored = [s for s in per_split.values() if s['n']]
    mean = {k: sum(s[k] for s in scored) / len(scored) if scored else None
            for k in ('f1', 'accuracy', 'precision', 'recall', 'yes_ratio')}
    return {'benchmark': self.name, **_counts(items, texts), 'f1': mean['f1'], 'mean': mean, 'splits': per_split}


def _mme_truth(row: _Row, image: str | None, question: str) -> str:
  """The ground truth MME's own files give when the question file has none (LLaVA's llava_mme.jsonl), found as
  LLaVA's convert_answer_to_mme.py finds it: '<subtask>/questions_answers_YN/<stem>.txt' for a subtask whose
  images are in '<subtask>/images/', else '<subtask>/<stem>.txt'; lines 'question<TAB>Yes|No'."""
  candidates = []
  if image is not None:
    folder, name = os.path.split(image)
    stem = os.path.splitext(name)[0] + '.txt'
    if os.path.basename(folder) == 'images':
      candidates.append(os.path.join(os.path.dirname(folder), 'questions_answers_YN', stem))
    candidates.append(os.path.join(folder, stem))
  for path in candidates:
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        for line in f:
          text, _, answer = line.strip().partition('\t')
          if prompts.strip_instruction(text) == question and answer.strip():
            return answer
      raise row.error(f'no field "answer", and {path} has no line for the question {question!r}')
  raise row.error(f'no field "answer" (or "label"), and no MME ground-truth file {" or ".join(candidates)}: for '
                  f'LLaVA\'s llava_mme.jsonl, pass the MME_Benchmark_release_version folder as the images folder')


class MME(Benchmark):
  name, description = 'mme', 'MME (perception and cognition scores; acc and acc+ per subtask)'
  shared_question_ids = True

  def _parse(self, row, image):
    category = row.get('category', types=str, required=False)
    qid = row.get('question_id', types=(int, str))
    if category in (None, 'default') and isinstance(qid, str) and '/' in qid:
      category = qid.split('/')[0]  # llava_mme.jsonl: 'existence/000000006040.jpg', category 'default'
    if category not in metrics.MME_PERCEPTION + metrics.MME_COGNITION:
      raise row.error(f'field "category": {category!r} is not an MME subtask '
                      f'{list(metrics.MME_PERCEPTION + metrics.MME_COGNITION)}')
    answer = row.get('answer', 'label', types=str, required=False)
    if answer is None:
      answer = _mme_truth(row, image, row.question())
    answer = answer.strip()
    if answer.lower() not in ('yes', 'no'):
      raise row.error(f'field "answer": expected "Yes" or "No", got {answer!r}')
    return [self._item(row, image, answer=answer, category=category)]

  def _text(self, item):
    return prompts.mme(item.question)

  def score(self, items, predictions):
    texts = _as_texts(items, predictions)
    records = [(it.category, it.image or str(it.question_id), it.answer, t) for it, t in zip(items, texts)]
    return {'benchmark': self.name, **_counts(items, texts), **metrics.mme_scores(records)}

  def _server_files(self, items, texts, out_dir):
    # MME's eval_tool input: one '<subtask>.txt' per subtask, 'image<TAB>question<TAB>truth<TAB>answer' lines.
    folder = os.path.join(out_dir, f'{self.name}_results')
    os.makedirs(folder, exist_ok=True)
    lines = defaultdict(list)
    for it, t in zip(items, texts):
      question = it.question if prompts.MME_YES_NO in it.question else f'{it.question} {prompts.MME_YES_NO}'
      lines[it.category].append('\t'.join([os.path.basename(it.image or ''), question, it.answer,
                                           ' '.join(t.split())]))
    paths = []
    for category, rows in sorted(lines.items()):
      paths.append(os.path.join(folder, f'{category}.txt'))
      with open(paths[-1], 'w', encoding='utf-8') as f:
        f.write('\n'.join(rows) + '\n')
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice.


class MultipleChoice(Benchmark):
  """Options listed 'A. ...', answered by letter; accuracy with `metrics.extract_choice`, overall and per category."""
  answer_required = True

  def _parse(self, row, image):
    options = _options(row)
    return [self._item(row, image, answer=_answer_letter(row, len(options), self.answer_required),
                       options=tuple(options), category=row.get('category', 'subject', types=str, required=False))]

  def _text(self, item):
    return prompts.multiple_choice(item.question, item.options)

  def _correct(self, items, texts) -> list[tuple[Item, bool | None, str | None]]:
    """(item, right?, letter read) per item with ground truth; right? is None for a failed item (no answer)."""
    out = []
    for it, t in zip(items, texts):
      if it.answer is None:
        continue
      choice = None if t is None else metrics.extract_choice(t, it.options)
      out.append((it, None if t is None else choice is not None and choice == it.answer, choice))
    return out

  def score(self, items, predictions):
    texts = _as_texts(items, predictions)
    counts = _counts(items, texts)
    graded = self._correct(items, texts)
    if not graded:
      return {'benchmark': self.name, **counts, 'accuracy': None, 'note': 'no ground-truth answers'}
    answered = [g for g in graded if g[1] is not None]
    per_category = defaultdict(list)
    for it, ok, _ in answered:
      if it.category is not None:
        per_category[it.category].append(ok)
    return {'benchmark': self.name, **counts,
            'accuracy': _pct(sum(ok for _, ok, _ in answered) / len(answered)) if answered else None,
            'n_unparsed': sum(choice is None for _, _, choice in answered),
            'categories': {c: _pct(sum(v) / len(v)) for c, v in sorted(per_category.items())}}


class AI2D(MultipleChoice):
  name, description = 'ai2d', 'AI2D test (multiple-choice accuracy)'


class SEEDImage(MultipleChoice):
  name, description = 'seed_image', 'SEED-Bench image questions (multiple-choice accuracy per question type)'

  def _server_files(self, items, texts, out_dir):
    path = os.path.join(out_dir, f'{self.name}_submission.jsonl')  # LLaVA's convert_seed_for_submission.py rows
    with open(path, 'w', encoding='utf-8') as f:
      for it, t in zip(items, texts):
        f.write(json.dumps({'question_id': it.question_id, 'prediction': t}, ensure_ascii=False) + '\n')
    return [path]


class ScienceQAImg(MultipleChoice):
  name, description = 'scienceqa_img', 'ScienceQA test, questions with an image (multiple-choice accuracy)'
  image_optional = True

  def __init__(self, img_only: bool = True):
    self.img_only = img_only

  def _parse(self, row, image):
    if image is None and self.img_only:
      return []
    options = _options(row)
    context = row.get('hint', 'context', types=str, required=False)
    return [self._item(row, image, answer=_answer_letter(row, len(options)), options=tuple(options),
                       category=row.get('subject', 'category', types=str, required=False),
                       extra={'context': context.strip() if context else None})]

  def _text(self, item):
    return prompts.scienceqa(item.question, item.options, item.extra['context'])


class MMBench(MultipleChoice):
  """MMBench with CircularEval: each question is asked once per circular shift of its options (LLaVA's
  --all-rounds), and counts as right only if every shift is answered right."""
  name, description = 'mmbench', 'MMBench (CircularEval accuracy; TSV rows for the submission server)'
  answer_required = False

  def __init__(self, circular: bool = True):
    self.circular = circular

  def _parse(self, row, image):
    options = _options(row)
    answer = _answer_letter(row, len(options), required=False)
    hint = row.get('hint', types=str, required=False)
    hint = None if hint is None or hint.strip().lower() in ('nan', 'none', '') else hint
    qid = row.get('index', 'question_id', types=(int, str))
    keys = prompts.letters(len(options))
    items = []
    for k in range(len(options) if self.circular else 1):
      shifted = options[k:] + options[:k]
      gold = None if answer is None else keys[(keys.index(answer) - k) % len(options)]
      items.append(Item(key=str(qid) if k == 0 else f'{qid}/r{k}', question_id=qid, question=row.question(),
                        image=image, answer=gold, options=tuple(shifted),
                        category=row.get('category', types=str, required=False),
                        extra={'round_id': k, 'hint': hint, 'source_options': tuple(options),
                               'l2_category': row.get('l2-category', 'l2_category', types=str, required=False)}))
    return items

  def _text(self, item):
    return prompts.multiple_choice(item.question, item.options, hint=item.extra['hint'])

  def score(self, items, predictions):
    texts = _as_texts(items, predictions)
    counts = _counts(items, texts)
    graded = self._correct(items, texts)
    if not graded:
      return {'benchmark': self.name, **counts, 'accuracy': None,
              'note': 'no ground-truth answers (test split): submit the TSV to the MMBench server'}
    groups, categories = defaultdict(list), {}
    for it, ok, _ in graded:
      groups[it.question_id].append(ok)
      categories[it.question_id] = it.category
    # CircularEval needs every round: a question with a failed round cannot be judged and is left out.
    judged = {qid: oks for qid, oks in groups.items() if None not in oks}
    per_category = defaultdict(dict)
    for qid, oks in judged.items():
      if categories[qid] is not None:
        per_category[categories[qid]][qid] = oks
    single = [ok for it, ok, _ in graded if it.extra['round_id'] == 0 and ok is not None]
    return {'benchmark': self.name, **counts, 'n_questions': len(groups),
            'n_failed_questions': len(groups) - len(judged),
            'accuracy': _pct(metrics.circular_accuracy(judged)) if judged else None, 'circular': self.circular,
            'accuracy_single_pass': _pct(sum(single) / len(single)) if single else None,
            'n_unparsed': sum(choice is None for _, ok, choice in graded if ok is not None),
            'categories': {c: _pct(metrics.circular_accuracy(g)) for c, g in sorted(per_category.items())}}

  def _server_files(self, items, texts, out_dir):
    # The columns LLaVA's convert_mmbench_for_submission.py keeps, one row per question (its first round).
    first = [(it, t) for it, t in zip(items, texts) if it.extra['round_id'] == 0]
    n_opt = max(len(it.options) for it, _ in first)
    keys = prompts.letters(n_opt)
    has_answer = any(it.answer is not None for it, _ in first)
    header = ['index', 'question', *keys, 'prediction'] + (['answer'] if has_answer else []) + ['category']
    path = os.path.join(out_dir, f'{self.name}_submission.tsv')
    with open(path, 'w', encoding='utf-8', newline='') as f:
      writer = csv.writer(f, delimiter='\t')
      writer.writerow(header)
      for it, t in first:
        opts = list(it.extra['source_options']) + [''] * (n_opt - len(it.options))
        writer.writerow([it.question_id, it.question, *opts, t] + ([it.answer or ''] if has_answer else [])
                        + [it.category or ''])
    return [path]


class MMMU(Benchmark):
  name, description = 'mmmu', 'MMMU validation (multiple-choice and open questions, parsed as MMMU eval_utils)'
  image_optional = True

  def __init__(self, seed: int = 42):
    self.seed = seed  # MMMU's unparseable multiple-choice answers become a random choice; seeded here

  def _parse(self, row, image):
    qtype = row.get('question_type', types=str)
    if qtype not in ('multiple-choice', 'open'):
      raise row.error(f'field "question_type": expected "multiple-choice" or "open", got {qtype!r}')
    options = row.str_list('options') if qtype == 'multiple-choice' else []  # open questions carry '[]'
    answer = row.get('answer', types=(str, list))
    if isinstance(answer, str) and answer.startswith('['):
      try:
        answer = ast.literal_eval(answer)
      except (ValueError, SyntaxError):
        pass
    if qtype == 'multiple-choice':
      answer = _answer_letter(row, len(options))
    qid = row.get('question_id', 'id', types=(int, str))
    subject = row.get('subject', types=str, required=False)
    if subject is None and isinstance(qid, str) and qid.count('_') >= 2:
      subject = qid.split('_', 1)[1].rsplit('_', 1)[0]  # 'validation_Art_Theory_12' -> 'Art_Theory'
    return [self._item(row, image, answer=answer, options=tuple(options) if qtype == 'multiple-choice' else (),
                       category=subject, extra={'question_type': qtype})]

  def _text(self, item):
    return prompts.mmmu(item.question, item.options, item.extra['question_type'])

  def _parsed(self, items, texts) -> list:
    rng = random.Random(self.seed)
    out = []
    for it, t in zip(items, texts):
      if it.extra['question_type'] == 'multiple-choice':
        choices = prompts.letters(len(it.options))
        out.append(metrics.mmmu_parse_multi_choice(t, choices, dict(zip(choices, it.options)), rng))
      else:
        out.append(metrics.mmmu_parse_open(t))
    return out

  def score(self, items, predictions):
    texts = _as_texts(items, predictions)
    counts = _counts(items, texts)
    answered = [(it, t) for it, t in zip(items, texts) if t is not None]
    items, texts = [it for it, _ in answered], [t for _, t in answered]
    per_subject = defaultdict(list)
    oks = []
    for it, parsed in zip(items, self._parsed(items, texts)):
      if it.extra['question_type'] == 'multiple-choice':
        ok = metrics.mmmu_eval_multi_choice(it.answer, parsed)
      else:
        ok = metrics.mmmu_eval_open(it.answer, parsed)
      oks.append(ok)
      per_subject[it.category or 'unknown'].append(ok)
    return {'benchmark': self.name, **counts, 'accuracy': _pct(sum(oks) / len(oks)) if oks else None,
            'subjects': {s: {'n': len(v), 'accuracy': _pct(sum(v) / len(v))} for s, v in sorted(per_subject.items())}}

  def _server_files(self, items, texts, out_dir):
    # MMMU's submission: {id: parsed letter for multiple choice, raw answer for open questions}.
    out = {str(it.question_id): (p if it.extra['question_type'] == 'multiple-choice' else t)
           for it, t, p in zip(items, texts, self._parsed(items, texts))}
    return [write_json(out, os.path.join(out_dir, f'{self.name}_submission.json'))]


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    VQAv2(), GQA(), TextVQA(), POPE(), MME(), MMBench(), SEEDImage(), ScienceQAImg(), AI2D(), MMMU())}


def get_benchmark(name: str) -> Benchmark:
  """The registered benchmark called `name`; an unknown name raises KeyError listing the known ones."""
  if name not in BENCHMARKS:
    raise KeyError(f'unknown benchmark {name!r}; known benchmarks: {sorted(BENCHMARKS)}')
  return BENCHMARKS[name]
