"""One process of the two-process expert-parallel training test (launched by tests/test_multiprocess.py).

    python tests/multiprocess_worker.py --process_id 0 --num_processes 2 --port 12345 --out DIR

Each process owns 2 CPU devices; `jax.distributed.initialize` (gloo) joins them into 4 global devices, meshed as
(expert=4): experts 0-1 live on process 0, experts 2-3 on process 1, and every MoE layer's all_to_all crosses the
process boundary. Each process loads only its own rows of each global batch (`mesh.global_batch`). Only process 0
writes the log (`DIR/log.json`: the loss of every step and where each expert lives).

The model, parameters and batches are deterministic functions of a seed (`tiny_setup`, `batches`), shared with the
test's single-process reference.
"""

from __future__ import annotations

import os
import sys

if __name__ == '__main__':  # before jax is imported: 2 CPU devices in this process
  os.environ['JAX_PLATFORMS'] = 'cpu'
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'force_host_platform_device_count' not in f]
  os.environ['XLA_FLAGS'] = ' '.join(flags + ['--xla_force_host_platform_device_count=2'])
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from moiie_jax.models.config import LLMConfig, LVLMConfig, MoEConfig, VisionConfig  # noqa: E402
from moiie_jax.models.lvlm import LVLM  # noqa: E402
from moiie_jax.train.optimizer import path_names  # noqa: E402

STEPS, GLOBAL_BATCH, LENGTH = 3, 8, 10


def tiny_setup():
  """(cfg, graphdef, numpy params, tx) of a tiny MoIIE LVLM with 1 + 2 + 1 experts (dropless)."""
  moe = MoEConfig(variant='moiie', n_vision=1, n_shared=2, n_language=1, top_k=2, aux_loss_coef=0.1)
  llm = LLMConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, moe=moe)
  vision = VisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                        image_size=8, patch_size=4)
  cfg = LVLMConfig(llm=llm, vision=vision, image_token_id=64)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: LVLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  rng = np.random.default_rng(0)

  def draw(path, a):
    names = path_names(path)
    if 'norm' in '.'.join(names):
      return np.ones(a.shape, np.float32)
    return ((2.0 if names[-2] in ('gate', 'gate_vis') else 0.1) * rng.standard_normal(a.shape)).astype(np.float32)

  return cfg, graphdef, jax.tree_util.tree_map_with_path(draw, params), optax.adamw(3e-3)


def batches():
  """STEPS global batches (numpy): 4 image tokens per row, answers from position 5, some padding."""
  rng = np.random.default_rng(1)
  out = []
  for _ in range(STEPS):
    ids = rng.integers(0, 64, (GLOBAL_BATCH, LENGTH)).astype(np.int32)
    ids[:, 1:5] = 64
    mask = np.ones_like(ids)
    mask[3, 7:] = 0
    labels = np.where((np.arange(LENGTH) >= 5) & (mask == 1), ids, -100).astype(np.int32)
    out.append(dict(input_ids=ids, labels=labels, attention_mask=mask,
                    pixel_values=rng.normal(size=(GLOBAL_BATCH, 8, 8, 3)).astype(np.float32)))
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--process_id', type=int, required=True)
  ap.add_argument('--num_processes', type=int, default=2)
  ap.add_argument('--port', type=int, required=True)
  ap.add_argument('--out', required=True)
  args = ap.parse_args()

  from moiie_jax import compile_cache  # pylint: disable=g-import-not-at-top
  from moiie_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from moiie_jax.train import step as ts  # pylint: disable=g-import-not-at-top

  mesh_lib.initialize_distributed(True, coordinator_address=f'127.0.0.1:{args.port}',
                                  num_processes=args.num_processes, process_id=args.process_id)
  compile_cache.enable()
  assert jax.process_count() == args.num_processes and len(jax.devices()) == 2 * args.num_processes
  mesh = mesh_lib.make_mesh({'expert': -1})

  cfg, graphdef, params, tx = tiny_setup()
  data = batches()
  rows = GLOBAL_BATCH // jax.process_count()
  local = [{k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in b.items()} for b in data]

  step = ts.make_sharded_train_step(graphdef, tx, cfg, mesh, params, data[0])
  p, o = step.init(params)
  losses = []
  for batch in local:
    p, o, metrics = step(p, o, mesh_lib.global_batch(batch, mesh))
    losses.append(float(np.asarray(metrics['loss'].addressable_data(0))))

  kernel = p['language_model']['model']['layers'][1]['mlp']['experts']['gate_proj']['kernel'][...]
  owners = {}
  for device, index in kernel.sharding.devices_indices_map(kernel.shape).items():
    experts = range(*index[0].indices(kernel.shape[0]))
    for e in experts:
      owners.setdefault(str(e), set()).add(device.process_index)
  if mesh_lib.is_main_process():
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'log.json'), 'w') as fh:
      json.dump({'losses': losses, 'process_count': jax.process_count(),
                 'expert_processes': {e: sorted(ps) for e, ps in owners.items()}}, fh)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
