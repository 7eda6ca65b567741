"""Export a moiie_jax checkpoint folder to another system's format.

    python -m moiie_jax.export --checkpoint DIR --format FORMAT --out OUT

Formats:
  llava-hf   a LlavaForConditionalGeneration folder (config, sharded safetensors, tokenizer files, the image
             processor's preprocessor_config.json, a generation_config.json that never samples the image
             placeholder) that transformers loads and runs with our logits; dense checkpoints. Not written: a
             processor_config.json and an `<image>` token in the tokenizer (LlavaProcessor needs both).
  hf-llm     the language model alone as its HF ...ForCausalLM (LLaMA, Phi-3, Phi-2, StableLM, Qwen2); dense.
  moiie      a folder the official MoIIE code (Bunny codebase) loads: bunny-mm-phi3-moe-s / bunny-mm-llama3-moe-s
             for a Phi-3 / LLaMA-3 MoIIE with 1 + 2 + 1 experts at the odd layers, bunny-phi3 / bunny-llama for a
             dense one; every config field its config classes read, S2 or not, the tower inside
             (unfreeze_vision_tower), safetensors shards, the tokenizer files.
  moe-llava  a folder MoE-LLaVA's PyTorch code loads (its model_type, `mm_*` fields and `moe` block, its key names),
             from a vanilla-MoE or dense Phi-2 / StableLM checkpoint (e.g. one converted from MoE-LLaVA and
             fine-tuned here).
Written atomically; on bad input one line names the problem, the exit code is 2 and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

FORMATS = ('llava-hf', 'hf-llm', 'moiie', 'moe-llava')


def _generation_config(checkpoint: str, suppress: list[int]) -> dict:
  path = os.path.join(checkpoint, 'generation_config.json')
  out = {}
  if os.path.isfile(path):
    with open(path) as f:
      out = json.load(f)
  if suppress:
    out['suppress_tokens'] = sorted(set(out.get('suppress_tokens') or []) | set(suppress))
  return out


def _preprocessor_config(cfg) -> dict:
  """The HF image processor that preprocesses as our tower's recipe does (moiie_jax.data.images)."""
  from moiie_jax.data import images  # pylint: disable=import-outside-toplevel
  ic = images.config_for_tower(cfg.vision.architecture, cfg.vision.image_size)
  common = dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(ic.mean), image_std=list(ic.std), do_convert_rgb=True)
  if ic.resize == 'squash':
    return dict(image_processor_type='SiglipImageProcessor', size=dict(height=ic.height, width=ic.width), **common)
  return dict(image_processor_type='CLIPImageProcessor', size=dict(shortest_edge=ic.height), do_center_crop=True,
              crop_size=dict(height=ic.height, width=ic.width), **common)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m moiie_jax.export', description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True, help='a moiie_jax checkpoint folder (python -m moiie_jax.convert)')
  p.add_argument('--format', required=True, choices=FORMATS)
  p.add_argument('--out', required=True, help='output folder')
  p.add_argument('--image-tower', default='', help="moiie / moe-llava: the tower's Hub name recorded as "
                                                   "mm_vision_tower / mm_image_tower (e.g. google/siglip-so400m-"
                                                   "patch14-384); default: the source's")
  p.add_argument('--max-shard-gb', type=float, default=5.0, help='safetensors shard size (save_pretrained: 5)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing non-empty --out folder')
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moiie_jax.convert import bunny, folder, hf, moe_llava, sources  # pylint: disable=import-outside-toplevel
  from moiie_jax.convert.errors import ConvertError  # pylint: disable=import-outside-toplevel
  from moiie_jax.models.config import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    cfg, model, meta = folder.load_folder(args.checkpoint)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    extra = {}
    if args.format == 'moe-llava':
      hf_cfg, tensors = moe_llava.to_moe_llava(cfg, flat, args.image_tower or meta.get('image_tower', ''))
    elif args.format == 'moiie':
      hf_cfg, tensors = bunny.to_bunny(cfg, flat, args.image_tower or meta.get('image_tower', ''),
                                       pad_to_square=bool(meta.get('pad_to_square', True)))
    elif args.format == 'hf-llm':
      hf_cfg, tensors = sources.to_hf_llm(cfg, flat)
    else:
      hf_cfg, tensors, suppress = sources.to_llava(cfg, flat)
      extra['generation_config.json'] = _generation_config(args.checkpoint, suppress)
      extra['preprocessor_config.json'] = _preprocessor_config(cfg)
    out = hf.write_folder(args.out, hf_cfg, tensors, copy_from=args.checkpoint, files=folder.TOKENIZER_FILES,
                          extra_json=extra, max_shard_bytes=int(args.max_shard_gb * 2 ** 30),
                          overwrite=args.overwrite)
  except (ConvertError, ConfigError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
