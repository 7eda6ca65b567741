"""The loss and the training/eval steps, in functional (graphdef, params) form for donation, and the same step
jit-compiled over a mesh with explicit shardings.

loss = LM cross-entropy (mean over answer tokens) + aux_loss_coef * load-balancing loss (+ z_loss_coef * z-loss).

The sharded step:

    mesh = mesh_lib.make_mesh({'fsdp': 2, 'expert': 4})
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = optimizer.make_optimizer(opt_cfg, params)
    step = make_sharded_train_step(graphdef, tx, cfg, mesh, params, example_batch)
    params, opt_state = step.init(params)                     # placed on the mesh, opt state born sharded
    params, opt_state, metrics = step(params, opt_state, step.shard_batch(batch))

It is `make_train_step` itself (same loss, same optimizer), run inside `dispatch.expert_parallel(plan)` so that its
MoE blocks dispatch expert-parallel. Everything else (attention, embeddings, vision tower) is partitioned by XLA
from the parameter and batch shardings. Parameters and optimizer state are donated: the caller's old buffers are
invalid after a call.

B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from moiie_jax.models import moe as moe_lib
from moiie_jax.models.config import LVLMConfig
from moiie_jax.parallel import dispatch
from moiie_jax.parallel import sharding as sharding_lib
from moiie_jax.train import optimizer as optimizer_lib

IGNORE = -100
Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token loss. logits: float[B, T, V]; labels: int32[B, T] unshifted (HF), -100 = no loss.

  Returns (sum of token losses, number of loss tokens), both float32 scalars.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  mask = targets != IGNORE
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, logz - picked, 0.0)), jnp.sum(mask).astype(jnp.float32)


def loss_fn(model: nnx.Module, batch: Batch, cfg: LVLMConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar training loss and metrics of one batch.

  batch: input_ids int32[B, T], labels int32[B, T], attention_mask int32[B, T], pixel_values float32[B, H, W, C].
  """
  out = model(batch['input_ids'], batch.get('pixel_values'), attention_mask=batch['attention_mask'])
  with jax.named_scope('loss'):  # a profile's label (bench/step_profile.py)
    loss_sum, n_tokens = cross_entropy(out.logits, batch['labels'])
  ce = loss_sum / jnp.maximum(n_tokens, 1.0)
  metrics = {'ce_loss': ce, 'loss_tokens': n_tokens}
  loss = ce
  moe_cfg = cfg.llm.moe
  if moe_cfg.is_moe and out.moe_stats is not None:
    aux, z = moe_lib.aux_loss(out.moe_stats, moe_cfg)
    loss = loss + moe_cfg.aux_loss_coef * aux + moe_cfg.z_loss_coef * z
    metrics.update(aux_loss=aux, z_loss=z, moe_stats=out.moe_stats)
  metrics['loss'] = loss
  return loss, metrics


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: LVLMConfig,
                    rest: Any = None) -> Callable:
  """(params, opt_state, batch[, lrs]) -> (params, opt_state, metrics): one optimizer update.

  Gradient accumulation is the optimizer's (optax.MultiSteps): each call is one micro-batch. `lrs`: {group: lr} of
  this update (`optimizer.learning_rates`), fed to the schedules (`optimizer.given_learning_rates`) so that the
  program does not depend on the schedule's numbers; None or {} = the schedules compute them in the graph.
  """

  def train_step(params: nnx.State, opt_state: Any, batch: Batch, lrs: Mapping[str, Any] | None = None):
    def f(p):
      model = nnx.merge(graphdef, p, rest) if rest is not None else nnx.merge(graphdef, p)
      return loss_fn(model, batch, cfg)

    (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    with jax.named_scope('optimizer'), optimizer_lib.given_learning_rates(lrs):
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    return params, opt_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, cfg: LVLMConfig, rest: Any = None) -> Callable:
  """(params, batch) -> metrics (same loss as training, no update)."""

  def eval_step(params: nnx.State, batch: Batch):
    model = nnx.merge(graphdef, params, rest) if rest is not None else nnx.merge(graphdef, params)
    return loss_fn(model, batch, cfg)[1]

  return eval_step


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


@dataclasses.dataclass
class ShardedTrainStep:
  """A compiled-on-first-call training step with the shardings it was built for."""
  mesh: Mesh
  plan: dispatch.ExpertParallel
  params_sharding: Any
  opt_state_sharding: Any
  batch_sharding: dict[str, Any]
  tx: optax.GradientTransformation
  step: Callable  # jitted (params, opt_state, batch, lrs) -> (params, opt_state, metrics); lrs {} or {group: lr}
  eval_step: Callable  # jitted (params, batch) -> metrics

  def __call__(self, params, opt_state, batch, lrs: Mapping[str, Any] | None = None):
    """One update; `lrs` as in `make_train_step` (None: the optimizer's schedules in the graph)."""
    return self.step(params, opt_state, batch, dict(lrs or {}))

  def init(self, params: Any) -> tuple[Any, Any]:
    """(params placed on the mesh, optimizer state created directly in its sharding)."""
    params = jax.device_put(params, self.params_sharding)
    opt_state = jax.jit(self.tx.init, out_shardings=self.opt_state_sharding)(params)
    return params, opt_state

  def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """A global batch held by this (single) process -> arrays split over the batch axes. Multi-host runs build
    global arrays from each host's rows with `mesh.global_batch` instead."""
    return {k: jax.device_put(v, self.batch_sharding[k]) for k, v in batch.items() if v is not None}


def make_sharded_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: LVLMConfig, mesh: Mesh,
                            params: Any, batch: Mapping[str, Any], rest: Any = None, *,
                            donate: bool = True) -> ShardedTrainStep:
  """Builds the sharded step for `params` (an nnx.State, concrete or abstract) and batches shaped like `batch`.

  Checks up front, with errors naming the field: experts divisible by the expert axis, batch divisible by the batch
  axes. `rest`: non-parameter state of the split (closed over, replicated), as in `make_train_step`.
  """
  moe = cfg.llm.moe
  plan = dispatch.ExpertParallel(mesh)
  if moe.is_moe:
    dispatch.check_experts(moe, plan)
  inner_train = make_train_step(graphdef, tx, cfg, rest)
  inner_eval = make_eval_step(graphdef, cfg, rest)

  # The expert-parallel context is entered inside the traced functions, so every trace (and retrace) sees it.
  def train_step(params, opt_state, batch, lrs):
    with dispatch.expert_parallel(plan):
      return inner_train(params, opt_state, batch, lrs)

  def eval_step(params, batch):
    with dispatch.expert_parallel(plan):
      return inner_eval(params, batch)

  params_sharding = sharding_lib.param_shardings(params, mesh)
  opt_state_sharding = sharding_lib.opt_state_shardings(jax.eval_shape(tx.init, _abstract(params)), params, mesh)
  batch_sharding = sharding_lib.batch_shardings(batch, mesh)
  metrics_sharding = sharding_lib.replicated(mesh)
  step = jax.jit(train_step, in_shardings=(params_sharding, opt_state_sharding, batch_sharding, metrics_sharding),
                 out_shardings=(params_sharding, opt_state_sharding, metrics_sharding),
                 donate_argnums=(0, 1) if donate else ())
  evaluate = jax.jit(eval_step, in_shardings=(params_sharding, batch_sharding), out_shardings=metrics_sharding)
  return ShardedTrainStep(mesh=mesh, plan=plan, params_sharding=params_sharding,
                          opt_state_sharding=opt_state_sharding, batch_sharding=batch_sharding, tx=tx, step=step,
                          eval_step=evaluate)


def make_grouped_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: LVLMConfig,
                            params: Any, groups: int, rest: Any = None) -> Callable:
  """The single-device statement of the sharded step (jitted, no shardings): MoE capacity per batch shard of
  `groups` shards (`dispatch.grouped_moe`), otherwise `make_train_step` unchanged. The oracle of the
  tight-capacity tests; with ample capacity it equals the plain single-device step."""
  del params  # the step is shape-polymorphic in them; kept for the signature's symmetry with the sharded step
  inner = make_train_step(graphdef, tx, cfg, rest)

  def train_step(params, opt_state, batch):
    with dispatch.expert_parallel(groups):
      return inner(params, opt_state, batch)

  return jax.jit(train_step)

