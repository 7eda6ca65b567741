"""ViT vision towers, SigLIP and CLIP, as HF `SiglipVisionModel` / `CLIPVisionModel` compute them.

Parameter paths follow HF's module names under one `vision_model` attribute (as in SigLIP/CLIP checkpoints and
in LLaVA's `vision_tower.vision_model.*`), so conversion is renames and transposes only:

  vision_model.embeddings.patch_embedding        nnx.Conv, kernel [P, P, C, D] (HF Conv2d weight [D, C, P, P])
  vision_model.embeddings.position_embedding     nnx.Embed [positions, D]
  vision_model.embeddings.class_embedding        CLIP only, Param [D]
  vision_model.pre_layrnorm                      CLIP only (HF's spelling)
  vision_model.encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}
  vision_model.post_layernorm

The patch embedding is an nnx.Conv rather than a Linear over flattened patches: its kernel is HF's Conv2d
weight with the axes moved (OIHW -> HWIO), which keeps the converter a plain transpose.

SigLIP's attention-pooling `head` is not built: LLaVA-style models read the patch tokens, never the pooled vector.

Letters: B batch, T tokens (patches, plus CLIP's class token), S key length, D width, F FFN width, N heads,
H head dim, P patch size, C image channels.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moiie_jax.models import partitioning
from moiie_jax.models import s2
from moiie_jax.models.config import VisionConfig
from moiie_jax.models.linear import Linear

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # HF's gelu_pytorch_tanh is torch's tanh approximation, which jax.nn.gelu(approximate=True) computes.
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}


def activation(name: str, field: str = 'hidden_act') -> Callable[[jax.Array], jax.Array]:
  """The HF `ACT2FN[name]` function; an unknown name is a ValueError naming `field`."""
  if name not in ACTIVATIONS:
    raise ValueError(f'{field}={name!r}: unsupported activation; expected one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def _dtypes(cfg: VisionConfig) -> dict:
  return {'dtype': jnp.dtype(cfg.dtype), 'param_dtype': jnp.dtype(cfg.param_dtype)}


def _layer_norm(cfg: VisionConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance, as torch computes it: the one-pass E[x^2] - E[x]^2 loses digits on large activations.
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, **_dtypes(cfg),
                       rngs=rngs)


class Attention(nnx.Module):
  """Bidirectional multi-head self-attention (HF `SiglipAttention` / `CLIPAttention`)."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    if cfg.hidden_size % cfg.num_attention_heads:
      raise ValueError(f'VisionConfig.num_attention_heads={cfg.num_attention_heads} must divide '
                       f'hidden_size={cfg.hidden_size}')
    self.num_heads = cfg.num_attention_heads
    self.head_dim = cfg.hidden_size // cfg.num_attention_heads
    d = cfg.hidden_size
    self.q_proj = Linear(d, d, **_dtypes(cfg), rngs=rngs)
    self.k_proj = Linear(d, d, **_dtypes(cfg), rngs=rngs)
    self.v_proj = Linear(d, d, **_dtypes(cfg), rngs=rngs)
    self.out_proj = Linear(d, d, **_dtypes(cfg), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, D] -> [B, T, D]."""
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # [B, T, N, H]
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    logits = jnp.einsum('BTNH,BSNH->BNTS', q, k) * self.head_dim**-0.5
    # Softmax in float32 whatever the compute dtype, as HF's eager attention does.
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum('BNTS,BSNH->BTNH', probs, v).reshape(b, t, -1)  # [B, T, D]
    return self.out_proj(out)


class MLP(nnx.Module):
  """fc1 -> activation -> fc2 (HF `SiglipMLP` / `CLIPMLP`)."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.act = activation(cfg.hidden_act, 'VisionConfig.hidden_act')
    self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, **_dtypes(cfg), rngs=rngs)
    self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, **_dtypes(cfg), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, D] -> [B, T, D] (through [B, T, F])."""
    return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
  """Pre-norm transformer block (HF `SiglipEncoderLayer` / `CLIPEncoderLayer`)."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.layer_norm1 = _layer_norm(cfg, rngs)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.layer_norm2 = _layer_norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, D] -> [B, T, D]."""
    x = partitioning.batch_sharded(x)
    x = partitioning.batch_sharded(x + self.self_attn(self.layer_norm1(x)))
    return partitioning.batch_sharded(x + self.mlp(self.layer_norm2(x)))


class Encoder(nnx.Module):
  """The stack of encoder layers; `__call__` runs only the first `num_layers` of them."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x: jax.Array, num_layers: int) -> jax.Array:
    """x: [B, T, D] -> the hidden state after layer `num_layers` (x itself for 0), [B, T, D]."""
    for layer in self.layers[:num_layers]:
      x = layer(x)
    return x


class Embeddings(nnx.Module):
  """Patch embedding + learned absolute positions, with CLIP's class token in front (HF `*VisionEmbeddings`)."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, d = cfg.patch_size, cfg.hidden_size
    # CLIP's patch conv has no bias (its class token carries none either); SigLIP's has one.
    self.patch_embedding = nnx.Conv(cfg.num_channels, d, (p, p), strides=(p, p), padding='VALID',
                                    use_bias=not cfg.has_class_token, **_dtypes(cfg), rngs=rngs)
    if cfg.has_class_token:
      self.class_embedding = nnx.Param(
          nnx.initializers.normal(d**-0.5)(rngs.params(), (d,), jnp.dtype(cfg.param_dtype)))
    positions = cfg.num_patches + int(cfg.has_class_token)
    self.position_embedding = nnx.Embed(positions, d, **_dtypes(cfg), rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: float32[B, H, W, C] (normalised) -> [B, T, D]."""
    cfg = self.cfg
    size = cfg.image_size
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (size, size, cfg.num_channels):
      raise ValueError(f'pixel_values has shape {tuple(pixel_values.shape)}; the {cfg.architecture} tower expects '
                       f'[B, {size}, {size}, {cfg.num_channels}] (NHWC, image_size={size}: position embeddings '
                       f'are fixed-size and not interpolated)')
    x = self.patch_embedding(pixel_values.astype(jnp.dtype(cfg.dtype)))  # [B, H/P, W/P, D]
    # Row-major flattening of the patch grid matches HF's `flatten(2).transpose(1, 2)` of the NCHW conv output.
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, D]
    if cfg.has_class_token:
      cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + T, D]
    return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class VisionTransformer(nnx.Module):
  """HF `SiglipVisionModel` / `CLIPVisionModel` without SigLIP's pooling head."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    if cfg.has_class_token:
      self.pre_layrnorm = _layer_norm(cfg, rngs)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.post_layernorm = _layer_norm(cfg, rngs)

  def __call__(self, pixel_values: jax.Array, num_layers: int) -> jax.Array:
    """pixel_values: float32[B, H, W, C] -> hidden_states[num_layers] (HF indexing), [B, T, D]."""
    x = self.embeddings(pixel_values)
    if self.cfg.has_class_token:
      # HF's hidden_states[0] is the encoder input, so CLIP's is already pre-normed.
      x = self.pre_layrnorm(x)
    return self.encoder(x, num_layers)


class VisionTower(nnx.Module):
  """The vision tower of an LVLM: one `vision_model` attribute holding the HF-named ViT."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.vision_model = VisionTransformer(cfg, rngs=rngs)

  def resolve_layer(self, layer: int) -> int:
    """An HF hidden_states index (negative counts from the end) as the number of layers to run, 0..L."""
    n = self.cfg.num_hidden_layers
    if not -n - 1 <= layer <= n:
      raise ValueError(f'vision output layer {layer}: the tower has {n} layers, so hidden_states indices run '
                       f'from {-n - 1} to {n}')
    return layer % (n + 1)

  def __call__(self, pixel_values: jax.Array, *, output_layer: int | None = None) -> jax.Array:
    """pixel_values: float32[B, H, W, C] (NHWC, normalised) -> [B, T, D] in the compute dtype.

    output_layer=None: HF's `last_hidden_state`. SigLIP applies `post_layernorm` to it; CLIP does not (HF CLIP
    applies `post_layernorm` only to the pooled class token, `vision_model.post_layernorm(out[:, 0])`).
    output_layer=i: HF's `hidden_states[i]` (0 embeddings, i after layer i, -1 last layer before post_layernorm);
    only the layers up to i run.
    """
    if output_layer is not None:
      return self.vision_model(pixel_values, self.resolve_layer(output_layer))
    x = self.vision_model(pixel_values, self.cfg.num_hidden_layers)
    return x if self.cfg.has_class_token else self.vision_model.post_layernorm(x)

  def features(self, pixel_values: jax.Array, layer: int, select_strategy: str = 'default') -> jax.Array:
    """LLaVA's image features: hidden_states[layer], CLIP's class token dropped when select_strategy='default'.

    pixel_values: float32[B, S, S, C] with S = cfg.input_size -> [B, N, D'] (N = num_patches, plus 1 for CLIP with
    'full'; D' = cfg.feature_size: the tower width, times the number of scales with S2, see models/s2.py).
    SigLIP has no class token, so both strategies keep all patches (HF LLaVA would slice off a patch under
    'default'; SigLIP LLaVA checkpoints therefore use 'full', which is what both mean here). 'drop_first' is
    MoE-LLaVA's `[:, 1:]` whatever the tower: CLIP's class token, or SigLIP's first patch (728 of 729 tokens).
    """
    if select_strategy not in ('default', 'full', 'drop_first'):
      raise ValueError(f'vision_feature_select_strategy={select_strategy!r}: expected default, full or drop_first')
    cfg = self.cfg
    if cfg.s2_scales:
      size = cfg.input_size
      if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:3]) != (size, size):
        raise ValueError(f'pixel_values has shape {tuple(pixel_values.shape)}; the S2 tower (scales '
                         f'{list(cfg.s2_scales)}) expects [B, {size}, {size}, {cfg.num_channels}], the largest scale')
      return s2.multiscale_features(lambda tiles: self(tiles, output_layer=layer), pixel_values, cfg.s2_scales)
    x = self(pixel_values, output_layer=layer)
    if (select_strategy == 'default' and cfg.has_class_token) or select_strategy == 'drop_first':
      x = x[:, 1:]
    return x
