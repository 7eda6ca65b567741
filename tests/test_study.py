"""The study (`python -m moiie_jax.study`) end to end in its quick form: a shared stage 1, two arms, the table with
a row per arm and finite numbers, non-empty figures, a rerun that skips finished arms, and the same numbers again
for the same seed; its bad input in one line; the study task's data and the interval arithmetic."""

import json
import os

import numpy as np
import pytest

from moiie_jax.data import synthetic
from moiie_jax.study import __main__ as study_cli
from moiie_jax.study import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, 'configs', 'study.py') + ':table=1,quick=True'
PNG = b'\x89PNG\r\n\x1a\n'


def _study(capsys, *args):
  rc = study_cli.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return rc, out, err


def test_quick_study_runs_end_to_end_resumes_and_repeats(tmp_path, capsys):
  work = tmp_path / 'study'
  rc, out, err = _study(capsys, '--config', QUICK, '--workdir', work)
  assert rc == 0, err
  assert 'where the time went:' in out and 'stage 1' in out
  table = (work / 'results.md').read_text()
  rows = [line for line in table.splitlines() if line.startswith('| ') and not line.startswith('| arm')]
  assert [r.split(' | ')[0][2:] for r in rows] == ['dense', 'moiie', 'chance']
  results = json.loads((work / 'results.json').read_text())
  for arm in ('dense', 'moiie'):
    row = results['table']['rows'][arm]
    assert set(row) == {'visual', 'text', 'binding', 'all', 'final_loss'}
    assert all(np.isfinite(cell['mean']) for cell in row.values())
  for png in [work / 'loss_curves.png', *sorted((work / 'routing' / 'moiie').glob('*.png'))]:
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000, png
  assert len(list((work / 'routing' / 'moiie').glob('routing_*.png'))) == 4
  assert not (work / 'routing' / 'dense').exists()  # a dense arm has no pathways

  # A rerun skips what is finished.
  rc, out, err = _study(capsys, '--config', QUICK, '--workdir', work)
  assert rc == 0, err
  assert out.count('done earlier') == 3  # stage 1 and both arms

  # data=files on the same task written as files (LLaVA JSON with a "kind" per eval record, images, tokenizer)
  # trains and scores exactly as the synthetic form did: it is the same pipeline reading the same records. This
  # is also the repeat check: a second run from scratch (its own stage 1, another workdir) with the same seed and
  # config gives the same numbers and the same loss curve, bit for bit (CPU).
  before = json.loads((work / 'arms' / 'moiie' / 'seed0' / 'result.json').read_text())
  losses = lambda path: [json.loads(line)['loss'] for line in path.read_text().splitlines()]
  ds = synthetic.make_study_dataset(str(tmp_path / 'files'), seed=0, n_train=48, n_eval=12, image_size=32)
  files = (f'{QUICK},data=files,stage1_json={ds.captions_json},stage2_json={ds.train_json},eval_json={ds.eval_json},'
           f'image_folder={ds.image_folder},tokenizer={ds.tokenizer_dir}')
  rc, out, err = _study(capsys, '--config', files, '--workdir', tmp_path / 'on_files', '--arms', 'moiie')
  assert rc == 0, err
  on_files = json.loads((tmp_path / 'on_files' / 'arms' / 'moiie' / 'seed0' / 'result.json').read_text())
  assert on_files['accuracy'] == before['accuracy'] and on_files['final_loss'] == before['final_loss']
  assert (losses(tmp_path / 'on_files' / 'arms' / 'moiie' / 'seed0' / 'metrics.jsonl')
          == losses(work / 'arms' / 'moiie' / 'seed0' / 'metrics.jsonl'))
  assert '| moiie |' in (tmp_path / 'on_files' / 'results.md').read_text()


@pytest.mark.parametrize('args, message', [
    (['--config', QUICK, '--arms', 'moe'], "arm 'moe': not in table 1; known arms: dense, moiie"),
    (['--config', QUICK.replace('table=1', 'table=2')], 'table=2: expected one of [1, 4]'),
    (['--config', QUICK + ',recipe=nope'], "study recipe 'configs/nope.py': no such file"),
    (['--config', QUICK + ',colour=red'], "'colour': unknown"),
    (['--config', QUICK + ',data=files,stage1_json=a,stage2_json=b,eval_json=c,image_folder=d'],
     'data.files.tokenizer: required with data=files when stage 1 starts from scratch'),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
  rc, out, err = _study(capsys, *args, '--workdir', tmp_path / 'w')
  assert rc == 2 and message in err and err.count('\n') == 1, err


def test_a_moe_field_on_a_dense_arm_is_refused():
  from moiie_jax.study import runner
  from moiie_jax.train import recipe
  config = recipe.load(QUICK)
  config.overrides = (('model.moe.aux_loss_coef', 0.1),)
  with pytest.raises(runner.StudyError, match=r"arm 'dense' is dense: override 'model.moe.aux_loss_coef' is a MoE"):
    runner.select_arms(config, None)
  assert runner.select_arms(config, ['moiie']) == ['moiie']
  config.overrides = (('model.nonsense', 1),)
  with pytest.raises(runner.StudyError, match=r"override 'model.nonsense': the recipe has no field 'nonsense'"):
    runner.stage_config(config, 2, steps=1, seed=0, data={'json': 'x', 'image_folder': 'y'}, where='arm x')


def test_study_task_has_three_kinds_answerable_as_designed(tmp_path):
  ds = synthetic.make_study_dataset(str(tmp_path), seed=3, n_train=9, n_eval=12, image_size=32)
  kinds = [q['kind'] for q in ds.eval_questions]
  assert kinds.count('visual') == kinds.count('text') == kinds.count('binding') == 4
  for q in ds.eval_questions:
    if q['kind'] == 'text':  # arithmetic in words: the answer follows from the question alone
      words = q['question'].rstrip('?.').split()
      a, b = (synthetic.NUMBER_WORDS.index(w) for w in words if w in synthetic.NUMBER_WORDS)
      want = a + b if ('plus' in words or 'Add' in words) else (a - b if 'minus' in words else b - a)
      assert q['answer'] == synthetic.NUMBER_WORDS[want], q
    if q['kind'] == 'binding':  # names one of two objects by an attribute the other lacks
      assert any(c in q['question'] for c in synthetic.COLORS) or any(s in q['question'] for s in synthetic.SHAPES)
  again = synthetic.make_study_dataset(str(tmp_path / 'again'), seed=3, n_train=9, n_eval=12, image_size=32)
  assert again.eval_questions == ds.eval_questions
  assert set(ds.chance_by_kind) == set(synthetic.KINDS)


def test_interval_is_students_t():
  m, h = report.mean_ci([0.5, 0.6, 0.7])
  assert m == pytest.approx(0.6) and h == pytest.approx(4.303 * 0.1 / np.sqrt(3))
  assert report.mean_ci([0.4]) == (0.4, None)
