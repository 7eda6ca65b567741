"""The vision-to-language connector: LLaVA-1.5's 2-layer GELU MLP (HF `LlavaMultiModalProjector`).

Letters: B batch, N image tokens, V vision width (Dv), D LLM width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moiie_jax.models.linear import Linear
from moiie_jax.models.vision import activation


def _torch_linear_init(fan_in: int):
  """PyTorch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernel and bias.

  LLaVA creates its projector after loading the LLM, so the projector trained from scratch in stage 1 starts from
  this default, not from the LLM's normal(0.02).
  """
  bound = fan_in**-0.5

  def init(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class MultiModalProjector(nnx.Module):
  """linear_1 (V -> D) -> activation -> linear_2 (D -> D)."""

  def __init__(self, vision_width: int, llm_width: int, *, act: str = 'gelu', bias: bool = True,
               dtype: str = 'float32', param_dtype: str = 'float32', rngs: nnx.Rngs):
    """act: HF `projector_hidden_act` ('gelu' is the exact erf GELU); bias: HF `multimodal_projector_bias`."""
    self.act = activation(act, 'projector_hidden_act')
    kw = {'use_bias': bias, 'dtype': jnp.dtype(dtype), 'param_dtype': jnp.dtype(param_dtype), 'rngs': rngs}
    self.linear_1 = Linear(vision_width, llm_width, kernel_init=_torch_linear_init(vision_width),
                               bias_init=_torch_linear_init(vision_width), **kw)
    self.linear_2 = Linear(llm_width, llm_width, kernel_init=_torch_linear_init(llm_width),
                               bias_init=_torch_linear_init(llm_width), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[B, N, V] image features -> [B, N, D] in the compute dtype."""
    return self.linear_2(self.act(self.linear_1(x)))
