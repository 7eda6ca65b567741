"""Checkpoints: exact round trip of the training state, keep-N, unfinished saves ignored, SIGTERM, params alone."""

import functools
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moiie_jax.train import checkpoint as ckpt
from moiie_jax.train import optimizer as opt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 8


class StandIn(nnx.Module):
  """The real LVLM's top-level names and a MoE layer's paths, at toy size."""

  def __init__(self, seed=0, width=D):
    rngs = nnx.Rngs(seed)
    self.vision_tower = nnx.Module()
    self.vision_tower.patch_embedding = nnx.Linear(6, width, rngs=rngs)
    self.multi_modal_projector = nnx.Module()
    self.multi_modal_projector.linear_1 = nnx.Linear(width, width, rngs=rngs)
    self.language_model = nnx.Module()
    self.language_model.lm_head = nnx.Linear(width, 16, use_bias=False, rngs=rngs)
    self.language_model.mlp = nnx.Module()
    self.language_model.mlp.experts = nnx.Param(jax.random.normal(rngs.params(), (4, width, 2 * width)))
    self.language_model.mlp.gate = nnx.Linear(width, 3, use_bias=False, rngs=rngs)
    self.language_model.norm = nnx.RMSNorm(width, rngs=rngs, param_dtype=jnp.bfloat16)


def _opt_cfg():
  cfg = opt.get_config('stage2')
  cfg.total_steps, cfg.grad_accum_steps, cfg.freeze_vision_tower = 10, 2, True
  return cfg


@functools.cache
def _train_state():
  """params, an opt state that has moved (MultiSteps accumulator, Adam moments, MaskedNodes), rng keys."""
  params = nnx.state(StandIn(), nnx.Param)
  tx, _ = opt.make_optimizer(_opt_cfg(), params)
  opt_state = tx.init(params)

  @jax.jit
  def update(params, opt_state, i):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape, x.dtype), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for i in range(3):
    params, opt_state = update(params, opt_state, i)
  return {'params': params, 'opt_state': opt_state, 'rng': jax.random.split(jax.random.key(7))[1],
          'rng_rbg': jax.random.key(3, impl='rbg'), 'step': jnp.int32(3), 'update': 1,
          'data': {'epoch': 1, 'next_index': 1234, 'shards': ['a', 'b'], 'seed': None},
          'meta': {'config': 'configs/x.py:variant=moiie', 'git': 'abc'}}


def _abstract(state):
  tx, _ = opt.make_optimizer(_opt_cfg(), state['params'])
  params = nnx.state(nnx.eval_shape(lambda: StandIn(seed=1)), nnx.Param)
  return {'params': params, 'opt_state': jax.eval_shape(tx.init, params),
          'rng': jax.eval_shape(lambda: jax.random.key(0)), 'rng_rbg': jax.eval_shape(lambda: state['rng_rbg']),
          'step': jax.ShapeDtypeStruct((), jnp.int32), 'update': None, 'data': None, 'meta': None}


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if ckpt.is_key(x):
      assert x.dtype == y.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path):
  state = _train_state()
  with ckpt.Checkpointer(tmp_path / 'checkpoints', max_to_keep=2) as checkpointer:
    assert checkpointer.latest_step() is None
    assert checkpointer.save(3, state)
    checkpointer.wait()
    restored = checkpointer.restore(None, _abstract(state))
  assert isinstance(restored['params'], nnx.State)
  for name in ('params', 'opt_state', 'rng', 'rng_rbg', 'step'):
    _assert_same(restored[name], state[name])
  assert restored['data'] == state['data'] and restored['meta'] == state['meta']
  assert str(restored['rng_rbg'].dtype) == 'key<rbg>'
  model = nnx.eval_shape(lambda: StandIn(seed=1))
  nnx.update(model, restored['params'])
  np.testing.assert_array_equal(model.language_model.mlp.experts[...], state['params']['language_model']['mlp']
                                ['experts'][...])

  # A new process restores with shardings from the template; without a template items come back as stored.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('fsdp',))
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp'))
  abstract = _abstract(state)
  abstract['params']['multi_modal_projector']['linear_1']['kernel'].set_value(
      jax.ShapeDtypeStruct((D, D), jnp.float32, sharding=row))
  with ckpt.Checkpointer(tmp_path / 'checkpoints') as checkpointer:
    sharded = checkpointer.restore(3, {'params': abstract['params'], 'data': None})
    raw = checkpointer.restore(3)
  assert set(sharded) == {'params', 'data', 'meta', 'update'}  # + every (small) JSON item, no unrequested arrays
  assert sharded['update'] == 1
  kernel = sharded['params']['multi_modal_projector']['linear_1']['kernel'][...]
  assert kernel.sharding == row
  np.testing.assert_array_equal(kernel, state['params']['multi_modal_projector']['linear_1']['kernel'][...])
  np.testing.assert_array_equal(raw['rng'], jax.random.key_data(state['rng']))
  assert raw['data'] == state['data'] and int(raw['step']) == 3


def test_async_save_survives_donation(tmp_path):
  # An async save copies to host before returning, so the next (donating) train step may free the buffers.
  w = jnp.arange(1 << 20, dtype=jnp.float32) * 3
  with ckpt.Checkpointer(tmp_path / 'checkpoints') as checkpointer:
    checkpointer.save(1, {'params': {'w': w}})
    w.delete()
    checkpointer.wait()
    restored = checkpointer.restore(1, {'params': {'w': jax.ShapeDtypeStruct((1 << 20,), jnp.float32)}})
  np.testing.assert_array_equal(restored['params']['w'], np.arange(1 << 20, dtype=np.float32) * 3)


def test_keep_n_and_save_interval(tmp_path):
  tree = {'w': jnp.arange(4.0)}
  directory = tmp_path / 'checkpoints'
  with ckpt.Checkpointer(directory, max_to_keep=2, async_=False, save_interval_steps=2) as checkpointer:
    saved = [step for step in range(7) if checkpointer.save(step, {'params': tree, 'data': {'step': step}})]
    assert saved == [0, 2, 4, 6]
    assert checkpointer.all_steps() == [4, 6]
    assert checkpointer.save(7, {'params': tree, 'data': {'step': 7}}, force=True)
    assert checkpointer.all_steps() == [6, 7]
    assert checkpointer.restore(6, {'data': None})['data'] == {'step': 6}
    with pytest.raises(ckpt.CheckpointError, match='no checkpoint for step 4'):
      checkpointer.restore(4, {'data': None})
  with pytest.raises(ckpt.CheckpointError, match='no finished checkpoint'):
    ckpt.Checkpointer(tmp_path / 'empty').restore()


def test_mismatch_errors_name_the_parameter(tmp_path):
  state = _train_state()
  with ckpt.Checkpointer(tmp_path / 'checkpoints', async_=False) as checkpointer:
    checkpointer.save(1, state)
    wider = nnx.state(nnx.eval_shape(lambda: StandIn(width=D + 2)), nnx.Param)
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)item 'params'.*multi_modal_projector\.linear_1\.kernel: "
                                                   r'stored shape \(8, 8\), expected \(10, 10\)'):
      checkpointer.restore(1, {'params': wider})
    abstract = _abstract(state)['params']
    abstract['language_model']['norm']['scale'].set_value(jax.ShapeDtypeStruct((D,), jnp.float32))
    with pytest.raises(ckpt.CheckpointError, match=r'language_model\.norm\.scale: stored dtype bfloat16'):
      checkpointer.restore(1, {'params': abstract})
    with pytest.raises(ckpt.CheckpointError, match="no item 'ema'"):
      checkpointer.restore(1, {'ema': None})
    with pytest.raises(ckpt.CheckpointError, match="'data' was saved as a json"):
      checkpointer.restore(1, {'data': {'x': jnp.zeros(2)}})
    with pytest.raises(ckpt.CheckpointError, match='not JSON-serialisable'):
      checkpointer.save(2, {'data': {'x': {1, 2}}})
  # The same checks from a Checkpointer that has not saved anything itself, as when a run resumes in a new process.
  fresh = ckpt.Checkpointer(tmp_path / 'checkpoints')
  with pytest.raises(ckpt.CheckpointError, match=r'multi_modal_projector\.linear_1\.kernel: stored shape'):
    fresh.restore(1, {'params': wider})
  fresh.close()


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
  with ckpt.Checkpointer(tmp_path / 'checkpoints', async_=False) as checkpointer:
    checkpointer.save(1, {'params': {'w': jnp.ones(3)}, 'data': {'step': 1}})
  # What a save killed before its final rename leaves behind.
  partial = tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp'
  (partial / 'params').mkdir(parents=True)
  (partial / 'params' / 'garbage').write_bytes(b'\0' * 100)
  with ckpt.Checkpointer(tmp_path / 'checkpoints') as checkpointer:
    assert checkpointer.latest_step() == 1
    assert checkpointer.restore(None, {'data': None})['data'] == {'step': 1}
  assert not partial.exists()


_KILLED_MID_SAVE = """
import sys
import jax.numpy as jnp
from moiie_jax.train.checkpoint import Checkpointer
checkpointer = Checkpointer(sys.argv[1], max_to_keep=3)
for step in range(10000):
  checkpointer.save(step, {'params': {'w': jnp.full((1 << 21,), step, jnp.float32)}, 'data': {'step': step}})
"""

_PREEMPTED = """
import os, signal, sys, time
import jax, jax.numpy as jnp
from moiie_jax.train.checkpoint import Checkpointer, install_preemption_handler
checkpointer = Checkpointer(sys.argv[1], save_interval_steps=1000)
preempted = install_preemption_handler()
w, key = jnp.zeros(4), jax.random.key(0)
for step in range(1, 10000):
  w, key = w + 1, jax.random.split(key)[0]
  if step == 5:
    os.kill(os.getpid(), signal.SIGTERM)  # the handler must keep the process alive
  if preempted():
    checkpointer.save(step, {'params': {'w': w}, 'rng': key, 'data': {'step': step}}, force=True)
    checkpointer.close()
    print('preempted at', step)
    sys.exit(0)
  time.sleep(0.01)
sys.exit(3)
"""


def _python(script, *args, **kw):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO, XLA_FLAGS='')
  return subprocess.Popen([sys.executable, '-c', script, *map(str, args)], env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_killed_mid_save_restores_previous_step(tmp_path):
  proc = _python(_KILLED_MID_SAVE, tmp_path / 'checkpoints')
  directory = tmp_path / 'checkpoints'
  deadline, seen = time.time() + 60, None
  try:
    while time.time() < deadline and seen is None:
      if proc.poll() is not None:
        pytest.fail(f'saver exited early: {proc.stdout.read()}')
      tmp = [p.name for p in directory.glob('*.orbax-checkpoint-tmp*')] if directory.exists() else []
      seen = next((t for t in tmp if int(t.split('.')[0]) >= 2), None)
      time.sleep(0.002)
  finally:
    proc.kill()  # SIGKILL: no chance to finish the write
    proc.wait()
  assert seen is not None, 'no save in progress was observed'
  killed_step = int(seen.split('.')[0])
  with ckpt.Checkpointer(tmp_path / 'checkpoints') as checkpointer:
    step = checkpointer.latest_step()
    assert step is not None and step >= killed_step - 1
    restored = checkpointer.restore(step, {'params': {'w': jax.ShapeDtypeStruct((1 << 21,), jnp.float32)},
                                           'data': None})
  assert restored['data'] == {'step': step}
  assert np.all(np.asarray(restored['params']['w']) == step)
  assert not list(directory.glob('*.orbax-checkpoint-tmp*'))


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  proc = _python(_PREEMPTED, tmp_path / 'checkpoints')
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  step = int(out.strip().split('preempted at ')[-1])
  assert step in (5, 6)
  key = jax.random.key(0)
  for _ in range(step):
    key = jax.random.split(key)[0]
  with ckpt.Checkpointer(tmp_path / 'checkpoints') as checkpointer:
    assert checkpointer.all_steps() == [step]
    restored = checkpointer.restore(None, {'params': {'w': jax.ShapeDtypeStruct((4,), jnp.float32)},
                                           'rng': key, 'data': None})
  np.testing.assert_array_equal(restored['params']['w'], np.full(4, step, np.float32))
  np.testing.assert_array_equal(jax.random.key_data(restored['rng']), jax.random.key_data(key))
  assert restored['data'] == {'step': step}


def test_save_and_restore_params_alone(tmp_path):
  params = nnx.state(StandIn(seed=4), nnx.Param)
  folder = tmp_path / 'converted'
  ckpt.save_params(folder, params)
  assert (folder / '_METADATA').exists() and not list(tmp_path.glob('*tmp*'))
  abstract = nnx.state(nnx.eval_shape(lambda: StandIn(seed=0)), nnx.Param)
  restored = ckpt.restore_params(folder, abstract)
  _assert_same(restored, params)
  with pytest.raises(ckpt.CheckpointError, match='already exists'):
    ckpt.save_params(folder, params)
  ckpt.save_params(folder, jax.tree.map(lambda x: x + 1, params), force=True)
  _assert_same(ckpt.restore_params(folder, abstract), jax.tree.map(lambda x: x + 1, params))

  with pytest.raises(ckpt.CheckpointError, match=f'{tmp_path}/nope does not exist'):
    ckpt.restore_params(tmp_path / 'nope', abstract)
  (tmp_path / 'half.orbax-checkpoint-tmp-17').mkdir()
  with pytest.raises(ckpt.CheckpointError, match='(?s)half does not exist.*unfinished save'):
    ckpt.restore_params(tmp_path / 'half', abstract)
  (tmp_path / 'plain').mkdir()
  (tmp_path / 'plain' / 'model.safetensors').write_bytes(b'x')
  with pytest.raises(ckpt.CheckpointError, match='plain is not an Orbax params checkpoint'):
    ckpt.restore_params(tmp_path / 'plain', abstract)
  wider = nnx.state(nnx.eval_shape(lambda: StandIn(width=D + 2)), nnx.Param)
  with pytest.raises(ckpt.CheckpointError, match=r'language_model\.mlp\.experts: stored shape \(4, 8, 16\)'):
    ckpt.restore_params(folder, wider)
  fewer = nnx.state(nnx.eval_shape(lambda: StandIn()), nnx.Param)
  del fewer['language_model']['mlp']['gate']
  with pytest.raises(ckpt.CheckpointError, match=r'not in the model/state: language_model\.mlp\.gate\.kernel'):
    ckpt.restore_params(folder, fewer)
