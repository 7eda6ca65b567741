"""Generation speed: per-token decode latency against context length (flat with a KV cache) and prefill throughput.

Run: `.venv/bin/python bench/generate.py [--contexts 256,1024,4096 --iters 3]`. Prints a table and writes
bench/results/generate.json. A tiny MoIIE LVLM (random weights; text-only prompts) runs `generate_ids`, the
jitted prefill and while-loop decoder, timed apart (`timings=`: the prefill is waited for before the decoding loop
starts), over --new greedy steps with no EOS:

    decode per token = decode time / steps,     prefill throughput = batch * context / prefill time.

Without a cache, every new token would cost a forward pass over the whole context: the prefill column is that cost.
Times are medians of --iters runs after one compile-and-warm-up run.

B batch, T context tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moiie_jax.infer.generate import NEW_TOKEN_STEP, generate_ids  # noqa: E402
from moiie_jax.models import config as config_lib  # noqa: E402
from moiie_jax.models.lvlm import LVLM  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'generate.json')


def tiny_config(args) -> config_lib.LVLMConfig:
  moe = config_lib.MoEConfig(variant='moiie', n_vision=1, n_shared=2, n_language=1, top_k=2)
  llm = config_lib.LLMConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.f,
                             num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=max(args.contexts) + NEW_TOKEN_STEP, moe=moe,
                             scan_layers=args.scan)
  vision = config_lib.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=8)
  return config_lib.LVLMConfig(llm=llm, vision=vision, image_token_id=args.vocab)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--contexts', type=lambda s: [int(x) for x in s.split(',')], default=[256, 1024, 4096])
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--new', type=int, default=NEW_TOKEN_STEP, help='decode steps timed')
  ap.add_argument('--d', type=int, default=128)
  ap.add_argument('--f', type=int, default=256)
  ap.add_argument('--layers', type=int, default=4)
  ap.add_argument('--vocab', type=int, default=4096)
  ap.add_argument('--scan', action='store_true', help='scanned decoder layers (cfg.scan_layers)')
  ap.add_argument('--iters', type=int, default=3)
  ap.add_argument('--out', default=RESULTS)
  args = ap.parse_args()

  cfg = tiny_config(args)
  model = LVLM(cfg, rngs=nnx.Rngs(0))
  rows = []
  for context in args.contexts:
    ids = np.random.RandomState(context).randint(3, args.vocab, (args.batch, context)).astype(np.int32)
    def run(ids=ids):
      timings = {}
      out = generate_ids(model, ids, None, None, max_new_tokens=args.new, timings=timings)  # greedy, no EOS
      assert out.shape == (args.batch, args.new) and timings['steps'] == args.new
      return timings

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    runs = [run() for _ in range(args.iters)]
    prefill = statistics.median(r['prefill_s'] for r in runs)
    per_token = statistics.median(r['decode_s'] / r['steps'] for r in runs)
    rows.append({'context': context, 'batch': args.batch, 'decode_ms_per_token': 1e3 * per_token,
                 'prefill_ms': 1e3 * prefill, 'prefill_tokens_per_s': args.batch * context / prefill,
                 'decode_tokens_per_s': args.batch / per_token, 'first_call_s_incl_compile': first})

  print(f'tiny MoIIE LVLM: D={args.d} F={args.f} L={args.layers} V={args.vocab}, scan={args.scan}, batch {args.batch}, '
        f'{jax.devices()[0].platform}')
  print(f'{"context":>8} | {"decode ms/token":>15} | {"prefill ms":>10} | {"prefill tok/s":>13} | '
        f'{"no-cache ms/token":>17}')
  for r in rows:
    print(f'{r["context"]:>8} | {r["decode_ms_per_token"]:>15.3f} | {r["prefill_ms"]:>10.1f} | '
          f'{r["prefill_tokens_per_s"]:>13.0f} | {r["prefill_ms"]:>17.1f}')
  flat = rows[-1]['decode_ms_per_token'] / rows[0]['decode_ms_per_token']
  print(f'decode latency at {rows[-1]["context"]} / at {rows[0]["context"]} tokens: {flat:.2f}x '
        f'(context grew {rows[-1]["context"] / rows[0]["context"]:.0f}x)')
  result = {'date': datetime.date.today().isoformat(), 'device': str(jax.devices()[0]),
            'platform': platform.platform(), 'jax': jax.__version__, 'config': {k: v for k, v in vars(args).items()
                                                                            if k != 'out'},
            'rows': rows, 'decode_growth': flat}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as fh:
    json.dump(result, fh, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
