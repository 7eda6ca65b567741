"""What `python -m moiie_jax.train` says when the run cannot start or go on for a reason outside the code: one line
on stderr that names the cause, a non-zero exit, and the checkpoints already written left intact.

Cases: a malformed JSON data file, a read-only workdir, data.max_length past the model's context, a workdir that
holds a run of another variant, and a disk that fills up while saving (simulated: the writer raises ENOSPC).
"""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from moiie_jax.data import synthetic
from moiie_jax.train import checkpoint, loop, recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHI3 = os.path.join(ROOT, 'configs', 'phi3_mini_moiie.py')


def _train_cli(workdir, *overrides, recipe_args='stage=2,runlocal=True', preamble=''):
  """Runs the training CLI in a fresh process (after `preamble`, Python run first); returns (code, stdout,
  stderr lines)."""
  argv = ['moiie_jax.train', f'--config={PHI3}:{recipe_args}', f'--workdir={workdir}', *overrides]
  code = (f'{preamble}\nimport runpy, sys\nsys.argv = {argv!r}\n'
          f'runpy.run_module("moiie_jax.train", run_name="__main__", alter_sys=True)\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        capture_output=True, text=True, timeout=600)
  return proc.returncode, proc.stdout, [line for line in proc.stderr.splitlines() if line.strip()]


def _one_error_line(code, err):
  assert code == 2, err[-30:]
  assert len(err) == 1 and err[0].startswith('error: '), err[-30:]  # the whole of stderr: one line
  return err[0]


def test_malformed_json_data_is_one_line(tmp_path):
  demo = synthetic.make_demo_dataset(str(tmp_path / 'demo'), n_train=4, n_eval=1)
  bad = tmp_path / 'broken.json'
  bad.write_text('[{"id": "a", "conversations": [')
  code, _, err = _train_cli(str(tmp_path / 'w'), '--config.data.synthetic_demo=False',
                            f'--config.data.json_path={bad}', f'--config.data.image_folder={demo.image_folder}',
                            f'--config.data.tokenizer_path={demo.tokenizer_dir}')
  line = _one_error_line(code, err)
  assert str(bad) in line and 'not valid JSON' in line, line


def test_read_only_workdir_is_one_line(tmp_path):
  workdir = tmp_path / 'readonly'
  workdir.mkdir()
  os.chmod(workdir, 0o555)
  preamble = ''
  if os.geteuid() == 0:  # root writes through permissions: make the file system refuse as it would anyone else
    preamble = (f'import errno, os, tempfile\n_mkstemp = tempfile.mkstemp\n'
                f'def mkstemp(*a, dir=None, **k):\n'
                f'  if dir == {str(workdir)!r}:\n'
                f'    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)\n'
                f'  return _mkstemp(*a, dir=dir, **k)\n'
                f'tempfile.mkstemp = mkstemp\n')
  try:
    code, _, err = _train_cli(str(workdir), preamble=preamble)
  finally:
    os.chmod(workdir, 0o755)
  line = _one_error_line(code, err)
  assert str(workdir) in line and 'Permission denied' in line, line
  assert os.listdir(workdir) == []


def test_max_length_past_the_context_is_refused_before_building(tmp_path):
  c = recipe.load(f'{PHI3}:stage=2,runlocal=True')
  context = loop.model_config(c).llm.max_position_embeddings
  code, _, err = _train_cli(str(tmp_path / 'w'), f'--config.data.max_length={context + 64}')
  line = _one_error_line(code, err)
  assert f'max_length={context + 64}' in line and f'context of {context}' in line, line
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_workdir_of_another_variant_is_one_line_and_kept(tmp_path):
  workdir = str(tmp_path / 'vanilla_run')
  c = recipe.load(f'{PHI3}:stage=2,variant=vanilla,runlocal=True')
  c.total_steps, c.checkpoint_every, c.export_final = 1, 1, False
  loop.train(c, workdir, progress=False)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  code, _, err = _train_cli(workdir, '--config.total_steps=1')
  line = _one_error_line(code, err)
  assert f'{workdir} holds a vanilla run, the config asks for moiie: use another --workdir' in line, line
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


# The second save (step 4) fails as a full disk makes it fail: the writer raises ENOSPC.
_DISK_FULL = '''
import errno, os
import orbax.checkpoint as ocp
_save = ocp.CheckpointManager.save
def save(self, step, *a, **k):
  if step >= 4:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  return _save(self, step, *a, **k)
ocp.CheckpointManager.save = save
'''


def test_disk_full_while_saving_is_one_line_and_earlier_checkpoints_restore(tmp_path):
  workdir = str(tmp_path / 'full')
  code, _, err = _train_cli(workdir, '--config.total_steps=4', '--config.checkpoint_every=2',
                            '--config.global_batch_size=4', preamble=_DISK_FULL)
  line = _one_error_line(code, err)
  assert 'No space left on device while saving step 4' in line and 'latest: step 2' in line, line
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    assert ckpt.latest_step() == 2 and int(ckpt.restore(2)['step']) == 2


def test_an_async_write_failure_names_its_own_step(tmp_path, monkeypatch):
  """The background write of step 2 fails; the error surfaces at the next save and still names step 2."""
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'c'))
  ckpt.save(1, {'x': {'a': np.zeros(3)}})
  ckpt.wait()

  def failing_wait():
    raise ValueError('RESOURCE_EXHAUSTED: Failed writing "d/1f": No space left on device [os_error_code=\'28\']')

  ckpt.save(2, {'x': {'a': np.ones(3)}})
  monkeypatch.setattr(ckpt._manager, 'wait_until_finished', failing_wait)
  with pytest.raises(checkpoint.CheckpointSaveError, match='No space left on device while saving step 2 to '):
    ckpt.save(3, {'x': {'a': np.ones(3)}})
  monkeypatch.undo()
  ckpt.close()  # its background threads must not outlive the test


@pytest.mark.parametrize('value', [errno.ENOSPC, errno.EROFS])
def test_io_cause_reads_os_errors_through_wrappers(value):
  wrapped = ValueError(f'RESOURCE_EXHAUSTED: ... {os.strerror(value)} [os_error_code=\'{value}\']')
  assert checkpoint.io_cause(wrapped) == os.strerror(value)
  try:
    try:
      raise OSError(value, os.strerror(value))
    except OSError as e:
      raise RuntimeError('save failed') from e
  except RuntimeError as e:
    assert checkpoint.io_cause(e) == os.strerror(value)
  assert checkpoint.io_cause(ValueError('shape mismatch')) is None
  assert checkpoint.io_cause(None) is None
