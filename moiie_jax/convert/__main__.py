"""Convert Hugging Face PyTorch weights into a moiie_jax checkpoint folder.

    python -m moiie_jax.convert --llm HF_LLM_DIR --vision HF_VISION_DIR --out DIR [--template phi3] [--s2]
    python -m moiie_jax.convert --llava HF_LLAVA_DIR --out DIR
    python -m moiie_jax.convert --moe-llava MOE_LLAVA_DIR [--vision HF_VISION_DIR] --out DIR
    python -m moiie_jax.convert --moiie BUNNY_DIR [--vision HF_VISION_DIR] --out DIR   (the official MoIIE code's)

Writes DIR/config.json, DIR/params (Orbax), DIR/meta.json and the tokenizer files, atomically: on any error
it prints one line naming what was wrong, exits non-zero and leaves no partial folder. The weights are read through
memory maps and written a layer at a time (convert/streaming.py): memory stays about one layer, whatever the model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m moiie_jax.convert', description=__doc__.split('\n')[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--llm', help='HF LLM folder (LlamaForCausalLM or Phi3ForCausalLM); needs --vision')
  src.add_argument('--llava', help='HF LLaVA folder (LlavaForConditionalGeneration)')
  src.add_argument('--moe-llava', help='a MoE-LLaVA folder (its MoE stage-3 or dense stage-2 models: Phi-2, '
                                      'StableLM, Qwen)')
  src.add_argument('--moiie', help='an official MoIIE (Bunny-format) folder: bunny-mm-phi3-moe-s, '
                                   'bunny-mm-llama3-moe-s, or the dense bunny-phi3 / bunny-llama')
  p.add_argument('--vision', help='HF vision folder (SiglipVisionModel/SiglipModel/CLIPVisionModel/CLIPModel); '
                                  'with --moe-llava / --moiie, the tower when the checkpoint lacks it or names an '
                                  'unknown one')
  p.add_argument('--out', required=True, help='output checkpoint folder')
  p.add_argument('--template', default=None,
                 help='chat template name stored in meta.json (phi3, llama3, moe_llava, plain); default from the LLM '
                      'type')
  p.add_argument('--vision-feature-layer', type=int, default=-2,
                 help='tower hidden state fed to the connector (LLaVA: -2, the second to last)')
  p.add_argument('--image-token-id', type=int, default=None,
                 help='placeholder id for image tokens (default: vocab_size, an id the tokenizer never emits)')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'), help='stored parameter dtype')
  p.add_argument('--seed', type=int, default=0, help='seed of the fresh connector (--llm/--vision only)')
  p.add_argument('--s2', nargs='?', const='official', default=None, metavar='SCALES',
                 help='S2 multi-scale features (--llm/--vision only): the official scales (the tower size x 1, 2, '
                      '3: 384,768,1152), or comma-separated sizes; the fresh connector takes their width')
  p.add_argument('--overwrite', action='store_true', help='replace an existing non-empty --out folder')
  args = p.parse_args(argv)
  if args.llm and not args.vision:
    p.error('--llm needs --vision')
  if args.llava and args.vision:
    p.error('--vision goes with --llm, --moe-llava or --moiie, not with --llava')
  if args.s2 is not None and not args.llm:
    p.error('--s2 goes with --llm/--vision (a converted LLaVA or MoE-LLaVA folder keeps its own features)')
  if args.s2 not in (None, 'official'):
    try:
      args.s2 = tuple(int(x) for x in args.s2.split(','))
    except ValueError:
      p.error(f'--s2 {args.s2}: expected comma-separated sizes in pixels, e.g. 384,768,1152')
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from moiie_jax import compile_cache
  from moiie_jax.convert import folder, hf, sources, tiktoken_bpe
  from moiie_jax.convert.errors import ConvertError
  from moiie_jax.models.config import ConfigError
  compile_cache.enable()
  cleanup = []
  try:
    notes, tower, notes_meta = [], None, {}
    if args.llava:
      cfg, state = sources.from_llava(args.llava, lazy=True)
      tokenizer_dir, source = args.llava, {'llava': args.llava}
    elif args.moiie:
      cfg, state, notes = sources.from_moiie(args.moiie, args.vision, lazy=True)
      tokenizer_dir, source = args.moiie, {'moiie': args.moiie}
      source_cfg = hf.read_config(args.moiie)
      tower = source_cfg.get('mm_vision_tower')
      notes_meta = {'pad_to_square': source_cfg.get('image_aspect_ratio', 'pad') == 'pad'}
    elif args.moe_llava:
      cfg, state, notes = sources.from_moe_llava(args.moe_llava, args.vision, lazy=True)
      tokenizer_dir, source = args.moe_llava, {'moe_llava': args.moe_llava}
      tiktoken_file = os.path.join(args.moe_llava, 'qwen.tiktoken')
      if os.path.isfile(tiktoken_file) and not os.path.isfile(os.path.join(args.moe_llava, 'tokenizer.json')):
        # Qwen v1 ships a tiktoken file: a tokenizer.json is built from it for our tokenizer.
        tokenizer_dir = tempfile.mkdtemp(prefix='moiie-qwen-tokenizer-')
        cleanup.append(tokenizer_dir)
        tiktoken_bpe.write_tokenizer_files(tiktoken_file, tokenizer_dir)
        hf.copy_files(args.moe_llava, ['generation_config.json'], tokenizer_dir)
        notes.append('tokenizer.json built from qwen.tiktoken')
      source_cfg = hf.read_config(args.moe_llava)
      tower = source_cfg.get('mm_image_tower')
      # Its images are padded to square with the processor mean (image_aspect_ratio 'pad', every released model).
      notes_meta = {'pad_to_square': source_cfg.get('image_aspect_ratio', 'pad') == 'pad'}
    else:
      s2 = args.s2
      if s2 == 'official':
        size = hf.read_config(args.vision)
        size = size.get('vision_config', size)['image_size']
        s2 = (size, 2 * size, 3 * size)
      cfg, state = sources.from_llm_and_vision(args.llm, args.vision, image_token_id=args.image_token_id,
                                               vision_feature_layer=args.vision_feature_layer, seed=args.seed,
                                               s2_scales=s2 or (), lazy=True)
      tokenizer_dir, source = args.llm, {'llm': args.llm, 'vision': args.vision}
    if args.dtype != 'float32':  # each parameter is cast as it is written
      cfg = sources.with_param_dtype(cfg, args.dtype)
    template = args.template or ('moe_llava' if args.moe_llava else sources.DEFAULT_TEMPLATES[cfg.llm.architecture])
    out = folder.save_folder(args.out, cfg, state, tokenizer_dir=tokenizer_dir, overwrite=args.overwrite,
                             meta={'template': template, 'source': source, **({'notes': notes} if notes else {}),
                                   **({'image_tower': tower} if tower else {}), **notes_meta})
  except (ConvertError, ConfigError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  finally:
    for path in cleanup:
      shutil.rmtree(path, ignore_errors=True)
  print(out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
