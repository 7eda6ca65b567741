"""The official MoIIE code's checkpoints (Bunny format) <-> moiie_jax: its folder layout, config and key names, both
ways.

A Bunny folder is one PyTorch model, as the authors' code (Bunny codebase, transformers 4.40) saves it:

  config.json   model_type `bunny-mm-phi3-moe-s` / `bunny-mm-llama3-moe-s` (MoIIE) or `bunny-phi3` / `bunny-llama`
                (dense); the backbone's HF fields; MoE fields num_experts, num_experts_per_tok,
                vis_router_aux_loss_coef, lan_router_aux_loss_coef, router_jitter_noise; `mm_vision_tower` (the tower's
                Hub name or path), use_s2 (+ s2_scales, default '384,768,1152'), mm_projector_type mlp2x_gelu,
                mm_hidden_size (3 x 1152 with S2), image_aspect_ratio.
  LLM           HF names under `model.` and `lm_head.weight`; in the MoE (odd) layers `mlp.gate.weight` [3, D] (the
                textual router: experts 1-3), `mlp.gate_vis.weight` [3, D] (the visual router: experts 0-2),
                `mlp.experts.{0..3}.gate_up_proj.weight` / `down_proj.weight` (Phi-3) or `gate_proj` / `up_proj` /
                `down_proj` (LLaMA-3); the even layers keep `mlp.*`.
  projector     `model.mm_projector.{0,2}.{weight,bias}` (Linear, GELU, Linear).
  tower         `model.vision_tower.vision_tower.vision_model.*` when saved; else `--vision DIR` gives it.

Its layer is our MoIIE with 1 vision, 2 shared and 1 language expert in that order (our stacking order), top-2
renormalised, dropless, routed by the CogVLM rule (`modality_rule='official'`: an image's last token and padding
go to the textual router). Its code works for 4 experts only (each router scores int(0.75 E) experts and the
textual one indexes experts[k + 1]); other counts are refused both ways. Images: hidden state -2 of the tower
(`mm_vision_select_layer`), with S2 the multi-scale features of models/s2.py.

`read_folder` returns (LVLMConfig, flat params, notes) checked against the model; `to_bunny` returns the config dict
and tensors of a folder its code loads (the inverse, bit for bit).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from moiie_jax.convert import hf
from moiie_jax.convert.errors import ConvertError
from moiie_jax.convert.llm_keys import experts_from_hf, experts_to_hf, llm_params_from_hf, llm_params_to_hf
from moiie_jax.convert.vision_keys import connector_params_to_hf, flat_params, image_side_params, vision_params_to_hf
from moiie_jax.models import config as config_lib
from moiie_jax.models import presets

Path = tuple
# model_type -> (our decoder architecture, its PyTorch class, MoE?)
MODEL_TYPES = {
    'bunny-mm-phi3-moe-s': ('phi3', 'BunnyMMSPhi3MoEForCausalLM', True),
    'bunny-mm-llama3-moe-s': ('llama', 'BunnyMMSLlamaMoEForCausalLM', True),
    'bunny-phi3': ('phi3', 'BunnyPhi3ForCausalLM', False),
    'bunny-llama': ('llama', 'BunnyLlamaForCausalLM', False),
}
# Its towers by the end of `mm_vision_tower`, when no --vision folder gives the tower's config.
TOWERS = {'siglip-so400m-patch14-384': 'siglip-so400m-384', 'clip-vit-large-patch14-336': 'clip-l-336'}
DEFAULT_S2_SCALES = '384,768,1152'
TOWER_PREFIX = 'model.vision_tower.vision_tower.'
PROJECTOR_PREFIX = 'model.mm_projector.'
ROUTERS = {'gate': 'gate', 'gate_vis': 'gate_vis'}  # its router names -> ours (the same)
_EXPERT_KEY = re.compile(r'^model\.layers\.(\d+)\.mlp\.(?:(gate|gate_vis)\.weight|experts\.(\d+)\.(\w+)\.(weight|bias))$')
_IGNORED = re.compile(r'(^|\.)rotary_emb\.inv_freq$')
# The backbone fields its config classes read: they skip Phi3Config's / LlamaConfig's __init__ (it calls
# PretrainedConfig's directly), so every one must be in config.json.
_BACKBONE_DEFAULTS = {
    'phi3': dict(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, use_cache=True, rope_scaling=None,
                 original_max_position_embeddings=4096, sliding_window=None),
    'llama': dict(attention_dropout=0.0, attention_bias=False, pretraining_tp=1, use_cache=True, rope_scaling=None,
                  mlp_bias=False),
}


def _model_type(hf_cfg: Mapping[str, Any], where: str) -> tuple[str, str, bool]:
  model_type = hf_cfg.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ConvertError(f'{where}: model_type={model_type!r} is not an official MoIIE (Bunny) model; expected one of '
                       f'{sorted(MODEL_TYPES)}')
  return MODEL_TYPES[model_type]


def _s2_scales(hf_cfg: Mapping[str, Any], where: str) -> tuple[int, ...]:
  if not hf_cfg.get('use_s2'):
    return ()
  text = hf_cfg.get('s2_scales') or DEFAULT_S2_SCALES
  try:
    return tuple(sorted(int(s) for s in str(text).split(',')))
  except ValueError:
    raise ConvertError(f'{where}: s2_scales={text!r}: expected comma-separated sizes like {DEFAULT_S2_SCALES!r}') \
        from None


# ------------------------------------------------------------------------------------------------ config
def moe_config(hf_cfg: Mapping[str, Any], where: str) -> config_lib.MoEConfig:
  """Our MoEConfig of its MoIIE layer: 1 + 2 + 1 experts at the odd layers, its routing rule."""
  e = hf_cfg.get('num_experts')
  if e != 4:
    raise ConvertError(f'{where}: num_experts={e!r}: the official MoIIE layer works for 4 experts only (each router '
                       f'scores int(0.75 E) of them and the textual router takes experts[k + 1])')
  vis, lan = (float(hf_cfg.get(k, 0.001)) for k in ('vis_router_aux_loss_coef', 'lan_router_aux_loss_coef'))
  if vis != lan:
    raise ConvertError(f'{where}: vis_router_aux_loss_coef={vis} and lan_router_aux_loss_coef={lan} differ; our '
                       f'MoEConfig has one aux_loss_coef for both routers')
  return config_lib.MoEConfig(variant='moiie', n_vision=1, n_shared=2, n_language=1,
                              top_k=int(hf_cfg.get('num_experts_per_tok', 2)), capacity_factor=0.0,
                              placement='interleaved', first_layer=1, aux_loss_coef=vis, aux_loss_scope='global',
                              modality_rule='official')


def vision_config(hf_cfg: Mapping[str, Any], vision_dir: str | None, where: str) -> config_lib.VisionConfig:
  if vision_dir:
    vision = config_lib.vision_from_hf(hf.read_config(vision_dir))
  else:
    name = str(hf_cfg.get('mm_vision_tower') or '')
    preset = next((p for suffix, p in TOWERS.items() if name.rstrip('/').endswith(suffix)), None)
    if preset is None:
      raise ConvertError(f'{where}: mm_vision_tower={name!r} is not a tower we know the shape of ({sorted(TOWERS)}); '
                         f'pass --vision with its Hugging Face folder')
    vision = presets.VISION_PRESETS[preset]
  try:
    vision = dataclasses.replace(vision, s2_scales=_s2_scales(hf_cfg, where))
    vision.validate()
  except config_lib.ConfigError as e:
    raise ConvertError(f'{where}: use_s2: {e}') from None
  return vision


def lvlm_config(hf_cfg: Mapping[str, Any], vision_dir: str | None, where: str) -> config_lib.LVLMConfig:
  arch, _, is_moe = _model_type(hf_cfg, where)
  if hf_cfg.get('mm_projector_type', 'mlp2x_gelu') != 'mlp2x_gelu':
    raise ConvertError(f'{where}: mm_projector_type={hf_cfg.get("mm_projector_type")!r}: only mlp2x_gelu (the MoIIE '
                       f'recipes\') is supported')
  try:
    llm = config_lib.llm_from_hf({**hf_cfg, 'model_type': arch})
    if is_moe:
      llm = dataclasses.replace(llm, moe=moe_config(hf_cfg, where))
    cfg = config_lib.LVLMConfig(llm=llm, vision=vision_config(hf_cfg, vision_dir, where),
                                image_token_id=llm.vocab_size,
                                vision_feature_layer=int(hf_cfg.get('mm_vision_select_layer', -2)),
                                vision_feature_select_strategy='full')
    cfg.validate()
  except KeyError as e:
    raise ConvertError(f'{where}: missing field {e}') from None
  except config_lib.ConfigError as e:
    raise ConvertError(f'{where}: {e}') from None
  width = hf_cfg.get('mm_hidden_size')
  if width is not None and int(width) != cfg.vision.feature_size:
    raise ConvertError(f'{where}: mm_hidden_size={width} but its tower gives {cfg.vision.feature_size}-wide features '
                       f'(use_s2={bool(hf_cfg.get("use_s2"))}, width {cfg.vision.hidden_size})')
  return cfg


# ------------------------------------------------------------------------------------------------ import
def _expert_key(i: int, j: int | None, name: str, leaf: str) -> str:
  return f'model.layers.{i}.mlp.' + (f'{name}.weight' if j is None else f'experts.{j}.{name}.{leaf}')


def _split(tensors: Mapping[str, np.ndarray], where: str) -> dict[str, dict]:
  """Tensors sorted into {'llm': HF decoder keys, 'moe': {(i, j or None, name, leaf): array}, 'vision': keys from
  vision_model. on, 'projector': linear_{1,2} keys}. Unknown keys are errors."""
  out = {'llm': {}, 'moe': {}, 'vision': {}, 'projector': {}}
  for key, value in tensors.items():
    if key.startswith(TOWER_PREFIX):
      out['vision'][key[len(TOWER_PREFIX):]] = value
    elif key.startswith(PROJECTOR_PREFIX):
      index, _, leaf = key[len(PROJECTOR_PREFIX):].partition('.')
      if index not in ('0', '2'):
        raise ConvertError(f'{where}: {key}: unexpected projector tensor (expected mm_projector.{{0,2}}.*)')
      out['projector'][f'linear_{1 if index == "0" else 2}.{leaf}'] = value
    elif _IGNORED.search(key):
      continue
    elif m := _EXPERT_KEY.match(key):  # a router or an expert (in a layer that is not MoE: an error below)
      i = int(m.group(1))
      if m.group(3) is None:
        out['moe'][(i, None, m.group(2), 'weight')] = value
      else:
        out['moe'][(i, int(m.group(3)), m.group(4), m.group(5))] = value
    elif key.startswith('model.') or key.startswith('lm_head.'):
      out['llm'][key] = value
    else:
      raise ConvertError(f'{where}: {key}: no rule maps this key (expected model.*, lm_head.*)')
  return out


def read_folder(folder: str, vision_dir: str | None = None) -> tuple[config_lib.LVLMConfig, dict[Path, np.ndarray],
                                                                    list[str]]:
  """(config, our flat LVLM params, notes) of an official MoIIE (Bunny) folder; the params still go through
  hf.build_state."""
  hf_cfg = hf.read_config(folder)
  where = f'{folder}/config.json'
  cfg = lvlm_config(hf_cfg, vision_dir, where)
  parts = _split(hf.read_tensors(folder), folder)
  notes = []
  llm = cfg.llm
  jitter = float(hf_cfg.get('router_jitter_noise') or 0.0)
  if jitter:
    notes.append(f'router_jitter_noise={jitter}: its training-time input jitter is not applied here')
  embed = parts['llm'].get('model.embed_tokens.weight')
  if embed is not None and embed.shape[0] != llm.vocab_size:
    notes.append(f'vocab_size {llm.vocab_size} -> {embed.shape[0]} (the embedding rows in the checkpoint)')
    llm = dataclasses.replace(llm, vocab_size=int(embed.shape[0]))
    cfg = dataclasses.replace(cfg, llm=llm, image_token_id=int(embed.shape[0]))
  first = parts['projector'].get('linear_1.weight')
  if first is not None and first.shape[1] != cfg.vision.feature_size:
    s2 = 'with S2' if cfg.vision.s2_scales else 'without S2 (use_s2 false or absent)'
    raise ConvertError(f'{folder}: {PROJECTOR_PREFIX}0.weight takes {first.shape[1]}-wide features but config.json '
                       f'describes a tower {s2} giving {cfg.vision.feature_size}: its use_s2 / s2_scales do not '
                       f'match the weights')
  dense = dataclasses.replace(llm, moe=config_lib.MoEConfig(), scan_layers=False)
  flat = {('language_model',) + p: v for p, v in llm_params_from_hf(
      parts['llm'], dense, without_mlp=llm.moe_layers).items()}
  if llm.moe.is_moe:
    experts = experts_from_hf(parts['moe'], llm, folder, _expert_key, ROUTERS, 'config.json num_experts',
                              'the odd layers')
    flat.update({('language_model',) + p: v for p, v in experts.items()})
  elif parts['moe']:
    i, j, name, leaf = sorted(parts['moe'], key=str)[0]
    raise ConvertError(f'{folder}: {_expert_key(i, j, name, leaf)}: an expert tensor in a dense '
                       f'{hf_cfg["model_type"]} checkpoint')
  flat.update(image_side_params(
      parts['vision'], parts['projector'], cfg, vision_dir, notes=notes,
      missing=f'{folder}: the checkpoint holds no {TOWER_PREFIX}* tensors (its tower was frozen and loaded from '
              f'{hf_cfg.get("mm_vision_tower")!r}); pass --vision with that Hugging Face folder'))
  return cfg, flat, notes


# ------------------------------------------------------------------------------------------------ export
def _check_exportable(cfg: config_lib.LVLMConfig) -> None:
  llm, moe = cfg.llm, cfg.llm.moe
  if llm.architecture not in ('phi3', 'llama'):
    raise ConvertError(f'export to moiie: architecture={llm.architecture!r}; the official code has Phi-3 and LLaMA-3')
  if moe.is_moe and (moe.variant, moe.n_vision, moe.n_shared, moe.n_language, moe.top_k) != ('moiie', 1, 2, 1, 2):
    raise ConvertError(f'export to moiie: variant={moe.variant!r} with {moe.n_vision} vision, {moe.n_shared} shared, '
                       f'{moe.n_language} language experts, top_k={moe.top_k}; the official code holds MoIIE with 1 + '
                       f'2 + 1 experts, top-2 (dense checkpoints export too)')
  if moe.is_moe and llm.moe_layers != tuple(range(1, llm.num_hidden_layers, 2)):
    raise ConvertError(f'export to moiie: MoE layers {list(llm.moe_layers)}; the official code puts them at the odd '
                       f'layers')
  if cfg.vision.architecture != 'siglip' and cfg.vision.s2_scales:
    raise ConvertError('export to moiie: S2 with a CLIP tower')
  if cfg.vision_feature_select_strategy == 'drop_first' or (
      cfg.vision.has_class_token and cfg.vision_feature_select_strategy == 'full'):
    raise ConvertError(f'export to moiie: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}; the '
                       f'official code feeds every patch feature and no class token')


HUB_TOWERS = {'siglip-so400m-384': 'google/siglip-so400m-patch14-384', 'clip-l-336': 'openai/clip-vit-large-patch14-336'}


def tower_name(vision: config_lib.VisionConfig) -> str:
  """The Hub name its code loads the tower's shape (and, frozen, weights) from, for our preset towers."""
  plain = dataclasses.replace(vision, s2_scales=(), dtype='float32', param_dtype='float32')
  for preset, name in HUB_TOWERS.items():
    if presets.VISION_PRESETS[preset] == plain:
      return name
  raise ConvertError(f'export to moiie: the {vision.architecture} tower (width {vision.hidden_size}, '
                     f'{vision.num_hidden_layers} layers) is not one whose Hub name we know ({sorted(HUB_TOWERS.values())}); '
                     f'give it with --image-tower (its code loads the tower config from that name)')


def config_dict(cfg: config_lib.LVLMConfig, image_tower: str = '', *, pad_to_square: bool = True) -> dict[str, Any]:
  """The config.json its code loads: every field its config classes read (they skip the backbone's defaults).
  `image_tower`: the tower's Hub name or path (mm_vision_tower); default: the Hub name of our preset tower."""
  llm = cfg.llm
  image_tower = image_tower or tower_name(cfg.vision)
  dense = dataclasses.replace(llm, moe=config_lib.MoEConfig())
  model_type = next(t for t, (arch, _, is_moe) in MODEL_TYPES.items()
                    if arch == llm.architecture and is_moe == llm.moe.is_moe)
  out = {**_BACKBONE_DEFAULTS[llm.architecture], **config_lib.llm_to_hf(dense)}
  out.pop('rope_parameters', None)  # transformers 5's spelling; 4.40 reads rope_theta / rope_scaling
  out.pop('partial_rotary_factor', None)
  if llm.architecture == 'phi3' and llm.original_max_position_embeddings is None:
    out['original_max_position_embeddings'] = llm.max_position_embeddings
  out.update(model_type=model_type, architectures=[MODEL_TYPES[model_type][1]],
             rms_norm_eps=llm.rms_norm_eps, rope_scaling=llm.rope_scaling_dict,
             mm_vision_tower=image_tower, use_mm_proj=True, mm_projector_type='mlp2x_gelu',
             mm_hidden_size=cfg.vision.feature_size, mm_vision_select_layer=cfg.vision_feature_layer,
             use_s2=bool(cfg.vision.s2_scales), image_aspect_ratio='pad' if pad_to_square else 'square',
             # The tower's weights are in the folder: its loader builds the tower and takes them from there.
             unfreeze_vision_tower=True, tokenizer_padding_side='right',
             tokenizer_model_max_length=llm.max_position_embeddings)
  if cfg.vision.s2_scales:
    out['s2_scales'] = ','.join(str(s) for s in cfg.vision.s2_scales)
  if llm.moe.is_moe:
    out.update(num_experts=llm.moe.n_experts, num_experts_per_tok=llm.moe.top_k,
               vis_router_aux_loss_coef=llm.moe.aux_loss_coef, lan_router_aux_loss_coef=llm.moe.aux_loss_coef,
               output_vis_router_logits=True, output_lan_router_logits=True, router_jitter_noise=0.0)
  return out


def to_bunny(cfg: config_lib.LVLMConfig, flat: Mapping[Path, Any], image_tower: str = '', *,
             pad_to_square: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, tensors) of an official MoIIE (Bunny) folder holding our model (a Phi-3 or LLaMA-3 MoIIE with
  1 + 2 + 1 experts at the odd layers, or dense), tower and connector included. ConvertError for what it cannot
  hold. Our routing rule is not stored: its code always routes by the CogVLM rule (`modality_rule='official'`)."""
  _check_exportable(cfg)
  flat = flat_params(flat)
  from moiie_jax.convert import upcycle  # pylint: disable=import-outside-toplevel
  llm, lm = upcycle.looped_language_model(flat, cfg.llm)
  tensors = experts_to_hf(lm, llm, _expert_key, ROUTERS) if llm.moe.is_moe else {}
  tensors.update(llm_params_to_hf(lm, dataclasses.replace(llm, moe=config_lib.MoEConfig()),
                                  without_mlp=llm.moe_layers))
  vision = {p[1:]: v for p, v in flat.items() if p[0] == 'vision_tower'}
  tensors.update(vision_params_to_hf(vision, cfg.vision, prefix=TOWER_PREFIX + 'vision_model.'))
  for key, value in connector_params_to_hf({p[1:]: v for p, v in flat.items() if p[0] == 'multi_modal_projector'},
                                           prefix='').items():
    layer, leaf = key.split('.', 1)
    tensors[f'{PROJECTOR_PREFIX}{0 if layer == "linear_1" else 2}.{leaf}'] = value
  return config_dict(cfg, image_tower, pad_to_square=pad_to_square), tensors
