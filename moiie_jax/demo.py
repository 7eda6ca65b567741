"""The embedded demo, the README's main job: `python -m moiie_jax.demo --workdir demo_out`.

1. Generates a shapes VQA dataset from a seed (coloured circles/squares/triangles at positions; questions about
   colour, shape, count and position; a captions split for stage 1; a held-out split) and its tokenizer.
2. Stage 1: a tiny SigLIP-shaped tower + connector + tiny LLaMA-shaped decoder, dense, trained from scratch on
   the captions (configs/demo.py:stage=1).
3. Held-out accuracy of the stage-1 model (greedy generated answers, exact match): "before".
4. Stage 2: upcycled to MoIIE (1 vision + 1 language + 2 shared experts, top-2, every other layer) and trained
   on the question-answer split (configs/demo.py:stage=2).
5. Held-out accuracy again: "after". The last line reads `demo accuracy: before=<x> after=<y> chance=<z>`.

Checkpoints and TensorBoard logs land in WORKDIR/stage1 and WORKDIR/stage2; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time


def _recipe(arg: str):
  from moiie_jax.train import recipe
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return recipe.load(os.path.join(root, 'configs', 'demo.py') + ':' + arg)


def evaluate(folder: str, dataset, batch_size: int = 64, key: str = 'type', max_new_tokens: int = 4,
             questions=None) -> dict[str, float]:
  """Exact-match accuracy of greedy answers on the held-out questions (default: the dataset's), overall and per
  question `key` ('type'; the study's task also has 'kind')."""
  from moiie_jax.infer.generate import Generator, Prompt
  gen = Generator.from_folder(folder, batch_size=batch_size)
  items = dataset.eval_questions if questions is None else questions
  prompts = [Prompt(q['question'], image=os.path.join(dataset.image_folder, q['image']) if q.get('image') else None)
             for q in items]
  answers = gen.generate(prompts, max_new_tokens=max_new_tokens)
  right, total = collections.Counter(), collections.Counter()
  for q, a in zip(items, answers):
    total[q[key]] += 1
    right[q[key]] += int(a.strip().lower() == q['answer'].strip().lower())
  out = {t: right[t] / total[t] for t in sorted(total)}
  out['all'] = sum(right.values()) / max(1, sum(total.values()))
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m moiie_jax.demo', description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='demo_out', help='output folder (data, checkpoints, logs)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--n-train', type=int, default=1500, help='training images per split')
  p.add_argument('--n-eval', type=int, default=300, help='held-out questions')
  p.add_argument('--stage1-steps', type=int, default=0, help='0 = the recipe default')
  p.add_argument('--stage2-steps', type=int, default=0, help='0 = the recipe default')
  args = p.parse_args(sys.argv[1:] if argv is None else argv)

  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  from moiie_jax import compile_cache
  from moiie_jax.data import synthetic
  from moiie_jax.train import loop
  compile_cache.enable()
  start = time.perf_counter()
  workdir = os.path.abspath(args.workdir)
  data_dir = os.path.join(workdir, 'data')
  if os.path.isfile(os.path.join(data_dir, 'metadata.json')):
    dataset = synthetic.load_demo_metadata(data_dir)
  else:
    dataset = synthetic.make_demo_dataset(data_dir, seed=args.seed, n_train=args.n_train, n_eval=args.n_eval)
  print(f'data: {args.n_train} captioned + {args.n_train} question images, {len(dataset.eval_questions)} held-out '
        f'questions, vocabulary {dataset.vocab_size} ({time.perf_counter() - start:.0f}s)', flush=True)

  def stage(n: int, steps: int, json_path: str, init: str = '') -> str:
    config = _recipe(f'stage={n},steps={steps}')
    config.seed = args.seed
    config.model.vocab_size = dataset.vocab_size
    config.init.checkpoint = init
    config.data.json_path = json_path
    config.data.image_folder = dataset.image_folder
    config.data.tokenizer_path = dataset.tokenizer_dir
    summary = loop.train(config, os.path.join(workdir, f'stage{n}'))
    m = summary['metrics']
    extra = f', aux {m["aux_loss"]:.3f}' if 'aux_loss' in m else ''
    print(f'stage {n}: {summary["steps"]} steps, loss {m["loss"]:.4f}{extra} '
          f'({time.perf_counter() - start:.0f}s)', flush=True)
    return summary['export']

  stage1 = stage(1, args.stage1_steps, dataset.captions_json)
  before = evaluate(stage1, dataset)
  print(f'after stage 1 (dense): {json.dumps({k: round(v, 3) for k, v in before.items()})}', flush=True)
  stage2 = stage(2, args.stage2_steps, dataset.train_json, init=stage1)
  after = evaluate(stage2, dataset)
  print(f'after stage 2 (MoIIE): {json.dumps({k: round(v, 3) for k, v in after.items()})}', flush=True)
  with open(os.path.join(workdir, 'demo_results.json'), 'w') as f:
    json.dump({'before': before, 'after': after, 'chance': dataset.chance_level,
               'chance_by_type': dataset.chance_by_type, 'seconds': time.perf_counter() - start}, f, indent=2)
  print(f'demo accuracy: before={before["all"]:.3f} after={after["all"]:.3f} chance={dataset.chance_level:.3f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
