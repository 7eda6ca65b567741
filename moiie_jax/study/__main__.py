"""The paper's comparison with one command: every arm of a table trained from one shared stage 1, evaluated per
question kind over several seeds, with intervals, routing pathways and loss curves.

    python -m moiie_jax.study --config configs/study.py:table=1 --workdir runs/study1
    python -m moiie_jax.study --config configs/study.py:table=4,seeds=5 --workdir runs/study4 --arms moiie-4,moiie-aux-0.1
    python -m moiie_jax.study --config configs/study.py:table=1,quick=True --workdir /tmp/quick

A rerun of the same command skips the finished arms and resumes an interrupted one. The table is in
WORKDIR/results.md (and results.json); the time each phase took is printed at the end.
Exit status: 0 done; 2 a bad config, arm or file (one line names it); 3 a training run failed (its line says why).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m moiie_jax.study', description=__doc__.split('\n')[0])
  p.add_argument('--config', required=True, help='configs/study.py[:table=1|4,seeds=N,quick=True,recipe=NAME]')
  p.add_argument('--workdir', required=True, help='output folder (resumable)')
  p.add_argument('--arms', default='', help='comma-separated arms of the table to run (default: all)')
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  from moiie_jax import compile_cache  # pylint: disable=g-import-not-at-top
  from moiie_jax.study import runner  # pylint: disable=g-import-not-at-top
  from moiie_jax.train import loop, recipe  # pylint: disable=g-import-not-at-top
  compile_cache.enable()
  try:
    config = recipe.load(args.config)
    out = runner.run(config, args.workdir, [a for a in args.arms.split(',') if a] or None,
                     log=lambda line: print(line, flush=True))
  except (runner.StudyError, ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except loop.RunError as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  t = out['timings']
  print('where the time went: ' + ', '.join(f'{k} {v:.0f} s' for k, v in t.items()))
  print(f'wrote {", ".join(out["files"][-3:])}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
