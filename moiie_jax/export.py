"""Export a moiie_jax checkpoint folder to another system's format.

    python -m moiie_jax.export --checkpoint DIR --format FORMAT --out OUT

Formats:
  llava-hf   a LlavaForConditionalGeneration folder (config, sharded safetensors, the tokenizer with an `<image>`
             token at the placeholder's id, the image processor's preprocessor_config.json, processor_config.json
             for LlavaProcessor, a generation_config.json that never samples the image placeholder) that
             transformers loads and runs with our logits; dense checkpoints.
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


IMAGE_TOKEN = '<image>'


def _processor_files(checkpoint: str, cfg, hf_cfg: dict) -> dict:
  """What `LlavaProcessor.from_pretrained` needs beside the image processor: processor_config.json and a tokenizer
  that knows the image token. Our placeholder id lies past the tokenizer's vocabulary (vocab_size, the embedding row
  the export adds), so `<image>` is added there as a special token; a checkpoint whose placeholder is already a
  tokenizer token (converted from llava-hf) keeps it. {} when the checkpoint has no tokenizer.json."""
  path = os.path.join(checkpoint, 'tokenizer.json')
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    tokenizer = json.load(f)
  image_id = hf_cfg['image_token_index']
  token = {'id': image_id, 'content': IMAGE_TOKEN, 'single_word': False, 'lstrip': False, 'rstrip': False,
           'normalized': False, 'special': True}
  known = {t['id']: t['content'] for t in tokenizer.get('added_tokens') or []}
  vocab = (tokenizer.get('model') or {}).get('vocab')
  if isinstance(vocab, dict):
    known.update({i: t for t, i in vocab.items()})
  out = {}
  image_token = known.get(image_id)
  if image_token is None:
    if IMAGE_TOKEN in known.values():
      from moiie_jax.convert.errors import ConvertError  # pylint: disable=import-outside-toplevel
      raise ConvertError(f'{path}: holds {IMAGE_TOKEN!r} at another id than the image placeholder {image_id}')
    tokenizer['added_tokens'] = list(tokenizer.get('added_tokens') or []) + [token]
    out['tokenizer.json'] = tokenizer
    image_token = IMAGE_TOKEN
    config_path = os.path.join(checkpoint, 'tokenizer_config.json')
    if os.path.isfile(config_path):
      with open(config_path) as f:
        tok_cfg = json.load(f)
      decoder = dict(tok_cfg.get('added_tokens_decoder') or {})
      decoder[str(image_id)] = {k: v for k, v in token.items() if k != 'id'}
      out['tokenizer_config.json'] = {**tok_cfg, 'added_tokens_decoder': decoder}
  v = cfg.vision
  out['processor_config.json'] = dict(
      processor_class='LlavaProcessor', image_token=image_token, patch_size=v.patch_size,
      vision_feature_select_strategy=hf_cfg['vision_feature_select_strategy'],
      num_additional_image_tokens=int(v.has_class_token))
  return out


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
      extra.update(_processor_files(args.checkpoint, cfg, hf_cfg))
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
