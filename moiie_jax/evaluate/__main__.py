"""Evaluate a converted checkpoint on a benchmark, or study its token pathways.

    python -m moiie_jax.evaluate --checkpoint DIR --benchmark pope --data pope_test.jsonl --images coco/val2014 \\
        --out results/pope
    python -m moiie_jax.evaluate routing --checkpoint DIR --data FILE --images DIR --out DIR [--benchmark NAME]

Evaluation answers greedily in batches, appending answers to OUT/<name>_predictions.jsonl as it goes (a rerun
skips answered items), then writes OUT/<name>_scores.json, OUT/<name>_answers.jsonl and the server-format files,
and prints the scores as JSON on stdout. An item whose image is missing or unreadable, or whose prompt does not
fit the context, is recorded with its error, left out of the metric and counted in the scores' `n_failed`; the run
goes on (--retry-errors asks those items again).

`routing` runs the forward pass over the data (prompt + reference answer when given) and writes OUT/routing.json
and OUT/routing_*.png: per MoE layer and modality, the share of top-k slots and routing weight per expert group.

Bad input (unknown benchmark, unreadable data file, missing checkpoint) prints one line naming it and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument('--checkpoint', required=True, help='converted checkpoint folder (python -m moiie_jax.convert)')
  p.add_argument('--data', required=True, help='data file (JSONL; the formats are listed at the end of --help)')
  p.add_argument('--images', default='', help='folder the data file\'s image paths are relative to')
  p.add_argument('--out', required=True, help='output folder')
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--capacity-factor', type=float, default=0.0,
                 help='MoE expert capacity: 0 = dropless (default: deterministic, batch-independent answers); '
                      'MoE-LLaVA evaluates at 2.0')
  p.add_argument('--template', default=None,
                 help='chat template (phi3, llama3, plain, demo, or none for raw prompts); default: the checkpoint\'s')
  p.add_argument('--limit', type=int, default=None, help='use only the first N items (smoke runs)')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')


def parse_args(argv: list[str]) -> argparse.Namespace:
  from moiie_jax.evaluate import benchmarks  # pylint: disable=g-import-not-at-top
  names = ', '.join(sorted(benchmarks.BENCHMARKS))
  if argv[:1] == ['routing']:
    p = argparse.ArgumentParser(prog='python -m moiie_jax.evaluate routing',
                                description='Routing statistics (token pathways) of an MoE checkpoint.')
    _common(p)
    p.add_argument('--benchmark', default=None, help=f'read --data as this benchmark\'s file ({names})')
    args = p.parse_args(argv[1:])
    args.command = 'routing'
  else:
    # The data formats live in benchmarks.py's docstring, next to the loaders that read them.
    formats = benchmarks.__doc__[benchmarks.__doc__.index('Data files are JSONL'):]
    p = argparse.ArgumentParser(prog='python -m moiie_jax.evaluate', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f'{formats}\nSubcommand: `routing` (python -m moiie_jax.evaluate routing '
                                       f'--help).')
    _common(p)
    p.add_argument('--benchmark', required=True, help=f'one of: {names}')
    p.add_argument('--max-new-tokens', type=int, default=128)
    p.add_argument('--retry-errors', action='store_true', help='ask again the items that failed in an earlier run')
    args = p.parse_args(argv)
    args.command = 'evaluate'
  if args.benchmark is not None and args.benchmark not in benchmarks.BENCHMARKS:
    p.error(f'unknown benchmark {args.benchmark!r}; known benchmarks: {names}')
  if args.batch_size < 1:
    p.error(f'--batch-size={args.batch_size}: expected >= 1')
  if args.limit is not None and args.limit < 1:
    p.error(f'--limit={args.limit}: expected >= 1')
  return args


def _generator(args):
  from moiie_jax.infer.generate import Generator  # pylint: disable=g-import-not-at-top
  template = 'auto' if args.template is None else args.template
  return Generator.from_folder(args.checkpoint, template=template, batch_size=args.batch_size,
                               capacity_factor=args.capacity_factor)


def evaluate(args) -> dict:
  from moiie_jax.evaluate import benchmarks, runner  # pylint: disable=g-import-not-at-top
  bench = benchmarks.get_benchmark(args.benchmark)
  # Missing images become per-item errors in the run rather than stopping it.
  items = bench.load(args.data, args.images, check_images=False)[:args.limit]
  generator = _generator(args)
  run_info = {'checkpoint': os.path.abspath(args.checkpoint), 'data': os.path.abspath(args.data),
              'template': generator.template.name if generator.template else 'none',
              'capacity_factor': args.capacity_factor}
  summary = runner.run_benchmark(generator, bench, items, args.out, max_new_tokens=args.max_new_tokens,
                                 run_info=run_info, progress=not args.no_progress, retry_errors=args.retry_errors)
  print(f'{bench.name}: {summary.n_new} answered now, {summary.n_resumed} from earlier runs, {summary.n_errors} '
        f'errors; results in {args.out}', file=sys.stderr)
  return summary.scores


def routing(args) -> dict:
  from moiie_jax.evaluate import runner  # pylint: disable=g-import-not-at-top
  items = runner.read_routing_items(args.data, args.images, args.benchmark)[:args.limit]
  generator = _generator(args)
  stats, errors = runner.collect_routing(generator, items, progress=not args.no_progress)
  for name, error in errors:
    print(f'skipped: {error}', file=sys.stderr)
  files = runner.write_routing(stats, generator.cfg, args.out, extra={
      'checkpoint': os.path.abspath(args.checkpoint), 'data': os.path.abspath(args.data),
      'n_items': len(items) - len(errors), 'n_skipped': len(errors), 'skipped': dict(errors[:20])})
  print(f'routing: {len(items) - len(errors)} items, {len(errors)} skipped; wrote {", ".join(files)}', file=sys.stderr)
  from moiie_jax.evaluate import routing as routing_lib  # pylint: disable=g-import-not-at-top
  with open(files[0]) as f:
    print(routing_lib.format_table(json.load(f)), file=sys.stderr)
  return {'routing': files[0], 'figures': files[1:], 'n_items': len(items) - len(errors), 'n_skipped': len(errors)}


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  from moiie_jax import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.enable()
  try:
    result = evaluate(args) if args.command == 'evaluate' else routing(args)
  except (ValueError, OSError, KeyError) as e:  # our errors name the file, line or item; no traceback for them
    print(f'error: {e.args[0] if isinstance(e, KeyError) and e.args else e}', file=sys.stderr)
    return 2
  print(json.dumps(result, indent=2, ensure_ascii=False))
  return 0


if __name__ == '__main__':
  sys.exit(main())
