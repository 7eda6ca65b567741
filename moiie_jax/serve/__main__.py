"""A web chat for a converted checkpoint, with the routing view, and a JSON endpoint.

    python -m moiie_jax.serve --checkpoint DIR [--port 7860] [--host 127.0.0.1]

Open http://HOST:PORT/ in a browser. Scripts: POST http://HOST:PORT/api/generate with a JSON body
{"prompt": "...", "image": "<the image file in base64>", "max_new_tokens": 64} (see README). A folder that cannot
be loaded is reported in the page (and here on stderr); the server keeps running and another folder can be loaded.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m moiie_jax.serve', description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', default=None, help='converted checkpoint folder (python -m moiie_jax.convert)')
  p.add_argument('--host', default='127.0.0.1', help='address to listen on (default: this machine only)')
  p.add_argument('--port', type=int, default=7860)
  p.add_argument('--max-new-tokens', type=int, default=128, help='the page\'s default answer length')
  p.add_argument('--chunk', type=int, default=1, help='tokens per streamed update')
  args = p.parse_args(argv)
  if not 0 < args.port < 65536:
    p.error(f'--port={args.port}: expected 1..65535')
  if args.chunk < 1 or args.max_new_tokens < 1:
    p.error('--chunk and --max-new-tokens: expected >= 1')
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  import uvicorn  # pylint: disable=g-import-not-at-top
  from moiie_jax import compile_cache  # pylint: disable=g-import-not-at-top
  from moiie_jax.serve.app import build_app  # pylint: disable=g-import-not-at-top
  from moiie_jax.serve.session import ChatEngine, CheckpointError  # pylint: disable=g-import-not-at-top
  compile_cache.enable()
  engine = ChatEngine(chunk=args.chunk)
  if args.checkpoint:
    try:
      engine.load(args.checkpoint)
    except CheckpointError as e:
      print(f'error: {e} (the page shows it; load another folder there)', file=sys.stderr)
  app = build_app(engine, default_max_new_tokens=args.max_new_tokens)
  print(f'serving {engine.describe()} on http://{args.host}:{args.port}/', file=sys.stderr, flush=True)
  uvicorn.run(app, host=args.host, port=args.port, log_level='warning')
  return 0


if __name__ == '__main__':
  sys.exit(main())
