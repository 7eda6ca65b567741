"""Converting a full-size checkpoint in bounded memory: a random LLaMA-3-8B-shaped bf16 HF folder (about 16 GB, on
disk and never in memory) plus a SigLIP-so400m-shaped tower, converted by `python -m moiie_jax.convert`, against a
plain file copy of the same bytes.

    python bench/convert.py                     # LLaMA-3-8B + so400m (about 17 GB written three times: keep 55 GB free)
    python bench/convert.py --size 1b           # a quick form
    python bench/convert.py --dtype float32     # an fp32 output (twice the bytes; the bound grows with it)

Prints a table and writes bench/results/convert.json: input and output GB, the converter's peak resident memory
(ru_maxrss of its process, which includes the memory-mapped pages it has touched and not yet released) against
the target "output bytes + 2 GiB" and against one layer, seconds and GB/s, and the copy's GB/s measured just
before on the same files. The random weights are bf16 bit patterns of small magnitude, written tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {  # name -> (LLaMA config fields, SigLIP config fields)
    '8b': (dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
           dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=384, patch_size=14)),
    '1b': (dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=4, rope_theta=10000.0, max_position_embeddings=4096),
           dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16)),
}
SHARD_BYTES = 5 * 10 ** 9


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  d, f, h = c['hidden_size'], c['intermediate_size'], c['hidden_size'] // c['num_attention_heads']
  kv = c['num_key_value_heads'] * h
  out = {'model.embed_tokens.weight': (c['vocab_size'], d)}
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.'
    out.update({p + 'input_layernorm.weight': (d,), p + 'post_attention_layernorm.weight': (d,),
                p + 'self_attn.q_proj.weight': (d, d), p + 'self_attn.k_proj.weight': (kv, d),
                p + 'self_attn.v_proj.weight': (kv, d), p + 'self_attn.o_proj.weight': (d, d),
                p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d),
                p + 'mlp.down_proj.weight': (d, f)})
  out.update({'model.norm.weight': (d,), 'lm_head.weight': (c['vocab_size'], d)})
  return out


def siglip_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  d, f, p = c['hidden_size'], c['intermediate_size'], c['patch_size']
  out = {'vision_model.embeddings.patch_embedding.weight': (d, 3, p, p),
         'vision_model.embeddings.patch_embedding.bias': (d,),
         'vision_model.embeddings.position_embedding.weight': ((c['image_size'] // p) ** 2, d)}
  for i in range(c['num_hidden_layers']):
    q = f'vision_model.encoder.layers.{i}.'
    for name in ('layer_norm1', 'layer_norm2'):
      out.update({q + f'{name}.weight': (d,), q + f'{name}.bias': (d,)})
    for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      out.update({q + f'self_attn.{name}.weight': (d, d), q + f'self_attn.{name}.bias': (d,)})
    out.update({q + 'mlp.fc1.weight': (f, d), q + 'mlp.fc1.bias': (f,), q + 'mlp.fc2.weight': (d, f),
                q + 'mlp.fc2.bias': (d,)})
  out.update({'vision_model.post_layernorm.weight': (d,), 'vision_model.post_layernorm.bias': (d,)})
  return out


def _random_bf16(rng: np.random.Generator, n: int) -> bytes:
  """n finite bf16 values of magnitude 2^-15 .. 2^0 with random sign, exponent and mantissa: about as hard to
  compress as trained weights (Orbax compresses what it writes)."""
  bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
  exponent = 0x70 + ((bits >> 7) & 0xF)  # 112 .. 127
  return ((bits & 0x807F) | (exponent << 7)).astype('<u2').tobytes()


def write_random_folder(folder: str, config: dict, shapes: dict[str, tuple[int, ...]], seed: int) -> int:
  """An HF folder of bf16 safetensors shards (with an index) written tensor by tensor; returns its weight bytes."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  names, shards, size = list(shapes), [[]], 0
  for name in names:
    nbytes = int(np.prod(shapes[name])) * 2
    if shards[-1] and size + nbytes > SHARD_BYTES:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  files = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  weight_map, total = {}, 0
  for file, members in zip(files, shards):
    header, offset = {}, 0
    for name in members:
      nbytes = int(np.prod(shapes[name])) * 2
      header[name] = {'dtype': 'BF16', 'shape': list(shapes[name]), 'data_offsets': [offset, offset + nbytes]}
      offset += nbytes
    raw = json.dumps(header, separators=(',', ':')).encode()
    raw += b' ' * (-len(raw) % 8)
    with open(os.path.join(folder, file), 'wb') as f:
      f.write(struct.pack('<Q', len(raw)))
      f.write(raw)
      for name in members:
        n = int(np.prod(shapes[name]))
        for start in range(0, n, 1 << 27):  # 256 MB at a time
          f.write(_random_bf16(rng, min(1 << 27, n - start)))
    weight_map.update({name: file for name in members})
    total += offset
  with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  return total


def copy_seconds(folder: str, dst: str) -> float:
  t0 = time.perf_counter()
  shutil.copytree(folder, dst)
  os.sync()
  return time.perf_counter() - t0


def _dir_bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', default='8b', choices=sorted(SIZES))
  p.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  p.add_argument('--workdir', default=None, help='scratch folder (default: a temporary one, removed at the end)')
  a = p.parse_args()
  llm_cfg, tower_cfg = SIZES[a.size]
  work = a.workdir or tempfile.mkdtemp(prefix='moiie-convert-bench-')
  try:
    t0 = time.perf_counter()
    llm_bytes = write_random_folder(
        os.path.join(work, 'llm'), {**llm_cfg, 'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
                                    'rms_norm_eps': 1e-5, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16'},
        llama_shapes(llm_cfg), 0)
    tower_bytes = write_random_folder(
        os.path.join(work, 'vision'), {**tower_cfg, 'architectures': ['SiglipVisionModel'],
                                       'model_type': 'siglip_vision_model'}, siglip_shapes(tower_cfg), 1)
    make_s = time.perf_counter() - t0
    in_bytes = llm_bytes + tower_bytes
    copy_s = copy_seconds(os.path.join(work, 'llm'), os.path.join(work, 'llm-copy'))
    copy_s += copy_seconds(os.path.join(work, 'vision'), os.path.join(work, 'vision-copy'))
    shutil.rmtree(os.path.join(work, 'llm-copy'))
    shutil.rmtree(os.path.join(work, 'vision-copy'))
    out = os.path.join(work, 'out')
    cmd = [sys.executable, '-m', 'moiie_jax.convert', '--llm', os.path.join(work, 'llm'), '--vision',
           os.path.join(work, 'vision'), '--out', out, '--dtype', a.dtype]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    os.sync()
    convert_s = time.perf_counter() - t0
    if proc.returncode:
      raise SystemExit(f'conversion failed: {proc.stderr.strip().splitlines()[-1]}')
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    disk_bytes = _dir_bytes(os.path.join(out, 'params'))
    d, f = llm_cfg['hidden_size'], llm_cfg['intermediate_size']
    itemsize = 2 if a.dtype == 'bfloat16' else 4
    # The output's size: its parameters in memory (the connector stays fp32); Orbax compresses what it writes.
    connector = (tower_cfg['hidden_size'] * d + d * d + 2 * d) * 4
    out_bytes = (llm_bytes + tower_bytes) // 2 * itemsize + connector
    layer = (2 * d * d + 2 * d * d * llm_cfg['num_key_value_heads'] // llm_cfg['num_attention_heads'] + 3 * d * f) * itemsize
    embed = llm_cfg['vocab_size'] * d * itemsize
    result = dict(date=time.strftime('%Y-%m-%d'), size=a.size, dtype=a.dtype, input_gb=in_bytes / 1e9,
                  output_gb=out_bytes / 1e9, output_on_disk_gb=disk_bytes / 1e9, peak_rss_gib=peak / 2 ** 30,
                  bound_gib=(out_bytes + 2 * 2 ** 30) / 2 ** 30,
                  largest_group_gib=max(layer, embed) / 2 ** 30, convert_s=convert_s,
                  convert_gb_per_s=in_bytes / 1e9 / convert_s, copy_s=copy_s, copy_gb_per_s=in_bytes / 1e9 / copy_s,
                  copy_over_convert=convert_s / copy_s, make_input_s=make_s, cpus=os.cpu_count())
  finally:
    if not a.workdir:
      shutil.rmtree(work, ignore_errors=True)
  rows = [('input (bf16 HF safetensors)', f'{result["input_gb"]:.2f} GB'),
          (f'output ({a.dtype} parameters)', f'{result["output_gb"]:.2f} GB'),
          ('output on disk (Orbax, compressed)', f'{result["output_on_disk_gb"]:.2f} GB'),
          ('converter peak RSS', f'{result["peak_rss_gib"]:.2f} GiB'),
          ('target: output + 2 GiB', f'{result["bound_gib"]:.2f} GiB'),
          ('largest group (embeddings / head)', f'{result["largest_group_gib"]:.2f} GiB'),
          ('convert', f'{convert_s:.0f} s, {result["convert_gb_per_s"]:.2f} GB/s'),
          ('plain copy of the input', f'{copy_s:.0f} s, {result["copy_gb_per_s"]:.2f} GB/s'),
          ('convert / copy time', f'{result["copy_over_convert"]:.2f}x')]
  width = max(len(r[0]) for r in rows)
  print('\n'.join(f'{k:<{width}}  {v}' for k, v in rows))
  os.makedirs(os.path.join(ROOT, 'bench', 'results'), exist_ok=True)
  with open(os.path.join(ROOT, 'bench', 'results', 'convert.json'), 'w') as f:
    json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
