"""Export a moiie_jax checkpoint folder to another system's format.

    python -m moiie_jax.export --checkpoint DIR --format moe-llava --out OUT [--image-tower NAME]

moe-llava: a folder MoE-LLaVA's PyTorch code loads (config.json with its model_type, `mm_*` fields and `moe` block,
model.safetensors with its key names, the tokenizer files), from a vanilla-MoE or dense Phi-2 / StableLM
checkpoint of ours (e.g. one converted from MoE-LLaVA and fine-tuned here). Written atomically; on bad input one
line names the problem, the exit code is 2 and nothing is written.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ('moe-llava',)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m moiie_jax.export', description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True, help='a moiie_jax checkpoint folder (python -m moiie_jax.convert)')
  p.add_argument('--format', required=True, choices=FORMATS)
  p.add_argument('--out', required=True, help='output folder')
  p.add_argument('--image-tower', default='', help="the tower's Hub name recorded as mm_image_tower (e.g. "
                                                   "openai/clip-vit-large-patch14-336); default: the source's")
  p.add_argument('--overwrite', action='store_true', help='replace an existing non-empty --out folder')
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moiie_jax.convert import folder, hf, moe_llava  # pylint: disable=import-outside-toplevel
  from moiie_jax.convert.errors import ConvertError  # pylint: disable=import-outside-toplevel
  from moiie_jax.models.config import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    cfg, model, meta = folder.load_folder(args.checkpoint)
    tower = args.image_tower or meta.get('image_tower', '')
    hf_cfg, tensors = moe_llava.to_moe_llava(cfg, dict(nnx.to_flat_state(nnx.state(model, nnx.Param))), tower)
    out = hf.write_folder(args.out, hf_cfg, tensors, copy_from=args.checkpoint, files=folder.TOKENIZER_FILES,
                          overwrite=args.overwrite)
  except (ConvertError, ConfigError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
