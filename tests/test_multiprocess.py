"""Two real processes on 127.0.0.1 (`jax.distributed.initialize`, CPU collectives over gloo) train a tiny MoIIE LVLM
with its experts split across both; the losses must match a one-process, one-device run of the same steps."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import multiprocess_worker as worker
from moiie_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'MOIIE_DISTRIBUTED')}
  script = os.path.join(ROOT, 'tests', 'multiprocess_worker.py')
  procs = [subprocess.Popen([sys.executable, script, '--process_id', str(i), '--num_processes', '2', '--port',
                             str(port), '--out', str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=240)[0])
  finally:
    for proc in procs:  # only the two workers started here
      if proc.poll() is None:
        proc.kill()
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f'process {i} failed:\n{out[-3000:]}'

  # Only process 0 wrote a log.
  assert os.listdir(tmp_path) == ['log.json']
  with open(tmp_path / 'log.json') as fh:
    log = json.load(fh)
  assert log['process_count'] == 2
  assert log['expert_processes'] == {'0': [0], '1': [0], '2': [1], '3': [1]}

  # The same steps on one device, unsharded.
  cfg, graphdef, params, tx = worker.tiny_setup()
  step = jax.jit(step_lib.make_train_step(graphdef, tx, cfg))
  opt_state = jax.jit(tx.init)(params)
  losses = []
  for batch in worker.batches():
    params, opt_state, metrics = step(params, opt_state, batch)
    losses.append(float(metrics['loss']))
  assert len(log['losses']) == worker.STEPS
  np.testing.assert_allclose(log['losses'], losses, rtol=1e-5, atol=1e-6)
  assert abs(losses[-1] - losses[0]) > 1e-3  # the steps really train
