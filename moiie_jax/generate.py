"""Ask a converted checkpoint about an image.

    python -m moiie_jax.generate --checkpoint DIR --image cat.jpg --prompt "What is in the image?"
    python -m moiie_jax.generate --checkpoint DIR --template none --image cat.jpg --prompt "<image>\\nUSER: ..."
    python -m moiie_jax.generate --checkpoint DIR --batch questions.jsonl --out answers.jsonl
    python -m moiie_jax.generate --checkpoint DIR --image cat.jpg --chat

Greedy unless --temperature > 0. The single-prompt mode prints only the answer on stdout. The checkpoint's chat
template (meta.json) wraps the prompt, the image going first (LLaVA's `<image>\\n{question}`); `--template none`
tokenises the prompt exactly as given, `<image>` marking where the image goes.

Batch mode reads JSONL lines {"image": path (optional, relative to --images), "prompt": text, "id": str or int
(optional; default: the line number)} and appends one line per item to --out as each batch finishes,
{"id", "prompt", "image", "answer"} or, for an item whose image is missing or unreadable or whose prompt is empty
or too long, {"id", ..., "error"}; the other items go on. A killed run keeps the answers written so far: the same
command again asks only the items without a line (--retry-errors also the failed ones), then rewrites --out in
input order, one line per item. The ids key the answers, so they must be unique; OUT's stem + `.run.json` records
the checkpoint and generation settings, and resuming with other ones is refused. A progress bar goes to stderr.

Chat mode reads turns from stdin (one line each; `/image PATH` switches image and starts over, `/reset` starts
over, `/quit` or end of input stops) and prints each answer on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m moiie_jax.generate', description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True, help='converted checkpoint folder (python -m moiie_jax.convert)')
  mode = p.add_mutually_exclusive_group(required=True)
  mode.add_argument('--prompt', help='the question (single-prompt mode)')
  mode.add_argument('--batch', help='JSONL file of {"image", "prompt"} lines (batch mode; needs --out)')
  mode.add_argument('--chat', action='store_true', help='multi-turn chat reading stdin')
  p.add_argument('--image', default=None, help='image file (single-prompt and chat modes)')
  p.add_argument('--images', default='', help='folder the --batch file\'s image paths are relative to')
  p.add_argument('--out', default=None, help='answers JSONL (batch mode)')
  p.add_argument('--template', default=None,
                 help='chat template (phi3, llama3, plain, demo) or none (raw prompt); default: the checkpoint\'s')
  p.add_argument('--max-new-tokens', type=int, default=256)
  p.add_argument('--temperature', type=float, default=0.0, help='0 = greedy (default)')
  p.add_argument('--top-p', type=float, default=1.0)
  p.add_argument('--top-k', type=int, default=0)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--stop', action='append', default=[], help='stop string (repeatable)')
  p.add_argument('--batch-size', type=int, default=8, help='prompts per device batch (batch mode)')
  p.add_argument('--retry-errors', action='store_true',
                 help='batch mode: ask again the items that failed in an earlier run into the same --out')
  p.add_argument('--no-progress', action='store_true', help='batch mode: no progress bar')
  p.add_argument('--capacity-factor', type=float, default=0.0,
                 help='MoE expert capacity at inference: 0 = dropless (default; an answer never depends on the other '
                      'prompts of its batch); MoE-LLaVA evaluates at 2.0')
  args = p.parse_args(argv)
  if args.batch and not args.out:
    p.error('--batch needs --out')
  if args.out and not args.batch:
    p.error('--out goes with --batch')
  if args.max_new_tokens < 1:
    p.error(f'--max-new-tokens={args.max_new_tokens}: expected >= 1')
  if args.batch_size < 1:
    p.error(f'--batch-size={args.batch_size}: expected >= 1')
  return args


def read_batch(path: str) -> list[dict]:
  """The batch file's items: {'id', 'prompt', 'image' (as written)} (a line that is not a JSON object becomes an
  item with an 'error', so one bad line does not stop the batch). Two items with the same id are an error: ids
  key the answers that a rerun resumes from."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'batch file {path!r} does not exist')
  items, seen = [], {}
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      item = _read_item(path, lineno, line)
      key = str(item['id'])
      if key in seen:
        raise ValueError(f'{path}, line {lineno}: id {item["id"]!r} is already used on line {seen[key]} (a line '
                         f'without an "id" is keyed by its line number); ids key the answers for resuming: make '
                         f'them unique')
      seen[key] = lineno
      items.append(item)
  return items


def _read_item(path: str, lineno: int, line: str) -> dict:
  item = {'id': lineno}
  try:
    row = json.loads(line)
    if not isinstance(row, dict):
      raise ValueError(f'expected a JSON object, got {type(row).__name__}')
  except ValueError as e:
    return {**item, 'error': f'{path}, line {lineno}: {e}'}
  given = row.get('id', row.get('question_id'))
  if isinstance(given, (str, int)) and not isinstance(given, bool):
    item['id'] = given
  prompt = row.get('prompt', row.get('question', row.get('text')))
  image = row.get('image')
  item['prompt'] = prompt
  item['image'] = image
  if given is not None and item['id'] != given:
    item['error'] = f'{path}, line {lineno}: field "id": expected a string or integer, got {given!r:.60}'
  elif not isinstance(prompt, str):
    item['error'] = f'{path}, line {lineno}: field "prompt": expected a string, got {prompt!r:.60}'
  elif image is not None and not isinstance(image, str):
    item['error'] = f'{path}, line {lineno}: field "image": expected a path, got {image!r:.60}'
  return item


def run_info_path(out: str) -> str:
  """Where batch mode records what produced `out`: answers.jsonl -> answers.run.json."""
  return os.path.splitext(out)[0] + '.run.json'


def run_batch(generator, args, sampling) -> int:
  """Answers the batch file into args.out, resuming from the answers already there (moiie_jax/infer/answers.py,
  the mechanism `evaluate` resumes with)."""
  from moiie_jax.infer import answers  # pylint: disable=g-import-not-at-top
  from moiie_jax.infer.generate import Prompt  # pylint: disable=g-import-not-at-top
  items = read_batch(args.batch)
  done = answers.read_answers(args.out, key='id')
  stale = sorted(set(done) - {str(it['id']) for it in items})
  if stale:
    raise answers.AnswerFileError(f'{args.out}: holds answers for {len(stale)} ids not in {args.batch} (e.g. id '
                                  f'{stale[0]!r}); write to another --out')
  if args.retry_errors:
    done = {k: v for k, v in done.items() if 'error' not in v}
  run_info = {'checkpoint': os.path.abspath(args.checkpoint),
              'template': generator.template.name if generator.template else 'none',
              'max_new_tokens': args.max_new_tokens, 'temperature': args.temperature, 'top_p': args.top_p,
              'top_k': args.top_k, 'seed': args.seed, 'stop': list(args.stop),
              'capacity_factor': args.capacity_factor}
  answers.check_run(run_info_path(args.out), run_info, resumed=bool(done), answers_path=args.out)
  todo = [it for it in items if str(it['id']) not in done]

  def prompt_of(it):
    if 'error' in it:  # a bad line: recorded as it is, nothing to ask
      return None, ''
    image = os.path.join(args.images, it['image']) if it['image'] else None
    return Prompt(it['prompt'], image), f'{args.batch}: item {it["id"]!r}'

  def row_of(it, r):
    return it if r is None else {**it, **({'answer': r.text} if r.error is None else {'error': r.error})}

  new = answers.answer_in_batches(generator, todo, args.out, prompt_of=prompt_of, row_of=row_of,
                                  max_new_tokens=args.max_new_tokens, sampling=sampling, total=len(items),
                                  desc='generate', progress=not args.no_progress)
  done.update((str(row['id']), row) for row in new)
  # A rerun appends out of input order (and --retry-errors a second line per item): write the final file in input
  # order, one line per item, through a temporary file so that a kill here loses nothing.
  tmp = args.out + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for it in items:
      f.write(json.dumps(done[str(it['id'])], ensure_ascii=False) + '\n')
  os.replace(tmp, args.out)
  for row in new:
    if 'error' in row:
      print(f'error: {row["error"]}', file=sys.stderr)
  n_err = sum('error' in done[str(it['id'])] for it in items)
  print(f'{len(items) - n_err} answered, {n_err} errors ({len(new)} items now, {len(items) - len(todo)} from an '
        f'earlier run); wrote {args.out}', file=sys.stderr)
  return 0


def run_chat(generator, args, sampling, stdin=None) -> int:
  from moiie_jax.infer.generate import Prompt, PromptError  # pylint: disable=g-import-not-at-top
  if generator.template is None:
    print('error: --chat needs a chat template (not --template none)', file=sys.stderr)
    return 2
  stdin = stdin or sys.stdin
  image, history = args.image, []
  interactive = stdin.isatty()
  while True:
    if interactive:
      print('> ', end='', file=sys.stderr, flush=True)
    line = stdin.readline()
    if not line:
      break
    line = line.strip()
    if not line:
      continue
    if line in ('/quit', '/exit'):
      break
    if line == '/reset':
      history = []
      continue
    if line.startswith('/image'):
      image, history = line[len('/image'):].strip() or None, []
      continue
    try:
      answer = generator.generate([Prompt(line, image, tuple(history))], args.max_new_tokens, sampling)[0]
    except PromptError as e:
      print(f'error: {e}', file=sys.stderr)
      continue
    print(answer, flush=True)
    history.append((line, answer))
  return 0


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  from moiie_jax import compile_cache  # pylint: disable=g-import-not-at-top
  from moiie_jax.infer.generate import Generator, Prompt, SamplingConfig  # pylint: disable=g-import-not-at-top
  compile_cache.enable()
  sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop=tuple(args.stop))
  try:
    sampling.validate()
    generator = Generator.from_folder(args.checkpoint, template='auto' if args.template is None else args.template,
                                      batch_size=args.batch_size if args.batch else 1,
                                      capacity_factor=args.capacity_factor)
    if args.batch:
      return run_batch(generator, args, sampling)
    if args.chat:
      return run_chat(generator, args, sampling)
    answer = generator.generate([Prompt(args.prompt, args.image)], args.max_new_tokens, sampling)[0]
  except (ValueError, OSError) as e:  # our errors name the file or item; no traceback for them
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(answer)
  return 0


if __name__ == '__main__':
  sys.exit(main())
