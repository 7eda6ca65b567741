"""Resumable answer files: answers are appended a batch at a time, so a killed run keeps them and a rerun goes on.

`python -m moiie_jax.generate --batch` and `python -m moiie_jax.evaluate` both ask their items through
`answer_in_batches`, which appends one JSON line per finished item to an answers file and flushes and syncs it
after every batch. A rerun reads the file back with `read_answers` (a last line that a kill cut short is dropped,
and that item asked again) and asks only the items without a line. `check_run` keeps the settings that produced
the file next to it and refuses to resume with other ones (another checkpoint, template or sampling setting), so
one file never mixes two runs.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Sequence, TypeVar

from moiie_jax.infer.generate import Generator, Prompt, Result, SamplingConfig

T = TypeVar('T')


class AnswerFileError(ValueError):
  """An answers file is unreadable or was written by a different run; the message names the file."""


def read_answers(path: str, key: str = 'key') -> dict[str, dict]:
  """str(row[key]) -> row for every line of an answers file (missing file: empty); a later line for the same key
  replaces an earlier one (an item asked again).

  A last line cut short by a kill is removed from the file, so that appending goes on from a clean line end; a
  bad line elsewhere is an error naming it.
  """
  if not os.path.isfile(path):
    return {}
  with open(path, 'rb') as f:
    data = f.read()
  good_end = data.rfind(b'\n') + 1
  if good_end < len(data):  # an unterminated (partial) last line
    with open(path, 'r+b') as f:
      f.truncate(good_end)
    data = data[:good_end]
  out = {}
  for lineno, line in enumerate(data.decode('utf-8').splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      value = row[key]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise AnswerFileError(f'{path}, line {lineno}: not an answers line with a {key!r} ({e}); use another output '
                            f'file, or delete this one to start over') from None
    out[str(value)] = row
  return out


def check_run(info_path: str, run_info: dict, resumed: bool, answers_path: str) -> None:
  """Refuses to resume `answers_path` if `info_path` records other settings; then records `run_info` there.

  run_info values must survive JSON unchanged (lists, not tuples) to compare equal on the next run.
  """
  if os.path.isfile(info_path) and resumed:
    with open(info_path) as f:
      old = json.load(f)
    diff = sorted(k for k in run_info if old.get(k) != run_info[k])
    if diff:
      raise AnswerFileError(
          f'{answers_path}: holds answers of a different run (differs in {diff}: '
          f'{ {k: old.get(k) for k in diff} } vs { {k: run_info[k] for k in diff} }); write to another file, or '
          f'delete it to start over')
  os.makedirs(os.path.dirname(os.path.abspath(info_path)), exist_ok=True)
  with open(info_path, 'w') as f:
    json.dump(run_info, f, indent=2, sort_keys=True)


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
  """A tqdm bar on stderr (stdout stays for results)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=desc, unit='q', disable=not enabled, file=sys.stderr,
              dynamic_ncols=True)


def answer_in_batches(generator: Generator, todo: Sequence[T], path: str, *,
                      prompt_of: Callable[[T], tuple[Prompt | None, str]],
                      row_of: Callable[[T, Result | None], dict], max_new_tokens: int, sampling: SamplingConfig,
                      total: int | None = None, desc: str = 'answers', progress: bool = True) -> list[dict]:
  """Asks `todo` in batches of `generator.batch_size`, appending `row_of(item, result)` per item to `path` and
  syncing the file after each batch; returns the rows written.

  prompt_of(item) -> (Prompt, name for error messages), or (None, _) for an item that already failed (then
  row_of(item, None) records it without asking). total: the bar's length (the items answered in earlier runs
  show as done).
  """
  total = len(todo) if total is None else total
  rows = []
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  b = generator.batch_size
  with open(path, 'a', encoding='utf-8') as f, progress_bar(total, total - len(todo), desc, progress) as bar:
    for start in range(0, len(todo), b):
      chunk = todo[start:start + b]
      asked = [(it, *prompt_of(it)) for it in chunk]
      ask = [(prompt, name) for _, prompt, name in asked if prompt is not None]
      # batch_offset: each batch samples with its own key, as one generate_results call over everything would.
      results = iter(generator.generate_results([p for p, _ in ask], max_new_tokens, sampling,
                                                names=[n for _, n in ask], batch_offset=start // b) if ask else [])
      for it, prompt, _ in asked:
        row = row_of(it, next(results) if prompt is not None else None)
        rows.append(row)
        f.write(json.dumps(row, ensure_ascii=False) + '\n')
      f.flush()
      os.fsync(f.fileno())
      bar.update(len(chunk))
  return rows
