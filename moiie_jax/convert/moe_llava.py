"""MoE-LLaVA checkpoints (PKU-YuanGroup) <-> moiie_jax: its folder layout, config and key names, both ways.

A MoE-LLaVA folder is one PyTorch model: config.json (model_type `moe_llava_phi` / `moe_llava_stablelm` /
`moe_llava_qwen` for the MoE stage 3, `llava_phi` / `llava_stablelm` / `llava_qwen` for the dense stage 2; the
backbone's own HF fields plus `mm_*` fields and, for MoE, the nested `moe` block) and safetensors or `.bin` shards
holding the LLM, the projector and (usually) the frozen vision tower. Its keys:

  LLM       Phi-2 / StableLM: HF names under `model.` (`model.layers.{i}.*`, `lm_head.weight`); Qwen v1 under
            `transformer.` (`wte`, `h.{i}.ln_1`, `attn.c_attn` = q|k|v with bias, `attn.c_proj`, `ln_2`,
            `mlp.w1` (up), `mlp.w2` (gate), `mlp.c_proj` (down), `ln_f`), read as Qwen2 with the fused weights split.
  experts   `...layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{j}.<the dense MLP's names>` in the MoE
            layers, router `...mlp.deepspeed_moe.gate.wg.weight` [E, D], no bias.
  projector `<prefix>mm_projector.image_spatial_proj.{0,2}.{weight,bias}` (mlp2x_gelu: Linear, GELU, Linear).
  tower     `<prefix>image_tower.image_tower.vision_model.*` (CLIP-L-336 or SigLIP-so400m-384).

Its image features are hidden state -2 then `[:, 1:]` (our vision_feature_select_strategy='drop_first': CLIP's
class token, or SigLIP's first patch, so the -384 models see 728 image tokens). Its gate is DeepSpeed's top-2
(`MoEConfig.gate='deepspeed'`, aux loss summed over layers). MoE-LLaVA's Phi-2 has no lm_head bias (HF's
PhiForCausalLM has one): a zero bias is filled in on the way in and must be zero on the way out.

`read_folder` returns (LVLMConfig, flat params, notes) checked against the model; `to_moe_llava` returns the
config dict and tensors of a folder its PyTorch code loads (the inverse, bit for bit).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from moiie_jax.convert import hf
from moiie_jax.convert.errors import ConvertError
from moiie_jax.convert.llm_keys import experts_from_hf, experts_to_hf, llm_params_from_hf, llm_params_to_hf
from moiie_jax.convert.vision_keys import (connector_params_to_hf, flat_params, image_side_params,
                                           vision_params_to_hf)
from moiie_jax.models import config as config_lib
from moiie_jax.models import presets

Path = tuple
# model_type -> backbone family (our LLMConfig.architecture, 'qwen' for Qwen v1 read as qwen2).
MODEL_TYPES = {'moe_llava_phi': 'phi', 'moe_llava_stablelm': 'stablelm', 'moe_llava_qwen': 'qwen',
               'llava_phi': 'phi', 'llava_stablelm': 'stablelm', 'llava_qwen': 'qwen'}
# Its towers by the name in `mm_image_tower`, when no --vision folder gives the tower's config.
TOWERS = {'clip-vit-large-patch14-336': 'clip-l-336', 'siglip-so400m-patch14-384': 'siglip-so400m-384'}
_MOE_KEY = re.compile(r'(?:layers|h)\.(\d+)\.mlp\.deepspeed_moe\.(gate\.wg\.weight|experts\.deepspeed_experts\.(\d+)\.'
                      r'(\w+)\.(weight|bias))$')
# Qwen v1 names -> HF Qwen2 names (per layer, then the rest).
_QWEN_LAYER = {'ln_1.weight': 'input_layernorm.weight', 'ln_2.weight': 'post_attention_layernorm.weight',
               'attn.c_proj.weight': 'self_attn.o_proj.weight', 'mlp.w1.weight': 'mlp.up_proj.weight',
               'mlp.w2.weight': 'mlp.gate_proj.weight', 'mlp.c_proj.weight': 'mlp.down_proj.weight'}
_QWEN_MLP = {'w1': 'up_proj', 'w2': 'gate_proj', 'c_proj': 'down_proj'}
# Buffers older checkpoints saved (GPT-style causal-mask buffers, RoPE frequencies); derived, safe to drop.
_IGNORED = re.compile(r'(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$')


def family(hf_cfg: Mapping[str, Any], where: str) -> str:
  model_type = hf_cfg.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ConvertError(f'{where}: model_type={model_type!r} is not a MoE-LLaVA model; expected one of '
                       f'{sorted(MODEL_TYPES)}')
  return MODEL_TYPES[model_type]


def _prefix(fam: str) -> str:
  return 'transformer.' if fam == 'qwen' else 'model.'


# ------------------------------------------------------------------------------------------------ config
def moe_config(hf_cfg: Mapping[str, Any], num_layers: int, where: str) -> config_lib.MoEConfig:
  """Our MoEConfig from the nested `moe` block (dense for the stage-2 model types or moe_enable false)."""
  if not hf_cfg['model_type'].startswith('moe_'):
    return config_lib.MoEConfig()
  moe = hf_cfg.get('moe')
  if not isinstance(moe, Mapping):
    raise ConvertError(f'{where}: model_type={hf_cfg["model_type"]} but config.json has no `moe` block')
  if not moe.get('moe_enable', True):
    return config_lib.MoEConfig()
  if moe.get('use_residual'):
    raise ConvertError(f'{where}: moe.use_residual=true (residual MoE) is not supported')
  if moe.get('moe_mode', 'sparse') != 'sparse':
    raise ConvertError(f'{where}: moe.moe_mode={moe.get("moe_mode")!r}: only the sparse mode is supported')
  counts = moe.get('num_experts')
  counts = counts if isinstance(counts, list) else [counts]
  if not counts or any(c != counts[0] for c in counts) or not isinstance(counts[0], int):
    raise ConvertError(f'{where}: moe.num_experts={moe.get("num_experts")!r}: expected one expert count per MoE '
                       f'layer, all equal')
  layers = [int(i) for i in moe.get('moe_layers_idx') or []]
  if not layers:
    raise ConvertError(f'{where}: moe.moe_layers_idx is empty')
  placement = dict(placement='interleaved', first_layer=0) if layers == list(range(0, num_layers, 2)) else dict(
      placement='list', layers=tuple(layers))
  cfg = config_lib.MoEConfig(
      variant='vanilla', n_vision=0, n_language=0, n_shared=counts[0], top_k=int(moe.get('top_k_experts', 2)),
      capacity_factor=float(moe.get('capacity_factor', 1.5)),
      eval_capacity_factor=float(moe.get('eval_capacity_factor', 2.0)),
      min_capacity=int(moe.get('min_capacity', 0)), aux_loss_coef=float(moe.get('router_aux_loss_coef', 0.01)),
      aux_loss_scope='sum', gate='deepspeed', **placement)
  try:
    cfg.validate()
  except config_lib.ConfigError as e:
    raise ConvertError(f'{where}: moe block: {e}') from None
  return cfg


def _qwen_llm(hf_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Qwen v1's config fields as a Qwen2Config dict (its FFN width is config.intermediate_size / 2)."""
  if float(hf_cfg.get('rotary_pct', 1.0)) != 1.0:
    raise ConvertError(f'config.json: rotary_pct={hf_cfg.get("rotary_pct")}: only 1.0 (Qwen-1.8B) is supported')
  heads = hf_cfg['num_attention_heads']
  return dict(model_type='qwen2', vocab_size=hf_cfg.get('padded_vocab_size') or hf_cfg['vocab_size'],
              hidden_size=hf_cfg['hidden_size'], intermediate_size=hf_cfg['intermediate_size'] // 2,
              num_hidden_layers=hf_cfg['num_hidden_layers'], num_attention_heads=heads, num_key_value_heads=heads,
              rms_norm_eps=hf_cfg.get('layer_norm_epsilon', 1e-6), rope_theta=hf_cfg.get('rotary_emb_base', 10000.0),
              # Its dynamic NTK and log-n attention only act past seq_length, the context we allow.
              max_position_embeddings=hf_cfg.get('seq_length', hf_cfg.get('max_position_embeddings', 8192)),
              tie_word_embeddings=False, eos_token_id=hf_cfg.get('eos_token_id'))


def llm_config(hf_cfg: Mapping[str, Any], where: str) -> config_lib.LLMConfig:
  fam = family(hf_cfg, where)
  base = _qwen_llm(hf_cfg) if fam == 'qwen' else {**hf_cfg, 'model_type': fam}
  base = {k: v for k, v in base.items() if k != 'moe'}
  try:
    llm = config_lib.llm_from_hf(base)
    return dataclasses.replace(llm, moe=moe_config(hf_cfg, llm.num_hidden_layers, where))
  except (KeyError, config_lib.ConfigError) as e:
    raise ConvertError(f'{where}: {e if isinstance(e, config_lib.ConfigError) else f"missing field {e}"}') from None


def vision_config(hf_cfg: Mapping[str, Any], vision_dir: str | None, where: str) -> config_lib.VisionConfig:
  if vision_dir:
    return config_lib.vision_from_hf(hf.read_config(vision_dir))
  name = str(hf_cfg.get('mm_image_tower') or hf_cfg.get('image_tower') or '')
  for suffix, preset in TOWERS.items():
    if name.rstrip('/').endswith(suffix):
      return presets.VISION_PRESETS[preset]
  raise ConvertError(f'{where}: mm_image_tower={name!r} is not a tower we know the shape of ({sorted(TOWERS)}); '
                     f'pass --vision with its Hugging Face folder')


def lvlm_config(hf_cfg: Mapping[str, Any], vision_dir: str | None, where: str) -> config_lib.LVLMConfig:
  if hf_cfg.get('image_projector_type', 'mlp2x_gelu') != 'mlp2x_gelu':
    raise ConvertError(f'{where}: image_projector_type={hf_cfg.get("image_projector_type")!r}: only mlp2x_gelu '
                       f'(every released MoE-LLaVA model) is supported')
  select = hf_cfg.get('mm_vision_select_feature', 'patch')
  if select not in ('patch', 'cls_patch'):
    raise ConvertError(f'{where}: mm_vision_select_feature={select!r}: expected patch or cls_patch')
  llm = llm_config(hf_cfg, where)
  cfg = config_lib.LVLMConfig(llm=llm, vision=vision_config(hf_cfg, vision_dir, where),
                              image_token_id=llm.vocab_size,
                              vision_feature_layer=int(hf_cfg.get('mm_vision_select_layer', -2)),
                              vision_feature_select_strategy='drop_first' if select == 'patch' else 'full')
  cfg.validate()
  return cfg


# ------------------------------------------------------------------------------------------------ import
def _split(tensors: Mapping[str, np.ndarray], fam: str, where: str) -> dict[str, dict]:
  """Tensors sorted into {'llm': HF-standard decoder keys, 'moe': {(i, j or None, name, leaf): array},
  'vision': tower keys from vision_model. on, 'projector': linear_{1,2} keys}. Unknown keys are errors."""
  prefix = _prefix(fam)
  out = {'llm': {}, 'moe': {}, 'vision': {}, 'projector': {}}
  tower, projector = prefix + 'image_tower.image_tower.', prefix + 'mm_projector.image_spatial_proj.'
  for key, value in tensors.items():
    if key.startswith(tower):
      out['vision'][key[len(tower):]] = value
    elif key.startswith(projector):
      rest = key[len(projector):]
      index, _, leaf = rest.partition('.')
      if index not in ('0', '2'):
        raise ConvertError(f'{where}: {key}: unexpected projector tensor (expected image_spatial_proj.{{0,2}}.*)')
      out['projector'][f'linear_{1 if index == "0" else 2}.{leaf}'] = value
    elif _IGNORED.search(key):
      continue
    elif m := _MOE_KEY.search(key):
      i, expert, name, leaf = int(m.group(1)), m.group(3), m.group(4), m.group(5)
      if expert is None:
        out['moe'][(i, None, 'gate', 'weight')] = value
      else:
        out['moe'][(i, int(expert), _QWEN_MLP.get(name, name) if fam == 'qwen' else name, leaf)] = value
    elif fam == 'qwen':
      _qwen_key(key, value, out['llm'], where)
    elif key.startswith(prefix) or key.startswith('lm_head.'):
      out['llm'][key] = value
    else:
      raise ConvertError(f'{where}: {key}: no rule maps this key (expected {prefix}*, lm_head.*)')
  return out


def _qwen_key(key: str, value: np.ndarray, llm: dict, where: str) -> None:
  """One Qwen v1 tensor as HF Qwen2 tensors (c_attn split into q, k, v)."""
  if key == 'lm_head.weight':
    llm[key] = value
  elif key == 'transformer.wte.weight':
    llm['model.embed_tokens.weight'] = value
  elif key == 'transformer.ln_f.weight':
    llm['model.norm.weight'] = value
  elif m := re.fullmatch(r'transformer\.h\.(\d+)\.(.+)', key):
    i, rest = m.group(1), m.group(2)
    if rest in ('attn.c_attn.weight', 'attn.c_attn.bias'):
      leaf = rest.rsplit('.', 1)[1]
      if value.shape[0] % 3:
        raise ConvertError(f'{where}: {key}: shape {value.shape}, expected 3 * hidden rows (q|k|v)')
      for name, part in zip(('q_proj', 'k_proj', 'v_proj'), np.split(np.asarray(value), 3, axis=0)):
        llm[f'model.layers.{i}.self_attn.{name}.{leaf}'] = part
    elif rest in _QWEN_LAYER:
      llm[f'model.layers.{i}.{_QWEN_LAYER[rest]}'] = value
    else:
      raise ConvertError(f'{where}: {key}: no rule maps this Qwen key (expected transformer.h.{{i}}.'
                         f'{{{",".join(["attn.c_attn.weight", "attn.c_attn.bias", *_QWEN_LAYER])}}})')
  else:
    raise ConvertError(f'{where}: {key}: no rule maps this key (expected transformer.wte, transformer.h.{{i}}.*, '
                       f'transformer.ln_f, lm_head)')


def _expert_key(prefix: str) -> Any:
  """Its key of an expert tensor, or (j None) of the router."""
  def key_of(i: int, j: int | None, name: str, leaf: str) -> str:
    base = f'{prefix}layers.{i}.mlp.deepspeed_moe.'
    return base + ('gate.wg.weight' if j is None else f'experts.deepspeed_experts.{j}.{name}.{leaf}')
  return key_of


def read_folder(folder: str, vision_dir: str | None = None) -> tuple[config_lib.LVLMConfig, dict[Path, np.ndarray],
                                                                    list[str]]:
  """(config, our flat LVLM params, notes) of a MoE-LLaVA folder; the params still go through hf.build_state."""
  hf_cfg = hf.read_config(folder)
  where = f'{folder}/config.json'
  fam = family(hf_cfg, where)
  cfg = lvlm_config(hf_cfg, vision_dir, where)
  parts = _split(hf.read_tensors(folder), fam, folder)
  notes = []
  llm = cfg.llm
  embed = parts['llm'].get('model.embed_tokens.weight')
  if embed is not None and embed.shape[0] != llm.vocab_size:  # saved after MoE-LLaVA resized to its tokenizer
    notes.append(f'vocab_size {llm.vocab_size} -> {embed.shape[0]} (the embedding rows in the checkpoint)')
    llm = dataclasses.replace(llm, vocab_size=int(embed.shape[0]))
    cfg = dataclasses.replace(cfg, llm=llm, image_token_id=int(embed.shape[0]))
  if llm.lm_head_bias and 'lm_head.bias' not in parts['llm']:
    parts['llm']['lm_head.bias'] = np.zeros((llm.vocab_size,), np.asarray(parts['llm']['lm_head.weight']).dtype)
    notes.append('lm_head.bias: absent in MoE-LLaVA (its Phi-2 head has none); filled with zeros')
  dense = dataclasses.replace(llm, moe=config_lib.MoEConfig(), scan_layers=False)
  flat = {('language_model',) + p: v for p, v in llm_params_from_hf(
      parts['llm'], dense, without_mlp=llm.moe_layers).items()}
  experts = experts_from_hf(parts['moe'], llm, folder, _expert_key(_prefix(fam)), {'gate': 'gate'},
                            'config.json moe.num_experts', 'moe.moe_layers_idx')
  flat.update({('language_model',) + p: v for p, v in experts.items()})
  flat.update(image_side_params(
      parts['vision'], parts['projector'], dataclasses.replace(cfg, llm=llm), vision_dir, notes=notes,
      missing=f'{folder}: the checkpoint holds no {_prefix(fam)}image_tower.* tensors; pass --vision with the '
              f'tower\'s Hugging Face folder'))
  return cfg, flat, notes


# ------------------------------------------------------------------------------------------------ export
def _hf_llm_config(llm: config_lib.LLMConfig) -> dict[str, Any]:
  """The backbone's own HF config fields (PhiConfig / StableLmConfig as transformers 4.37 reads them)."""
  out = dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
             num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
             num_key_value_heads=llm.num_key_value_heads, hidden_act=llm.hidden_act, rope_theta=llm.rope_theta,
             partial_rotary_factor=llm.partial_rotary_factor, layer_norm_eps=llm.layer_norm_eps,
             max_position_embeddings=llm.max_position_embeddings, tie_word_embeddings=llm.tie_word_embeddings,
             bos_token_id=llm.bos_token_id, eos_token_id=llm.eos_token_id, initializer_range=llm.initializer_range,
             qk_layernorm=False)
  if llm.architecture == 'stablelm':
    out.update(use_qkv_bias=llm.use_qkv_bias, use_parallel_residual=llm.use_parallel_residual)
  return out


def to_moe_llava(cfg: config_lib.LVLMConfig, flat: Mapping[Path, Any],
                 image_tower: str = '') -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, tensors) of a MoE-LLaVA folder holding our model: a vanilla MoE (or dense) Phi-2 or StableLM
  LVLM with a looped decoder, its tower and connector. Raises ConvertError for what MoE-LLaVA cannot express."""
  llm = cfg.llm
  if llm.architecture not in ('phi', 'stablelm'):
    raise ConvertError(f'export to moe-llava: architecture={llm.architecture!r}; MoE-LLaVA has Phi-2 and StableLM '
                       f'(and Qwen v1, whose export is not implemented)')
  if llm.moe.is_moe and (llm.moe.variant != 'vanilla' or llm.moe.top_k != 2):
    raise ConvertError(f'export to moe-llava: variant={llm.moe.variant!r}, top_k={llm.moe.top_k}; MoE-LLaVA has '
                       f'one router over shared experts, top-2')
  if cfg.vision_feature_select_strategy != 'drop_first':
    raise ConvertError(f'export to moe-llava: vision_feature_select_strategy='
                       f'{cfg.vision_feature_select_strategy!r}; MoE-LLaVA takes [:, 1:] (drop_first)')
  flat = flat_params(flat)
  from moiie_jax.convert import upcycle  # pylint: disable=import-outside-toplevel
  llm, lm = upcycle.looped_language_model(flat, llm)
  tensors: dict[str, np.ndarray] = {}
  moe_layers = set(llm.moe_layers)
  tensors.update(experts_to_hf(lm, llm, _expert_key('model.'), {'gate': 'gate'}))
  llm_tensors = llm_params_to_hf(lm, dataclasses.replace(llm, moe=config_lib.MoEConfig()), without_mlp=moe_layers)
  bias = llm_tensors.pop('lm_head.bias', None)
  if bias is not None and np.any(bias != 0):
    raise ConvertError('export to moe-llava: lm_head.bias is nonzero; MoE-LLaVA\'s Phi-2 head has no bias')
  tensors.update(llm_tensors)
  vision = {p[1:]: v for p, v in flat.items() if p[0] == 'vision_tower'}
  tensors.update(vision_params_to_hf(vision, cfg.vision, prefix='model.image_tower.image_tower.vision_model.'))
  for key, value in connector_params_to_hf({p[1:]: v for p, v in flat.items() if p[0] == 'multi_modal_projector'},
                                           prefix='').items():
    layer, leaf = key.split('.', 1)
    tensors[f'model.mm_projector.image_spatial_proj.{0 if layer == "linear_1" else 2}.{leaf}'] = value
  kind = llm.architecture  # phi | stablelm, checked above
  hf_cfg = {**_hf_llm_config(llm), 'model_type': f'moe_llava_{kind}' if llm.moe.is_moe else f'llava_{kind}',
            'image_projector_type': 'mlp2x_gelu', 'mm_hidden_size': cfg.vision.hidden_size,
            'mm_vision_select_layer': cfg.vision_feature_layer, 'mm_vision_select_feature': 'patch',
            'mm_image_tower': image_tower, 'image_tower': image_tower}
  if llm.moe.is_moe:
    moe = llm.moe
    hf_cfg['moe'] = dict(moe_enable=True, moe_mode='sparse', moe_layers_idx=sorted(moe_layers), ep_size=1,
                         top_k_experts=moe.top_k, capacity_factor=moe.capacity_factor,
                         eval_capacity_factor=moe.eval_capacity_factor or moe.capacity_factor,
                         min_capacity=moe.min_capacity, use_residual=False,
                         router_aux_loss_coef=moe.aux_loss_coef, train_modules=[],
                         num_experts=[moe.n_experts] * len(moe_layers))
  return hf_cfg, tensors
