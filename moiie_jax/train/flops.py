"""Model FLOPs of a training step and model-FLOPs utilisation (MFU), the PaLM-appendix way.

Per token, a matmul with W parameters costs 2W FLOPs forward and 4W backward (6W in all); attention adds
2 * 2 * T * N * H forward per layer (scores and the weighted sum), 3x that with the backward. Only the activated
experts count (top_k of them in an MoE layer), and the vision tower counts once per image. Embedding lookups are
free; the LM head is a matmul and counts. MFU = model FLOPs per second / (devices * peak FLOP/s of one device).
"""

from __future__ import annotations

from moiie_jax.models.config import LVLMConfig
from moiie_jax.parallel import topology


def llm_matmul_params_per_token(cfg: LVLMConfig) -> int:
  """Activated matmul parameters of the decoder per token (attention, activated FFNs, routers, LM head)."""
  llm = cfg.llm
  d, f, h = llm.hidden_size, llm.intermediate_size, llm.resolved_head_dim
  attn = d * h * (llm.num_attention_heads * 2 + llm.num_key_value_heads * 2)
  ffn = (2 if llm.mlp_kind == 'gelu' else 3) * d * f  # fc1, fc2 (Phi-2) or gate, up, down (SwiGLU)
  moe_layers = set(llm.moe_layers)
  total = 0
  for i in range(llm.num_hidden_layers):
    if i in moe_layers:
      total += attn + llm.moe.top_k * ffn + d * llm.moe.n_experts  # routers: at most every expert scored
    else:
      total += attn + ffn
  return total + d * llm.vocab_size


def vision_matmul_params_per_token(cfg: LVLMConfig) -> int:
  """Matmul parameters one patch token meets in the tower (connector excluded: it runs once per image token,
  after S2's pooling)."""
  v = cfg.vision
  per_layer = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size
  patch = v.num_channels * v.patch_size ** 2 * v.hidden_size
  return v.num_hidden_layers * per_layer + patch


def connector_params_per_token(cfg: LVLMConfig) -> int:
  return cfg.vision.feature_size * cfg.llm.hidden_size + cfg.llm.hidden_size ** 2


def train_flops_per_step(cfg: LVLMConfig, batch: int, seq_len: int, images: int | None = None,
                         vision_backward: bool = True) -> float:
  """Model FLOPs (forward + backward) of one step over `batch` sequences of `seq_len` tokens with `images`
  images (default: one per sequence). Set vision_backward=False when the tower is frozen (stage 1).

  With S2 the tower runs on every tile of every scale (cfg.vision.tiles_per_image passes per image); the
  connector, which trains in every stage, on the pooled tokens once."""
  images = batch if images is None else images
  llm = cfg.llm
  tokens = batch * seq_len
  attn = llm.num_hidden_layers * 2 * 2 * seq_len * llm.num_attention_heads * llm.resolved_head_dim  # per token, fwd
  llm_flops = tokens * (6 * llm_matmul_params_per_token(cfg) + 3 * attn)
  n_patch = cfg.vision.num_patches + (1 if cfg.vision.has_class_token else 0)
  v = cfg.vision
  v_attn = v.num_hidden_layers * 2 * 2 * n_patch * v.hidden_size
  v_tokens = images * n_patch * v.tiles_per_image
  v_mult = 6 if vision_backward else 2
  vision_flops = v_tokens * (v_mult * vision_matmul_params_per_token(cfg) + v_mult / 2 * v_attn)
  connector_flops = images * n_patch * 6 * connector_params_per_token(cfg)
  return float(llm_flops + vision_flops + connector_flops)


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of a `jax.devices()[0].device_kind` (the hardware table of `parallel/topology.py`,
  which the compile-time estimates use too), or None when unknown (a CPU, say)."""
  chip = topology.chip_of_device_kind(device_kind)
  return chip.peak_flops if chip is not None else None


def mfu(flops_per_step: float, step_seconds: float, n_devices: int, device_kind: str) -> float | None:
  peak = peak_flops(device_kind)
  if peak is None:
    return None
  return flops_per_step / step_seconds / (n_devices * peak)
