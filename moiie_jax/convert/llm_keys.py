"""Hugging Face LLaMA / Phi-3 / Phi-2 / StableLM / Qwen2 tensors <-> the flat parameter paths of
`moiie_jax.models.decoder.CausalLM`.

Pure functions: renames, transposes ([out, in] torch weights -> [in, out] kernels) and, for cfg.scan_layers,
stacking layers on the leading axis `decoder.layer_location` names. No RoPE permutation (we keep HF's rotate_half
layout) and no folded scalings.

Where the LLM's keys live (`decoder_prefix`: the HF base model, `LlamaModel`; `lm_head_key`: the output head):
  LlamaForCausalLM / Phi3ForCausalLM           'model.'                 'lm_head.weight'
  LLaVA file (save_pretrained, llava-hf)       'language_model.model.'  'language_model.lm_head.weight'
  LLaVA in-memory state_dict (transformers 5)  'model.language_model.'  'lm_head.weight'
(`HF_LAYOUTS` holds these.) Keys outside `decoder_prefix` other than `lm_head_key` are left alone (a LLaVA
checkpoint's vision keys belong to another converter); every key under `decoder_prefix` must be mapped or it is an
error naming it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from moiie_jax.convert.errors import ConvertError
from moiie_jax.convert.hf import stack
from moiie_jax.models.config import LLMConfig
from moiie_jax.models.decoder import layer_location
from moiie_jax.models.routing import router_ranges

HF_LAYOUTS = {
    'causal_lm': ('model.', 'lm_head.weight'),
    'llava_legacy': ('language_model.model.', 'language_model.lm_head.weight'),
    'llava': ('model.language_model.', 'lm_head.weight'),
}

# Buffers some older checkpoints saved although they are derived from the config; safe to drop.
_IGNORED_LAYER_SUFFIXES = ('self_attn.rotary_emb.inv_freq',)
_IGNORED_BASE_KEYS = ('rotary_emb.inv_freq',)
_LAYER_KEY = re.compile(r'layers\.(\d+)\.(.+)$')


def _layer_rules(cfg: LLMConfig) -> dict[str, tuple[tuple[str, ...], bool, tuple[int, ...]]]:
  """HF suffix under `layers.{i}.` -> (our path under the layer, transpose?, HF shape)."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  n, g, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
  rules = {}
  for norm in ('input_layernorm',) + (() if cfg.parallel_residual else ('post_attention_layernorm',)):
    rules[f'{norm}.weight'] = ((norm, 'weight'), False, (d,))
    if cfg.norm_kind == 'layer':
      rules[f'{norm}.bias'] = ((norm, 'bias'), False, (d,))
  out = cfg.attn_out_name
  rules[f'self_attn.{out}.weight'] = (('self_attn', out, 'kernel'), True, (d, n * h))
  if cfg.out_bias:
    rules[f'self_attn.{out}.bias'] = (('self_attn', out, 'bias'), False, (d,))
  if cfg.fused_projections:
    rules['self_attn.qkv_proj.weight'] = (('self_attn', 'qkv_proj', 'kernel'), True, ((n + 2 * g) * h, d))
  else:
    for name, width in (('q_proj', n * h), ('k_proj', g * h), ('v_proj', g * h)):
      rules[f'self_attn.{name}.weight'] = (('self_attn', name, 'kernel'), True, (width, d))
      if cfg.qkv_bias:
        rules[f'self_attn.{name}.bias'] = (('self_attn', name, 'bias'), False, (width,))
  for name, (shape, bias) in mlp_tensor_shapes(cfg).items():
    rules[f'mlp.{name}.weight'] = (('mlp', name, 'kernel'), True, shape)
    if bias is not None:
      rules[f'mlp.{name}.bias'] = (('mlp', name, 'bias'), False, bias)
  return rules


def mlp_tensor_shapes(cfg: LLMConfig) -> dict[str, tuple[tuple[int, int], tuple[int] | None]]:
  """The dense MLP's HF tensors: name -> (torch weight shape [out, in], bias shape or None), in HF order."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  if cfg.mlp_kind == 'gelu':
    return {'fc1': ((f, d), (f,)), 'fc2': ((d, f), (d,))}
  if cfg.fused_projections:
    return {'gate_up_proj': ((2 * f, d), None), 'down_proj': ((d, f), None)}
  bias = cfg.mlp_bias
  return {'gate_proj': ((f, d), (f,) if bias else None), 'up_proj': ((f, d), (f,) if bias else None),
          'down_proj': ((d, f), (d,) if bias else None)}


def _base_rules(cfg: LLMConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """HF suffix under the decoder prefix, outside the layers -> (our path, shape)."""
  d, norm = cfg.hidden_size, cfg.final_norm_name
  rules = {'embed_tokens.weight': (('model', 'embed_tokens', 'embedding'), (cfg.vocab_size, d)),
           f'{norm}.weight': (('model', norm, 'weight'), (d,))}
  if cfg.norm_kind == 'layer':
    rules[f'{norm}.bias'] = (('model', norm, 'bias'), (d,))
  return rules


def lm_head_bias_key(lm_head_key: str) -> str:
  return lm_head_key[:-len('weight')] + 'bias'


def _check_dense(cfg: LLMConfig) -> None:
  if cfg.moe.is_moe:
    raise ConvertError(f'LLMConfig.moe.variant={cfg.moe.variant!r}: a dense HF checkpoint has no expert weights for '
                       f'the MoE layers {list(cfg.moe_layers)}; convert it with the dense config (moe variant '
                       f"'dense') and then upcycle (moiie_jax.convert.upcycle)")


def _check_shape(key: str, array: np.ndarray, want: tuple[int, ...]) -> None:
  if tuple(array.shape) != tuple(want):
    raise ConvertError(f'{key}: shape {tuple(array.shape)}, expected {tuple(want)} for this LLMConfig')


def _check_without_mlp(cfg: LLMConfig, without_mlp) -> frozenset[int]:
  without_mlp = frozenset(without_mlp)
  if without_mlp and cfg.scan_layers:
    raise ConvertError('without_mlp needs a looped LLMConfig (scan_layers=False); relayout afterwards')
  return without_mlp


def llm_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: LLMConfig, decoder_prefix: str = 'model.',
                       lm_head_key: str = 'lm_head.weight', without_mlp=()) -> dict[tuple, np.ndarray]:
  """Our flat state paths (as `nnx.to_flat_state(nnx.state(CausalLM(cfg)))` lists them) -> arrays.

  tensors: HF name -> array (numpy, any dtype; kept as given). Kernels come back transposed to [in, out] and, with
  cfg.scan_layers, stacked on the leading axis. Raises ConvertError naming the key for an unmapped key under
  `decoder_prefix`, a missing key, a wrong shape, a tied lm_head that differs from the embeddings, or an MoE config.
  without_mlp: indices of layers whose FFN is not among `tensors` (an expert layer another converter assembles,
  e.g. MoE-LLaVA's); their `mlp.*` keys are neither expected nor accepted (looped cfg only).
  """
  _check_dense(cfg)
  without_mlp = _check_without_mlp(cfg, without_mlp)
  rules, base = _layer_rules(cfg), _base_rules(cfg)
  n_layers = cfg.num_hidden_layers
  out: dict[tuple, np.ndarray] = {}
  stacked: dict[tuple, dict[int, np.ndarray]] = {}
  seen: set[str] = set()

  def put(path: tuple, stack_index: int | None, array: np.ndarray) -> None:
    if stack_index is None:
      out[path] = array
    else:
      stacked.setdefault(path, {})[stack_index] = array

  embed_key = decoder_prefix + 'embed_tokens.weight'
  for key, value in tensors.items():
    if key in (lm_head_key, lm_head_bias_key(lm_head_key)):
      continue  # after the embeddings (a tied head is compared with them)
    if not key.startswith(decoder_prefix):
      continue
    rest = key[len(decoder_prefix):]
    array = np.asarray(value)
    if rest in base:
      path, shape = base[rest]
      _check_shape(key, array, shape)
      put(path, None, array)
    elif rest in _IGNORED_BASE_KEYS:
      continue
    elif m := _LAYER_KEY.match(rest):
      i, suffix = int(m.group(1)), m.group(2)
      if suffix in _IGNORED_LAYER_SUFFIXES:
        continue
      if i >= n_layers:
        raise ConvertError(f'{key}: layer {i} does not exist; LLMConfig.num_hidden_layers={n_layers}')
      if suffix not in rules or (i in without_mlp and suffix.startswith('mlp.')):
        raise ConvertError(f'{key}: no rule maps this key for architecture={cfg.architecture!r} (attention_bias='
                           f'{cfg.attention_bias}, mlp_bias={cfg.mlp_bias}); expected one of layers.{{i}}.'
                           f'{sorted(rules)}')
      sub, transpose, shape = rules[suffix]
      _check_shape(key, array, shape)
      location, stack_index = layer_location(cfg, i)
      put(location + sub, stack_index, array.T if transpose else array)
    else:
      raise ConvertError(f'{key}: no rule maps this key (expected {decoder_prefix}{{{",".join(base)}}} or '
                         f'{decoder_prefix}layers.{{i}}.*)')
    seen.add(key)

  if cfg.tie_word_embeddings:
    if lm_head_key in tensors:
      head = np.asarray(tensors[lm_head_key])
      if embed_key not in tensors or not np.array_equal(head, np.asarray(tensors[embed_key])):
        raise ConvertError(f'{lm_head_key}: LLMConfig.tie_word_embeddings=True but this tensor differs from '
                           f'{embed_key}; set tie_word_embeddings=False to load it')
  elif lm_head_key in tensors:
    head = np.asarray(tensors[lm_head_key])
    _check_shape(lm_head_key, head, (cfg.vocab_size, cfg.hidden_size))
    out[('lm_head', 'kernel')] = head.T
    seen.add(lm_head_key)
  bias_key = lm_head_bias_key(lm_head_key)
  if bias_key in tensors:
    if not cfg.lm_head_bias:
      raise ConvertError(f'{bias_key}: architecture={cfg.architecture!r} has no lm_head bias')
    bias = np.asarray(tensors[bias_key])
    _check_shape(bias_key, bias, (cfg.vocab_size,))
    out[('lm_head', 'bias')] = bias
    seen.add(bias_key)

  missing = [k for k in llm_hf_keys(cfg, decoder_prefix, lm_head_key, without_mlp) if k not in seen]
  if missing:
    more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
    raise ConvertError(f'missing HF keys {missing[:5]}{more} (decoder_prefix={decoder_prefix!r}, '
                       f'lm_head_key={lm_head_key!r})')
  for path, by_index in stacked.items():
    out[path] = stack([by_index[b] for b in range(len(by_index))])  # made when written
  return out


def llm_hf_keys(cfg: LLMConfig, decoder_prefix: str = 'model.', lm_head_key: str = 'lm_head.weight',
                without_mlp=()) -> list[str]:
  """Every HF key a dense checkpoint of this config holds (without a tied lm_head), in layer order; no `mlp.*` keys
  at the layers in `without_mlp`."""
  base = list(_base_rules(cfg))
  keys = [decoder_prefix + base[0]]
  suffixes = list(_layer_rules(cfg))
  keys += [f'{decoder_prefix}layers.{i}.{s}' for i in range(cfg.num_hidden_layers) for s in suffixes
           if not (i in without_mlp and s.startswith('mlp.'))]
  keys += [decoder_prefix + k for k in base[1:]]
  if not cfg.tie_word_embeddings:
    keys.append(lm_head_key)
    if cfg.lm_head_bias:
      keys.append(lm_head_bias_key(lm_head_key))
  return keys


def _to_numpy(value: Any) -> np.ndarray:
  # nnx.Variable (from nnx.to_flat_state) or a plain array.
  if hasattr(value, 'get_value'):
    value = value.get_value()
  return np.asarray(value)


def llm_params_to_hf(flat: Mapping[tuple, Any], cfg: LLMConfig, decoder_prefix: str = 'model.',
                     lm_head_key: str = 'lm_head.weight', include_tied_lm_head: bool = False,
                     without_mlp=()) -> dict[str, np.ndarray]:
  """The inverse of `llm_params_from_hf`: HF name -> numpy array ([out, in] weights, layers unstacked).

  flat: our path -> array or nnx.Variable (e.g. `dict(nnx.to_flat_state(nnx.state(model)))`). A tied model
  exports no lm_head unless include_tied_lm_head (HF's state_dict() lists it, save_pretrained drops it). A path of
  ours that no rule reads, or a missing one, is a ConvertError naming it. without_mlp: as in `llm_params_from_hf`
  (the caller exports those layers' FFN itself and leaves them out of `flat`).
  """
  _check_dense(cfg)
  without_mlp = _check_without_mlp(cfg, without_mlp)
  rules = _layer_rules(cfg)
  flat = {tuple(k): v for k, v in flat.items()}
  used: set[tuple] = set()

  def get(path: tuple) -> np.ndarray:
    if path not in flat:
      raise ConvertError(f'parameter {"/".join(map(str, path))} is missing from the state to export')
    used.add(path)
    return _to_numpy(flat[path])

  out: dict[str, np.ndarray] = {}
  base = _base_rules(cfg)
  embedding = get(base['embed_tokens.weight'][0])
  out[decoder_prefix + 'embed_tokens.weight'] = embedding
  cache: dict[tuple, np.ndarray] = {}
  for i in range(cfg.num_hidden_layers):
    location, stack_index = layer_location(cfg, i)
    for suffix, (sub, transpose, _) in rules.items():
      if i in without_mlp and suffix.startswith('mlp.'):
        continue
      path = location + sub
      if path not in cache:
        cache[path] = get(path)
      array = cache[path] if stack_index is None else cache[path][stack_index]
      out[f'{decoder_prefix}layers.{i}.{suffix}'] = array.T if transpose else array  # views: copied when written
  for suffix, (path, _) in list(base.items())[1:]:
    out[decoder_prefix + suffix] = get(path)
  if cfg.tie_word_embeddings:
    if include_tied_lm_head:
      out[lm_head_key] = embedding
  else:
    out[lm_head_key] = get(('lm_head', 'kernel')).T
    if cfg.lm_head_bias:
      out[lm_head_bias_key(lm_head_key)] = get(('lm_head', 'bias'))
  unused = sorted('/'.join(map(str, p)) for p in set(flat) - used)
  if unused:
    raise ConvertError(f'parameters {unused[:5]} have no HF name in a dense {cfg.architecture} checkpoint')
  return out


# ------------------------------------------------------------------------------------------------ experts
# How a checkpoint format names one expert tensor (i layer, j expert, name the dense MLP's tensor, leaf weight|bias)
# or, with j None, a router (name the router's HF name, leaf 'weight').
ExpertKey = Callable[[int, 'int | None', str, str], str]


def router_widths(cfg: LLMConfig) -> dict[str, int]:
  """Our routers of an MoE layer and how many experts each scores: 'gate' (textual, or vanilla's only one) and,
  unless vanilla, 'gate_vis' (visual)."""
  (t0, t1), (v0, v1) = router_ranges(cfg.moe)
  return {'gate': t1 - t0, **({} if cfg.moe.variant == 'vanilla' else {'gate_vis': v1 - v0})}


def experts_from_hf(found: Mapping[tuple, np.ndarray], cfg: LLMConfig, where: str, key_of: ExpertKey,
                    routers: Mapping[str, str], count_field: str, layers_field: str) -> dict[tuple, np.ndarray]:
  """The MoE layers' stacked experts and routers at looped paths ('model', 'layers', i, 'mlp', ...).

  found: (i, j, name, leaf) -> array for every expert tensor and (i, None, hf_router, 'weight') for the routers;
  routers: HF router name -> ours ('gate' / 'gate_vis'). A missing, extra or mis-shaped tensor is a ConvertError
  naming its key (`key_of`); `count_field` / `layers_field` name the config fields the counts and layers came from.
  """
  e = cfg.moe.n_experts
  shapes = mlp_tensor_shapes(cfg)
  layers = set(cfg.moe_layers)
  stray = sorted({i for i, *_ in found} - layers)
  if stray:
    raise ConvertError(f'{where}: layer {stray[0]} has expert tensors but is not an MoE layer ({layers_field}: '
                       f'{sorted(layers)})')
  widths = router_widths(cfg)
  out = {}
  for i in sorted(layers):
    present = sorted({j for (li, j, *_) in found if li == i and j is not None})
    if present and present != list(range(len(present))):
      missing = sorted(set(range(max(present) + 1)) - set(present))
      raise ConvertError(f'{where}: {key_of(i, missing[0], "*", "*")} is missing')
    if len(present) != e:
      raise ConvertError(f'{where}: layer {i} holds {len(present)} experts but {count_field} says {e}')
    base = ('model', 'layers', i, 'mlp')
    for hf_name, ours in routers.items():
      key = key_of(i, None, hf_name, 'weight')
      w = found.get((i, None, hf_name, 'weight'))
      if w is None:
        raise ConvertError(f'{where}: {key} is missing')
      if tuple(w.shape) != (widths[ours], cfg.hidden_size):
        raise ConvertError(f'{where}: {key}: shape {tuple(w.shape)}, expected {(widths[ours], cfg.hidden_size)}')
      out[base + (ours, 'kernel')] = np.asarray(w).T
    extra_routers = sorted({n for (li, j, n, _) in found if li == i and j is None} - set(routers))
    if extra_routers:
      raise ConvertError(f'{where}: {key_of(i, None, extra_routers[0], "weight")}: no rule maps this router '
                         f'(expected {sorted(routers)})')
    for name, (w_shape, b_shape) in shapes.items():
      for leaf, want in (('weight', w_shape), ('bias', b_shape)):
        if want is None:
          continue
        arrays = []
        for j in range(e):
          a = found.get((i, j, name, leaf))
          if a is None:
            raise ConvertError(f'{where}: {key_of(i, j, name, leaf)} is missing')
          if tuple(a.shape) != tuple(want):
            raise ConvertError(f'{where}: {key_of(i, j, name, leaf)}: shape {tuple(a.shape)}, expected {tuple(want)}')
          arrays.append(np.asarray(a).T if leaf == 'weight' else np.asarray(a))
        out[base + ('experts', name, 'kernel' if leaf == 'weight' else 'bias')] = stack(arrays)  # made when written
    unknown = sorted({(n, leaf) for (li, j, n, leaf) in found if li == i and j is not None}
                     - {(n, leaf) for n, (_, b) in shapes.items() for leaf in ('weight', 'bias')
                        if leaf == 'weight' or b is not None})
    if unknown:
      raise ConvertError(f'{where}: {key_of(i, 0, *unknown[0])}: not a tensor of the {cfg.architecture} MLP')
  return out


def experts_to_hf(lm: dict, cfg: LLMConfig, key_of: ExpertKey, routers: Mapping[str, str]) -> dict[str, np.ndarray]:
  """The inverse of `experts_from_hf` for a looped decoder: pops the MoE layers' routers and experts from `lm` (our
  looped LLM paths) and returns them by HF key."""
  tensors = {}
  for i in sorted(cfg.moe_layers):
    base = ('model', 'layers', i, 'mlp')
    for hf_name, ours in routers.items():
      tensors[key_of(i, None, hf_name, 'weight')] = _to_numpy(lm.pop(base + (ours, 'kernel'))).T
    for name, (_, b_shape) in mlp_tensor_shapes(cfg).items():
      kernel = _to_numpy(lm.pop(base + ('experts', name, 'kernel')))
      bias = _to_numpy(lm.pop(base + ('experts', name, 'bias'))) if b_shape is not None else None
      for j in range(cfg.moe.n_experts):
        tensors[key_of(i, j, name, 'weight')] = kernel[j].T  # a view: copied when written
        if bias is not None:
          tensors[key_of(i, j, name, 'bias')] = bias[j]
  return tensors
