"""Model configuration dataclasses: the one contract every module, converter and recipe shares.

Field names follow the Hugging Face config classes (`LlamaConfig`, `Phi3Config`, `SiglipVisionConfig`,
`CLIPVisionConfig`, `LlavaConfig`) so that `from_hf` is a plain copy and a reader who knows HF knows these.
All configs are frozen and hashable: NNX keeps them as static module attributes, so they end up in jit keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

# The decoder families (HF model_type): LlamaForCausalLM, Phi3ForCausalLM, PhiForCausalLM (Phi-2),
# StableLmForCausalLM (StableLM-2) and Qwen2ForCausalLM (also Qwen v1, whose fused weights the converter splits).
LLM_ARCHITECTURES = ('llama', 'phi3', 'phi', 'stablelm', 'qwen2')
# Activations of the fc1 -> act -> fc2 MLP (Phi-2 uses gelu_new, the tanh approximation).
GELU_ACTIVATIONS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu', 'gelu_fast')
# What a rematerialised decoder layer keeps for the backward pass (see decoder.REMAT_POLICIES).
REMAT_POLICIES = ('full', 'minimal', 'dots')
VISION_ARCHITECTURES = ('siglip', 'clip')
MOE_VARIANTS = ('dense', 'vanilla', 'modality', 'moiie')
MOE_PLACEMENTS = ('interleaved', 'all', 'list')
MODALITY_RULES = ('all_image', 'official')
AUX_LOSS_SCOPES = ('global', 'per_layer', 'sum')
GATES = ('mixtral', 'deepspeed')
GATE_NOISES = ('none', 'gumbel')
GROUPED_MATMULS = ('auto', 'scan', 'ragged_dot', 'megablox', 'mosaic_gpu')


def _freeze(value: Any) -> Any:
  """Turns dicts/lists (HF rope_scaling) into sorted tuples so the config stays hashable."""
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _thaw(value: Any) -> Any:
  if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                                                for v in value):
    return {k: _thaw(v) for k, v in value}
  if isinstance(value, tuple):
    return [_thaw(v) for v in value]
  return value


class ConfigError(ValueError):
  """A configuration field holds a value the model cannot use; the message names the field."""


def _check_choice(owner: str, field: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise ConfigError(f'{owner}.{field}={value!r}: expected one of {list(choices)}')


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Which decoder FFNs become expert layers, and how tokens are routed to experts.

  Experts are stored in one stacked array ordered [vision..., shared..., language...], so that the visual router
  scores the contiguous range [0, n_vision + n_shared) and the textual router [n_vision, n_experts). This is the
  official MoIIE code's layout for 4 experts (0 vision, 1-2 shared, 3 language), generalised to any counts.
  """
  variant: str = 'dense'  # dense | vanilla | modality | moiie
  n_vision: int = 1
  n_language: int = 1
  n_shared: int = 2
  top_k: int = 2
  # Renormalise the chosen top-k weights to sum to 1 (official MoIIE code and Mixtral do).
  renormalize: bool = True
  # Capacity per expert = ceil(capacity_factor * tokens * k / experts_in_group); <= 0 means dropless.
  capacity_factor: float = 0.0
  # Capacity at evaluation (MoE-LLaVA uses 2.0); None means the training value.
  eval_capacity_factor: float | None = None
  placement: str = 'interleaved'  # interleaved | all | list
  # Interleaving starts here: 1 = odd layers (official MoIIE code), 0 = even layers (MoE-LLaVA).
  first_layer: int = 1
  layers: tuple[int, ...] = ()  # explicit MoE layer indices when placement == 'list'
  aux_loss_coef: float = 0.001
  # 'global': f and P over all MoE layers' tokens together (HF Mixtral loss on concatenated logits, as the
  # official MoIIE code does); 'per_layer': the loss per layer, averaged over layers; 'sum': per layer, summed
  # (DeepSpeed, MoE-LLaVA).
  aux_loss_scope: str = 'global'
  # 'mixtral' (ours and the official MoIIE code's): softmax top-k over the router's experts, padding not routed,
  # the Mixtral balance loss over all k choices. 'deepspeed' (MoE-LLaVA, DeepSpeed's top2gating): every position
  # of the flattened batch is routed (padding included), capacity max(ceil(cf * 2 * N / E), min_capacity), the
  # kept weights renormalised after the drop, GShard's balance loss over first choices (1.0 when uniform).
  gate: str = 'mixtral'
  min_capacity: int = 0  # DeepSpeed's floor on the capacity per expert (MoE-LLaVA: 0)
  # Noise on the second choice of DeepSpeed's gate. 'none': argmax of the logits without the first (deterministic;
  # our default, also at evaluation). 'gumbel': DeepSpeed's argmax of logits + Gumbel noise, which it applies at
  # evaluation too (so MoE-LLaVA's scores vary from run to run). Our noise is keyed by fold_in(gate_noise_seed,
  # a fingerprint of the layer's input): reproducible for a seed and a batch, different across batches and
  # layers, with no RNG state to carry (a different backend may round the fingerprint differently).
  gate_noise: str = 'none'
  gate_noise_seed: int = 0
  z_loss_coef: float = 0.0
  # 'all_image': every image token is routed as vision, padding is excluded from routing and loss (our default).
  # 'official': the official code's CogVLM rule: a token is vision when it and the next token are both image
  # tokens, so each image's last token and all padding are routed as text (padding takes expert capacity but,
  # as the official loss applies the attention mask, stays out of the aux loss and the statistics).
  modality_rule: str = 'all_image'
  # Router init std; None = the LLM's initializer_range (official MoIIE code).
  router_init_std: float | None = None
  # The dropless layer's grouped matmul (`models.gmm`): 'auto' picks by the target platform (TPU megablox, GPU
  # ragged_dot, else scan). Execution only: the parameters and the result do not depend on it. On an H200 at the
  # Phi-3-mini shape (bf16) 'mosaic_gpu' ran the dropless layer 3.2x faster than ragged_dot and 'scan' 1.86x
  # (bench/RESULTS.md, 2026-12-04); 'mosaic_gpu' is opt-in (Hopper, bf16/fp16, K and N multiples of 128).
  grouped_matmul: str = 'auto'

  @property
  def n_experts(self) -> int:
    return self.n_vision + self.n_shared + self.n_language

  @property
  def is_moe(self) -> bool:
    return self.variant != 'dense'

  def validate(self) -> None:
    owner = 'MoEConfig'
    _check_choice(owner, 'variant', self.variant, MOE_VARIANTS)
    _check_choice(owner, 'placement', self.placement, MOE_PLACEMENTS)
    _check_choice(owner, 'modality_rule', self.modality_rule, MODALITY_RULES)
    _check_choice(owner, 'aux_loss_scope', self.aux_loss_scope, AUX_LOSS_SCOPES)
    _check_choice(owner, 'grouped_matmul', self.grouped_matmul, GROUPED_MATMULS)
    _check_choice(owner, 'gate', self.gate, GATES)
    _check_choice(owner, 'gate_noise', self.gate_noise, GATE_NOISES)
    if self.min_capacity < 0:
      raise ConfigError(f'{owner}.min_capacity={self.min_capacity}: expected >= 0')
    if self.gate == 'deepspeed':
      if self.top_k != 2:
        raise ConfigError(f"{owner}.top_k={self.top_k}: gate='deepspeed' is DeepSpeed's top-2 gate; expected 2")
      if not self.renormalize:
        raise ConfigError(f"{owner}.renormalize=False: gate='deepspeed' always renormalises the kept weights")
    elif self.gate_noise != 'none':
      raise ConfigError(f"{owner}.gate_noise={self.gate_noise!r}: noise is a choice of gate='deepspeed' only")

    for name in ('n_vision', 'n_language', 'n_shared'):
      if getattr(self, name) < 0:
        raise ConfigError(f'{owner}.{name}={getattr(self, name)}: expert counts must be >= 0')
    if self.top_k < 1:
      raise ConfigError(f'{owner}.top_k={self.top_k}: must be >= 1')
    if self.first_layer not in (0, 1):
      raise ConfigError(f'{owner}.first_layer={self.first_layer}: expected 0 or 1')
    if not self.is_moe:
      return
    if self.variant == 'vanilla':
      if self.n_vision or self.n_language:
        raise ConfigError(f'{owner}: variant=vanilla uses shared experts only; got n_vision={self.n_vision}, '
                          f'n_language={self.n_language} (set them to 0 and n_shared to the expert count)')
      routers = {'shared': self.n_shared}
    elif self.variant == 'modality':
      if self.n_shared:
        raise ConfigError(f'{owner}: variant=modality has no shared experts; got n_shared={self.n_shared}')
      routers = {'vision': self.n_vision, 'language': self.n_language}
    else:
      routers = {'vision': self.n_vision + self.n_shared, 'language': self.n_language + self.n_shared}
    for router, allowed in routers.items():
      field = {'shared': 'n_shared', 'vision': 'n_vision', 'language': 'n_language'}[router]
      if allowed == 0:
        raise ConfigError(f'{owner}.{field}: the {router} router of variant={self.variant} has no experts to '
                          f'route to')
      if self.top_k > allowed:
        raise ConfigError(f'{owner}.top_k={self.top_k} exceeds the {allowed} experts the {router} router of '
                          f'variant={self.variant} may choose from')

  def moe_layers(self, num_layers: int) -> tuple[int, ...]:
    """Indices of the decoder layers whose FFN is an expert layer."""
    if not self.is_moe:
      return ()
    if self.placement == 'all':
      return tuple(range(num_layers))
    if self.placement == 'interleaved':
      return tuple(range(self.first_layer, num_layers, 2))
    bad = [i for i in self.layers if not 0 <= i < num_layers]
    if bad:
      raise ConfigError(f'MoEConfig.layers={list(self.layers)}: indices {bad} are outside [0, {num_layers})')
    return tuple(sorted(set(self.layers)))


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """A decoder-only language model (HF `LlamaConfig`, `Phi3Config`, `PhiConfig`, `StableLmConfig`, `Qwen2Config`).

  What differs between the families is derived from `architecture` (and StableLM's two flags) by the properties
  below, one place: the norm (RMSNorm, or LayerNorm with bias), the residual (sequential, or Phi-2's parallel
  x + attn(ln x) + mlp(ln x)), the MLP (SwiGLU, or fc1 -> GELU -> fc2 with biases), which projections carry
  biases, the HF names that differ (`dense`, `final_layernorm`) and the lm_head bias.
  """
  architecture: str = 'llama'  # llama | phi3 | phi | stablelm | qwen2
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int | None = None  # None = hidden_size // num_attention_heads
  hidden_act: str = 'silu'
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None  # frozen HF rope_scaling dict (see rope_scaling_dict)
  partial_rotary_factor: float = 1.0
  max_position_embeddings: int = 4096
  original_max_position_embeddings: int | None = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None  # Phi-3: keys further back than this are not attended (HF applies it)
  layer_norm_eps: float = 1e-5  # the LayerNorm families (phi, stablelm); the RMSNorm ones use rms_norm_eps
  use_qkv_bias: bool = False  # StableLM: q/k/v biases (its o_proj has none)
  use_parallel_residual: bool = False  # StableLM: x + attn(ln x) + mlp(ln x) (Phi-2 always is)
  qk_layernorm: bool = False  # Phi-2 / StableLM option; not supported (validate refuses it)
  initializer_range: float = 0.02
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  moe: MoEConfig = MoEConfig()
  # Execution choices (not part of the checkpoint's meaning).
  scan_layers: bool = False
  remat: bool = False
  # With remat: 'full' recomputes the whole layer in the backward pass (least memory; MaxText's 'full'), 'minimal'
  # keeps the weight matmuls' outputs (dots without batch dims) and recomputes the rest, 'dots' keeps every dot.
  remat_policy: str = 'full'
  # Attention over more than this many queries runs a block of this many at a time (attention.chunked_attention):
  # score memory O(chunk * S) instead of O(T * S). 0 = never.
  attention_chunk: int = 512
  # Without a KV cache (training, scoring) and up to attention_chunk queries, attention runs the queries in this
  # many blocks, each against the keys up to its last query (attention.causal_block_attention): the later keys
  # are causally masked anyway, so 2 blocks skip a quarter of the score work. Exact up to the order of float sums.
  # 1 = all keys for all queries (what HF computes).
  attention_causal_blocks: int = 2
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def rope_scaling_dict(self) -> dict | None:
    return None if self.rope_scaling is None else _thaw(self.rope_scaling)

  @property
  def fused_projections(self) -> bool:
    """Phi-3 stores `qkv_proj` and `gate_up_proj` as single fused matrices."""
    return self.architecture == 'phi3'

  @property
  def norm_kind(self) -> str:
    """'layer' (LayerNorm with weight and bias: phi, stablelm) or 'rms' (RMSNorm weight only)."""
    return 'layer' if self.architecture in ('phi', 'stablelm') else 'rms'

  @property
  def norm_eps(self) -> float:
    return self.layer_norm_eps if self.norm_kind == 'layer' else self.rms_norm_eps

  @property
  def parallel_residual(self) -> bool:
    """x + attn(ln x) + mlp(ln x) with one norm per layer (Phi-2; StableLM with use_parallel_residual)."""
    return self.architecture == 'phi' or (self.architecture == 'stablelm' and self.use_parallel_residual)

  @property
  def mlp_kind(self) -> str:
    """'gelu': Phi-2's fc1 -> act -> fc2, both biased; 'swiglu': down(silu(gate x) * up x)."""
    return 'gelu' if self.architecture == 'phi' else 'swiglu'

  @property
  def qkv_bias(self) -> bool:
    return {'llama': self.attention_bias, 'phi3': False, 'phi': True, 'stablelm': self.use_qkv_bias,
            'qwen2': True}[self.architecture]

  @property
  def out_bias(self) -> bool:
    """Whether the attention output projection (`o_proj`, Phi-2's `dense`) has a bias."""
    return {'llama': self.attention_bias, 'phi': True}.get(self.architecture, False)

  @property
  def attn_out_name(self) -> str:
    return 'dense' if self.architecture == 'phi' else 'o_proj'

  @property
  def final_norm_name(self) -> str:
    return 'final_layernorm' if self.architecture == 'phi' else 'norm'

  @property
  def lm_head_bias(self) -> bool:
    return self.architecture == 'phi'

  @property
  def mlp_has_bias(self) -> bool:
    return self.mlp_kind == 'gelu' or (self.mlp_bias and not self.fused_projections)

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return self.moe.moe_layers(self.num_hidden_layers)

  def validate(self) -> None:
    _check_choice('LLMConfig', 'architecture', self.architecture, LLM_ARCHITECTURES)
    _check_choice('LLMConfig', 'remat_policy', self.remat_policy, REMAT_POLICIES)
    if self.attention_chunk < 0:
      raise ConfigError(f'LLMConfig.attention_chunk={self.attention_chunk}: expected >= 0 (0 = whole sequence)')
    if self.attention_causal_blocks < 1:
      raise ConfigError(f'LLMConfig.attention_causal_blocks={self.attention_causal_blocks}: expected >= 1 (1 = one '
                        f'block of all queries)')
    if self.mlp_kind == 'swiglu' and self.hidden_act != 'silu':
      raise ConfigError(f'LLMConfig.hidden_act={self.hidden_act!r}: the {self.architecture} MLP is SwiGLU; only '
                        f'silu is supported')
    if self.mlp_kind == 'gelu' and self.hidden_act not in GELU_ACTIVATIONS:
      raise ConfigError(f'LLMConfig.hidden_act={self.hidden_act!r}: expected one of {list(GELU_ACTIVATIONS)} for '
                        f'the {self.architecture} fc1/fc2 MLP')
    if self.qk_layernorm:
      raise ConfigError('LLMConfig.qk_layernorm=True: per-head q/k LayerNorms are not supported (no released '
                        'Phi-2, StableLM-2-1.6B or MoE-LLaVA model uses them)')
    if self.use_qkv_bias and self.architecture != 'stablelm':
      raise ConfigError(f'LLMConfig.use_qkv_bias=True is a StableLM field; architecture={self.architecture!r} '
                        f'(use attention_bias for LLaMA)')
    if self.use_parallel_residual and self.architecture != 'stablelm':
      raise ConfigError(f'LLMConfig.use_parallel_residual=True is a StableLM field; architecture='
                        f'{self.architecture!r} (Phi-2 is always parallel)')
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(f'LLMConfig.num_key_value_heads={self.num_key_value_heads} must divide '
                        f'num_attention_heads={self.num_attention_heads}')
    self.moe.validate()
    self.moe_layers  # checks explicit layer lists against num_hidden_layers


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT vision tower: SigLIP or CLIP (HF `SiglipVisionConfig` / `CLIPVisionConfig` fields)."""
  architecture: str = 'siglip'  # siglip | clip
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 384
  patch_size: int = 14
  hidden_act: str = 'gelu_pytorch_tanh'  # SigLIP; CLIP uses quick_gelu
  layer_norm_eps: float = 1e-6
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  # S2 multi-scale features (models/s2.py; the official MoIIE fine-tuning's --use_s2 with 384, 768, 1152): () off,
  # else the scales in pixels, smallest = image_size (the tile the tower sees), each a multiple of it. The image
  # is served at the largest scale and the connector takes len(s2_scales) * hidden_size channels.
  s2_scales: tuple[int, ...] = ()

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def input_size(self) -> int:
    """The side of the images the tower is fed: the largest S2 scale, else image_size."""
    return max(self.s2_scales) if self.s2_scales else self.image_size

  @property
  def feature_size(self) -> int:
    """Channels of the image features the connector takes."""
    return self.hidden_size * max(1, len(self.s2_scales))

  @property
  def tiles_per_image(self) -> int:
    """Tower passes per image (1 + 4 + 9 = 14 for the official S2 scales)."""
    return sum((s // self.image_size) ** 2 for s in self.s2_scales) if self.s2_scales else 1

  @property
  def has_class_token(self) -> bool:
    return self.architecture == 'clip'

  def validate(self) -> None:
    _check_choice('VisionConfig', 'architecture', self.architecture, VISION_ARCHITECTURES)
    if self.hidden_act not in ('gelu_pytorch_tanh', 'quick_gelu', 'gelu'):
      raise ConfigError(f'VisionConfig.hidden_act={self.hidden_act!r}: expected gelu_pytorch_tanh, quick_gelu '
                        f'or gelu')
    if self.s2_scales:
      scales = tuple(self.s2_scales)
      if (list(scales) != sorted(set(scales)) or scales[0] != self.image_size
          or any(s % self.image_size for s in scales)):
        raise ConfigError(f'VisionConfig.s2_scales={list(scales)}: expected increasing sizes starting at the '
                          f'tower\'s image_size={self.image_size}, each a multiple of it (e.g. '
                          f'{[self.image_size * k for k in (1, 2, 3)]})')
      if self.has_class_token:
        raise ConfigError(f'VisionConfig.s2_scales with architecture={self.architecture!r}: S2 tiles are merged '
                          f'patch by patch, so it needs a tower without a class token (siglip)')


@dataclasses.dataclass(frozen=True)
class LVLMConfig:
  """Vision tower + 2-layer GELU MLP connector + decoder LLM (HF `LlavaConfig` fields)."""
  llm: LLMConfig = LLMConfig()
  vision: VisionConfig = VisionConfig()
  # Id of the image placeholder token in input_ids; its embedding is never looked up, so it may be vocab_size.
  image_token_id: int = 32000
  # Which hidden state of the tower feeds the connector; -2 (second to last) as LLaVA does.
  vision_feature_layer: int = -2
  # 'default' drops CLIP's class token; 'full' keeps it. SigLIP has none. 'drop_first': MoE-LLaVA's [:, 1:] for
  # any tower (SigLIP's first patch goes: 728 image tokens at 384 px).
  vision_feature_select_strategy: str = 'default'
  projector_hidden_act: str = 'gelu'
  multimodal_projector_bias: bool = True

  @property
  def num_image_tokens(self) -> int:
    n = self.vision.num_patches
    if self.vision.has_class_token and self.vision_feature_select_strategy == 'full':
      n += 1
    if self.vision_feature_select_strategy == 'drop_first' and not self.vision.has_class_token:
      n -= 1
    return n

  def validate(self) -> None:
    self.llm.validate()
    self.vision.validate()
    _check_choice('LVLMConfig', 'vision_feature_select_strategy', self.vision_feature_select_strategy,
                  ('default', 'full', 'drop_first'))
    if self.vision.s2_scales and self.vision_feature_select_strategy == 'drop_first':
      raise ConfigError('LVLMConfig.vision_feature_select_strategy=\'drop_first\' with vision.s2_scales: S2 '
                        'merges whole patch grids; drop_first (MoE-LLaVA) is a non-S2 strategy')
    layers = self.vision.num_hidden_layers
    if not -layers - 1 <= self.vision_feature_layer <= layers:
      raise ConfigError(f'LVLMConfig.vision_feature_layer={self.vision_feature_layer}: the tower has '
                        f'{layers} layers (hidden states 0..{layers})')
    if not isinstance(self.image_token_id, int) or self.image_token_id < 0:
      raise ConfigError(f'LVLMConfig.image_token_id={self.image_token_id!r}: expected an int >= 0 (an id inside '
                        f'the vocabulary, as LLaVA adds one, or vocab_size, an id the tokenizer never produces)')


# ------------------------------------------------------------------------------------------------ serialisation
def to_dict(config: Any) -> dict:
  """A JSON-ready dict of any config above (rope_scaling back to a dict)."""
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      value = to_dict(value)
    elif field.name == 'rope_scaling':
      value = _thaw(value) if value is not None else None
    elif isinstance(value, tuple):
      value = list(value)
    out[field.name] = value
  return out


_NESTED = {'llm': 'LLMConfig', 'vision': 'VisionConfig', 'moe': 'MoEConfig'}


def from_dict(cls: type, data: Mapping[str, Any], where: str = 'config') -> Any:
  """Inverse of `to_dict`; an unknown key is an error naming it and `where` (a file name, say)."""
  names = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - set(names))
  if unknown:
    raise ConfigError(f'{where}: unknown {cls.__name__} keys {unknown}; expected some of {sorted(names)}')
  kwargs = {}
  for key, value in data.items():
    if key in _NESTED and isinstance(value, Mapping):
      value = from_dict(globals()[_NESTED[key]], value, f'{where}.{key}')
    elif key == 'rope_scaling':
      value = _freeze(value) if value is not None else None
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[key] = value
  return cls(**kwargs)


def save_json(config: Any, path: str) -> None:
  with open(path, 'w') as f:
    json.dump({'type': type(config).__name__, **to_dict(config)}, f, indent=2, sort_keys=True)


def load_json(path: str) -> Any:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f'{path}: cannot read a model config ({e})') from e
  kind = data.pop('type', None)
  classes = {'LVLMConfig': LVLMConfig, 'LLMConfig': LLMConfig, 'VisionConfig': VisionConfig}
  if kind not in classes:
    raise ConfigError(f'{path}: "type" is {kind!r}, expected one of {sorted(classes)}')
  return from_dict(classes[kind], data, path)


# ------------------------------------------------------------------------------------------------- from HF
def _get(hf: Mapping[str, Any], key: str, default: Any) -> Any:
  value = hf.get(key, default)
  return default if value is None and default is not None else value


def llm_from_hf(hf: Mapping[str, Any], **overrides: Any) -> LLMConfig:
  """LLMConfig from an HF LlamaConfig / Phi3Config / PhiConfig / StableLmConfig / Qwen2Config dict."""
  model_type = hf.get('model_type')
  if model_type not in LLM_ARCHITECTURES:
    raise ConfigError(f'config.json: model_type={model_type!r} is not a supported LLM; expected one of '
                      f'{list(LLM_ARCHITECTURES)} (LlamaForCausalLM, Phi3ForCausalLM, PhiForCausalLM, '
                      f'StableLmForCausalLM, Qwen2ForCausalLM)')
  sliding_window = hf.get('sliding_window')
  if model_type == 'qwen2':
    if hf.get('use_sliding_window'):
      raise ConfigError('config.json: use_sliding_window=true (Qwen2 sliding attention on the upper layers) is not '
                        'supported')
    sliding_window = None  # Qwen2 configs carry a window that only use_sliding_window turns on
  heads = hf['num_attention_heads']
  rope_scaling = hf.get('rope_scaling')
  rope_theta = hf.get('rope_theta')
  # transformers 5 keeps theta (and the scaling) in `rope_parameters`.
  params = hf.get('rope_parameters')
  partial = hf.get('partial_rotary_factor')
  if isinstance(params, Mapping):
    rope_theta = params.get('rope_theta', rope_theta)
    partial = params.get('partial_rotary_factor', partial)
    kind = params.get('rope_type', params.get('type', 'default'))
    if kind != 'default':
      rope_scaling = {k: v for k, v in params.items() if k != 'rope_theta'}
  if isinstance(rope_scaling, Mapping) and rope_scaling.get('rope_type', rope_scaling.get('type')) == 'default':
    rope_scaling = None
  eos = hf.get('eos_token_id')
  cfg = LLMConfig(
      architecture=model_type,
      vocab_size=hf['vocab_size'],
      hidden_size=hf['hidden_size'],
      intermediate_size=hf['intermediate_size'],
      num_hidden_layers=hf['num_hidden_layers'],
      num_attention_heads=heads,
      num_key_value_heads=_get(hf, 'num_key_value_heads', heads),
      head_dim=hf.get('head_dim'),
      hidden_act=_get(hf, 'hidden_act', 'silu'),
      rms_norm_eps=_get(hf, 'rms_norm_eps', 1e-6),
      rope_theta=float(_get({'t': rope_theta}, 't', 10000.0)),
      rope_scaling=_freeze(rope_scaling) if rope_scaling else None,
      partial_rotary_factor=float(1.0 if partial is None else partial),
      max_position_embeddings=_get(hf, 'max_position_embeddings', 4096),
      original_max_position_embeddings=hf.get('original_max_position_embeddings'),
      tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
      attention_bias=bool(hf.get('attention_bias', False)),
      mlp_bias=bool(hf.get('mlp_bias', False)),
      sliding_window=sliding_window,
      layer_norm_eps=_get(hf, 'layer_norm_eps', 1e-5),
      use_qkv_bias=bool(hf.get('use_qkv_bias', False)),
      use_parallel_residual=bool(hf.get('use_parallel_residual', False)),
      qk_layernorm=bool(hf.get('qk_layernorm', False)),
      initializer_range=_get(hf, 'initializer_range', 0.02),
      pad_token_id=hf.get('pad_token_id'),
      bos_token_id=hf.get('bos_token_id'),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
  )
  cfg = dataclasses.replace(cfg, **overrides)
  cfg.validate()
  return cfg


def vision_from_hf(hf: Mapping[str, Any], **overrides: Any) -> VisionConfig:
  """VisionConfig from an HF SiglipVisionConfig/CLIPVisionConfig dict (or a SiglipModel/CLIPModel dict)."""
  model_type = hf.get('model_type')
  if model_type in ('siglip', 'clip') and 'vision_config' in hf:
    hf = hf['vision_config']
    model_type = hf.get('model_type', model_type + '_vision_model')
  arch = {'siglip_vision_model': 'siglip', 'clip_vision_model': 'clip'}.get(model_type)
  if arch is None:
    raise ConfigError(f'config.json: model_type={model_type!r} is not a supported vision tower; expected '
                      f'siglip_vision_model or clip_vision_model (or a SiglipModel/CLIPModel)')
  cfg = VisionConfig(
      architecture=arch,
      hidden_size=hf['hidden_size'],
      intermediate_size=hf['intermediate_size'],
      num_hidden_layers=hf['num_hidden_layers'],
      num_attention_heads=hf['num_attention_heads'],
      num_channels=_get(hf, 'num_channels', 3),
      image_size=hf['image_size'],
      patch_size=hf['patch_size'],
      hidden_act=_get(hf, 'hidden_act', 'gelu_pytorch_tanh' if arch == 'siglip' else 'quick_gelu'),
      layer_norm_eps=_get(hf, 'layer_norm_eps', 1e-6 if arch == 'siglip' else 1e-5),
  )
  cfg = dataclasses.replace(cfg, **overrides)
  cfg.validate()
  return cfg


def lvlm_from_hf_llava(hf: Mapping[str, Any], **llm_overrides: Any) -> LVLMConfig:
  """LVLMConfig from an HF LlavaConfig dict."""
  if hf.get('model_type') != 'llava':
    raise ConfigError(f'config.json: model_type={hf.get("model_type")!r}, expected llava '
                      f'(LlavaForConditionalGeneration)')
  layer = hf.get('vision_feature_layer', -2)
  if not isinstance(layer, int):
    raise ConfigError(f'config.json: vision_feature_layer={layer!r}; only a single layer index is supported')
  cfg = LVLMConfig(
      llm=llm_from_hf(hf['text_config'], **llm_overrides),
      vision=vision_from_hf(hf['vision_config']),
      image_token_id=hf.get('image_token_id', hf.get('image_token_index', 32000)),
      vision_feature_layer=layer,
      vision_feature_select_strategy=hf.get('vision_feature_select_strategy', 'default'),
      projector_hidden_act=hf.get('projector_hidden_act', 'gelu'),
      multimodal_projector_bias=hf.get('multimodal_projector_bias', True),
  )
  cfg.validate()
  return cfg


# --------------------------------------------------------------------------------------------------- to HF
_HF_LLM = {'llama': ('LlamaForCausalLM', 'llama'), 'phi3': ('Phi3ForCausalLM', 'phi3'),
           'phi': ('PhiForCausalLM', 'phi'), 'stablelm': ('StableLmForCausalLM', 'stablelm'),
           'qwen2': ('Qwen2ForCausalLM', 'qwen2')}


def llm_to_hf(cfg: LLMConfig) -> dict[str, Any]:
  """The HF config dict of a dense LLMConfig (`llm_from_hf` reads it back to the same model fields)."""
  if cfg.moe.is_moe:
    raise ConfigError(f'LLMConfig.moe.variant={cfg.moe.variant!r}: a Hugging Face {_HF_LLM[cfg.architecture][0]} '
                      f'has no expert layers')
  arch, model_type = _HF_LLM[cfg.architecture]
  rope = {'rope_type': 'default', **(cfg.rope_scaling_dict or {}), 'rope_theta': cfg.rope_theta}
  if cfg.partial_rotary_factor != 1.0:
    rope['partial_rotary_factor'] = cfg.partial_rotary_factor
  out = dict(architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
             num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
             hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
             rope_theta=cfg.rope_theta, rope_parameters=rope, partial_rotary_factor=cfg.partial_rotary_factor,
             tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
             pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
             eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id)
  if cfg.head_dim is not None:
    out['head_dim'] = cfg.head_dim
  if cfg.rope_scaling is not None:
    out['rope_scaling'] = cfg.rope_scaling_dict
  if cfg.original_max_position_embeddings is not None:
    out['original_max_position_embeddings'] = cfg.original_max_position_embeddings
  if cfg.norm_kind == 'layer':
    out['layer_norm_eps'] = cfg.layer_norm_eps
  else:
    out['rms_norm_eps'] = cfg.rms_norm_eps
  if cfg.architecture == 'llama':
    out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
  if cfg.architecture == 'stablelm':
    out.update(use_qkv_bias=cfg.use_qkv_bias, use_parallel_residual=cfg.use_parallel_residual, qk_layernorm=False)
  if cfg.architecture == 'phi':
    out['qk_layernorm'] = False
  if cfg.architecture in ('phi3', 'qwen2'):
    out['sliding_window'] = cfg.sliding_window
  if cfg.architecture == 'qwen2':
    out['use_sliding_window'] = False
  return out


def vision_to_hf(cfg: VisionConfig) -> dict[str, Any]:
  """The HF SiglipVisionConfig / CLIPVisionConfig dict of a VisionConfig."""
  return dict(model_type=f'{cfg.architecture}_vision_model', hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
              num_attention_heads=cfg.num_attention_heads, num_channels=cfg.num_channels, image_size=cfg.image_size,
              patch_size=cfg.patch_size, hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps)


def lvlm_to_hf_llava(cfg: LVLMConfig, image_token_id: int) -> dict[str, Any]:
  """The HF LlavaConfig dict of a dense LVLMConfig, with `image_token_id` inside the text vocabulary (HF looks the
  placeholder up in the embedding table before replacing it)."""
  # HF's 'default' always drops the first feature, 'full' keeps them all.
  drops_first = cfg.vision_feature_select_strategy == 'drop_first' or (
      cfg.vision_feature_select_strategy == 'default' and cfg.vision.has_class_token)
  text = llm_to_hf(cfg.llm)
  return dict(architectures=['LlavaForConditionalGeneration'], model_type='llava', text_config=text,
              vision_config=vision_to_hf(cfg.vision), image_token_index=image_token_id,
              image_seq_length=cfg.num_image_tokens, vision_feature_layer=cfg.vision_feature_layer,
              vision_feature_select_strategy='default' if drops_first else 'full',
              projector_hidden_act=cfg.projector_hidden_act, multimodal_projector_bias=cfg.multimodal_projector_bias,
              tie_word_embeddings=cfg.llm.tie_word_embeddings)


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def capacity(tokens: int, k: int, experts: int, factor: float) -> int:
  """Slots per expert: ceil(factor * tokens * k / experts); 0 when factor <= 0 (dropless)."""
  if factor <= 0:
    return 0
  return max(1, math.ceil(factor * tokens * k / experts))
