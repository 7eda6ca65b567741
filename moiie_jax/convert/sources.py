"""Whole-model conversion from the Hugging Face sources users have, and back to Hugging Face's own classes.

(a) A separate LLM folder (LlamaForCausalLM, Phi3ForCausalLM) plus a separate vision folder (SiglipVisionModel,
    SiglipModel, CLIPVisionModel, CLIPModel) with a freshly initialised connector: how the paper builds its model.
(b) A LLaVA folder (LlavaForConditionalGeneration as llava-hf publishes it, with the legacy `language_model.model.*`
    keys that `save_pretrained` writes, or the in-memory `model.language_model.*` layout).

(c) A MoE-LLaVA folder (`convert/moe_llava.py`: its MoE or dense models, Phi-2, StableLM or Qwen v1).
(d) An official MoIIE folder (`convert/bunny.py`: the authors' Bunny-format MoIIE or dense Phi-3 / LLaMA-3 models).

Each returns (LVLMConfig, nnx.State of parameters), checked path by path against `nnx.eval_shape` of the model; with
lazy=True the parameters are `streaming.LazyParams` instead, read and written a layer at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import nnx

from moiie_jax.convert import bunny
from moiie_jax.convert import hf
from moiie_jax.convert import moe_llava
from moiie_jax.convert import streaming
from moiie_jax.convert.errors import ConvertError
from moiie_jax.convert.llm_keys import llm_params_from_hf, llm_params_to_hf
from moiie_jax.convert.vision_keys import (connector_params_from_hf, connector_params_to_hf, flat_params,
                                           vision_params_from_hf, vision_params_to_hf)
from moiie_jax.models import config as config_lib
from moiie_jax.models.connector import MultiModalProjector
from moiie_jax.models.lvlm import LVLM

LLM_ARCHITECTURES = ('LlamaForCausalLM', 'Phi3ForCausalLM', 'PhiForCausalLM', 'StableLmForCausalLM',
                     'Qwen2ForCausalLM')
# The chat template a converted folder records by default, per decoder family.
DEFAULT_TEMPLATES = {'phi3': 'phi3', 'llama': 'llama3', 'phi': 'moe_llava', 'stablelm': 'moe_llava',
                     'qwen2': 'moe_llava'}
VISION_ARCHITECTURES = ('SiglipVisionModel', 'SiglipModel', 'CLIPVisionModel', 'CLIPModel')
LLAVA_ARCHITECTURES = ('LlavaForConditionalGeneration',)


def _finish(cfg: config_lib.LVLMConfig, flat: dict, where: str, lazy: bool) -> Any:
  """The converted parameters checked against the model: an nnx.State, or (lazy) `streaming.LazyParams` that
  `folder.save_folder` writes a layer at a time without ever holding the whole model."""
  abstract = nnx.eval_shape(lambda: LVLM(cfg, rngs=nnx.Rngs(0)))
  return streaming.LazyParams.build(abstract, flat, where, cfg) if lazy else hf.build_state(abstract, flat, where)


def _check_architecture(folder: str, hf_cfg: dict[str, Any], allowed: tuple[str, ...]) -> str:
  archs = hf_cfg.get('architectures') or []
  found = [a for a in archs if a in allowed]
  if not found:
    raise ConvertError(f'{folder}: architecture {archs or hf_cfg.get("model_type")} is not supported here; '
                       f'expected one of {list(allowed)}')
  return found[0]


def _prefixed(prefix: tuple, flat: dict) -> dict:
  return {prefix + tuple(path): value for path, value in flat.items()}


def fresh_connector(cfg: config_lib.LVLMConfig, seed: int) -> dict:
  """A freshly initialised connector's flat parameters, as the paper's stage 1 starts from (HF-default nnx.Linear
  init); its input is cfg.vision.feature_size wide (3 x the tower's with S2)."""
  projector = MultiModalProjector(cfg.vision.feature_size, cfg.llm.hidden_size, act=cfg.projector_hidden_act,
                                  bias=cfg.multimodal_projector_bias, rngs=nnx.Rngs(seed))
  return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(projector, nnx.Param))}


def from_llm_and_vision(llm_dir: str, vision_dir: str, *, image_token_id: int | None = None,
                        vision_feature_layer: int = -2, seed: int = 0,
                        s2_scales: tuple[int, ...] = (), lazy: bool = False) -> tuple[config_lib.LVLMConfig, Any]:
  """Source (a): an LLM folder + a vision folder; the connector is freshly initialised from `seed` (for S2
  features when `s2_scales` is set: 3 x the tower's width for the official 384, 768, 1152)."""
  llm_hf = hf.read_config(llm_dir)
  _check_architecture(llm_dir, llm_hf, LLM_ARCHITECTURES)
  vision_hf = hf.read_config(vision_dir)
  _check_architecture(vision_dir, vision_hf, VISION_ARCHITECTURES)
  llm_cfg = config_lib.llm_from_hf(llm_hf)
  cfg = config_lib.LVLMConfig(
      llm=llm_cfg, vision=config_lib.vision_from_hf(vision_hf, s2_scales=tuple(s2_scales)),
      image_token_id=llm_cfg.vocab_size if image_token_id is None else image_token_id,
      vision_feature_layer=vision_feature_layer)
  cfg.validate()
  llm_tensors = hf.read_tensors(llm_dir)
  vision_tensors = hf.read_tensors(vision_dir)
  flat = {}
  flat.update(_prefixed(('language_model',), llm_params_from_hf(llm_tensors, cfg.llm)))
  flat.update(_prefixed(('vision_tower',), vision_params_from_hf(vision_tensors, cfg.vision)))
  flat.update(_prefixed(('multi_modal_projector',), fresh_connector(cfg, seed)))
  return cfg, _finish(cfg, flat, f'{llm_dir} + {vision_dir}', lazy)


def from_llava(llava_dir: str, lazy: bool = False) -> tuple[config_lib.LVLMConfig, Any]:
  """Source (b): a LlavaForConditionalGeneration folder (legacy or current key layout)."""
  hf_cfg = hf.read_config(llava_dir)
  _check_architecture(llava_dir, hf_cfg, LLAVA_ARCHITECTURES)
  try:
    cfg = config_lib.lvlm_from_hf_llava(hf_cfg)
  except KeyError as e:
    raise ConvertError(f'{llava_dir}/config.json: missing field {e}') from e
  tensors = hf.read_tensors(llava_dir)
  if any(k.startswith('language_model.model.') for k in tensors):  # save_pretrained / llava-hf layout
    llm_prefix, lm_head, vision_prefix, projector_prefix = ('language_model.model.', 'language_model.lm_head.weight',
                                                            'vision_tower.', 'multi_modal_projector.')
  else:  # in-memory state_dict layout of transformers 5
    llm_prefix, lm_head, vision_prefix, projector_prefix = ('model.language_model.', 'lm_head.weight',
                                                            'model.vision_tower.', 'model.multi_modal_projector.')
  groups = {'llm': {}, 'vision': {}, 'projector': {}, 'other': {}}
  for key, value in tensors.items():
    if key.startswith(llm_prefix) or key == lm_head:
      groups['llm'][key] = value
    elif key.startswith(vision_prefix):
      groups['vision'][key[len(vision_prefix):]] = value
    elif key.startswith(projector_prefix):
      groups['projector'][key[len(projector_prefix):]] = value
    else:
      groups['other'][key] = value
  hf.reject_leftovers(groups['other'], llava_dir)
  flat = {}
  flat.update(_prefixed(('language_model',), llm_params_from_hf(groups['llm'], cfg.llm, decoder_prefix=llm_prefix,
                                                                lm_head_key=lm_head)))
  flat.update(_prefixed(('vision_tower',), vision_params_from_hf(groups['vision'], cfg.vision)))
  flat.update(_prefixed(('multi_modal_projector',), connector_params_from_hf(groups['projector'], prefix='')))
  return cfg, _finish(cfg, flat, llava_dir, lazy)


def from_moiie(folder: str, vision_dir: str | None = None,
               lazy: bool = False) -> tuple[config_lib.LVLMConfig, Any, list[str]]:
  """Source (d): an official MoIIE (Bunny-format) folder (`convert.bunny`); returns the notes of what was filled in."""
  cfg, flat, notes = bunny.read_folder(folder, vision_dir)
  return cfg, _finish(cfg, flat, folder, lazy), notes


def from_moe_llava(folder: str, vision_dir: str | None = None,
                   lazy: bool = False) -> tuple[config_lib.LVLMConfig, Any, list[str]]:
  """Source (c): a MoE-LLaVA folder (`convert.moe_llava`); returns the notes of what was filled in or resized."""
  cfg, flat, notes = moe_llava.read_folder(folder, vision_dir)
  return cfg, _finish(cfg, flat, folder, lazy), notes


# ------------------------------------------------------------------------------------------------ to HF
# What can hold an MoE checkpoint, named in the error a dense-only format gives.
MOE_FORMATS = ('moiie (the official code\'s MoIIE, Phi-3 or LLaMA-3), moe-llava (vanilla MoE, Phi-2 or StableLM); '
               'or keep the moiie_jax folder')


def _looped_llm(cfg: config_lib.LVLMConfig, flat: dict, fmt: str) -> tuple[config_lib.LLMConfig, dict]:
  """(a looped dense LLMConfig, the LLM's flat params in its layout) for an export to `fmt`."""
  llm = cfg.llm
  if llm.moe.is_moe:
    raise ConvertError(f'export to {fmt}: the checkpoint is a {llm.moe.variant} MoE model and {fmt} has no expert '
                       f'layers; formats that hold it: {MOE_FORMATS}')
  from moiie_jax.convert import upcycle  # pylint: disable=import-outside-toplevel
  return upcycle.looped_language_model(flat, llm)


def to_hf_llm(cfg: config_lib.LVLMConfig, flat) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, tensors) of the language model alone as its HF ...ForCausalLM (format hf-llm)."""
  llm, lm = _looped_llm(cfg, flat_params(flat), 'hf-llm')
  return config_lib.llm_to_hf(llm), llm_params_to_hf(lm, llm)


def to_llava(cfg: config_lib.LVLMConfig, flat) -> tuple[dict[str, Any], dict[str, np.ndarray], list[int]]:
  """(config.json dict, tensors, token ids generation must never pick) of a LlavaForConditionalGeneration folder
  (format llava-hf; the file layout `save_pretrained` writes).

  HF looks the image placeholder up in the embedding table before replacing it, so our out-of-vocabulary
  placeholder (id = vocab_size) gets a zero embedding row and a zero lm_head row; that id is returned for the
  generation config's `suppress_tokens`. HF's LLaVA head has no bias: a nonzero Phi-2 lm_head bias is refused.
  """
  if cfg.vision.s2_scales:
    raise ConvertError(f'export to llava-hf: the checkpoint uses S2 multi-scale features (scales '
                       f'{list(cfg.vision.s2_scales)}), which LlavaForConditionalGeneration cannot compute; use '
                       f'--format hf-llm for the language model alone')
  flat = flat_params(flat)
  llm, lm = _looped_llm(cfg, flat, 'llava-hf')
  suppress = []
  image_id = cfg.image_token_id
  if image_id >= llm.vocab_size:
    if image_id != llm.vocab_size:
      raise ConvertError(f'export to llava-hf: image_token_id={image_id} lies beyond vocab_size={llm.vocab_size} + 1')
    pad = lambda a, axis: np.concatenate([a, np.zeros_like(np.take(a, [0], axis=axis))], axis=axis)
    lm[('model', 'embed_tokens', 'embedding')] = pad(lm[('model', 'embed_tokens', 'embedding')], 0)
    if not llm.tie_word_embeddings:
      lm[('lm_head', 'kernel')] = pad(lm[('lm_head', 'kernel')], 1)
      if llm.lm_head_bias:
        lm[('lm_head', 'bias')] = pad(lm[('lm_head', 'bias')], 0)
    llm = dataclasses.replace(llm, vocab_size=llm.vocab_size + 1)
    suppress.append(image_id)
  tensors = llm_params_to_hf(lm, llm, decoder_prefix='language_model.model.',
                             lm_head_key='language_model.lm_head.weight')
  bias = tensors.pop('language_model.lm_head.bias', None)
  if bias is not None and np.any(bias != 0):
    raise ConvertError('export to llava-hf: the lm_head has a nonzero bias, which LlavaForConditionalGeneration '
                       'cannot hold; use --format hf-llm for the language model')
  tensors.update(vision_params_to_hf({p[1:]: v for p, v in flat.items() if p[0] == 'vision_tower'}, cfg.vision,
                                     prefix='vision_tower.'))  # as transformers 5 saves it
  tensors.update(connector_params_to_hf({p[1:]: v for p, v in flat.items() if p[0] == 'multi_modal_projector'}))
  hf_cfg = config_lib.lvlm_to_hf_llava(dataclasses.replace(cfg, llm=llm), image_id)
  return hf_cfg, tensors, suppress


def with_param_dtype(cfg: config_lib.LVLMConfig, dtype: str) -> config_lib.LVLMConfig:
  return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, param_dtype=dtype),
                             vision=dataclasses.replace(cfg.vision, param_dtype=dtype))
