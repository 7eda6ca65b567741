"""Running a model over a data set: benchmark answering (resumable) and routing statistics.

`run_benchmark` asks every question of a benchmark in batches (greedy, deterministic) and appends each answer, or
the error that kept an item from being answered, to `<out>/<name>_predictions.jsonl` as soon as its batch is done,
so a restarted run skips what is already there (moiie_jax/infer/answers.py, shared with `generate --batch`). It
then scores the answers with the benchmark's metric, failed items left out and counted, and writes the answer
file, the server-format file(s) and `<name>_scores.json` (`Benchmark.evaluate`'s files). `<out>/<name>_run.json`
records what produced the predictions; resuming with a different checkpoint, data file or generation setting is
refused rather than mixing two runs.

`collect_routing` runs the model's forward pass over prompts (plus reference answers) and sums, per MoE layer and
modality, the top-k slots and routing weight each expert received (`MoEStats.tokens_per_expert` /
`weight_per_expert`), for `evaluate.routing.summarize`.

L MoE layers, M = 2 modalities (text, image), E experts, B batch, T tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moiie_jax.evaluate import benchmarks
from moiie_jax.evaluate import routing as routing_lib
from moiie_jax.infer import answers
from moiie_jax.infer.generate import Generator, Prompt, PromptError, SamplingConfig, bucket_length, left_pad


RunError = answers.AnswerFileError  # the output folder holds another run's predictions, or an unreadable file


@dataclasses.dataclass
class RunSummary:
  scores: dict
  n_items: int
  n_new: int  # answered (or failed) in this run
  n_resumed: int  # found in the predictions file
  n_errors: int  # items without an answer (all runs)
  files: list[str]


def predictions_path(out_dir: str, bench_name: str) -> str:
  return os.path.join(out_dir, f'{bench_name}_predictions.jsonl')


def run_benchmark(generator: Generator, bench: benchmarks.Benchmark, items: Sequence[benchmarks.Item],
                  out_dir: str, *, max_new_tokens: int = 128, run_info: dict | None = None, progress: bool = True,
                  retry_errors: bool = False) -> RunSummary:
  """Answers every item (resuming from `out_dir`), scores, and writes the result files.

  Items whose prompt cannot be built or whose image is missing/unreadable are recorded with an "error"; they are
  left out of the metric and counted as failed (`n_failed` in the scores). `retry_errors` asks them again on a
  rerun.
  """
  if not items:
    raise ValueError(f'{bench.name}: no items to evaluate')
  os.makedirs(out_dir, exist_ok=True)
  path = predictions_path(out_dir, bench.name)
  done = answers.read_answers(path)
  keys = {it.key for it in items}
  stale = sorted(set(done) - keys)
  if stale:
    raise RunError(f'{path}: holds answers for {len(stale)} items not in this data file (e.g. key {stale[0]!r}); '
                   f'use another --out for another data file')
  if retry_errors:
    done = {k: v for k, v in done.items() if 'error' not in v}
  answers.check_run(os.path.join(out_dir, f'{bench.name}_run.json'),
                    {**(run_info or {}), 'benchmark': bench.name, 'max_new_tokens': max_new_tokens},
                    resumed=bool(done), answers_path=path)
  todo = [it for it in items if it.key not in done]
  n_resumed = len(items) - len(todo)

  def prompt_of(it):
    text, image = bench.prompt(it)
    return Prompt(text=text, image=image), f'{bench.name} question_id {it.question_id!r}'

  def row_of(it, r):
    return {'key': it.key, 'question_id': it.question_id, **({'text': r.text} if r.error is None else
                                                             {'error': r.error})}

  t0 = time.time()
  for row in answers.answer_in_batches(generator, todo, path, prompt_of=prompt_of, row_of=row_of,
                                       max_new_tokens=max_new_tokens, sampling=SamplingConfig(), total=len(items),
                                       desc=bench.name, progress=progress):
    done[row['key']] = row
  elapsed = time.time() - t0
  errors = {k: done[k]['error'] for k in (it.key for it in items) if 'error' in done[k]}
  # None marks a failed item: the benchmark leaves it out of its metric and counts it (n_failed).
  predictions = {it.key: None if 'error' in done[it.key] else done[it.key].get('text', '') for it in items}
  scores = bench.score(items, predictions)
  scores.update({'errors': dict(list(errors.items())[:20]), 'n_new': len(todo), 'n_resumed': n_resumed,
                 'seconds': round(elapsed, 2), **({'run': run_info} if run_info else {})})
  files = bench.write_predictions(items, predictions, out_dir)
  files.append(benchmarks.write_json(scores, os.path.join(out_dir, f'{bench.name}_scores.json')))
  return RunSummary(scores=scores, n_items=len(items), n_new=len(todo), n_resumed=n_resumed,
                    n_errors=len(errors), files=[path] + files)


# ------------------------------------------------------------------------------------------------ routing
@dataclasses.dataclass(frozen=True)
class RoutingItem:
  """One sequence for routing analysis: a question (with `<image>` or an image path), optional reference answer."""
  name: str
  question: str
  image: str | None = None
  answer: str | None = None


def read_routing_items(path: str, images_dir: str, benchmark: str | None = None) -> list[RoutingItem]:
  """Items from a benchmark data file (`benchmark` given: its prompts and its reference answers), a LLaVA
  conversation file (.json list or .jsonl, first turn), or a JSONL of {"image", "question"|"text"|"prompt",
  "answer"?}."""
  if benchmark is not None:
    bench = benchmarks.get_benchmark(benchmark)
    out = []
    for it in bench.load(path, images_dir, check_images=False):
      text, image = bench.prompt(it)
      # The first reference answer (VQA lists ten); multiple choice keeps the letter the model is asked for.
      answer = it.answer[0] if isinstance(it.answer, (list, tuple)) and it.answer else it.answer
      out.append(RoutingItem(f'{bench.name} question_id {it.question_id!r}', text, image,
                             answer if isinstance(answer, str) else None))
    return out
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data file {path!r} does not exist')
  with open(path, encoding='utf-8') as f:
    head = f.read(1)
  if head == '[':
    from moiie_jax.data import records  # pylint: disable=g-import-not-at-top
    try:
      convs = records.read_records(path)
    except (ValueError, OSError) as e:
      raise benchmarks.BenchmarkDataError(f'{path}: {e}') from e
    return [RoutingItem(f'record {c.id!r}', c.turns[0][0], os.path.join(images_dir, c.image) if c.image else None,
                        c.turns[0][1]) for c in convs]
  out = []
  for row in benchmarks.read_jsonl(path):
    if 'conversations' in row.data:
      from moiie_jax.data import records  # pylint: disable=g-import-not-at-top
      try:
        c = records.parse_record(row.data, path, row.lineno)
      except ValueError as e:
        raise row.error(str(e)) from None
      out.append(RoutingItem(f'record {c.id!r}', c.turns[0][0],
                             os.path.join(images_dir, c.image) if c.image else None, c.turns[0][1]))
      continue
    question = row.get('question', 'text', 'prompt', types=str)
    image = row.get('image', types=str, required=False)
    answer = row.get('answer', types=str, required=False)
    name = row.get('question_id', 'id', types=(int, str), required=False)
    out.append(RoutingItem(f'{path}, line {row.lineno}' if name is None else f'question_id {name!r}', question,
                           os.path.join(images_dir, image) if image else None, answer))
  return out


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _routing_sums(graphdef, state, input_ids, attention_mask, pixel_values):
  """(tokens_per_expert, weight_per_expert) float32[L, 2, E], summed over the batch."""
  model = nnx.merge(graphdef, state)
  embeds, modality = model.embed(input_ids, pixel_values)
  _, stats, _ = model.language_model.model(inputs_embeds=embeds, attention_mask=attention_mask, modality=modality)
  return stats.tokens_per_expert, stats.weight_per_expert


def _encode_with_answer(generator: Generator, item: RoutingItem) -> tuple[np.ndarray, np.ndarray | None]:
  """The item's prompt as the generator builds it, followed by the tokens of the reference answer (if any)."""
  ids, pixels = generator.encode(Prompt(item.question, item.image), item.name)
  if item.answer:
    template = generator.template
    end = template.end_token(generator.tokenizer.eos_token) if template is not None and not template.plain else ''
    # The template prompt ends with 'ASSISTANT:'; the answer follows after a space, then the end marker.
    answer = (' ' if template is not None else '') + item.answer + end
    extra = generator.tokenizer.tokenizer.encode(answer, add_special_tokens=False).ids
    ids = np.concatenate([ids, np.asarray(extra, np.int32)])
  limit = generator.max_positions
  if len(ids) > limit:
    raise PromptError(f'{item.name}: prompt + answer are {len(ids)} tokens, longer than the context ({limit})')
  return ids, pixels


def collect_routing(generator: Generator, items: Sequence[RoutingItem], *, progress: bool = True
                    ) -> tuple[routing_lib.RoutingStats, list[tuple[str, str]]]:
  """Runs the forward pass over every item; returns the summed statistics and (item, error) of skipped items."""
  cfg = generator.cfg
  if not cfg.llm.moe.is_moe:
    raise ValueError('routing analysis: this checkpoint has no MoE layers (MoEConfig.variant=dense)')
  stats = routing_lib.RoutingStats()
  errors = []
  encoded = []
  for it in items:
    try:
      encoded.append(_encode_with_answer(generator, it))
    except PromptError as e:
      errors.append((it.name, str(e)))
  if not encoded:
    raise ValueError(f'routing analysis: none of the {len(items)} items could be encoded; first error: '
                     f'{errors[0][1] if errors else "no items"}')
  graphdef, state = nnx.split(generator.model)
  b = generator.batch_size
  pad = generator.tokenizer.pad_id
  with answers.progress_bar(len(encoded), 0, 'routing', progress) as bar:
    for start in range(0, len(encoded), b):
      chunk = encoded[start:start + b]
      length = bucket_length(max(len(ids) for ids, _ in chunk))
      # Filler rows have no real token: nothing of them is routed or counted.
      seqs = [ids for ids, _ in chunk] + [np.zeros((0,), np.int32)] * (b - len(chunk))
      ids, mask = left_pad(seqs, pad, length)
      pixels = None
      if any(p is not None for _, p in chunk):
        shape = next(p for _, p in chunk if p is not None).shape
        pixels = np.stack([p if p is not None else np.zeros(shape, np.float32) for _, p in chunk]
                          + [np.zeros(shape, np.float32)] * (b - len(chunk)))
      slots, weights = _routing_sums(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                                     None if pixels is None else jnp.asarray(pixels))
      stats.add(np.asarray(slots), np.asarray(weights))
      bar.update(len(chunk))
  return stats, errors


def write_routing(stats: routing_lib.RoutingStats, cfg, out_dir: str, extra: dict[str, Any] | None = None
                  ) -> list[str]:
  """routing.json (summary + raw sums) and the pathway figures; returns the files written."""
  moe = cfg.llm.moe
  summary = stats.summarize(cfg.llm.moe_layers, moe.n_vision, moe.n_shared, moe.n_language)
  summary['variant'] = moe.variant
  summary['raw'] = {'slot_counts': stats.slot_counts.tolist(), 'weight_sums': stats.weight_sums.tolist()}
  summary.update(extra or {})
  files = [routing_lib.write_json(summary, os.path.join(out_dir, 'routing.json'))]
  files += routing_lib.plot_pathways(summary, out_dir)
  return files

