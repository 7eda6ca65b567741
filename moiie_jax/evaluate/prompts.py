"""Benchmark questions phrased as the LLaVA-1.5 / Bunny (MoIIE) evaluation scripts phrase them.

The strings are the ones in LLaVA's question files and eval scripts (`llava/eval/model_vqa_loader.py` question
files, `model_vqa_mmbench.py`, `model_vqa_science.py --single-pred-prompt`) and in MMMU's `configs/llava1.5.yaml`.
Every builder returns the user turn only: `<image>\\n` + question + instruction. The chat template (system
prompt, `USER:`/`ASSISTANT:`) is applied by the caller, as `conv.get_prompt()` does in LLaVA.

  VQAv2, GQA, POPE   '{question}\\nAnswer the question using a single word or phrase.'
  MME                as above, with MME's own ' Please answer yes or no.' removed (LLaVA's llava_mme.jsonl; its
                     convert_answer_to_mme.py adds it back to look up the ground truth)
  TextVQA            '{question}\\nReference OCR token: {t1}, {t2}, ...\\nAnswer the question using a single word or
                     phrase.' (LLaVA's llava_textvqa_val_v051_ocr.jsonl; the OCR line is left out without tokens)
  MMBench            '{hint}\\n{question}\\nA. {a}\\nB. {b}...\\nAnswer with the option's letter from the given
                     choices directly.' (the hint line only when there is a hint)
  SEED, AI2D         '{question}\\nA. {a}\\nB. {b}...\\nAnswer with the option's letter ...'
  ScienceQA          'Context: {hint}\\n{question}\\nA. {a}...\\nAnswer with the option's letter ...' (the context
                     line only when the problem has a hint)
  MMMU               multiple choice '{question}\\n(A) {a}\\n(B) {b}\\n\\nAnswer with the option's letter from the
                     given choices directly.'; open '{question}\\nAnswer the question using a single word or
                     phrase.' (MMMU's construct_prompt with the llava1.5.yaml formats)
"""

from __future__ import annotations

from typing import Sequence

IMAGE_TOKEN = '<image>'
SHORT_ANSWER = 'Answer the question using a single word or phrase.'
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
MME_YES_NO = 'Please answer yes or no.'
OCR_PREFIX = 'Reference OCR token: '
# MMMU's llava1.5.yaml formats: YAML folds its blank lines into these single newlines.
MMMU_MULTI_CHOICE_FORMAT = '{}\n{}\n' + OPTION_LETTER
MMMU_OPEN_FORMAT = '{}\n' + SHORT_ANSWER

# Instructions a LLaVA question file may already carry at the end of its `text`; stripped on load so that a
# question is never asked with its instruction twice.
KNOWN_INSTRUCTIONS = (SHORT_ANSWER, OPTION_LETTER, MME_YES_NO)


def letters(n: int) -> list[str]:
  """The option letters 'A', 'B', ... for n options."""
  if not 0 < n <= 26:
    raise ValueError(f'a multiple-choice question needs 1 to 26 options, got {n}')
  return [chr(ord('A') + i) for i in range(n)]


def strip_instruction(text: str) -> str:
  """Removes trailing instructions (and a leading `<image>` line) that LLaVA question files embed in `text`."""
  text = text.strip()
  if text.startswith(IMAGE_TOKEN):
    text = text[len(IMAGE_TOKEN):].strip()
  changed = True
  while changed:
    changed = False
    for instruction in KNOWN_INSTRUCTIONS:
      if text.endswith(instruction):
        text = text[:-len(instruction)].rstrip()
        changed = True
  return text


def with_image(text: str, has_image: bool) -> str:
  """Puts the image placeholder on its own line before the text, as LLaVA's eval scripts do."""
  return f'{IMAGE_TOKEN}\n{text}' if has_image else text


def format_options(options: Sequence[str], style: str = 'dot') -> str:
  """'A. x\\nB. y' (LLaVA style, no trailing newline) or '(A) x\\n(B) y\\n' (MMMU style, trailing newline)."""
  keys = letters(len(options))
  if style == 'dot':
    return '\n'.join(f'{k}. {o}' for k, o in zip(keys, options))
  if style == 'paren':
    return ''.join(f'({k}) {o}\n' for k, o in zip(keys, options))
  raise ValueError(f'format_options style={style!r}: expected "dot" or "paren"')


def short_answer(question: str) -> str:
  """VQAv2 / GQA / POPE: open question answered with one word or phrase."""
  return f'{question}\n{SHORT_ANSWER}'


def mme(question: str) -> str:
  """MME: the yes/no question without MME's own 'Please answer yes or no.', then the short-answer line."""
  question = question.replace(MME_YES_NO, '').strip()
  return f'{question}\n{SHORT_ANSWER}'


def textvqa(question: str, ocr_tokens: Sequence[str] | None = None) -> str:
  """TextVQA, with the OCR reference line of LLaVA's `_ocr` question file when tokens are given."""
  if ocr_tokens:
    return f'{question}\n{OCR_PREFIX}{", ".join(ocr_tokens)}\n{SHORT_ANSWER}'
  return f'{question}\n{SHORT_ANSWER}'


def multiple_choice(question: str, options: Sequence[str], hint: str | None = None,
                    hint_prefix: str = '') -> str:
  """MMBench / SEED / AI2D / ScienceQA: optional hint line, question, 'A. ...' lines, letter instruction."""
  text = question
  if hint:
    text = f'{hint_prefix}{hint}\n{text}'
  return f'{text}\n{format_options(options)}\n{OPTION_LETTER}'


def scienceqa(question: str, options: Sequence[str], context: str | None = None) -> str:
  """ScienceQA: 'Context: {hint}' line (only with a hint), question, options, letter instruction."""
  return multiple_choice(question, options, hint=context, hint_prefix='Context: ')


def mmmu(question: str, options: Sequence[str], question_type: str) -> str:
  """MMMU: MMMU's construct_prompt with the LLaVA-1.5 formats; `question_type` is 'multiple-choice' or 'open'."""
  if question_type == 'multiple-choice':
    return MMMU_MULTI_CHOICE_FORMAT.format(question, format_options(options, style='paren'))
  if question_type == 'open':
    return MMMU_OPEN_FORMAT.format(question)
  raise ValueError(f'MMMU question_type={question_type!r}: expected "multiple-choice" or "open"')
