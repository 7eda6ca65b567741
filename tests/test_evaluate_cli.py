"""The command lines on a tiny converted checkpoint: generate (single, raw template, batch with per-item errors,
chat), evaluate (scores, resumption, recorded errors, bad input) and routing (counts and figures)."""

import io
import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from moiie_jax import generate as generate_cli
from moiie_jax.convert import folder
from moiie_jax.evaluate import __main__ as evaluate_cli
from moiie_jax.models.lvlm import LVLM
from test_generate import tiny_config, write_tokenizer

MAX_NEW = 4


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A converted checkpoint (demo template), three images, one corrupt image and a POPE data file."""
  root = tmp_path_factory.mktemp('cli')
  cfg = tiny_config()
  model = LVLM(cfg, rngs=nnx.Rngs(1))
  tok_dir = write_tokenizer(str(root / 'tok'))
  folder.save_folder(str(root / 'ckpt'), cfg, nnx.state(model, nnx.Param), tokenizer_dir=tok_dir,
                     meta={'template': 'demo', 'source': 'test'})
  images = root / 'images'
  images.mkdir()
  rs = np.random.RandomState(0)
  for i in range(3):
    Image.fromarray(rs.randint(0, 255, (24, 20, 3), np.uint8)).save(images / f'{i}.png')
  (images / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  rows = [{'question_id': i, 'image': f'{i}.png', 'text': f'Is there a {w} in the image?', 'label': lab,
           'category': 'random'} for i, (w, lab) in enumerate([('red', 'yes'), ('circle', 'no'), ('square', 'yes')])]
  rows.append({'question_id': 3, 'image': 'missing.png', 'text': 'Is there a dog?', 'label': 'no',
               'category': 'random'})
  with open(root / 'pope.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return root


def _run(main, argv, capsys, stdin=None, monkeypatch=None):
  if stdin is not None:
    monkeypatch.setattr('sys.stdin', io.StringIO(stdin))
  rc = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def test_generate_single_and_raw_template(workdir, capsys):
  ckpt, img = workdir / 'ckpt', workdir / 'images' / '0.png'
  rc, out, err = _run(generate_cli.main, ['--checkpoint', ckpt, '--image', img, '--prompt', 'What is in the image?',
                                          '--max-new-tokens', MAX_NEW], capsys)
  assert rc == 0, err
  answer = out
  assert out.endswith('\n') and out.count('\n') == 1  # only the answer on stdout
  # --template none tokenises the text as given: the demo template written out by hand gives the same answer.
  raw = 'USER: <image>\nWhat is in the image? ASSISTANT:'
  rc, out, err = _run(generate_cli.main, ['--checkpoint', ckpt, '--image', img, '--prompt', raw, '--template', 'none',
                                          '--max-new-tokens', MAX_NEW], capsys)
  assert rc == 0, err
  assert out == answer
  rc, out, err = _run(generate_cli.main, ['--checkpoint', ckpt, '--image', workdir / 'nope.png', '--prompt', 'Hi'],
                      capsys)
  assert rc == 2 and out == '' and 'nope.png' in err and 'not found' in err


def test_generate_batch_records_item_errors(workdir, capsys, tmp_path):
  lines = [json.dumps({'id': 'ok', 'image': '0.png', 'prompt': 'What is in the image?'}),
           json.dumps({'id': 'missing', 'image': 'missing.png', 'prompt': 'What?'}),
           json.dumps({'id': 'corrupt', 'image': 'corrupt.png', 'prompt': 'What?'}),
           json.dumps({'id': 'empty', 'image': '1.png', 'prompt': ''}),
           json.dumps({'id': 'long', 'image': '1.png', 'prompt': 'red ' * 200}),
           '{not json',
           json.dumps({'id': 'text', 'prompt': 'Is there a circle?'})]
  batch = tmp_path / 'batch.jsonl'
  batch.write_text('\n'.join(lines) + '\n')
  out_file = tmp_path / 'answers.jsonl'
  rc, out, err = _run(generate_cli.main, ['--checkpoint', workdir / 'ckpt', '--batch', batch, '--images',
                                          workdir / 'images', '--out', out_file, '--max-new-tokens', MAX_NEW,
                                          '--batch-size', 2], capsys)
  assert rc == 0, err
  rows = [json.loads(line) for line in out_file.read_text().splitlines()]
  assert len(rows) == 7
  by_id = {r['id']: r for r in rows}
  assert isinstance(by_id['ok']['answer'], str) and 'error' not in by_id['ok']
  assert isinstance(by_id['text']['answer'], str)
  for key, message in [('missing', 'not found'), ('corrupt', 'cannot decode'), ('empty', 'empty'),
                       ('long', 'longer than'), (6, 'line 6')]:
    assert message in by_id[key]['error'], by_id[key]
    assert 'answer' not in by_id[key]
  assert "item 'missing'" in by_id['missing']['error']
  # Batch answers equal the single-prompt mode's answer for the same question.
  rc, out, _ = _run(generate_cli.main, ['--checkpoint', workdir / 'ckpt', '--image', workdir / 'images' / '0.png',
                                        '--prompt', 'What is in the image?', '--max-new-tokens', MAX_NEW], capsys)
  assert out.strip() == by_id['ok']['answer']


def test_generate_batch_resumes_after_a_kill(workdir, capsys, tmp_path, monkeypatch):
  from moiie_jax.infer import generate as gen
  batch = tmp_path / 'batch.jsonl'
  rows = [{'id': f'q{i}', 'image': f'{i % 3}.png', 'prompt': p} for i, p in
          enumerate(['What is in the image?', 'Is there a circle?', 'What colour?', 'Is there a square?'])]
  batch.write_text(''.join(json.dumps(r) + '\n' for r in rows) + json.dumps({'prompt': 'Is there a red?'}) + '\n')
  argv = ['--checkpoint', workdir / 'ckpt', '--batch', batch, '--images', workdir / 'images', '--max-new-tokens',
          MAX_NEW, '--batch-size', 2]
  rc, _, err = _run(generate_cli.main, argv + ['--out', tmp_path / 'full.jsonl'], capsys)
  assert rc == 0, err
  full = (tmp_path / 'full.jsonl').read_text()
  # The same command killed after its first batch: that batch's answers are on disk.
  original, asked = gen.Generator.generate_results, []

  def counted(self, prompts, *a, **kw):
    asked.append(len(prompts))
    return original(self, prompts, *a, **kw)

  def killed_after_one_batch(self, prompts, *a, **kw):
    if asked:
      raise KeyboardInterrupt
    return counted(self, prompts, *a, **kw)

  monkeypatch.setattr(gen.Generator, 'generate_results', killed_after_one_batch)
  out = tmp_path / 'answers.jsonl'
  with pytest.raises(KeyboardInterrupt):
    _run(generate_cli.main, argv + ['--out', out], capsys)
  kept = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['id'] for r in kept] == ['q0', 'q1'] and all('answer' in r for r in kept)
  # Rerun: only the other 3 items are asked, and the file ends as an uninterrupted run's, in input order.
  monkeypatch.setattr(gen.Generator, 'generate_results', counted)
  rc, _, err = _run(generate_cli.main, argv + ['--out', out], capsys)
  assert rc == 0, err
  assert asked == [2, 2, 1] and '2 from an earlier run' in err
  assert out.read_text() == full
  assert [json.loads(line)['id'] for line in full.splitlines()] == ['q0', 'q1', 'q2', 'q3', 5]
  # Resuming with other generation settings would mix two runs: refused.
  rc, _, err = _run(generate_cli.main, argv + ['--out', out, '--temperature', '0.7'], capsys)
  assert rc == 2 and 'different run' in err and 'temperature' in err


def test_generate_chat(workdir, capsys, monkeypatch):
  rc, out, err = _run(generate_cli.main, ['--checkpoint', workdir / 'ckpt', '--image', workdir / 'images' / '1.png',
                                          '--chat', '--max-new-tokens', 2], capsys,
                      stdin='What?\n\nAnd?\n/quit\nignored\n', monkeypatch=monkeypatch)
  assert rc == 0, err
  assert len(out.splitlines()) == 2  # one answer per turn, nothing else on stdout


def _evaluate(workdir, out, capsys, *extra):
  return _run(evaluate_cli.main, ['--checkpoint', workdir / 'ckpt', '--benchmark', 'pope', '--data',
                                  workdir / 'pope.jsonl', '--images', workdir / 'images', '--out', out,
                                  '--batch-size', 2, '--max-new-tokens', MAX_NEW, '--no-progress', *extra], capsys)


def test_evaluate_resumes(workdir, capsys, tmp_path):
  out = tmp_path / 'pope'
  rc, stdout, err = _evaluate(workdir, out, capsys, '--limit', 2)
  assert rc == 0, err
  scores = json.loads(stdout)
  assert scores['n_new'] == 2 and scores['n_resumed'] == 0
  # A crash mid-write leaves a partial last line; it is dropped and that item asked again.
  preds = out / 'pope_predictions.jsonl'
  preds.write_text(preds.read_text() + '{"key": "2", "te')
  rc, stdout, err = _evaluate(workdir, out, capsys)
  assert rc == 0, err
  scores = json.loads(stdout)
  assert (scores['n_new'], scores['n_resumed'], scores['n_failed']) == (2, 2, 1)
  assert 'missing.png' in scores['errors']['3']
  # The unanswerable item (missing image) is left out of the metric, not scored as an answer.
  assert scores['n'] == 4 and scores['splits']['random']['n'] == 3 and scores['splits']['random']['n_failed'] == 1
  assert scores['f1'] == scores['splits']['random']['f1']
  first = preds.read_text()
  assert len(first.splitlines()) == 4
  rc, stdout, err = _evaluate(workdir, out, capsys)
  assert rc == 0, err
  assert json.loads(stdout)['n_new'] == 0  # nothing answered again
  assert preds.read_text() == first
  assert json.loads((out / 'pope_scores.json').read_text())['n_new'] == 0
  assert (out / 'pope_answers.jsonl').is_file()
  # Resuming with another template (a different run) is refused.
  rc, _, err = _evaluate(workdir, out, capsys, '--template', 'plain')
  assert rc == 2 and 'different run' in err


def test_evaluate_bad_input(workdir, capsys, tmp_path):
  with pytest.raises(SystemExit) as e:
    evaluate_cli.main(['--checkpoint', str(workdir / 'ckpt'), '--benchmark', 'nope', '--data', 'x', '--out', 'y'])
  assert e.value.code == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps([{'question_id': 1}]) + '\n')
  rc, _, err = _evaluate(workdir, tmp_path / 'o', capsys, '--data', bad)
  assert rc == 2 and 'bad.jsonl, line 1' in err and 'expected a JSON object' in err
  rc, _, err = _evaluate(workdir, tmp_path / 'o', capsys, '--data', tmp_path / 'absent.jsonl')
  assert rc == 2 and 'absent.jsonl' in err


def test_routing(workdir, capsys, tmp_path):
  data = tmp_path / 'routing.jsonl'
  rows = [{'image': f'{i}.png', 'question': 'What is in the image?', 'answer': 'A red square.'} for i in range(3)]
  rows.append({'question': 'Is there a circle?'})
  rows.append({'image': 'missing.png', 'question': 'What?'})
  data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  out = tmp_path / 'routing'
  rc, stdout, err = _run(evaluate_cli.main, ['routing', '--checkpoint', workdir / 'ckpt', '--data', data, '--images',
                                             workdir / 'images', '--out', out, '--batch-size', 2, '--no-progress'],
                         capsys)
  assert rc == 0, err
  result = json.loads(stdout)
  assert result['n_items'] == 4 and result['n_skipped'] == 1 and 'missing.png' in err
  summary = json.loads((out / 'routing.json').read_text())
  assert summary['layer_ids'] == [1] and summary['expert_labels'] == ['V', 'S1', 'S2', 'L']
  image = summary['layers'][0]['image']
  # 3 images x 4 image tokens x top-2, all on the visual router's experts (vision + shared), none on language.
  assert image['n_slots'] == 3 * 4 * 2
  assert image['slot_share']['language'] == 0.0
  assert summary['layers'][0]['text']['slot_share']['vision'] == 0.0
  assert abs(image['weight_total'] - 3 * 4) < 1e-4  # renormalised top-2 weights sum to 1 per token
  for name in ('routing_groups_weight.png', 'routing_experts_slots.png'):
    assert (out / name).stat().st_size > 0
