"""Official benchmark metrics, re-implemented from the reference evaluation code.

Each function names the code it reproduces; quirks of that code are kept (and commented) so that our numbers equal
the published ones:

  normalize_vqa_answer / vqa_accuracy   EvalAIAnswerProcessor and TextVQAAccuracyEvaluator of LLaVA's
                                        llava/eval/m4c_evaluator.py (from MMF; the VQA challenge's vqaEval.py rules)
  pope_parse / pope_metrics             LLaVA's llava/eval/eval_pope.py
  mme_parse / mme_scores                MME's eval_tool/calculation.py
  extract_choice                        option-letter extraction for MMBench / SEED / ScienceQA / AI2D: LLaVA's
                                        eval_science_qa.py and eval_mmbench.py auto_parse_answer rules, extended
  mmmu_*                                MMMU's mmmu/utils/eval_utils.py (parse_multi_choice_response,
                                        parse_open_response, eval_multi_choice, eval_open)
"""

from __future__ import annotations

import random
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from moiie_jax.evaluate.prompts import letters

# ----------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (EvalAI) and the 10-answer VQA accuracy.

_CONTRACTIONS_TABLE = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've
I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am
mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at
shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd
someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
somethingd've:something'd've something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've
they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've
we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's
whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll
whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll
youre:you're youve:you've
"""
# The official table maps the apostrophe-less forms to the written forms ("somebody'd" -> "somebodyd" included).
CONTRACTIONS = dict(pair.split(':', 1) for pair in _CONTRACTIONS_TABLE.split())
NUMBER_MAP = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
              'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = ('a', 'an', 'the')
# '(?!<=\d)' is the official code's typo for a lookbehind; as written it never blocks a match. Kept on purpose.
_PERIOD_STRIP = re.compile(r'(?!<=\d)(\.)(?!\d)')
_COMMA_STRIP = re.compile(r'(?<=\d)(\,)+(?=\d)')
_PUNCTUATIONS = (';', r'/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
                 '?', '!')


def _process_punctuation(text: str) -> str:
  out = text
  for p in _PUNCTUATIONS:
    # A mark next to a space is dropped; one inside a word becomes a space ("t-shirt" -> "t shirt"), except
    # when the text has a digit-comma-digit group ("1,000"), where every mark is dropped.
    if (p + ' ' in text or ' ' + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  # The official code passes re.UNICODE (= 32) as sub's positional `count`: at most 32 periods are stripped.
  return _PERIOD_STRIP.sub('', out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
  words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return ' '.join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
  """EvalAI answer processing: lower case, punctuation, digit words -> digits, articles, contractions."""
  answer = answer.lower().replace(',', '').replace('?', '').replace("'s", " 's").strip()
  answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
  return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy of one prediction against its human answers, both normalised by `normalize_vqa_answer`.

  With 10 answers (VQAv2, TextVQA): min(1, #matches / 3) averaged over the 10 leave-one-out subsets of 9 answers, as
  TextVQAAccuracyEvaluator / vqaEval.py compute it. Otherwise (GQA's single answer): exact match with any answer.
  """
  if not answers:
    raise ValueError('vqa_accuracy: no ground-truth answers')
  pred = normalize_vqa_answer(prediction)
  gts = [normalize_vqa_answer(a) for a in answers]
  if len(gts) != 10:
    return float(pred in gts)
  accs = []
  for i in range(len(gts)):
    matches = sum(1 for j, gt in enumerate(gts) if j != i and gt == pred)
    accs.append(min(1.0, matches / 3))
  return sum(accs) / len(accs)


# ----------------------------------------------------------------------------------------------------------------
# POPE (LLaVA eval_pope.py).


def pope_parse(text: str) -> str:
  """'yes' or 'no' as eval_pope.py reads it: first sentence, commas removed, 'No'/'no'/'not' as a word -> 'no'."""
  if '.' in text:
    text = text.split('.')[0]
  words = text.replace(',', '').split(' ')
  return 'no' if ('No' in words or 'not' in words or 'no' in words) else 'yes'


def _safe_div(a: float, b: float) -> float:
  return a / b if b else 0.0


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
  """Accuracy, precision, recall, F1 (positive = 'yes') and yes-ratio of raw answers against 'yes'/'no' labels."""
  if len(predictions) != len(labels):
    raise ValueError(f'pope_metrics: {len(predictions)} predictions for {len(labels)} labels')
  preds = [pope_parse(p) == 'yes' for p in predictions]
  gts = [str(l).strip().lower() != 'no' for l in labels]  # eval_pope.py: any label other than 'no' is positive
  tp = sum(p and g for p, g in zip(preds, gts))
  fp = sum(p and not g for p, g in zip(preds, gts))
  tn = sum(not p and not g for p, g in zip(preds, gts))
  fn = sum(not p and g for p, g in zip(preds, gts))
  precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
  return {'n': len(preds), 'TP': tp, 'FP': fp, 'TN': tn, 'FN': fn,
          'accuracy': _safe_div(tp + tn, len(preds)), 'precision': precision, 'recall': recall,
          'f1': _safe_div(2 * precision * recall, precision + recall), 'yes_ratio': _safe_div(sum(preds), len(preds))}


# ----------------------------------------------------------------------------------------------------------------
# MME (eval_tool/calculation.py).

MME_PERCEPTION = ('existence', 'count', 'position', 'color', 'posters', 'celebrity', 'scene', 'landmark', 'artwork',
                  'OCR')
MME_COGNITION = ('commonsense_reasoning', 'numerical_calculation', 'text_translation', 'code_reasoning')


def mme_parse(text: str) -> str:
  """'yes', 'no' or 'other': the whole lower-cased answer, else 'yes'/'no' inside its first 4 characters."""
  text = text.strip().lower()
  if text in ('yes', 'no'):
    return text
  prefix = text[:4]
  if 'yes' in prefix:
    return 'yes'
  if 'no' in prefix:
    return 'no'
  return 'other'


def mme_scores(records: Iterable[tuple[str, str, str, str | None]]) -> dict:
  """MME scores from (subtask, image, ground truth 'Yes'/'No', raw answer) records.

  Per subtask: acc = share of questions right ('other' is wrong), acc_plus = share of images whose questions (two
  per image) are all right, score = 100 * acc + 100 * acc_plus. perception / cognition = sums over the 10 / 4
  subtasks present; `missing_subtasks` lists the absent ones. A record whose answer is None (the item failed: no
  answer) is left out of acc, its image out of acc_plus, and counted in `n_failed`; a subtask left with nothing to
  score has score None and counts as missing.
  """
  per_task: dict[str, dict[str, list[bool | None]]] = {}
  for task, image, gt, pred in records:
    if task not in MME_PERCEPTION + MME_COGNITION:
      raise ValueError(f'MME subtask {task!r}: expected one of {list(MME_PERCEPTION + MME_COGNITION)}')
    gt = gt.strip().lower()
    if gt not in ('yes', 'no'):
      raise ValueError(f'MME ground truth {gt!r} for {task}/{image}: expected Yes or No')
    per_task.setdefault(task, {}).setdefault(image, []).append(None if pred is None else mme_parse(pred) == gt)
  subtasks = {}
  for task, images in per_task.items():
    flat = [c for answers in images.values() for c in answers if c is not None]
    complete = [answers for answers in images.values() if None not in answers]
    acc = sum(flat) / len(flat) if flat else None
    acc_plus = sum(all(answers) for answers in complete) / len(complete) if complete else None
    subtasks[task] = {'acc': acc, 'acc_plus': acc_plus,
                      'score': None if acc is None or acc_plus is None else 100 * acc + 100 * acc_plus,
                      'n_questions': len(flat), 'n_images': len(complete),
                      'n_failed': sum(c is None for answers in images.values() for c in answers),
                      'n_unpaired_images': sum(len(a) != 2 for a in images.values())}
  scored = {t for t, v in subtasks.items() if v['score'] is not None}
  return {'perception': sum(subtasks[t]['score'] for t in MME_PERCEPTION if t in scored),
          'cognition': sum(subtasks[t]['score'] for t in MME_COGNITION if t in scored),
          'subtasks': subtasks, 'n_failed': sum(v['n_failed'] for v in subtasks.values()),
          'missing_subtasks': [t for t in MME_PERCEPTION + MME_COGNITION if t not in scored]}


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice: option letter extraction (MMBench, SEED, ScienceQA, AI2D).


def _norm_text(text: str) -> str:
  return ' '.join(re.sub(r'[^\w\s]', ' ', text.lower()).split())


def extract_choice(response: str, options: Sequence[str]) -> str | None:
  """The option letter a free-form answer names, or None.

  In order: a bare letter ('B', 'b', 'B.', '(B)'); a leading letter with a delimiter ('B. text', '(B) text',
  'B) text', 'B: text'); an answer phrase ('The answer is B', 'Answer: (B)', the last one wins); the option text
  (equal to one option, or containing exactly one option's text, the longest when nested, or contained in exactly
  one option, as eval_mmbench.py's auto_parse_answer); a single distinct '(B)' anywhere.
  """
  keys = letters(len(options))
  text = response.strip()
  if not text:
    return None
  bare = re.sub(r'^[(\[]\s*|\s*[)\]]$', '', text.strip('.').strip()).upper()
  if bare in keys:
    return bare
  m = re.match(r'^[(\[]?([A-Z])[)\].:](?:\s|$)', text)
  if m and m.group(1) in keys:
    return m.group(1)
  phrase = re.findall(r'(?i:answer)\s*(?:(?i:is)\s*)?:?\s*(?:(?i:option)\s*)?[(\[]?([A-Z])(?![A-Za-z])', text)
  phrase = [k for k in phrase if k in keys]
  if phrase:
    return phrase[-1]
  resp = _norm_text(text)
  opts = [_norm_text(str(o)) for o in options]
  exact = [k for k, o in zip(keys, opts) if o and o == resp]
  if len(exact) == 1:
    return exact[0]
  inside = [(len(o), k) for k, o in zip(keys, opts) if o and re.search(rf'\b{re.escape(o)}\b', resp)]
  if inside:
    longest = max(n for n, _ in inside)
    top = [k for n, k in inside if n == longest]
    if len(top) == 1:
      return top[0]
  containing = [k for k, o in zip(keys, opts) if resp and resp in o]
  if len(containing) == 1:
    return containing[0]
  bracketed = sorted(set(re.findall(r'\(([A-Z])\)', text)) & set(keys))
  if len(bracketed) == 1:
    return bracketed[0]
  return None


def circular_accuracy(groups: Mapping[object, Sequence[bool]]) -> float:
  """MMBench CircularEval: a question counts as right only if every circular shift of its options was right."""
  if not groups:
    raise ValueError('circular_accuracy: no questions')
  return sum(all(v) for v in groups.values()) / len(groups)


# ----------------------------------------------------------------------------------------------------------------
# MMMU (mmmu/utils/eval_utils.py).


def mmmu_parse_multi_choice(response: str, all_choices: Sequence[str], index2ans: Mapping[str, str],
                            rng: random.Random | None = None) -> str:
  """MMMU's parse_multi_choice_response: '(A)' marks, then ' A ' tokens, then option text in a >5-word answer;
  the last-mentioned candidate wins; no candidate -> a random choice (from `rng`, seeded for reproducibility)."""
  for char in (',', '.', '!', '?', ';', ':', "'"):
    response = response.strip(char)
  response = ' ' + response + ' '  # spaces avoid partial matches
  index_ans, ans_with_brack, candidates = True, False, []
  for choice in all_choices:
    if f'({choice})' in response:
      candidates.append(choice)
      ans_with_brack = True
  if not candidates:
    for choice in all_choices:
      if f' {choice} ' in response:
        candidates.append(choice)
  if not candidates and len(response.split()) > 5:
    for index, ans in index2ans.items():
      if ans.lower() in response.lower():
        candidates.append(index)
        index_ans = False
  if not candidates:
    return (rng or random.Random(0)).choice(list(all_choices))
  if len(candidates) == 1:
    return candidates[0]
  if index_ans and ans_with_brack:
    starts = [response.rfind(f'({c})') for c in candidates]
  elif index_ans:
    starts = [response.rfind(f' {c} ') for c in candidates]
  else:
    starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
  return candidates[int(np.argmax(starts))]


def mmmu_check_is_number(string: str) -> bool:
  try:
    float(string.replace(',', ''))
    return True
  except ValueError:
    return False


def mmmu_normalize_str(string: str) -> list:
  """A number becomes [float rounded to 2 decimals]; a string is lower-cased, one character padded by a space
  on either side to avoid trivial matches."""
  string = string.strip()
  if mmmu_check_is_number(string):
    return [round(float(string.replace(',', '')), 2)]
  string = string.lower()
  if len(string) == 1:
    return [' ' + string, string + ' ']
  return [string]


def mmmu_extract_numbers(string: str) -> list[str]:
  """Numbers with thousands commas, in scientific notation, and plain (in that order), as strings."""
  pattern_commas = r'-?\b\d{1,3}(?:,\d{3})+\b'
  pattern_scientific = r'-?\d+(?:\.\d+)?[eE][+-]?\d+'
  pattern_simple = r'-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])'
  return re.findall(pattern_commas, string) + re.findall(pattern_scientific, string) + re.findall(pattern_simple,
                                                                                                 string)


def mmmu_parse_open(response: str) -> list:
  """MMMU's parse_open_response: the shortest tail after an indicator ('is ', 'so ', 'answer ', ... and '=' in the
  last sentence) per sentence, plus every number in those tails, all normalised by `mmmu_normalize_str`."""
  response = response.strip().strip('.').lower()
  # The official split looks for '. ' before an upper-case letter on the lower-cased text, so in effect only
  # newlines split. Kept as is.
  sub_responses = re.split(r'\.\s(?=[A-Z])|\n', response)
  indicators = ['could be ', 'so ', 'is ', 'thus ', 'therefore ', 'final ', 'answer ', 'result ']
  key_responses = []
  for index, resp in enumerate(sub_responses):
    if index == len(sub_responses) - 1:
      indicators = indicators + ['=']  # the last sentence may be just an equation
    shortest = None
    for indicator in indicators:
      if indicator in resp:
        tail = resp.split(indicator)[-1].strip()
        if not shortest or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest.strip() not in (':', ',', '.', '!', '?', ';', "'"):
      key_responses.append(shortest)
  if not key_responses:
    key_responses = [response]
  pred_list = list(key_responses)
  for resp in key_responses:
    pred_list.extend(mmmu_extract_numbers(resp))
  normalized = []
  for pred in pred_list:
    normalized.extend(mmmu_normalize_str(pred))
  return list(dict.fromkeys(normalized))  # de-duplicated (the official set(); order does not change the result)


def mmmu_eval_multi_choice(gold: str | Sequence[str], pred: str) -> bool:
  """Exact letter match (any of several golds)."""
  golds = [gold] if isinstance(gold, str) else list(gold)
  return pred in golds


def mmmu_eval_open(gold: str | Sequence[str], pred_list: Sequence) -> bool:
  """A parsed number equal to a normalised gold number, or a normalised gold string inside a parsed string."""
  golds = [gold] if isinstance(gold, str) else list(gold)
  norm_answers = []
  for answer in golds:
    norm_answers.extend(mmmu_normalize_str(str(answer)))
  for pred in pred_list:
    if isinstance(pred, str):
      if any(isinstance(a, str) and a in pred for a in norm_answers):
        return True
    elif pred in norm_answers:
      return True
  return False
