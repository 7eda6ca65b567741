"""The training loop on the tiny runlocal recipes: stage-1 freezing, upcycling at stage 2, resume after a kill,
SIGTERM, a non-finite loss, loss going down, and every paper recipe building its model."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from moiie_jax.convert import folder
from moiie_jax.data import pipeline
from moiie_jax.models.lvlm import LVLM
from moiie_jax.train import loop, recipe
from runlocal import phi3_config as _config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHI3 = os.path.join(ROOT, 'configs', 'phi3_mini_moiie.py')


def _flat(state):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


def test_stage1_trains_only_the_connector(tmp_path):
  c = _config('stage=1', total_steps=1, log_every=1)
  summary = loop.train(c, str(tmp_path / 's1'), progress=False)
  cfg, trained, _ = folder.load_folder(summary['export'])
  init = _flat(nnx.state(LVLM(cfg, rngs=nnx.Rngs(c.seed)), nnx.Param))
  after = _flat(nnx.state(trained, nnx.Param))
  changed = {p[0] for p in init if not np.array_equal(init[p], after[p])}
  assert changed == {'multi_modal_projector'}
  assert all(np.array_equal(init[p], after[p]) for p in init if p[0] != 'multi_modal_projector')


def test_stage2_upcycles_the_stage1_checkpoint_and_loss_decreases(tmp_path):
  s1 = loop.train(_config('stage=1', total_steps=2), str(tmp_path / 's1'), progress=False)
  c = _config('stage=2', total_steps=30, log_every=1, global_batch_size=4)
  c.init.checkpoint = s1['export']
  c.optimizer.lr.language_model = 3e-3
  c.optimizer.lr.experts = 3e-3
  c.optimizer.lr.multi_modal_projector = 3e-3
  s2 = loop.train(c, str(tmp_path / 's2'), progress=False)
  cfg, model, _ = folder.load_folder(s2['export'])
  assert cfg.llm.moe.variant == 'moiie' and cfg.llm.moe_layers == (1, 3)
  # The experts started as copies of the dense FFN they replaced.
  _, dense, _ = folder.load_folder(s1['export'])
  assert model.language_model.model.layers[1].mlp.experts.gate_up_proj.kernel.shape[0] == 4
  assert 'aux_loss' in s2['metrics']
  losses = _losses(str(tmp_path / 's2'))
  first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (28, 29, 30)])
  assert last < first - 0.3, (first, last)


def _train_subprocess(config_arg, workdir, extra=()):
  code = ('import sys; from moiie_jax.train import recipe, loop; '
          f'c = recipe.load({PHI3!r} + ":" + {config_arg!r}); '
          'c.total_steps = 24; c.checkpoint_every = 4; c.log_every = 1; c.global_batch_size = 4; '
          f'print(loop.train(c, {workdir!r}, progress=False)["steps"])')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, '-c', code, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(workdir, proc, timeout=240):
  ckpts = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(ckpts) and any(d.isdigit() and int(d) >= 4 for d in os.listdir(ckpts)):
      return
    if proc.poll() is not None:
      raise AssertionError(f'training exited early: {proc.stderr.read()[-2000:]}')
    time.sleep(0.2)
  proc.kill()
  raise AssertionError('no checkpoint appeared in time')


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
  arg = 'stage=2,runlocal=True'
  reference = str(tmp_path / 'ref')
  c = recipe.load(f'{PHI3}:{arg}')
  # The reference saves once, at the end: the losses must not depend on how often a run checkpoints.
  c.total_steps, c.checkpoint_every, c.log_every, c.global_batch_size = 24, 24, 1, 4
  loop.train(c, reference, progress=False)

  killed = str(tmp_path / 'killed')
  proc = _train_subprocess(arg, killed)
  _wait_for_checkpoint(killed, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(_losses(killed)) < 24, 'the run finished before it was killed: nothing to resume'
  c = recipe.load(f'{PHI3}:{arg}')
  c.total_steps, c.checkpoint_every, c.log_every, c.global_batch_size = 24, 4, 1, 4
  summary = loop.train(c, killed, progress=False)
  assert summary['steps'] == 24
  want, got = _losses(reference), _losses(killed)
  assert max(got) == 24
  for s in range(12, 25):
    assert abs(got[s] - want[s]) <= 1e-5 * max(1.0, abs(want[s])), (s, got[s], want[s])


def _cli(workdir, *overrides):
  """`python -m moiie_jax.train` on the tiny stage-2 recipe, as a user runs it."""
  args = [sys.executable, '-m', 'moiie_jax.train', f'--config={PHI3}:stage=2,runlocal=True', f'--workdir={workdir}',
          *overrides]
  return subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  workdir = str(tmp_path / 'term')
  proc = _cli(workdir, '--config.total_steps=24', '--config.checkpoint_every=4', '--config.log_every=1',
              '--config.global_batch_size=4')
  _wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  # Not 0: a preempted run must not look finished to a script or scheduler.
  from moiie_jax.train.__main__ import PREEMPTED
  assert proc.returncode == PREEMPTED, err[-2000:]
  line = out.strip().splitlines()[-1]
  assert line.startswith('preempted at step ') and line.endswith(' of 24; rerun the same command to resume'), line
  steps = int(line.split()[3])
  assert 4 <= steps < 24
  from moiie_jax.train import checkpoint
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.latest_step() == steps
  restored = ckpt.restore(steps)
  assert int(restored['step']) == steps and restored['data']


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path):
  c = _config('stage=2', total_steps=12, checkpoint_every=2, log_every=1)
  for group in ('vision_tower', 'multi_modal_projector', 'language_model', 'experts', 'routers'):
    c.optimizer.lr[group] = 1e30
  c.optimizer.grad_clip = 0.0
  workdir = str(tmp_path / 'nan')
  with pytest.raises(loop.NonFiniteLossError, match='loss is'):
    loop.train(c, workdir, progress=False)
  from moiie_jax.train import checkpoint
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  last_good = ckpt.latest_step()
  losses = _losses(workdir) if os.path.exists(os.path.join(workdir, 'metrics.jsonl')) else {}
  assert last_good is None or all(np.isfinite(losses[s]) for s in losses if s <= last_good)


def test_non_finite_state_is_never_saved_and_a_sane_rerun_continues(tmp_path):
  workdir = str(tmp_path / 'blowup')
  sane = dict(total_steps=2, checkpoint_every=1, log_every=1, global_batch_size=4, export_final=False,
              keep_checkpoints=5)
  loop.train(_config('stage=2', **sane), workdir, progress=False)
  built = list(loop._STEPS.values())[-1]
  from moiie_jax.train import checkpoint, optimizer

  def blow_up(lr):
    c = _config('stage=2', **{**sane, 'total_steps': 4})
    for group, default in optimizer.stage_param_groups(c.optimizer.stage, c.optimizer).items():
      if default is not None:  # the same trained groups, so that the optimizer state restores
        c.optimizer.lr[group] = lr
    return c

  # Resume with an lr that makes step 3's weights huge but finite (|w| ~ 1e30): its loss (before the update) is
  # finite, the loss of its weights is not. Then with one that overflows float32: the weights are not finite.
  for lr, reason in ((1e30, r'the updated parameters give a loss of (nan|inf)'),
                     (1e300, 'the parameters or optimizer state it updated are not finite')):
    with pytest.raises(loop.NonFiniteLossError, match=rf'step 3: loss is .* but {reason}.*\(step 2\)'):
      loop.train(blow_up(lr), workdir, progress=False)
  # Other lrs and length, the same program (lrs are inputs): each run reused the step the first one built.
  assert list(loop._STEPS.values())[-1] is built
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.latest_step() == 2
  restored = ckpt.restore(2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves((restored['params'], restored['opt_state']))
             if np.issubdtype(np.asarray(x).dtype, np.inexact))
  summary = loop.train(_config('stage=2', **{**sane, 'total_steps': 4}), workdir, progress=False)
  assert summary['steps'] == 4 and np.isfinite(summary['metrics']['loss'])


def test_resume_drops_replayed_metrics_and_rerun_keeps_the_summary(tmp_path):
  workdir = str(tmp_path / 'replay')
  c = _config('stage=2', total_steps=4, checkpoint_every=2, log_every=1, global_batch_size=4, export_final=False,
              keep_checkpoints=5)
  loop.train(c, workdir, progress=False)
  # As after a kill -9 between the checkpoint of step 2 and the end: metrics.jsonl holds steps 3 and 4 (and a line
  # cut short), the checkpoints stop at 2.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 5, "lo')
  loop.train(c, workdir, progress=False)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [1, 2, 3, 4]
  with open(os.path.join(workdir, 'summary.json')) as f:
    finished = json.load(f)
  summary = loop.train(c, workdir, progress=False)  # nothing left to train
  assert summary['steps'] == 4 and summary['metrics'] == finished['metrics'] and 'loss' in finished['metrics']
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['metrics'] == finished['metrics']


def test_no_usable_record_stops_with_the_skip_counts(tmp_path):
  # 17 tokens hold the 16 image tokens and nothing else: truncation='drop' rejects every record.
  t0 = time.perf_counter()
  with pytest.raises(pipeline.NoUsableDataError, match=r'no usable record.*too_long=\d+'):
    loop.train(_config('stage=2', **{'data.max_length': 17}), str(tmp_path / 'in_process'), progress=False)
  assert time.perf_counter() - t0 < 300
  proc = _cli(str(tmp_path / 'cli'), '--config.data.max_length=17')
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 4, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'no usable record' in last and 'too_long=' in last, last


_PARTS: dict = {}


def _abstract_params(part_cfg, build) -> int:
  """Parameter count of `build()` made abstractly (nnx.eval_shape), cached by the part's (frozen) config."""
  key = (type(part_cfg).__name__, part_cfg)
  if key not in _PARTS:
    _PARTS[key] = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(nnx.eval_shape(build), nnx.Param)))
  return _PARTS[key]


@pytest.mark.parametrize('spec', [
    'phi3_mini_moiie.py:stage=1', 'phi3_mini_moiie.py:stage=2', 'phi3_mini_moiie.py:stage=2,variant=dense',
    'phi3_mini_moiie.py:stage=2,variant=vanilla', 'phi3_mini_moiie.py:stage=2,variant=modality',
    'phi3_mini_moiie.py:stage=2,experts=8,layout=balanced', 'phi3_mini_moiie.py:stage=2,experts=8,layout=unbalanced',
    'phi3_mini_moiie.py:stage=2,placement=all,aux=0.01', 'phi3_mini_moiie.py:stage=2,vision=clip',
    'phi3_mini_moiie.py:stage=3,three_stage=True', 'llama3_8b_moiie.py:stage=2', 'llama3_8b_moiie.py:stage=2,vision=clip',
    'moe_llava.py:stage=3', 'moe_llava.py:stage=2', 'moe_llava.py:stage=3,llm=stablelm2-1.6b',
    'moe_llava.py:stage=3,llm=qwen-1.8b,vision=siglip', 'moe_llava.py:stage=3,llm=phi3-mini,gate=mixtral',
    'phi3_mini_moiie.py:stage=2,s2=on', 'demo.py:stage=2'])
def test_every_recipe_builds_its_full_size_model(spec):
  c = recipe.load(os.path.join(ROOT, 'configs', spec))
  cfg = recipe.model_config(c)
  cfg.validate()
  # The LVLM's three parts, built abstractly; a part already built for an equal config (the so400m tower of most
  # recipes, ~7 s each to trace) is counted once.
  from moiie_jax.models.connector import MultiModalProjector
  from moiie_jax.models.decoder import CausalLM
  from moiie_jax.models.vision import VisionTower
  n = _abstract_params(cfg.vision, lambda: VisionTower(cfg.vision, rngs=nnx.Rngs(0)))
  n += _abstract_params(cfg.llm, lambda: CausalLM(cfg.llm, rngs=nnx.Rngs(0)))
  n += _abstract_params(cfg, lambda: MultiModalProjector(cfg.vision.feature_size, cfg.llm.hidden_size,
                                                         act=cfg.projector_hidden_act,
                                                         bias=cfg.multimodal_projector_bias, rngs=nnx.Rngs(0)))
  assert n > 0
  if spec.startswith('phi3_mini_moiie.py:stage=2') and 'variant' not in spec and 'experts' not in spec \
     and 'placement' not in spec and 'vision' not in spec:
    assert cfg.llm.moe.variant == 'moiie' and len(cfg.llm.moe_layers) == 16 and cfg.llm.moe.n_experts == 4
    assert cfg.num_image_tokens == 729 and 7e9 < n < 9e9, n  # 4 experts in 16 of 32 layers of Phi-3-mini
  if spec.endswith('s2=on'):  # the official S2 scales: 14 tower passes per image, a 3 x 1152-wide connector
    assert (cfg.vision.s2_scales, cfg.vision.tiles_per_image, cfg.vision.feature_size) == ((384, 768, 1152), 14, 3456)
    assert cfg.num_image_tokens == 729
  if spec == 'moe_llava.py:stage=3':  # MoE-LLaVA-Phi2-2.7B-4e: 4 experts in the 16 even layers, its gate
    moe = cfg.llm.moe
    assert cfg.llm.architecture == 'phi' and cfg.llm.moe_layers == tuple(range(0, 32, 2)) and moe.n_experts == 4
    assert (moe.gate, moe.aux_loss_scope, moe.capacity_factor, moe.eval_capacity_factor) == ('deepspeed', 'sum', 1.5,
                                                                                             2.0)
    assert 5e9 < n < 6.5e9, n  # 2.7B + 3 extra FFN copies in 16 layers + CLIP-L


@pytest.mark.parametrize('variant', ['dense', 'moiie'])
def test_a_looped_checkpoint_loads_into_a_scanned_recipe_and_back(tmp_path, variant):
  """A runlocal (looped) checkpoint as the init of a recipe that scans its layers: the same layers, restacked."""
  c = _config(f'stage=2,variant={variant}')
  cfg = recipe.model_config(c)
  assert not cfg.llm.scan_layers
  model = LVLM(cfg, rngs=nnx.Rngs(3))
  looped = folder.save_folder(str(tmp_path / 'looped'), cfg, nnx.state(model, nnx.Param))
  c.init.checkpoint = looped
  c.model.scan_layers = True
  scan_cfg, scanned, _ = loop.build_model(c)
  assert scan_cfg.llm.scan_layers
  from moiie_jax.convert import upcycle
  source = {p: np.asarray(v) for p, v in _flat(nnx.state(model, nnx.Param)).items()}
  target = _flat(nnx.state(scanned, nnx.Param))
  llm = {p[1:]: v for p, v in source.items() if p[0] == 'language_model'}
  expected = upcycle.relayout(llm, cfg.llm, scan_cfg.llm)
  assert {('language_model',) + p for p in expected} | {p for p in source if p[0] != 'language_model'} == set(target)
  for p, v in expected.items():
    np.testing.assert_array_equal(target[('language_model',) + p], v)
  # ... and back: the scanned model saved and loaded by a looped recipe gives the original arrays.
  back_dir = folder.save_folder(str(tmp_path / 'scanned'), scan_cfg, nnx.state(scanned, nnx.Param))
  c.init.checkpoint, c.model.scan_layers = back_dir, False
  _, back, _ = loop.build_model(c)
  for p, v in _flat(nnx.state(back, nnx.Param)).items():
    np.testing.assert_array_equal(v, source[p])
