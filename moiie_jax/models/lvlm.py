"""The vision-language model: vision tower -> MLP connector -> decoder LLM (HF `LlavaForConditionalGeneration`).

Image convention (LLaVA's): the prompt's single `<image>` placeholder has already been expanded by the data
pipeline into `num_image_tokens` consecutive copies of `image_token_id`; here each copy's embedding is replaced
by the matching projected image feature, in order. The per-token modality mask (1 image, 0 text) is returned so
the MoE layers and the routing analysis know which tokens came from the image.

B batch, T tokens, N image tokens per image, D LLM width, V vocabulary, H/W image height/width, C channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from moiie_jax.models.config import LVLMConfig
from moiie_jax.models.connector import MultiModalProjector
from moiie_jax.models.decoder import CausalLM
from moiie_jax.models.vision import VisionTower


@struct.dataclass
class LVLMOutput:
  logits: jax.Array  # float32[B, T, V]
  hidden_states: jax.Array  # [B, T, D], after the final norm
  modality: jax.Array  # int32[B, T], 1 where the token is an image token
  moe_stats: object  # the MoE layers' routing statistics (None for a dense model)
  cache: object  # the updated KV cache, or None


class LVLM(nnx.Module):
  """Attributes carry HF LLaVA names: `vision_tower`, `multi_modal_projector`, `language_model`."""

  def __init__(self, cfg: LVLMConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.vision_tower = VisionTower(cfg.vision, rngs=rngs)
    self.multi_modal_projector = MultiModalProjector(
        cfg.vision.feature_size, cfg.llm.hidden_size, act=cfg.projector_hidden_act,
        bias=cfg.multimodal_projector_bias, rngs=rngs)
    self.language_model = CausalLM(cfg.llm, rngs=rngs)

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: float32[B, H, W, C] (normalised) -> projected features [B, N, D]."""
    with jax.named_scope('vision_tower'):  # a profile's label (bench/step_profile.py)
      feats = self.vision_tower.features(pixel_values, self.cfg.vision_feature_layer,
                                         self.cfg.vision_feature_select_strategy)
    with jax.named_scope('multi_modal_projector'):
      return self.multi_modal_projector(feats)

  def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Text embeddings with image features placed at the image tokens.

    input_ids: int32[B, T]; pixel_values: float32[B, H, W, C] or None (then no image token may appear).
    Returns (embeds [B, T, D], modality int32[B, T]).
    """
    is_image = input_ids == self.cfg.image_token_id
    # The placeholder id may lie outside the vocabulary (it never comes from the tokenizer); look up id 0 there.
    text_ids = jnp.where(is_image, 0, input_ids)
    embeds = self.language_model.model.embed_tokens(text_ids)
    if pixel_values is None:
      return embeds, jnp.zeros_like(input_ids, dtype=jnp.int32)
    feats = self.image_features(pixel_values).astype(embeds.dtype)  # [B, N, D]
    # The k-th image token of a row takes the row's k-th feature.
    order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)  # [B, T]
    placed = jnp.take_along_axis(feats, order[..., None], axis=1)  # [B, T, D]
    embeds = jnp.where(is_image[..., None], placed, embeds)
    return embeds, is_image.astype(jnp.int32)

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, *,
               attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
               cache: object = None, modality: jax.Array | None = None) -> LVLMOutput:
    """input_ids int32[B, T]; attention_mask int32[B, T] (1 real, 0 padding; the whole cache length when
    decoding with `cache`); pixel_values float32[B, H, W, C] or None for text-only rows/steps.

    `modality` overrides the image mask (decoding steps after the prompt carry no image tokens).
    """
    embeds, image_mask = self.embed(input_ids, pixel_values)
    if modality is None:
      modality = image_mask
    out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions,
                              modality=modality, cache=cache)
    return LVLMOutput(logits=out.logits, hidden_states=out.hidden_states, modality=modality,
                      moe_stats=out.moe_stats, cache=out.cache)


def check_image_tokens(input_ids, has_image, cfg: LVLMConfig, where: str = 'batch') -> None:
  """Host-side check (numpy inputs): rows with an image hold exactly num_image_tokens placeholders, others none."""
  import numpy as np
  counts = (np.asarray(input_ids) == cfg.image_token_id).sum(axis=1)
  want = np.where(np.asarray(has_image), cfg.num_image_tokens, 0)
  bad = np.nonzero(counts != want)[0]
  if bad.size:
    row = int(bad[0])
    raise ValueError(f'{where}: row {row} has {int(counts[row])} image tokens (id {cfg.image_token_id}), expected '
                     f'{int(want[row])}')
