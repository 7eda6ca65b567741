"""The training loop, top-down: model, data, mesh, sharded step, restore-or-start, steps, checkpoints, export.

One call trains one stage. Stage 2 starts from stage 1's exported folder (`init.checkpoint = STAGE1/final`) and,
when the recipe asks for an MoE layer kind while that checkpoint is dense, upcycles the FFNs into experts first.
Preemption (SIGTERM) saves a checkpoint and returns. A non-finite loss, non-finite parameters or optimizer state
about to be saved, or weights about to be saved whose loss on the step's batch is not finite (one forward pass per
save) stop the run before anything is saved, so the latest checkpoint is always a good one. What the run cannot
use (a config value, the data, a workdir of another run, a full or read-only disk) raises `RunError`, one line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from moiie_jax import compile_cache
from moiie_jax.convert import folder as folder_lib
from moiie_jax.convert import hf as hf_lib
from moiie_jax.convert import sources
from moiie_jax.convert import upcycle as upcycle_lib
from moiie_jax.data import pipeline
from moiie_jax.models import config as config_lib
from moiie_jax.models.config import ConfigError, LLMConfig, LVLMConfig
from moiie_jax.models.lvlm import LVLM
from moiie_jax.parallel import mesh as mesh_lib
from moiie_jax.train.step import ShardedTrainStep, make_sharded_train_step
from moiie_jax.train import checkpoint as ckpt_lib
from moiie_jax.train import optimizer as optimizer_lib
from moiie_jax.train import progress as progress_lib
from moiie_jax.train import recipe
from moiie_jax.train.metrics import MetricWriter

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """The loss (or the state to be saved) became NaN/inf; the run stopped and the last good checkpoint is intact."""


class RunError(RuntimeError):
  """The run cannot start or go on for a reason outside the code: a config value, the data, the workdir, the disk.

  The message is one line that names the cause; the CLI prints it and exits 2. Earlier checkpoints are intact.
  """


# Errors of the inputs a run is built from (our own messages name the field, file or key); anything else is a bug
# and keeps its traceback.
_INPUT_ERRORS = (ValueError, pipeline.DataError, OSError)


@jax.jit
def _all_finite(tree) -> jax.Array:
  """bool[]: every floating leaf of `tree` is finite. One fused reduction on device; only the flag comes back."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


# ---------------------------------------------------------------------------------------------------- the model
def build_model(config: ml_collections.ConfigDict) -> tuple[LVLMConfig, LVLM, dict[str, Any]]:
  """The model a recipe trains, with its initial weights: a checkpoint (upcycled if needed) or a fresh init."""
  if not config.init.checkpoint:
    cfg = recipe.model_config(config)
    return cfg, LVLM(cfg, rngs=nnx.Rngs(config.seed)), {}
  source_cfg, source_model, meta = folder_lib.load_folder(config.init.checkpoint)
  cfg = recipe.model_config(config, base=source_cfg)
  flat = {path: np.asarray(value) for path, value in hf_lib.flat_abstract(source_model).items()}
  if config.init.get('fresh_connector'):
    flat = {p: v for p, v in flat.items() if p[0] != 'multi_modal_projector'}
    flat.update({('multi_modal_projector',) + p: v for p, v in sources.fresh_connector(cfg, config.seed).items()})
  elif source_cfg.vision.feature_size != cfg.vision.feature_size:
    raise ConfigError(f'{config.init.checkpoint}: its connector takes {source_cfg.vision.feature_size}-wide image '
                      f'features (S2 scales {list(source_cfg.vision.s2_scales) or "off"}) and the recipe\'s tower gives '
                      f'{cfg.vision.feature_size} (S2 scales {list(cfg.vision.s2_scales) or "off"}): set '
                      f'init.fresh_connector=True to train a new connector, or match model.s2_scales')
  if cfg.llm != source_cfg.llm:
    if source_cfg.llm.moe.is_moe:
      _check_same_experts(config.init.checkpoint, source_cfg.llm, cfg.llm)
    if not source_cfg.llm.moe.is_moe and cfg.llm.moe.is_moe:
      flat = upcycle_lvlm(flat, cfg, jax.random.key(config.seed), source_scan_layers=source_cfg.llm.scan_layers)
    elif source_cfg.llm.scan_layers != cfg.llm.scan_layers:
      # A looped checkpoint (runlocal, a conversion) into a scanned recipe, or back: the same layers, restacked.
      flat = upcycle_lib.relayout_lvlm(flat, source_cfg.llm, cfg.llm)
  abstract = nnx.eval_shape(lambda: LVLM(cfg, rngs=nnx.Rngs(0)))
  nnx.update(abstract, hf_lib.build_state(abstract, flat, config.init.checkpoint))
  return cfg, abstract, meta


def _check_same_experts(where: str, source: LLMConfig, target: LLMConfig) -> None:
  """An MoE checkpoint continues training only as the same experts in the same layers; how tokens are routed
  (gate, capacity, aux loss, noise) is the recipe's to choose. Raises ValueError naming the first difference."""
  a, b = source.moe, target.moe
  for field in ('variant', 'n_vision', 'n_shared', 'n_language'):
    if getattr(a, field) != getattr(b, field):
      raise ValueError(f'{where}: holds a {a.variant} MoE model with moe.{field}={getattr(a, field)!r}; the recipe '
                       f'asks for {getattr(b, field)!r}. Only a dense checkpoint can be upcycled.')
  if source.moe_layers != target.moe_layers:
    raise ValueError(f'{where}: its MoE layers are {list(source.moe_layers)}; the recipe places them at '
                     f'{list(target.moe_layers)}. Only a dense checkpoint can be upcycled.')


def model_config(config: ml_collections.ConfigDict) -> LVLMConfig:
  """The LVLMConfig `build_model` trains, read without weights (an init checkpoint's config.json gives shapes)."""
  if not config.init.checkpoint:
    return recipe.model_config(config)
  return recipe.model_config(config, base=folder_lib.load_config(config.init.checkpoint))


def upcycle_lvlm(flat: dict, cfg: LVLMConfig, rng: jax.Array, source_scan_layers: bool) -> dict:
  """A dense LVLM's flat parameters with the LLM's FFNs upcycled into the experts of `cfg` (sparse upcycling)."""
  root = ('language_model',)
  llm = {p[1:]: v for p, v in flat.items() if p[:1] == root}
  out = {p: v for p, v in flat.items() if p[:1] != root}
  upcycled = upcycle_lib.upcycle(llm, cfg.llm, rng, source_scan_layers=source_scan_layers)
  out.update({root + p: v for p, v in upcycled.items()})
  return out


def data_config(config: ml_collections.ConfigDict, cfg: LVLMConfig, tokenizer_path: str,
                workdir: str) -> pipeline.DataConfig:
  """The pipeline's DataConfig: the recipe's data fields, with the image recipe and image tokens from the model."""
  d = config.data.to_dict()
  pad_to_square = d.pop('pad_to_square')
  if d.pop('synthetic_demo'):
    from moiie_jax.data import synthetic
    ds = synthetic.make_demo_dataset(os.path.join(workdir, 'data'), seed=int(config.seed), n_train=64, n_eval=16,
                                     image_size=cfg.vision.input_size)
    d.update(json_path=ds.captions_json if cfg.llm.moe.variant == 'dense' else ds.train_json,
             image_folder=ds.image_folder, tokenizer_path=ds.tokenizer_dir)
  for key in ('json_path', 'tfds_dir', 'image_folder'):
    d[key] = d.get(key) or None
  d['tokenizer_path'] = d.get('tokenizer_path') or tokenizer_path
  d['seed'] = int(config.seed)
  d['num_epochs'] = None  # the loop stops by step count
  d['length_buckets'] = tuple(d.get('length_buckets') or ())
  return pipeline.DataConfig.for_model(cfg, pad_to_square=pad_to_square, **d)


def check_context(config: ml_collections.ConfigDict, cfg: LVLMConfig) -> None:
  """data.max_length (and its buckets) must fit the language model's positions: RoPE past them is extrapolation
  the model never saw, and a learned position table would be indexed out of range."""
  context = int(cfg.llm.max_position_embeddings)
  longest = max([int(config.data.max_length), *[int(b) for b in (config.data.get('length_buckets') or ())]])
  if longest > context:
    source = f' ({config.init.checkpoint}/config.json)' if config.init.checkpoint else ''
    raise ConfigError(f'config.data.max_length={longest} exceeds the language model\'s context of {context} '
                      f'tokens (llm.max_position_embeddings{source}); lower data.max_length')


def grad_accum_steps(config: ml_collections.ConfigDict, processes: int | None = None) -> int:
  """optimizer.grad_accum_steps, or global_batch_size / (data.batch_size * processes) when that is set."""
  if not config.get('global_batch_size'):
    return int(config.optimizer.grad_accum_steps)
  processes = jax.process_count() if processes is None else processes
  per_step = config.data.batch_size * processes
  if config.global_batch_size % per_step:
    raise ConfigError(f'config.global_batch_size={config.global_batch_size} is not a multiple of data.batch_size '
                     f'({config.data.batch_size}) x processes ({processes})')
  return config.global_batch_size // per_step


def batch_shapes(cfg: LVLMConfig, batch_size: int, max_length: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the step is built for: `batch_size` rows (all processes together) of `max_length` tokens,
  one image each at the tower's size. input_ids / labels / attention_mask int32[B, T], pixel_values f32[B, H, W, C].
  """
  ids = jax.ShapeDtypeStruct((batch_size, max_length), np.int32)
  size = cfg.vision.input_size  # the largest S2 scale when S2 is on
  return {'input_ids': ids, 'labels': ids, 'attention_mask': ids,
          'pixel_values': jax.ShapeDtypeStruct((batch_size, size, size, cfg.vision.num_channels), np.float32)}


# ------------------------------------------------------------------------------------------- the shared builder
# Any positive count will do for an abstract build: the schedule changes values, never the compiled step's shapes.
ABSTRACT_TOTAL_STEPS = 1000


@dataclasses.dataclass
class Training:
  """Everything one stage's training step is built from: what `train` runs and `moiie_jax.aot` compiles.

  Abstract builds (`build_training(..., abstract=True)`) hold ShapeDtypeStructs in `model` / `params`, and no data.
  """
  cfg: LVLMConfig
  model: LVLM  # with its initial weights, or abstract (nnx.eval_shape)
  meta: dict[str, Any]  # the init checkpoint's meta.json ({} from scratch or abstract)
  opt_cfg: ml_collections.ConfigDict  # config.optimizer with grad_accum_steps and total_steps filled in
  mesh: Mesh
  graphdef: nnx.GraphDef
  params: nnx.State
  step: ShardedTrainStep
  batch: dict[str, jax.ShapeDtypeStruct]  # the global batch of one micro-step (`batch_shapes`)
  processes: int  # hosts feeding the batch: B = data.batch_size * processes
  data_cfg: pipeline.DataConfig | None = None  # None when abstract
  data: Any = None  # this process's batch iterator; None when abstract
  tokenizer_path: str | None = None

  @property
  def total_steps(self) -> int:
    return int(self.opt_cfg.total_steps)

  @property
  def micro_steps(self) -> int:
    return int(self.opt_cfg.total_steps) * int(self.opt_cfg.grad_accum_steps)


# Steps built in this process, by everything their program depends on; not the schedule, whose lrs are inputs of
# the step (`optimizer.given_learning_rates`). A later run in the process with the same model, optimizer settings,
# mesh and batch shapes (another lr, length or seed; a resumed run; the study's seeds; the tests) reuses the jitted
# step, already traced and compiled, instead of spending seconds tracing, lowering and loading it again.
_STEPS: collections.OrderedDict[Any, ShardedTrainStep] = collections.OrderedDict()
_STEPS_KEPT = 2


def _step_key(graphdef, cfg, opt_cfg, mesh, params, batch) -> tuple:
  opt = {k: v for k, v in opt_cfg.to_dict().items() if k not in ('lr', 'total_steps', 'warmup_ratio', 'min_lr_ratio')}
  trained = sorted(g for g, lr in optimizer_lib.stage_param_groups(opt_cfg.stage, opt_cfg).items() if lr is not None)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return (graphdef, cfg, json.dumps(opt, sort_keys=True, default=repr), tuple(trained), mesh,
          tuple((jax.tree_util.keystr(p), np.shape(x), str(x.dtype)) for p, x in leaves),
          tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items())))


def _sharded_step(graphdef, tx, cfg, opt_cfg, mesh, params, batch, *, reuse: bool) -> ShardedTrainStep:
  """`make_sharded_train_step`, or the one built earlier in this process for the same program (see `_STEPS`)."""
  if not reuse:
    return make_sharded_train_step(graphdef, tx, cfg, mesh, params, batch)
  key = _step_key(graphdef, cfg, opt_cfg, mesh, params, batch)
  if key in _STEPS:
    _STEPS.move_to_end(key)
    return _STEPS[key]
  step = _STEPS[key] = make_sharded_train_step(graphdef, tx, cfg, mesh, params, batch)
  while len(_STEPS) > _STEPS_KEPT:
    _STEPS.popitem(last=False)
  return step


def build_training(config: ml_collections.ConfigDict, *, workdir: str | None = None,
                   devices: Sequence[Any] | None = None, processes: int | None = None,
                   abstract: bool = False) -> Training:
  """Model, data, optimizer (frozen groups, accumulation, schedule), mesh and sharded step of one stage.

  devices: the mesh's devices; default `config.mesh_devices` of this process, or every device of every process.
  processes: the hosts that feed batches (default `jax.process_count()`); sets the global batch and accumulation.
  abstract: create no weights (`nnx.eval_shape`; an init checkpoint's config.json alone is read) and touch no data
  files or tokenizers; total_steps = 0 (epochs over the data) becomes `ABSTRACT_TOTAL_STEPS`. `workdir` is needed
  only when not abstract (the runlocal recipes generate their demo data set there).
  """
  processes = jax.process_count() if processes is None else int(processes)
  # What the config alone decides is checked first, then the data, then the weights are made or read: a typo, a
  # wrong path or a broken file is reported in seconds.
  cfg = model_config(config)
  check_context(config, cfg)
  opt_cfg = ml_collections.ConfigDict(config.optimizer.to_dict())
  opt_cfg.grad_accum_steps = grad_accum_steps(config, processes)
  if devices is None:
    n_devices = int(config.get('mesh_devices', 0))
    devices = jax.local_devices()[:n_devices] if n_devices else None
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  if abstract:
    meta = {}
    model = nnx.eval_shape(lambda: LVLM(cfg, rngs=nnx.Rngs(config.seed)))
    data_cfg, data, tokenizer_path = None, None, None
  else:
    tokenizer_path = config.data.tokenizer_path or config.init.checkpoint
    data_cfg = data_config(config, cfg, tokenizer_path, workdir)
    tokenizer_path = data_cfg.tokenizer_path
    data = pipeline.make_iterator(data_cfg, process_index=jax.process_index(), process_count=processes)
  try:
    if not abstract:
      cfg, model, meta = build_model(config)
    total_steps = int(config.total_steps)  # optimizer updates
    if total_steps <= 0 and abstract:
      total_steps = ABSTRACT_TOTAL_STEPS
    elif total_steps <= 0:
      global_batch = data_cfg.batch_size * processes * opt_cfg.grad_accum_steps
      total_steps = max(1, math.ceil(data.num_records * config.num_epochs / global_batch))
    opt_cfg.total_steps = total_steps

    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = optimizer_lib.make_optimizer(opt_cfg, params)
    source = data_cfg or config.data  # the same batch_size and max_length either way
    batch = batch_shapes(cfg, source.batch_size * processes, source.max_length)
    step = _sharded_step(graphdef, tx, cfg, opt_cfg, mesh, params, batch, reuse=not abstract)
  except BaseException:
    if data is not None:  # its worker processes would outlive the error
      data.close()
    raise
  return Training(cfg=cfg, model=model, meta=meta, opt_cfg=opt_cfg, mesh=mesh, graphdef=graphdef, params=params,
                  step=step, batch=batch, processes=processes, data_cfg=data_cfg, data=data,
                  tokenizer_path=tokenizer_path)


# ---------------------------------------------------------------------------------------------------- the loop
def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """Trains one stage in `workdir`; returns a summary (steps, last metrics, export path)."""
  compile_cache.enable()
  _check_workdir(workdir)
  try:
    t = build_training(config, workdir=workdir)
  except _INPUT_ERRORS as e:
    raise RunError(_one_line(e)) from e
  cfg, model, meta, data, tokenizer_path = t.cfg, t.model, t.meta, t.data, t.tokenizer_path
  opt_cfg, mesh, train_step = t.opt_cfg, t.mesh, t.step
  total_steps, micro_steps = t.total_steps, t.micro_steps
  params, opt_state = train_step.init(t.params)  # placed on the mesh; optimizer state born sharded
  rng = jax.random.key(config.seed)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=config.keep_checkpoints)
  start = 0
  if ckpt.latest_step() is not None:
    try:
      restored = ckpt.restore(None, {'params': params, 'opt_state': opt_state, 'rng': rng})
    except ckpt_lib.CheckpointError as e:
      data.close()
      raise RunError(_another_run(ckpt, workdir, cfg, e)) from e
    params, opt_state, rng = restored['params'], restored['opt_state'], restored['rng']
    try:
      data.set_state(restored['data'])
    except ValueError as e:
      data.close()
      raise RunError(f'{workdir}: the checkpoint was written with other data settings ({_one_line(e)}); use '
                     f'another --workdir or the same data config') from e
    start = int(restored['step'])
    if jax.process_index() == 0:
      print(f'{workdir}: resuming from step {start} of {micro_steps}', flush=True)
  if jax.process_index() == 0:
    _drop_metrics_after(os.path.join(workdir, 'metrics.jsonl'), start)
  preempted = ckpt_lib.install_preemption_handler()
  # purge_step hides the events of steps after the checkpoint that a killed run wrote, as metrics.jsonl drops them.
  writer = MetricWriter(os.path.join(workdir, 'tensorboard'), enabled=jax.process_index() == 0,
                        purge_step=start + 1)

  saved = [start]
  run_meta = {'total_steps': total_steps, 'model': config_lib.to_dict(cfg)}

  def save(step: int, force: bool = False) -> None:
    """Saves `step` (async unless `force`, which also waits until it is on disk)."""
    if saved[0] == step:
      if force:
        finish()
      return
    # The loss of a step is computed before its update: the weights the update produced can still have blown up,
    # to NaN/inf or to huge finite values (|w| ~ 1e30). Before saving, the state must be finite and the loss of the
    # new weights on the step's batch (one forward pass, as the next step would do) too.
    reason = None
    if not bool(_all_finite((params, opt_state))):
      reason = 'the parameters or optimizer state it updated are not finite'
    else:
      after = float(train_step.eval_step(params, batch)['loss'])
      if not math.isfinite(after):
        reason = f'the updated parameters give a loss of {after} on the same batch'
    if reason is not None:
      _stop(ckpt, data, bar, writer)
      raise NonFiniteLossError(f'step {step}: loss is {float(metrics["loss"])} but {reason}; stopping without '
                               f'saving. The last good checkpoint ({_last_good(ckpt)}) is intact in '
                               f'{workdir}/checkpoints')
    saved[0] = step
    try:
      ckpt.save(step, {'params': params, 'opt_state': opt_state, 'rng': rng, 'data': data.get_state(),
                       'step': step, 'meta': run_meta}, force=force)
    except ckpt_lib.CheckpointSaveError as e:
      _stop(ckpt, data, bar, writer, wait=False)
      raise RunError(f'{e}; the checkpoints before it are intact (latest: {_last_good(ckpt)})') from e
    if force:
      finish()

  def finish() -> None:
    """Waits for the pending async save; its failure is reported like a failed save."""
    try:
      ckpt.wait()
    except ckpt_lib.CheckpointSaveError as e:
      _stop(ckpt, data, bar, writer, wait=False)
      raise RunError(f'{e}; the checkpoints before it are intact (latest: {_last_good(ckpt)})') from e

  bar = progress_lib.progress(micro_steps, start, enabled=progress and jax.process_index() == 0,
                              updates_per_step=int(opt_cfg.grad_accum_steps))
  last: dict[str, float] = {}
  step = start
  accum = int(opt_cfg.grad_accum_steps)
  lrs_at = optimizer_lib.learning_rates(opt_cfg)  # inputs of the step: its program is the same for any schedule
  t0, tokens = time.perf_counter(), 0
  while step < micro_steps:
    try:
      host_batch = next(data)
    except pipeline.NoUsableDataError:
      _stop(ckpt, data, bar, writer)
      raise
    tokens += int(host_batch['attention_mask'].sum())
    batch = mesh_lib.global_batch(_model_inputs(host_batch), mesh)
    params, opt_state, metrics = train_step(params, opt_state, batch, lrs_at(step // accum))
    step += 1
    stop = preempted()  # on several hosts a collective: every process asks once per step
    due_save = stop or step % config.checkpoint_every == 0 or step == micro_steps
    if due_save or step % config.log_every == 0:
      # Checked before every save too: NaN parameters give a NaN loss, so nothing non-finite is ever saved.
      loss = float(metrics['loss'])
      if not math.isfinite(loss):
        _stop(ckpt, data, bar, writer)
        raise NonFiniteLossError(f'step {step}: loss is {loss}; stopping. The last good checkpoint '
                                 f'({_last_good(ckpt)}) is intact in {workdir}/checkpoints')
    if step % config.log_every == 0 or step == micro_steps:
      last = _scalars(metrics)
      elapsed = time.perf_counter() - t0
      last['tokens_per_s'] = tokens / max(elapsed, 1e-9)
      t0, tokens = time.perf_counter(), 0
      last.update({f'lr/{g}': float(lr) for g, lr in lrs_at(step // accum).items()})  # the next update's
      writer.write(step, last, metrics.get('moe_stats'), cfg)
      if jax.process_index() == 0:
        with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
          f.write(json.dumps({'step': step, **last}) + '\n')
      bar.set_postfix(loss=f'{last["loss"]:.4f}')
    bar.update(1)
    if stop:
      save(step, force=True)
      bar.close()
      log.warning('SIGTERM received: saved step %d and stopping', step)
      writer.close()
      data.close()
      return {'steps': step, 'micro_steps': micro_steps, 'updates': step // int(opt_cfg.grad_accum_steps),
              'preempted': True, 'metrics': last}
    if step % config.checkpoint_every == 0:
      save(step)
  bar.close()
  save(step, force=True)
  writer.close()
  summary_path = os.path.join(workdir, 'summary.json')
  if step == start and not last and os.path.exists(summary_path):
    with open(summary_path) as f:  # a rerun of a finished run: the metrics of the run that trained stand
      last = json.load(f).get('metrics', {})
  summary = {'steps': step, 'micro_steps': micro_steps, 'updates': step // int(opt_cfg.grad_accum_steps),
             'preempted': False, 'metrics': last, 'data_stats': data.stats()}
  if config.export_final:
    params = _to_host(params)  # every process takes part in gathering a multi-host array
  if config.export_final and jax.process_index() == 0:
    final = os.path.join(workdir, 'final')
    nnx.update(model, params)
    folder_lib.save_folder(final, cfg, nnx.state(model, nnx.Param), tokenizer_dir=_tokenizer_dir(tokenizer_path),
                           meta={**meta, 'template': config.data.template, 'trained_steps': step},
                           overwrite=True)
    summary['export'] = final
  if jax.process_index() == 0:
    with open(summary_path, 'w') as f:
      json.dump(summary, f, indent=2, default=float)
  data.close()
  return summary


def _check_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that files can be written in it, before anything is built."""
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.write_check_', dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise RunError(f'--workdir {workdir}: cannot write there ({e.strerror or e})') from e


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


def _last_good(ckpt: ckpt_lib.Checkpointer) -> str:
  step = ckpt.latest_step()
  return 'none yet' if step is None else f'step {step}'


def _stop(ckpt, data, bar, writer, wait: bool = True) -> None:
  """Releases what the loop holds before it raises: pending saves finish, workers and files close."""
  bar.close()
  if wait:
    ckpt.wait()
  writer.close()
  data.close()


def _another_run(ckpt: ckpt_lib.Checkpointer, workdir: str, cfg: LVLMConfig, error: Exception) -> str:
  """Why the latest checkpoint in `workdir` does not restore into the model of `cfg`, in one line."""
  try:
    meta = ckpt.restore(None, {}).get('meta') or {}
  except Exception:  # pylint: disable=broad-except
    meta = {}
  stored, wanted = meta.get('model'), config_lib.to_dict(cfg)
  if isinstance(stored, dict):
    old_variant = stored.get('llm', {}).get('moe', {}).get('variant')
    new_variant = cfg.llm.moe.variant
    if old_variant != new_variant:
      return (f'{workdir} holds a {old_variant} run, the config asks for {new_variant}: use another --workdir '
              f'(or the config of that run)')
    diff = [f'{k}={a!r} there, {b!r} here' for k, (a, b) in _differences(stored, wanted).items()]
    if diff:
      return (f'{workdir} holds a run of another model ({"; ".join(diff[:4])}{"; ..." if len(diff) > 4 else ""}): '
              f'use another --workdir')
  first = str(error).split('\n')
  detail = ' '.join(' '.join(first[:2]).split())
  return f'{workdir} holds a run that does not restore into this config ({detail}): use another --workdir'


def _differences(a: Any, b: Any, prefix: str = '') -> dict[str, tuple[Any, Any]]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = {}
    for key in sorted(set(a) | set(b)):
      out.update(_differences(a.get(key), b.get(key), f'{prefix}{key}.'))
    return out
  return {} if a == b else {prefix[:-1]: (a, b)}


def _drop_metrics_after(path: str, step: int) -> None:
  """Drops the lines of metrics.jsonl past `step`: a killed run wrote them, and the resumed run writes them again."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if _metrics_step(line) <= step]
  if len(kept) == len(lines):
    return
  with open(path + '.tmp', 'w') as f:
    f.writelines(kept)
  os.replace(path + '.tmp', path)  # a kill now leaves the old file or the new one, never half of one


def _metrics_step(line: str) -> float:
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return math.inf  # a line cut short by a kill -9: dropped


def _tokenizer_dir(path: str) -> str:
  return path if os.path.isdir(path) else os.path.dirname(path)


MODEL_INPUTS = ('input_ids', 'labels', 'attention_mask', 'pixel_values')


def _model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: batch[k] for k in MODEL_INPUTS}


def _to_host(tree):
  """Parameters as host numpy arrays (gathered over processes when they span hosts)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items() if k != 'moe_stats' and np.ndim(v) == 0}
