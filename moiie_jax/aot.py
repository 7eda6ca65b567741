"""Compile a recipe's training step for a TPU slice on a CPU machine and report whether and how it fits.

    python -m moiie_jax.aot --config configs/phi3_mini_moiie.py:stage=2 --topology v5p-64 [--out REPORT.json]
    python -m moiie_jax.aot --config configs/phi3_mini_moiie.py:stage=2 --topology v5p-64 \\
        --config.mesh.data=1 --config.mesh.fsdp=-1

Prints memory per chip (parameters, optimizer state, temporaries, total against HBM), model and compiled FLOPs,
collective bytes per chip and a roofline step time with its MFU (moiie_jax/train/aot.py). Topologies: v4-8 ...
v4-512 and v5p-8 ... v5p-512 (TensorCores), v5e-1 ... v5e-256 and v6e-1 ... v6e-256 (chips), 8xh100 and 8xh200
(one GPU host; memory estimated by the TPU compiler). `config.mesh_devices` is ignored: the step is compiled for
the slice's devices.

Exit status: 0 fits, 1 does not fit (the largest buffers are listed), 2 bad input (one line on stderr).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'recipe file, e.g. configs/phi3_mini_moiie.py:stage=2',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', None, 'slice to compile for, e.g. v5p-64, v5e-16, 8xh100')
_OUT = flags.DEFINE_string('out', None, 'also write the report as JSON to this file')
_TOP = flags.DEFINE_integer('top', 10, 'largest buffers to list when the step does not fit')
flags.mark_flags_as_required(['config', 'topology'])


def main(argv: list[str]) -> int:
  del argv
  import jax
  if not os.environ.get('JAX_PLATFORMS'):
    # The step compiles for TPU through libtpu's topology description; this host itself computes nothing.
    jax.config.update('jax_platforms', 'cpu')
  # A persistent cache could not reload executables compiled for a topology without its TPU client.
  jax.config.update('jax_enable_compilation_cache', False)
  from absl import logging as absl_logging
  if not flags.FLAGS['verbosity'].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  from moiie_jax.models.config import ConfigError
  from moiie_jax.train import aot
  from moiie_jax.train.optimizer import OptimizerConfigError
  try:
    report = aot.compile_report(_CONFIG.value, _TOPOLOGY.value, top=_TOP.value)
    status = 0
  except (ConfigError, OptimizerConfigError) as e:  # an unknown topology, a mesh or batch the slice cannot take
    print(f'error: {e}', file=sys.stderr)
    return 2
  except aot.DoesNotFit as e:
    report, status = e.report, 1
    print(f'error: {e}', file=sys.stderr)
  print(aot.format_report(report), flush=True)
  if _OUT.value:
    aot.write_json(report, _OUT.value)
  return status


if __name__ == '__main__':
  app.run(main)
