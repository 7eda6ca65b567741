"""Runs a study (configs/study.py): the task's data, one shared stage 1, then every arm x seed of the table's stage 2
from it (same data order, steps and recipe; only the arm's overrides differ), each evaluated per question kind,
the MoE arms' routing pathways, and the report. Resumable: a finished arm x seed leaves result.json and is skipped
on a rerun; an interrupted one resumes from its last checkpoint (the training loop's own resumption).

    WORKDIR/data/                 the task (synthetic: generated from config.data.seed)
    WORKDIR/stage1/               the shared stage 1 (training run; final/ is the init of every arm)
    WORKDIR/arms/ARM/seedS/       each stage-2 run, with result.json when done
    WORKDIR/routing/ARM/          routing pathway figures and routing.json (first seed of each MoE arm)
    WORKDIR/results.md, results.json, loss_curves.png
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import ml_collections

from moiie_jax.study import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE_KEYS = ('model.moe.', 'model.experts', 'model.layout')


class StudyError(ValueError):
  """A study that cannot run as configured; the message names the arm, field or file."""


# ------------------------------------------------------------------------------------------------ planning
def _recipe_path(config) -> str:
  path = config.recipe if os.path.isabs(config.recipe) else os.path.join(ROOT, config.recipe)
  if not os.path.isfile(path):
    raise StudyError(f'study recipe {config.recipe!r}: no such file (expected configs/NAME.py, e.g. configs/demo.py)')
  return path


def _set(c: ml_collections.ConfigDict, key: str, value: Any, where: str) -> None:
  node = c
  *parents, leaf = key.split('.')
  for part in parents:
    if part not in node:
      raise StudyError(f'{where}: override {key!r}: the recipe has no field {part!r} there')
    node = node[part]
  if leaf not in node:
    raise StudyError(f'{where}: override {key!r}: the recipe has no field {leaf!r} there')
  node[leaf] = tuple(value) if isinstance(value, list) else value


def arm_overrides(config) -> dict[str, dict[str, Any]]:
  """{arm: {dotted field: value}} from the config's (arm, ((field, value), ...)) pairs."""
  try:
    return {str(name): {str(k): v for k, v in pairs} for name, pairs in config.arms}
  except (TypeError, ValueError) as e:
    raise StudyError(f'study config arms: expected (name, ((field, value), ...)) pairs ({e})') from e


def select_arms(config, names: Sequence[str] | None) -> list[str]:
  """The arms to run, in the table's order; StudyError naming an unknown one or a MoE override on a dense arm."""
  arms = arm_overrides(config)
  known = list(arms)
  if not known:
    raise StudyError('study config: no arms')
  chosen = known if not names else list(names)
  unknown = [a for a in chosen if a not in arms]
  if unknown:
    raise StudyError(f'arm {unknown[0]!r}: not in table {config.table}; known arms: {", ".join(known)}')
  for arm in chosen:
    overrides = {**dict(config.overrides), **arms[arm]}
    if overrides.get('model.variant') == 'dense':
      bad = [k for k in overrides if k.startswith(MOE_KEYS)]
      if bad:
        raise StudyError(f'arm {arm!r} is dense: override {bad[0]!r} is a MoE field it cannot vary (put it on the '
                         f'MoE arms only)')
  return [a for a in known if a in chosen]


def stage_config(config, stage: int, *, steps: int, seed: int, data: dict, init: str = '',
                 overrides: dict | None = None, where: str = 'study') -> ml_collections.ConfigDict:
  """The recipe's config for one stage with the study's settings and an arm's overrides."""
  from moiie_jax.train import recipe  # pylint: disable=g-import-not-at-top
  c = recipe.load(f'{_recipe_path(config)}:stage={stage}')
  c.total_steps = int(steps)
  c.seed = int(seed)
  if init:  # else the recipe's own (a from-scratch demo stage 1: none)
    c.init.checkpoint = init
  c.data.json_path = data['json']
  c.data.image_folder = data['image_folder']
  if data.get('tokenizer_dir'):
    c.data.tokenizer_path = data['tokenizer_dir']
  if data.get('vocab_size'):
    c.model.vocab_size = data['vocab_size']
  c.log_every = max(1, int(steps) // 50)  # ~50 points per loss curve
  c.checkpoint_every = max(int(steps) // 2, 1)
  c.keep_checkpoints = 1
  for key, value in {**dict(config.overrides), **(overrides or {})}.items():
    _set(c, key, value, where)
  return c


# ------------------------------------------------------------------------------------------------ data
def prepare_data(config, workdir: str):
  """The task: (dataset with eval_questions carrying a 'kind', kinds, chance per kind)."""
  from moiie_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  d = config.data
  if d.source == 'synthetic':
    out = os.path.join(workdir, 'data')
    if os.path.isfile(os.path.join(out, 'metadata.json')):
      ds = synthetic.load_demo_metadata(out)
    else:
      ds = synthetic.make_study_dataset(out, seed=d.seed, n_train=d.n_train, n_eval=d.n_eval,
                                        image_size=d.image_size)
    return ds, list(synthetic.KINDS), ds.chance_by_kind
  f = d.files
  for key in ('stage1_json', 'stage2_json', 'eval_json', 'image_folder'):
    if not f[key]:
      raise StudyError(f'study config data.files.{key}: required with data=files')
  if not f.tokenizer and not config.stage1.init:
    raise StudyError('study config data.files.tokenizer: required with data=files when stage 1 starts from scratch '
                     '(no init= checkpoint to take it from)')
  try:
    with open(f.eval_json, encoding='utf-8') as fh:
      records = json.load(fh)
  except (OSError, ValueError) as e:
    raise StudyError(f'{f.eval_json}: cannot read the eval records ({e})') from e
  questions = []
  for i, r in enumerate(records):
    try:
      conv = r['conversations']
      questions.append({'id': str(r.get('id', i)), 'kind': str(r.get('kind', 'all')), 'image': r.get('image'),
                        'question': conv[0]['value'].replace('<image>', '').strip(), 'answer': conv[1]['value']})
    except (KeyError, IndexError, TypeError, AttributeError) as e:
      raise StudyError(f'{f.eval_json}, record {i}: expected {{"conversations": [question, answer], "kind"}} '
                       f'({type(e).__name__}: {e})') from e
  kinds = sorted({q['kind'] for q in questions})

  tokenizer = f.tokenizer
  vocab = _vocab_size(tokenizer) if tokenizer else 0  # a from-scratch model is sized to it, as on the synthetic task

  class Files:  # the fields the runner reads of a dataset
    eval_questions = tuple(questions)
    image_folder = f.image_folder
    captions_json = f.stage1_json
    train_json = f.stage2_json
    tokenizer_dir = tokenizer
    vocab_size = vocab
  return Files, kinds, {}


def _vocab_size(folder: str) -> int:
  """The number of ids of `folder`/tokenizer.json (added tokens included), as the synthetic task counts them."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, 'tokenizer.json') if os.path.isdir(folder) else folder
  try:
    return tokenizers.Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
  except Exception as e:  # tokenizers raises a bare Exception on a missing or bad file
    raise StudyError(f'{path}: cannot load the tokenizer ({e})') from e


# ------------------------------------------------------------------------------------------------ running
def _read_curve(run_dir: str) -> tuple[list[int], list[float]]:
  steps, losses = [], []
  path = os.path.join(run_dir, 'metrics.jsonl')
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        steps.append(int(row['step']))
        losses.append(float(row['loss']))
  return steps, losses


def _routing(config, ds, export: str, out_dir: str) -> list[str]:
  """The routing pathway figures of one MoE arm on the held-out questions with their reference answers."""
  from moiie_jax.evaluate import runner as eval_runner  # pylint: disable=g-import-not-at-top
  from moiie_jax.infer.generate import Generator  # pylint: disable=g-import-not-at-top
  gen = Generator.from_folder(export, batch_size=config.eval.batch_size)
  items = [eval_runner.RoutingItem(q['id'], q['question'], os.path.join(ds.image_folder, q['image'])
                                   if q.get('image') else None, q['answer'])
           for q in ds.eval_questions[:config.eval.routing_items]]
  stats, _ = eval_runner.collect_routing(gen, items, progress=False)
  return eval_runner.write_routing(stats, gen.cfg, out_dir, extra={'checkpoint': export})


def run(config, workdir: str, arms: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the study; returns {'table', 'files', 'timings'}."""
  from moiie_jax import demo  # pylint: disable=g-import-not-at-top
  from moiie_jax.train import loop  # pylint: disable=g-import-not-at-top
  chosen = select_arms(config, arms)
  overrides = arm_overrides(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  ds, kinds, chance = prepare_data(config, workdir)
  timings['data'] = time.perf_counter() - t0
  data1 = {'json': ds.captions_json, 'image_folder': ds.image_folder, 'tokenizer_dir': ds.tokenizer_dir,
           'vocab_size': ds.vocab_size}
  data2 = {**data1, 'json': ds.train_json}
  log(f'study: table {config.table}, arms {", ".join(chosen)}, seeds {list(config.seeds)}; '
      f'{len(ds.eval_questions)} held-out questions ({", ".join(kinds)})')

  stage1_dir = os.path.join(workdir, 'stage1')
  stage1_done = os.path.join(stage1_dir, 'study_stage1.json')
  t = time.perf_counter()
  if os.path.isfile(stage1_done):
    with open(stage1_done) as f:
      s1 = json.load(f)
    log(f'stage 1 (shared): done earlier, {s1["steps"]} steps')
  else:
    c1 = stage_config(config, 1, steps=config.stage1.steps, seed=config.stage1.seed, data=data1,
                      init=config.stage1.init, where='stage 1')
    s1 = loop.train(c1, stage1_dir, progress=False)
    report.write_json({'steps': s1['steps'], 'export': s1['export']}, stage1_done)
    log(f'stage 1 (shared): {s1["steps"]} steps ({time.perf_counter() - t:.0f} s)')
  timings['stage 1'] = time.perf_counter() - t

  results: dict[str, list[dict]] = {}
  curves: dict[str, list] = {}
  files: list[str] = []
  for arm in chosen:
    results[arm], curves[arm] = [], []
    for seed in config.seeds:
      run_dir = os.path.join(workdir, 'arms', arm, f'seed{seed}')
      done = os.path.join(run_dir, 'result.json')
      if os.path.isfile(done):
        with open(done) as f:
          results[arm].append(json.load(f))
        curves[arm].append(_read_curve(run_dir))
        log(f'{arm} seed {seed}: done earlier, skipped')
        continue
      t = time.perf_counter()
      c2 = stage_config(config, 2, steps=config.stage2.steps, seed=seed, data=data2, init=s1['export'],
                        overrides=overrides[arm], where=f'arm {arm!r}')
      summary = loop.train(c2, run_dir, progress=False)
      t_train = time.perf_counter() - t
      t = time.perf_counter()
      acc = demo.evaluate(summary['export'], ds, batch_size=config.eval.batch_size, key='kind',
                          max_new_tokens=config.eval.max_new_tokens)
      t_eval = time.perf_counter() - t
      curve = _read_curve(run_dir)
      result = {'arm': arm, 'seed': seed, 'accuracy': acc, 'final_loss': curve[1][-1] if curve[1] else float('nan'),
                'steps': summary['steps'], 'train_s': round(t_train, 1), 'eval_s': round(t_eval, 1),
                'variant': c2.model.variant, 'overrides': overrides[arm]}
      report.write_json(result, done)
      results[arm].append(result)
      curves[arm].append(curve)
      timings[f'{arm} train'] = timings.get(f'{arm} train', 0.0) + t_train
      timings[f'{arm} eval'] = timings.get(f'{arm} eval', 0.0) + t_eval
      log(f'{arm} seed {seed}: ' + ' '.join(f'{k} {v:.3f}' for k, v in acc.items())
          + f' (train {t_train:.0f} s, eval {t_eval:.0f} s)')
    first = os.path.join(workdir, 'arms', arm, f'seed{config.seeds[0]}', 'final')
    route_dir = os.path.join(workdir, 'routing', arm)
    if results[arm][0]['variant'] != 'dense' and not os.path.isfile(os.path.join(route_dir, 'routing.json')):
      t = time.perf_counter()
      files += _routing(config, ds, first, route_dir)
      timings[f'{arm} routing'] = time.perf_counter() - t

  tab = report.table(results, kinds, chance, getattr(ds, 'chance_level', None) if chance else None)
  title = f'Study: Table {config.table} ({os.path.basename(config.recipe)}, {len(ds.eval_questions)} held-out questions)'
  notes = [f'Arms (stage-2 overrides of {config.recipe}): ' + '; '.join(
      f'{a} = {", ".join(f"{k}={v}" for k, v in overrides[a].items())}' for a in chosen),
           f'Stage 1: {config.stage1.steps} steps, shared; stage 2: {config.stage2.steps} steps per arm and seed.',
           'Routing pathways: routing/ARM/ (first seed); loss curves: loss_curves.png.']
  files.append(report.write_text(report.markdown(tab, title, list(config.seeds), notes),
                                 os.path.join(workdir, 'results.md')))
  files.append(report.plot_losses(curves, os.path.join(workdir, 'loss_curves.png')))
  timings['total'] = time.perf_counter() - t0
  files.append(report.write_json({'table': tab, 'runs': results, 'timings': timings, 'kinds': kinds,
                                  'config': config.to_dict()}, os.path.join(workdir, 'results.json')))
  return {'table': tab, 'files': files, 'timings': timings}
