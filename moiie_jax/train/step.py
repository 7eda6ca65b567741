"""The loss and the jit-compiled training/eval steps, in functional (graphdef, params) form for donation.

loss = LM cross-entropy (mean over answer tokens) + aux_loss_coef * load-balancing loss (+ z_loss_coef * z-loss).

B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moiie_jax.models import moe as moe_lib
from moiie_jax.models.config import LVLMConfig

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
  """(params, opt_state, batch) -> (params, opt_state, metrics): one optimizer update.

  Gradient accumulation is the optimizer's (optax.MultiSteps): each call is one micro-batch.
  """

  def train_step(params: nnx.State, opt_state: Any, batch: Batch):
    def f(p):
      model = nnx.merge(graphdef, p, rest) if rest is not None else nnx.merge(graphdef, p)
      return loss_fn(model, batch, cfg)

    (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
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
