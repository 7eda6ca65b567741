"""Train one stage: `python -m moiie_jax.train --config configs/NAME.py:ARGS --workdir DIR`.

ARGS are the recipe's own key=value arguments (its docstring lists them; an unknown key is refused with the list
of known ones). Config overrides go on the command line as absl flags: `--config.optimizer.grad_accum_steps=4`.
`--print_config` prints the resolved config (recipe + overrides) as JSON and exits without building anything: the
way to see every field a recipe sets (moiie_jax/train/recipe.py documents them).
Multi-host: set MOIIE_DISTRIBUTED=1 (or pass --distributed) to call jax.distributed.initialize() first; it finds
TPU pods and SLURM jobs by itself, elsewhere set COORDINATOR=host:port, NUM_PROCESSES and PROCESS_ID.

Exit status: 0 trained to the end (or nothing was left to train); 2 a usage, config, data or workdir error (a
workdir of another run, a full or read-only disk: one line names it); 3 a non-finite loss or
state (the latest checkpoint is the last good one); 4 no usable record in the data (every record rejected; the
line counts them by reason); 75 preempted by SIGTERM after saving a checkpoint: rerun the same command to resume.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'recipe file, e.g. configs/demo.py:stage=1',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'output folder (checkpoints, TensorBoard, final export)')
_DISTRIBUTED = flags.DEFINE_bool('distributed', os.environ.get('MOIIE_DISTRIBUTED') == '1',
                                 'call jax.distributed.initialize() (multi-host pods and clusters)')
_PRINT_CONFIG = flags.DEFINE_bool('print_config', False,
                                  'print the resolved config (recipe + --config.* overrides) as JSON and exit')
flags.mark_flag_as_required('config')

PREEMPTED = 75  # EX_TEMPFAIL: a scheduler may requeue; distinct from a finished run (0) and from errors

_HELP_FLAGS = ('-h', '--help', '-help', '--helpshort', '-?', '--helpfull')


def _help() -> str:
  return (f'{__doc__}\nUsage: python -m moiie_jax.train --config configs/NAME.py[:ARGS] --workdir DIR '
          f'[--config.FIELD=VALUE ...]\n       python -m moiie_jax.train --config configs/NAME.py[:ARGS] '
          f'--print_config\n\n{flags.FLAGS.main_module_help()}\n')


def _error_line(error: Exception) -> str:
  """One line for a flag error. ml_collections wraps a recipe's exception in its whole traceback: keep the
  exception's own line (e.g. "config arg runlocal='yesplease': expected a boolean ...")."""
  message = str(error)
  raised = re.findall(r'^\s*\w*(?:Error|Exception): (.*)$', message, re.MULTILINE)
  if 'Traceback' in message and raised:
    flag = message.split('\n', 1)[0].rsplit(': ', 1)[0]  # 'flag --config=configs/x.py:ARGS'
    return f'{flag}: {raised[-1]}'
  return ' '.join(message.split())


def _parse_flags(argv: list[str]) -> list[str]:
  # absl's --help exits 1 and lists only the flags; ours exits 0 and says how to see a recipe's fields.
  if any(a in _HELP_FLAGS for a in argv[1:]):
    print(_help() if '--helpfull' not in argv else flags.FLAGS.get_help())
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit(_error_line(e))
  except (AttributeError, KeyError) as e:  # ml_collections' answer to an override of a field the config lacks
    _exit(f'--config.* override of an unknown field {e}; --print_config lists the fields')


def _exit(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)  # one line: the usage is a --help away
  sys.exit(2)


def main(argv: list[str]) -> int:
  del argv
  config = _CONFIG.value
  try:
    config.keys()
  except OSError as e:  # ml_collections reports an unreadable recipe file only when the config is first used
    reason = re.findall(r'\[Errno \d+\] (.*)', str(e))
    _exit(f'--config: {reason[-1] if reason else " ".join(str(e).split())}')
  if _PRINT_CONFIG.value:  # before importing jax: nothing is built or initialised
    print(config.to_json_best_effort(indent=2))
    return 0
  if not _WORKDIR.value:
    print('error: --workdir is required (or --print_config to only show the config)', file=sys.stderr)
    return 2
  import jax
  if _DISTRIBUTED.value:
    if os.environ.get('COORDINATOR'):
      jax.distributed.initialize(os.environ['COORDINATOR'], int(os.environ['NUM_PROCESSES']),
                                 int(os.environ['PROCESS_ID']))
    else:
      jax.distributed.initialize()
  from absl import logging as absl_logging
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every save at INFO: keep the console to the progress bar
    absl_logging.set_verbosity(absl_logging.WARNING)
  from moiie_jax.train import loop
  try:
    summary = loop.train(config, _WORKDIR.value)
  except loop.NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  except loop.pipeline.NoUsableDataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 4
  except loop.RunError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if summary['preempted']:
    if jax.process_index() == 0:
      print(f'preempted at step {summary["steps"]} of {summary["micro_steps"]}; rerun the same command to resume',
            flush=True)
    return PREEMPTED
  if jax.process_index() == 0:
    loss = summary['metrics'].get('loss')
    print(f'trained {summary["steps"]} micro-steps ({summary["updates"]} updates)'
          + (f'; loss {loss:.4f}' if loss is not None else '; nothing left to train')
          + (f'; exported {summary["export"]}' if summary.get('export') else ''))
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
