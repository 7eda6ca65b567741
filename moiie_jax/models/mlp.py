"""The feed-forward block of a decoder layer (HF `LlamaMLP` / `Phi3MLP` / `PhiMLP` / StableLM's and Qwen2's MLP).

Parameters carry HF names. SwiGLU (`LLMConfig.mlp_kind`): LLaMA, StableLM, Qwen2 `gate_proj`, `up_proj` (kernels
[D, F]) and `down_proj` ([F, D]), biases iff cfg.mlp_bias; Phi-3 one fused `gate_up_proj` (kernel [D, 2F], the
gate's F columns first, then up's, as HF's `chunk(2)` reads them) and `down_proj`, no biases. GELU (Phi-2): `fc1`
[D, F] and `fc2` [F, D], both with biases, `hidden_act` between them. The MoE block stacks these same names on a
leading expert axis.

Letters: B batch, T tokens, D model width, F FFN width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moiie_jax.models.attention import logical
from moiie_jax.models.config import GELU_ACTIVATIONS, ConfigError, LLMConfig
from moiie_jax.models.linear import Linear


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, elementwise: the SwiGLU activation of HF's `act_fn(gate_proj(x)) * up_proj(x)`."""
  return jax.nn.silu(gate) * up


def gelu(name: str):
  """The HF activation `name` of a GELU MLP (gelu_new, gelu_pytorch_tanh and gelu_fast are the tanh form)."""
  if name not in GELU_ACTIVATIONS:
    raise ConfigError(f'LLMConfig.hidden_act={name!r}: expected one of {list(GELU_ACTIVATIONS)}')
  approximate = name != 'gelu'
  return lambda x: jax.nn.gelu(x, approximate=approximate)


def split_gate_up(gate_up: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[..., 2F] -> (gate [..., F], up [..., F]): Phi-3's fused layout (HF `chunk(2, dim=-1)`)."""
  f = gate_up.shape[-1] // 2
  return gate_up[..., :f], gate_up[..., f:]


class MLP(nnx.Module):
  """Dense FFN: x [B, T, D] -> [B, T, D]."""

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.hidden_size, cfg.intermediate_size
    if cfg.fused_projections and cfg.mlp_bias:
      raise ConfigError('LLMConfig.mlp_bias=True: the Phi-3 MLP has no biases (HF ignores the flag)')
    init = nnx.initializers.normal(cfg.initializer_range)
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    zeros = nnx.initializers.zeros_init()
    if cfg.mlp_kind == 'gelu':
      gelu(cfg.hidden_act)  # an unknown activation fails here, not at the first call
      self.fc1 = Linear(d, f, kernel_init=logical(init, 'embed', 'mlp'), bias_init=logical(zeros, 'mlp'), **kw)
      self.fc2 = Linear(f, d, kernel_init=logical(init, 'mlp', 'embed'), bias_init=logical(zeros, 'embed'), **kw)
      return
    if cfg.fused_projections:
      self.gate_up_proj = Linear(d, 2 * f, use_bias=False, kernel_init=logical(init, 'embed', 'gate_up'), **kw)
    else:
      up = dict(use_bias=cfg.mlp_bias, kernel_init=logical(init, 'embed', 'mlp'),
                bias_init=logical(nnx.initializers.zeros_init(), 'mlp'), **kw)
      self.gate_proj = Linear(d, f, **up)
      self.up_proj = Linear(d, f, **up)
    self.down_proj = Linear(f, d, use_bias=cfg.mlp_bias and not cfg.fused_projections,
                                kernel_init=logical(init, 'mlp', 'embed'),
                                bias_init=logical(nnx.initializers.zeros_init(), 'embed'), **kw)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    if self.cfg.mlp_kind == 'gelu':
      return self.fc2(gelu(self.cfg.hidden_act)(self.fc1(x_btd)))
    if self.cfg.fused_projections:
      gate, up = split_gate_up(self.gate_up_proj(x_btd))  # [B, T, F] each
    else:
      gate, up = self.gate_proj(x_btd), self.up_proj(x_btd)
    return self.down_proj(swiglu(gate, up))
