"""The train command line's help and errors: `--help` exits 0, `--print_config` prints a config that parses back,
and a mistyped recipe argument is refused in one line before anything is built."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from moiie_jax.train import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = 'configs/phi3_mini_moiie.py'


def _train(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'moiie_jax.train', *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def _lists(obj):
  """Tuples as lists: JSON has no tuples, and a config's tuple fields come back as lists."""
  if isinstance(obj, dict):
    return {k: _lists(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_lists(v) for v in obj]
  return obj


def test_parse_arg_refuses_unclear_booleans_and_unknown_keys():
  defaults = dict(stage=2, aux=0.001, runlocal=False, variant='moiie')
  for text, want in [('1', True), ('True', True), ('yes', True), ('on', True), ('0', False), ('false', False),
                     ('No', False), ('off', False)]:
    assert recipe.parse_arg(f'runlocal={text}', **defaults).runlocal is want
  with pytest.raises(ValueError, match=r"runlocal='yesplease': expected a boolean"):
    recipe.parse_arg('runlocal=yesplease', **defaults)
  with pytest.raises(ValueError, match=r"'bogus': unknown; known keys: \['aux', 'runlocal', 'stage', 'variant'\]"):
    recipe.parse_arg('bogus=1', **defaults)
  with pytest.raises(ValueError, match=r"stage='two': expected int"):
    recipe.parse_arg('stage=two', **defaults)


def test_mistyped_recipe_arg_is_refused_before_building(tmp_path):
  workdir = tmp_path / 'run'
  r = _train('--config', f'{RECIPE}:runlocal=yesplease', '--workdir', workdir)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
  assert 'runlocal' in lines[0] and 'yesplease' in lines[0]
  assert 'Traceback' not in r.stderr and not workdir.exists()


def test_help_exits_0_and_points_to_print_config():
  r = _train('--help')
  assert r.returncode == 0, r.stderr
  assert '--print_config' in r.stdout and '--config.' in r.stdout and '--workdir' in r.stdout


def test_print_config_parses_back_to_the_config():
  r = _train('--config', f'{RECIPE}:runlocal=True,experts=8', '--config.optimizer.grad_accum_steps=3',
             '--config.data.max_length=77', '--print_config')
  assert r.returncode == 0, r.stderr
  expected = recipe.load(f'{RECIPE}:runlocal=True,experts=8')
  expected.optimizer.grad_accum_steps = 3
  expected.data.max_length = 77
  parsed = ml_collections.ConfigDict(json.loads(r.stdout))
  assert _lists(parsed.to_dict()) == _lists(expected.to_dict())
  assert parsed.model.experts == 8 and parsed.data.max_length == 77
