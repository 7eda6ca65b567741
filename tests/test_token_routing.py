"""Per-token routing (the web chat's routing view): each token's combine weights per MoE layer, summing to 1 for
routed tokens, within its modality's experts, adding up to the layer's routing statistics; scanned = looped; dense
models have none."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from moiie_jax.evaluate.token_routing import GROUPS, token_routing
from moiie_jax.models import config as config_lib
from moiie_jax.models.lvlm import LVLM

V, IMAGE = 64, 16


def _cfg(variant='moiie', scan=False):
  moe = config_lib.MoEConfig(variant=variant, n_vision=1 if variant == 'moiie' else 2 * (variant == 'modality'),
                             n_shared={'moiie': 2, 'vanilla': 4, 'modality': 0, 'dense': 2}[variant],
                             n_language=1 if variant == 'moiie' else 2 * (variant == 'modality'), top_k=2)
  llm = config_lib.LLMConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             initializer_range=0.5, moe=moe, scan_layers=scan)
  vision = config_lib.VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=IMAGE, patch_size=8)
  return config_lib.LVLMConfig(llm=llm, vision=vision, image_token_id=V)


def _inputs():
  ids = np.random.default_rng(0).integers(1, V, size=12).astype(np.int32)
  ids[2:6] = V  # 4 image tokens
  pixels = np.random.default_rng(1).standard_normal((IMAGE, IMAGE, 3)).astype(np.float32)
  return ids, pixels


@pytest.mark.parametrize('variant', ['moiie', 'vanilla', 'modality'])
def test_token_weights_add_up_to_the_layer_statistics(variant):
  model = LVLM(_cfg(variant), rngs=nnx.Rngs(0))
  ids, pixels = _inputs()
  r = token_routing(model, ids, pixels)
  assert r.layers == (1, 3) and r.weights.shape == (2, 12, model.cfg.llm.moe.n_experts)
  np.testing.assert_allclose(r.weights.sum(-1), 1.0, atol=1e-6)  # dropless, top-2 renormalised
  assert (r.modality == (ids == V)).all()
  stats = model(ids[None], pixels[None]).moe_stats  # the layers' own aggregates, from a plain forward
  for m in (0, 1):
    np.testing.assert_allclose(r.weights[:, r.modality == m].sum(1), np.asarray(stats.weight_per_expert)[:, m],
                               atol=1e-5)
  groups = np.array(r.groups)
  image, text = r.modality == 1, r.modality == 0
  if variant == 'moiie':  # image tokens never reach the language expert, text never the vision one
    assert (r.weights[:, image][..., groups == 'language'] == 0).all()
    assert (r.weights[:, text][..., groups == 'vision'] == 0).all()
  assert set(r.top_groups()) <= set(GROUPS) and len(r.top_groups(layer=1)) == 12
  np.testing.assert_allclose(r.group_weights().sum(-1), 1.0, atol=1e-6)


def test_scanned_model_routes_as_looped_and_dense_has_none():
  looped = LVLM(_cfg(), rngs=nnx.Rngs(0))
  from moiie_jax.convert import upcycle
  cfg = looped.cfg
  scan_cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, scan_layers=True))
  flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(looped, nnx.Param))}
  lm = upcycle.relayout({p[1:]: v for p, v in flat.items() if p[0] == 'language_model'}, cfg.llm, scan_cfg.llm)
  scanned = nnx.eval_shape(lambda: LVLM(scan_cfg, rngs=nnx.Rngs(0)))
  from moiie_jax.convert import hf
  flat = {**{p: v for p, v in flat.items() if p[0] != 'language_model'},
          **{('language_model',) + p: v for p, v in lm.items()}}
  nnx.update(scanned, hf.build_state(scanned, flat, 'test'))
  ids, pixels = _inputs()
  np.testing.assert_allclose(token_routing(scanned, ids, pixels).weights, token_routing(looped, ids, pixels).weights,
                             atol=1e-6)
  assert token_routing(LVLM(_cfg('dense'), rngs=nnx.Rngs(0)), ids, pixels) is None
