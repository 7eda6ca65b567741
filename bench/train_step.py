"""Training-step throughput: tokens/s and model FLOP/s of one jitted update (forward, backward, AdamW), with MFU
where the device's peak is known (GPU/TPU; on a CPU it is left null).

    python bench/train_step.py [--configs tiny,100m] [--steps 10] [--seq T] [--compare SWITCH] [--out FILE]

--compare times each config twice side by side, steps alternating, with a switch off and on: `flatten`, the linear
layers' matmuls on flattened [B*T, D] rows (`models/linear.py`, the CPU default) or on [B, T, D] as nnx.Linear
does (`--flatten both` is the same); `expert_ffn`, the dropless experts on the CPU's scan backend fused per row
tile (`gmm.grouped_ffn`, the default) or as one grouped matmul per projection (`moe.separate_projections`);
`causal_blocks`, the decoder's attention in one block of queries or in two that skip the later keys
(`LLMConfig.attention_causal_blocks`, 2 by default); `scan_tiles`, the scan backend's tiles all of 128 rows or its
default whole + remainder tiles (`gmm.scan_tiles`); `mosaic_gpu`, a GPU's dropless experts on ragged_dot or on the
Hopper kernels (`--configs 1b` on an H100/H200).

Configs (MoIIE, 4 experts 1+1+2, top-2, interleaved, stage-2 optimizer: everything trains):
  tiny   tiny-llama (D 64, 4 layers) + tiny-siglip (32 px, 16 image tokens), batch 32 x 64 tokens
  100m   llama-100m (D 768, 8 layers, ~100M dense) + tiny-siglip, batch 4 x 256 tokens
  1b     for accelerators: a ~1B-activated LLaMA-shaped MoIIE + SigLIP-so400m, batch 8 x 2048, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moiie_jax import compile_cache  # noqa: E402
from moiie_jax.data.conversations import IGNORE_INDEX  # noqa: E402
from moiie_jax.models import gmm  # noqa: E402
from moiie_jax.models import linear  # noqa: E402
from moiie_jax.models import moe as moe_lib  # noqa: E402
from moiie_jax.models import presets  # noqa: E402
from moiie_jax.models.config import LLMConfig  # noqa: E402
from moiie_jax.models.lvlm import LVLM  # noqa: E402
from moiie_jax.train import flops as flops_lib  # noqa: E402
from moiie_jax.train import optimizer as optimizer_lib  # noqa: E402
from moiie_jax.train import step as step_lib  # noqa: E402

LLM_1B = LLMConfig(architecture='llama', vocab_size=32064, hidden_size=2048, intermediate_size=5632,
                   num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8, rms_norm_eps=1e-5,
                   max_position_embeddings=4096)

CONFIGS = {
    'tiny': dict(llm='tiny-llama', vision='tiny-siglip', batch=32, seq=64, dtype='float32'),
    '100m': dict(llm='llama-100m', vision='tiny-siglip', batch=4, seq=256, dtype='float32'),
    '1b': dict(llm=LLM_1B, vision='siglip-so400m-384', batch=8, seq=2048, dtype='bfloat16'),
}


def build(name: str, variant: str = 'moiie'):
  spec = CONFIGS[name]
  moe = presets.moe_config(variant)
  if isinstance(spec['llm'], LLMConfig):
    presets.LLM_PRESETS['bench-1b'] = spec['llm']
    llm = 'bench-1b'
  else:
    llm = spec['llm']
  cfg = presets.lvlm_config(llm, spec['vision'], moe, dtype=spec['dtype'], remat=name == '1b')
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, dtype=spec['dtype']))
  return cfg, spec


def setup(name: str, variant: str = 'moiie', seq: int | None = None):
  """(cfg, spec, graphdef, tx, params, opt_state, batch) of one config: random weights, AdamW (stage 2: everything
  trains), and a batch of random text with the image tokens after BOS (labelled as the data pipeline labels them).
  variant: the MoE kind or 'dense'; seq: tokens per row (default: the config's)."""
  cfg, spec = build(name, variant)
  model = LVLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  opt_cfg = optimizer_lib.get_config('stage2')
  opt_cfg.total_steps = 1000
  tx, _ = optimizer_lib.make_optimizer(opt_cfg, params)
  opt_state = tx.init(params)
  b, t, n_img = spec['batch'], seq or spec['seq'], cfg.num_image_tokens
  rng = np.random.default_rng(0)
  ids = rng.integers(1, cfg.llm.vocab_size, (b, t)).astype(np.int32)
  ids[:, 1:1 + n_img] = cfg.image_token_id
  size = cfg.vision.image_size
  labels = np.where(ids == cfg.image_token_id, IGNORE_INDEX, ids)  # the image placeholder is outside the vocabulary
  batch = {'input_ids': jnp.asarray(ids), 'labels': jnp.asarray(labels), 'attention_mask': jnp.ones((b, t), jnp.int32),
           'pixel_values': jnp.asarray(rng.standard_normal((b, size, size, 3)), jnp.float32)}
  return cfg, spec, graphdef, tx, params, opt_state, batch


def _llm_field(**fields):
  """A switch's config change: these LLMConfig fields replaced."""
  return lambda cfg: dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **fields))


def _moe_field(**fields):
  """A switch's config change: these MoEConfig fields replaced."""
  return lambda cfg: _llm_field(moe=dataclasses.replace(cfg.llm.moe, **fields))(cfg)


# --compare's switches: (label, context entered while tracing the step[, config change]) off, then on (the default).
SWITCHES = {
    'flatten': (('off', lambda: linear.flattening(False)), ('on', lambda: linear.flattening(True))),
    'expert_ffn': (('apart', moe_lib.separate_projections), ('fused', contextlib.nullcontext)),
    'causal_blocks': (('1', contextlib.nullcontext, _llm_field(attention_causal_blocks=1)),
                      ('2', contextlib.nullcontext, _llm_field(attention_causal_blocks=2))),
    # The scan backend's tiles: all of 128 rows (the tile the previous rule, ~M / (8G), chose at the demo's shape)
    # against the default whole + remainder tiles (gmm.scan_tiles).
    'scan_tiles': (('128', lambda: gmm.tiles_as(gmm.Tiles(128, 128))), ('auto', contextlib.nullcontext)),
    # A GPU's dropless experts: XLA's ragged_dot (the default) against the Hopper kernels (bf16 configs: 1b).
    'mosaic_gpu': (('ragged_dot', contextlib.nullcontext, _moe_field(grouped_matmul='ragged_dot')),
                   ('mosaic_gpu', contextlib.nullcontext, _moe_field(grouped_matmul='mosaic_gpu'))),
}


def measure(name: str, steps: int, compare: str | None = None, seq: int | None = None) -> list[dict]:
  """One row per variant: the platform defaults, or each side of a `SWITCHES` entry, timed alternately."""
  cfg, spec, graphdef, tx, params, opt_state, batch = setup(name, seq=seq)
  b, t = batch['input_ids'].shape
  variants = SWITCHES[compare] if compare else (('auto', contextlib.nullcontext),)
  runs = {}
  for flag, switch, *change in variants:
    state = jax.tree.map(jnp.copy, (params, opt_state))  # each variant its own buffers (the step donates them)
    t0 = time.perf_counter()
    v_cfg, v_graphdef = cfg, graphdef
    if change:  # the same parameters under a changed config: the modules read it when traced
      v_cfg = change[0](cfg)
      v_graphdef = nnx.graphdef(nnx.eval_shape(lambda: LVLM(v_cfg, rngs=nnx.Rngs(0))))
    # A new step function per variant: jit caches traces by function, and the switch is read when tracing.
    step = jax.jit(step_lib.make_train_step(v_graphdef, tx, v_cfg), donate_argnums=(0, 1))
    with switch():
      compiled = step.lower(*state, batch).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(*state, batch)
    jax.block_until_ready(out[2]['loss'])
    runs[flag] = dict(compiled=compiled, state=out[:2], compile_s=compile_s, times=[], sys=[], faults=[],
                      cost=compiled.cost_analysis() or {})
  for _ in range(steps):  # variants alternate, so a noisy neighbour slows both alike
    for flag, run in runs.items():
      r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      out = run['compiled'](*run['state'], batch)
      jax.block_until_ready(out[2]['loss'])
      run['times'].append(time.perf_counter() - t0)
      r1 = resource.getrusage(resource.RUSAGE_SELF)  # the process's, so this step's system time and page faults
      run['sys'].append(r1.ru_stime - r0.ru_stime)
      run['faults'].append(r1.ru_minflt - r0.ru_minflt)
      run['state'] = out[:2]
      run['loss'] = float(out[2]['loss'])
  model_flops = flops_lib.train_flops_per_step(cfg, b, t)
  device = jax.devices()[0]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  rows = []
  for flag, run in runs.items():
    sec = float(np.median(run['times']))
    rows.append({
        'config': name, 'compare': compare, 'variant': flag, 'flatten': flag if compare == 'flatten' else 'auto',
        'device': device.device_kind,
        'params': n_params, 'activated_llm_matmul_params_per_token': flops_lib.llm_matmul_params_per_token(cfg),
        'batch': b, 'seq_len': t, 'step_seconds_median': sec, 'step_seconds_min': float(np.min(run['times'])),
        'tokens_per_s': b * t / sec, 'compile_seconds': run['compile_s'],
        'sys_seconds_per_step': float(np.median(run['sys'])), 'minor_faults_per_step': float(np.median(run['faults'])),
        'model_flops_per_step': model_flops,
        'compiled_flops_per_step': float(run['cost'].get('flops', float('nan'))),
        'model_flops_per_s': model_flops / sec, 'final_loss': run.get('loss'),
        'mfu': flops_lib.mfu(model_flops, sec, 1, device.device_kind),
    })
  return rows


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--configs', default='tiny,100m')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--seq', type=int, default=0, help='tokens per row (0 = each config\'s own)')
  p.add_argument('--compare', choices=tuple(SWITCHES), help='time a switch off and on, side by side')
  p.add_argument('--flatten', default='auto', choices=('auto', 'both'), help='both = --compare flatten')
  p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                               'train_step.json'))
  args = p.parse_args()
  compile_cache.enable()
  compare = args.compare or ('flatten' if args.flatten == 'both' else None)
  rows = [r for name in args.configs.split(',') for r in measure(name, args.steps, compare, args.seq or None)]
  print(f'{"config":<6} {"variant":<7} {"device":<14} {"params":>12} {"batch x seq":>12} {"step s":>8} '
        f'{"tokens/s":>10} {"model TFLOP/s":>14} {"MFU":>6}')
  for r in rows:
    mfu = '-' if r['mfu'] is None else f'{100 * r["mfu"]:.1f}%'
    print(f'{r["config"]:<6} {r["variant"]:<7} {r["device"]:<14} {r["params"]:>12,} {r["batch"]:>5} x '
          f'{r["seq_len"]:<5} {r["step_seconds_median"]:>8.3f} {r["tokens_per_s"]:>10.0f} '
          f'{r["model_flops_per_s"] / 1e12:>14.4f} {mfu:>6}')
  if compare:
    for name in args.configs.split(','):
      off, on = (next(r for r in rows if r['config'] == name and r['variant'] == label)
                 for label, *_ in SWITCHES[compare])
      print(f'{name}: {compare} {on["variant"]} vs {off["variant"]}: '
            f'{off["step_seconds_median"] / on["step_seconds_median"]:.2f}x faster (median step), same loss: '
            f'{off["final_loss"] == on["final_loss"]} ({on["final_loss"]:.6f})')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'date': time.strftime('%Y-%m-%d'), 'rows': rows}, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
