"""Train one stage: `python -m moiie_jax.train --config configs/NAME.py:ARGS --workdir DIR`.

Config overrides go on the command line as absl flags: `--config.optimizer.grad_accum_steps=4`.
Multi-host: set MOIIE_DISTRIBUTED=1 (or pass --distributed) to call jax.distributed.initialize() first; it finds
TPU pods and SLURM jobs by itself, elsewhere set COORDINATOR=host:port, NUM_PROCESSES and PROCESS_ID.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'recipe file, e.g. configs/demo.py:stage=1',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'output folder (checkpoints, TensorBoard, final export)')
_DISTRIBUTED = flags.DEFINE_bool('distributed', os.environ.get('MOIIE_DISTRIBUTED') == '1',
                                 'call jax.distributed.initialize() (multi-host pods and clusters)')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> int:
  del argv
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
    summary = loop.train(_CONFIG.value, _WORKDIR.value)
  except loop.NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  if jax.process_index() == 0:
    loss = summary['metrics'].get('loss')
    print(f'trained {summary["steps"]} micro-steps ({summary["updates"]} updates)'
          + (f'; loss {loss:.4f}' if loss is not None else '; nothing left to train')
          + (f'; exported {summary["export"]}' if summary.get('export') else ''))
  return 0


if __name__ == '__main__':
  app.run(main)
