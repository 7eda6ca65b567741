"""Optax AdamW with per-module learning rates, frozen modules, warmup + cosine, clipping and accumulation.

Parameters fall into five groups, read from their (Hugging Face style) paths:

  vision_tower           `vision_tower.*`
  multi_modal_projector  `multi_modal_projector.*` (the connector)
  experts                `language_model...mlp.experts.*`   (MoE layers only)
  routers                `language_model...mlp.gate.*`, `...mlp.gate_vis.*`
  language_model         the rest of the LLM (attention, dense FFNs, embeddings, norms, lm_head)

Every group trains at its own peak lr or is frozen. The transform is, from outside in:

  multi_transform({'train': T, 'frozen': set_to_zero()})
  T = MultiSteps(chain(clip_by_global_norm, multi_transform({group: adamw(schedule(group))})), grad_accum_steps)

Frozen parameters reach T only as empty `optax.MaskedNode`s, so they get no Adam moments, no accumulator and do not
count in the clipping norm (as in PyTorch, where frozen parameters have no gradient); their update is exactly zero,
so they stay bit-identical. (Their gradients are still computed by a plain `jax.grad`; a step that wants to skip
that work differentiates only w.r.t. the trainable leaves, see `trainable_mask`.)

Training step style (functional, jit with donated state; `nnx.Optimizer` is not used):

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, labels = make_optimizer(opt_cfg, params)
  opt_state = tx.init(params)                        # fp32 params are the master weights
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch):
    def loss_fn(p):
      return loss(nnx.merge(graphdef, cast_params(p, jnp.bfloat16), rest), batch)   # bf16 compute
    grads = jax.grad(loss_fn)(params)                # float32, like the params
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

Gradient accumulation: with `grad_accum_steps = N > 1` the step above is called once per micro-batch; `tx` (an
`optax.MultiSteps`) averages the N gradients and returns zero updates on the first N-1 calls, the real update on
the N-th. Schedules, clipping and Adam see only the real updates, so `total_steps` counts optimizer updates
(= micro-steps / N) and clipping applies to the mean gradient, as in DeepSpeed and the HF Trainer.

Learning rates as inputs: inside a `given_learning_rates(lrs)` context (entered at trace time, as the training step
does when it is called with lrs) every group's schedule returns lrs[group], a traced scalar, instead of computing
its value from the update count in the graph. The loop computes them with `learning_rates(opt_cfg)`, which runs the
same schedule operations compiled on their own, so the step's numbers are bit-identical either way; but its compiled
program no longer depends on the peak lrs, warmup or total_steps: runs that differ only in those reuse it (the
persistent compilation cache), as an lr sweep or a resumed run with more steps would.

Mixed precision: params (and hence Adam moments and the accumulator) stay float32; `cast_params` casts the
floating leaves to bf16 inside the loss, so the forward/backward runs in bf16 while the cast's transpose hands back
float32 gradients. Updates too small for bf16 (1e-5 of 1.0) still accumulate in the master copy.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_dict

from moiie_jax.models.paths import path_names

GROUPS = ('vision_tower', 'multi_modal_projector', 'language_model', 'experts', 'routers')
STAGES = ('stage1', 'stage2', 'sft_dense', 'moe_only')
# Top-level attribute names that belong to the LLM: an LVLM's `language_model`, or a bare causal LM (`model`,
# `lm_head`) trained on its own.
_LLM_ROOTS = ('language_model', 'model', 'lm_head')
_ROUTER_NAMES = ('gate', 'gate_vis')


class OptimizerConfigError(ValueError):
  """An optimizer config field holds an unusable value; the message names the field."""


def get_config(stage: str = 'stage2') -> ml_collections.ConfigDict:
  """The optimizer config (`config.optimizer` in a recipe). Per-group lrs left at None take the stage's preset."""
  cfg = ml_collections.ConfigDict()
  cfg.stage = stage
  # Per-group peak lr overrides; a value here also unfreezes a group the stage preset freezes.
  cfg.lr = ml_collections.ConfigDict({g: config_dict.placeholder(float) for g in GROUPS})
  cfg.frozen = ''  # groups frozen on top of the preset, comma-separated ('vision_tower,routers')
  cfg.freeze_vision_tower = False  # stage2 only: the released MoIIE stage-2 script keeps the tower frozen
  cfg.total_steps = 0  # optimizer updates (not micro-steps); the loop sets it from the data size
  cfg.warmup_ratio = 0.03  # warmup steps = ceil(ratio * total_steps), as in the HF Trainer
  cfg.min_lr_ratio = 0.0  # cosine floor as a fraction of each group's peak lr
  cfg.b1 = 0.9
  cfg.b2 = 0.999
  cfg.eps = 1e-8
  cfg.weight_decay = 0.0  # decoupled (AdamW); never applied to biases and norm scales
  cfg.grad_clip = 1.0  # global-norm clipping over the trainable parameters; 0 = off
  cfg.grad_accum_steps = 1
  return cfg


def _cfg_get(cfg, name: str, default: Any = None) -> Any:
  if cfg is None:
    return default
  value = cfg.get(name, default) if hasattr(cfg, 'get') else getattr(cfg, name, default)
  return default if value is None else value


def _frozen_set(cfg) -> set[str]:
  frozen = _cfg_get(cfg, 'frozen', ())  # a string in a ConfigDict; a tuple also works in a plain dict
  if isinstance(frozen, str):
    frozen = [f.strip() for f in frozen.split(',') if f.strip()]
  frozen = set(frozen)
  unknown = frozen - set(GROUPS)
  if unknown:
    raise OptimizerConfigError(f'optimizer.frozen={sorted(frozen)}: unknown group(s) {sorted(unknown)}; '
                               f'expected names from {list(GROUPS)}')
  return frozen


def stage_param_groups(stage: str, cfg: ml_collections.ConfigDict | None = None) -> dict[str, float | None]:
  """Peak lr of every group for a training stage (None = frozen), after the overrides in `cfg`.

  stage1     connector only at 1e-3 (paper, MoE-LLaVA; the official MoIIE script uses 5e-4: set
             `lr.multi_modal_projector=5e-4` to match it).
  stage2     everything: vision tower at 2e-6, the rest at 2e-5 (`freeze_vision_tower=True` keeps the tower
             frozen, as the released MoIIE stage-2 script does).
  sft_dense  MoE-LLaVA stage 2 / paper Table 3: LLM (all of it) + connector at 2e-5, vision tower frozen.
  moe_only   MoE-LLaVA stage 3: experts + routers at 2e-5, everything else frozen.
  """
  if stage == 'stage1':
    groups = {g: None for g in GROUPS} | {'multi_modal_projector': 1e-3}
  elif stage == 'stage2':
    groups = {g: 2e-5 for g in GROUPS} | {'vision_tower': None if _cfg_get(cfg, 'freeze_vision_tower') else 2e-6}
  elif stage == 'sft_dense':
    groups = {g: 2e-5 for g in GROUPS} | {'vision_tower': None}
  elif stage == 'moe_only':
    groups = {g: None for g in GROUPS} | {'experts': 2e-5, 'routers': 2e-5}
  else:
    raise OptimizerConfigError(f'optimizer.stage={stage!r}: expected one of {list(STAGES)}')
  overrides = _cfg_get(cfg, 'lr', {}) or {}
  for group, lr in overrides.items():
    if group not in GROUPS:
      raise OptimizerConfigError(f'optimizer.lr.{group}: unknown group; expected one of {list(GROUPS)}')
    if lr is None:
      continue
    if not lr > 0:
      raise OptimizerConfigError(f'optimizer.lr.{group}={lr!r}: expected a positive learning rate '
                                 '(freeze a group with optimizer.frozen)')
    groups[group] = float(lr)
  for group in _frozen_set(cfg):
    groups[group] = None
  return groups


def group_of(names: tuple[str, ...]) -> str:
  """The group of one parameter path, e.g. ('language_model', 'model', 'layers', '1', 'mlp', 'gate', 'kernel')."""
  if not names:
    raise OptimizerConfigError('cannot label a parameter with an empty path')
  root = names[0]
  if root in ('vision_tower', 'multi_modal_projector'):
    return root
  if root not in _LLM_ROOTS:
    raise OptimizerConfigError(f'parameter {".".join(names)}: top-level module {root!r} is in no optimizer group; '
                               f'expected vision_tower, multi_modal_projector or one of {list(_LLM_ROOTS)}')
  for parent, child in zip(names[:-1], names[1:]):
    if parent == 'mlp' and child == 'experts':
      return 'experts'
    if parent == 'mlp' and child in _ROUTER_NAMES:
      return 'routers'
  return 'language_model'


def param_labels(params_state: Any) -> Any:
  """The group name of every leaf: a pytree of strings with the structure of `params_state` (an nnx.State)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: group_of(path_names(path)), params_state)


def _no_decay(names: tuple[str, ...]) -> bool:
  # The HF Trainer's rule: biases and normalisation parameters are not decayed. By name rather than ndim, since
  # scanned layers give a norm scale the shape [L, D].
  return names[-1] == 'bias' or any('norm' in n.lower() for n in names)


def trainable_mask(opt_cfg: ml_collections.ConfigDict, params_state: Any) -> Any:
  """bool pytree: True where the leaf's group trains under `opt_cfg` (for a step that skips frozen gradients)."""
  lrs = stage_param_groups(opt_cfg.stage, opt_cfg)
  return jax.tree_util.tree_map_with_path(lambda path, _: lrs[group_of(path_names(path))] is not None, params_state)


def _warmup_steps(opt_cfg) -> int:
  total = int(opt_cfg.total_steps)
  if total <= 0:
    raise OptimizerConfigError(f'optimizer.total_steps={opt_cfg.total_steps!r}: expected the number of optimizer '
                               'updates (> 0)')
  ratio = float(opt_cfg.warmup_ratio)
  if not 0.0 <= ratio < 1.0:
    raise OptimizerConfigError(f'optimizer.warmup_ratio={ratio!r}: expected a value in [0, 1)')
  # At least one decay step, so a tiny run (total_steps=1) trains at the peak instead of dividing by zero.
  return min(math.ceil(ratio * total), total - 1)


_GIVEN_LRS: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar('moiie_given_lrs', default=None)


@contextlib.contextmanager
def given_learning_rates(lrs: Mapping[str, Any] | None):
  """While active (at trace time), each group's schedule returns lrs[group] whatever the count; None or {} = the
  schedules' own values. See the module docstring."""
  token = _GIVEN_LRS.set(dict(lrs) if lrs else None)
  try:
    yield
  finally:
    _GIVEN_LRS.reset(token)


def learning_rate_schedule(opt_cfg: ml_collections.ConfigDict, group: str) -> optax.Schedule:
  """lr(count) of one group: linear 0 -> peak over the warmup, then cosine peak -> floor at `total_steps`.

  Identical to HF `get_cosine_schedule_with_warmup` (floor 0): the first update runs at lr 0 when warming up.
  A frozen group gets a constant 0. Inside `given_learning_rates(lrs)` it returns lrs[group] instead.
  """
  static = _schedule(opt_cfg, group)

  def schedule(count):
    given = _GIVEN_LRS.get()
    return static(count) if given is None else given[group]

  return schedule


def learning_rates(opt_cfg: ml_collections.ConfigDict) -> Callable[[int], dict[str, np.float32]]:
  """update -> {group: lr as float32} for every group (0 when frozen): the values `given_learning_rates` feeds the
  step. The schedules run compiled on their own over every update count at once (int32, as the step's optimizer
  state counts; elementwise, so the same values to the bit as one count at a time in the step), here, before
  training: computing them per update instead would queue behind the running step on a CPU device and stall the
  loop's host work. Past total_steps the last value holds (the schedules are constant there)."""
  schedules = {g: _schedule(opt_cfg, g) for g in GROUPS}
  counts = jnp.arange(int(opt_cfg.total_steps) + 1, dtype=jnp.int32)
  table = jax.device_get(jax.jit(lambda c: {g: s(c) for g, s in schedules.items()})(counts))
  table = {g: np.broadcast_to(np.asarray(v, np.float32), counts.shape) for g, v in table.items()}  # frozen: a scalar
  last = int(opt_cfg.total_steps)

  def at(update: int) -> dict[str, np.float32]:
    i = min(int(update), last)
    return {g: v[i] for g, v in table.items()}

  return at


def _schedule(opt_cfg: ml_collections.ConfigDict, group: str) -> optax.Schedule:
  """`learning_rate_schedule` with the schedule's numbers in the graph."""
  if group not in GROUPS:
    raise OptimizerConfigError(f'learning_rate_schedule: unknown group {group!r}; expected one of {list(GROUPS)}')
  peak = stage_param_groups(opt_cfg.stage, opt_cfg)[group]
  if peak is None:
    return optax.constant_schedule(0.0)
  floor = float(opt_cfg.min_lr_ratio)
  if not 0.0 <= floor <= 1.0:
    raise OptimizerConfigError(f'optimizer.min_lr_ratio={floor!r}: expected a value in [0, 1]')
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=_warmup_steps(opt_cfg),
                                            decay_steps=int(opt_cfg.total_steps), end_value=peak * floor)


def current_lrs(opt_cfg: ml_collections.ConfigDict, step: int) -> dict[str, float]:
  """Every group's lr at optimizer update `step` (micro-steps // grad_accum_steps), for logging; 0 when frozen."""
  return {g: float(learning_rate_schedule(opt_cfg, g)(step)) for g in GROUPS}


def _group_adamw(opt_cfg, group: str) -> optax.GradientTransformation:
  wd = float(opt_cfg.weight_decay)
  mask = None
  if wd:
    mask = lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: not _no_decay(path_names(path)), tree)
  return optax.adamw(learning_rate_schedule(opt_cfg, group), b1=float(opt_cfg.b1), b2=float(opt_cfg.b2),
                     eps=float(opt_cfg.eps), weight_decay=wd, mask=mask)


def make_optimizer(opt_cfg: ml_collections.ConfigDict,
                   params_state: Any) -> tuple[optax.GradientTransformation, Any]:
  """The full optimizer for `params_state` (an nnx.State of nnx.Param, concrete or abstract).

  Returns (tx, labels): `tx.init(params)` allocates Adam moments (and the accumulator) for trainable groups only;
  `labels` is `param_labels(params_state)`. Raises if the stage trains no parameter of this model.
  """
  lrs = stage_param_groups(opt_cfg.stage, opt_cfg)
  labels = param_labels(params_state)
  present = set(jax.tree.leaves(labels))
  trainable = sorted(g for g in present if lrs[g] is not None)
  if not trainable:
    raise OptimizerConfigError(
        f'optimizer.stage={opt_cfg.stage!r} trains groups {sorted(g for g, lr in lrs.items() if lr is not None)} '
        f'but this model only has parameters in {sorted(present)}: nothing would train')
  accum = int(opt_cfg.grad_accum_steps)
  if accum < 1:
    raise OptimizerConfigError(f'optimizer.grad_accum_steps={accum!r}: expected an integer >= 1')
  clip = float(opt_cfg.grad_clip)
  if clip < 0:
    raise OptimizerConfigError(f'optimizer.grad_clip={clip!r}: expected >= 0 (0 turns clipping off)')

  # Labels are recomputed from paths inside each multi_transform (a callable rather than a fixed tree) because the
  # inner transforms see trees in which the frozen leaves are MaskedNodes.
  group_labels = lambda tree: param_labels(tree)
  train_or_frozen = lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, _: 'train' if lrs[group_of(path_names(path))] is not None else 'frozen', tree)

  inner = optax.multi_transform({g: _group_adamw(opt_cfg, g) if lrs[g] is not None else optax.set_to_zero()
                                 for g in GROUPS}, group_labels)
  if clip > 0:
    inner = optax.chain(optax.clip_by_global_norm(clip), inner)
  if accum > 1:
    inner = optax.MultiSteps(inner, every_k_schedule=accum).gradient_transformation()
  tx = optax.multi_transform({'train': inner, 'frozen': optax.set_to_zero()}, train_or_frozen)
  return tx, labels


def cast_params(state: Any, dtype: Any = jnp.bfloat16,
                keep_fp32: Callable[[tuple[str, ...]], bool] | None = None) -> Any:
  """Casts the floating leaves of a params state to `dtype` for the forward pass; the master copy stays fp32.

  `keep_fp32(names)` selects leaves left in float32; the default keeps the routers (groups `routers`), which
  compute in float32 so that near-tied top-k choices are not decided by bf16 rounding. Integer leaves never change.
  Differentiating through the cast returns gradients in each leaf's original dtype.
  """
  if keep_fp32 is None:
    keep_fp32 = lambda names: names[0] in _LLM_ROOTS and group_of(names) == 'routers'

  def cast(path, x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or keep_fp32(path_names(path)):
      return x
    return x.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, state)
