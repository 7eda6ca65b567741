"""Size presets: the one table of model shapes that configs and tests pick from by name.

The full-size entries copy the published Hugging Face configs (microsoft/Phi-3-mini-4k-instruct,
meta-llama/Meta-Llama-3-8B, microsoft/phi-2, stabilityai/stablelm-2-1_6b, Qwen/Qwen-1_8B,
google/siglip-so400m-patch14-384, openai/clip-vit-large-patch14-336); the `tiny-*`
entries have the same structure at toy size, for CPU tests and the demo.
"""

from __future__ import annotations

import dataclasses

from moiie_jax.models.config import ConfigError, LLMConfig, LVLMConfig, MoEConfig, VisionConfig

LLM_PRESETS: dict[str, LLMConfig] = {
    'phi3-mini': LLMConfig(
        architecture='phi3', vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, original_max_position_embeddings=4096, pad_token_id=32000,
        bos_token_id=1, eos_token_id=32000),
    'llama3-8b': LLMConfig(
        architecture='llama', vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001, pad_token_id=128001),
    # MoE-LLaVA's backbones (microsoft/phi-2, stabilityai/stablelm-2-1_6b, Qwen/Qwen-1_8B as Qwen2 math: Qwen v1's
    # config.intermediate_size 11008 is twice its FFN width).
    'phi2': LLMConfig(
        architecture='phi', vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, hidden_act='gelu_new', layer_norm_eps=1e-5,
        partial_rotary_factor=0.4, rope_theta=10000.0, max_position_embeddings=2048, bos_token_id=50256,
        eos_token_id=50256, pad_token_id=50256),
    'stablelm2-1.6b': LLMConfig(
        architecture='stablelm', vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=32, layer_norm_eps=1e-5, use_qkv_bias=True,
        partial_rotary_factor=0.25, rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=100257,
        eos_token_id=100257, pad_token_id=100257),
    'qwen-1.8b': LLMConfig(
        architecture='qwen2', vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=8192, eos_token_id=151643, pad_token_id=151643),
    # ~100M-parameter LLaMA-shaped decoder for CPU benchmarks.
    'llama-100m': LLMConfig(
        architecture='llama', vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=4096),
    'tiny-llama': LLMConfig(
        architecture='llama', vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=1024),
    'tiny-phi3': LLMConfig(
        architecture='phi3', vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=1024, original_max_position_embeddings=1024),
    'tiny-phi2': LLMConfig(
        architecture='phi', vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, hidden_act='gelu_new', partial_rotary_factor=0.5,
        max_position_embeddings=1024),
    'tiny-stablelm2': LLMConfig(
        architecture='stablelm', vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, use_qkv_bias=True, partial_rotary_factor=0.25,
        max_position_embeddings=1024),
    'tiny-qwen': LLMConfig(
        architecture='qwen2', vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=1024),
}
# The tiny stand-in of each full-size decoder (a recipe's runlocal form).
TINY_LLM = {'phi3-mini': 'tiny-phi3', 'llama3-8b': 'tiny-llama', 'phi2': 'tiny-phi2',
            'stablelm2-1.6b': 'tiny-stablelm2', 'qwen-1.8b': 'tiny-qwen'}

VISION_PRESETS: dict[str, VisionConfig] = {
    'siglip-so400m-384': VisionConfig(
        architecture='siglip', hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, image_size=384, patch_size=14, hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6),
    'clip-l-336': VisionConfig(
        architecture='clip', hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, image_size=336, patch_size=14, hidden_act='quick_gelu', layer_norm_eps=1e-5),
    'tiny-siglip': VisionConfig(
        architecture='siglip', hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6),
    'tiny-clip': VisionConfig(
        architecture='clip', hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, hidden_act='quick_gelu', layer_norm_eps=1e-5),
}

# The paper's expert layouts ([vision, language, shared]) per layer kind; 'modality' has no shared experts, so its
# equal-total-count rival splits the experts between the two modalities.
EXPERT_LAYOUTS: dict[str, dict[str, int]] = {
    'moiie-4': dict(n_vision=1, n_language=1, n_shared=2),
    'moiie-8-balanced': dict(n_vision=2, n_language=2, n_shared=4),
    'moiie-8-unbalanced': dict(n_vision=3, n_language=3, n_shared=2),
    'vanilla-4': dict(n_vision=0, n_language=0, n_shared=4),
    'vanilla-8': dict(n_vision=0, n_language=0, n_shared=8),
    'modality-4': dict(n_vision=2, n_language=2, n_shared=0),
    'modality-8': dict(n_vision=4, n_language=4, n_shared=0),
}


def moe_config(variant: str, experts: int = 4, layout: str = 'balanced', **overrides) -> MoEConfig:
  """The MoEConfig of one of the paper's four layer kinds at 4 or 8 experts."""
  if variant == 'dense':
    return MoEConfig(variant='dense', **overrides)
  key = f'{variant}-{experts}' + (f'-{layout}' if variant == 'moiie' and experts == 8 else '')
  if key not in EXPERT_LAYOUTS:
    raise ConfigError(f'moe_config: no expert layout {key!r}; known: {sorted(EXPERT_LAYOUTS)}')
  cfg = MoEConfig(variant=variant, **EXPERT_LAYOUTS[key], **overrides)
  cfg.validate()
  return cfg


def lvlm_config(llm: str, vision: str, moe: MoEConfig | None = None, *, image_token_id: int | None = None,
                vision_feature_layer: int = -2, **llm_overrides) -> LVLMConfig:
  """An LVLMConfig from preset names; the image token defaults to vocab_size (never produced by the tokenizer)."""
  if llm not in LLM_PRESETS:
    raise ConfigError(f'lvlm_config: unknown llm preset {llm!r}; known: {sorted(LLM_PRESETS)}')
  if vision not in VISION_PRESETS:
    raise ConfigError(f'lvlm_config: unknown vision preset {vision!r}; known: {sorted(VISION_PRESETS)}')
  llm_cfg = dataclasses.replace(LLM_PRESETS[llm], moe=moe or MoEConfig(), **llm_overrides)
  cfg = LVLMConfig(llm=llm_cfg, vision=VISION_PRESETS[vision],
                   image_token_id=llm_cfg.vocab_size if image_token_id is None else image_token_id,
                   vision_feature_layer=vision_feature_layer)
  cfg.validate()
  return cfg
