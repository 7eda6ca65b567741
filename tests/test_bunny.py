"""The official MoIIE code's checkpoints (Bunny format) in moiie_jax: a tiny folder with its config and keys built
from tiny random transformers models, converted, and compared with a PyTorch forward of the same block structure
(transformers decoder layers with the official MoE block written here from its code: CogVLM modality rule, visual
router over experts 0-2, textual over 1-3, softmax top-2 renormalised, dropless); S2 features included. Export ->
import is bit-identical and the exported config holds every field its config classes read; bad input."""

import copy
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, SiglipVisionConfig,
                          SiglipVisionModel)

from moiie_jax import export as export_cli
from moiie_jax.convert import __main__ as convert_cli
from moiie_jax.convert import folder, hf
from torch_s2 import torch_s2_features

TOL = 1e-4
V, D, F, LAYERS = 96, 32, 48, 4
SCALES = (32, 64, 96)
PATCHES = 16  # 32 px / patch 8, squared
# Every backbone field the official modeling files read from the config (grep of config.<name> in
# phi3_moe_mm_s/modeling_phi3.py and llama_moe_mms/modeling_llama.py, less the PretrainedConfig ones).
READ_FIELDS = {
    'phi3': ('attention_dropout', 'embd_pdrop', 'hidden_act', 'hidden_size', 'initializer_range', 'intermediate_size',
             'max_position_embeddings', 'num_attention_heads', 'num_hidden_layers', 'num_key_value_heads',
             'original_max_position_embeddings', 'pad_token_id', 'resid_pdrop', 'rms_norm_eps', 'rope_scaling',
             'rope_theta', 'sliding_window', 'use_cache', 'vocab_size'),
    'llama': ('attention_bias', 'attention_dropout', 'hidden_act', 'hidden_size', 'initializer_range',
              'intermediate_size', 'max_position_embeddings', 'num_attention_heads', 'num_hidden_layers',
              'num_key_value_heads', 'pad_token_id', 'pretraining_tp', 'rms_norm_eps', 'rope_scaling', 'rope_theta',
              'use_cache', 'vocab_size'),
}
MOE_FIELDS = ('num_experts', 'num_experts_per_tok', 'vis_router_aux_loss_coef', 'lan_router_aux_loss_coef',
              'output_vis_router_logits', 'output_lan_router_logits', 'router_jitter_noise')
MM_FIELDS = ('mm_vision_tower', 'mm_projector_type', 'mm_hidden_size', 'use_s2', 'image_aspect_ratio')


class OfficialMoIIE(torch.nn.Module):
  """The official MoESparseMoeBlock (4 experts), from its code: token types set before each forward."""

  def __init__(self, experts, gate, gate_vis):
    super().__init__()
    self.experts = torch.nn.ModuleList(experts)
    self.gate, self.gate_vis = gate, gate_vis
    self.token_type = None

  def forward(self, h):
    t = self.token_type
    vision = torch.zeros_like(t, dtype=torch.bool)
    vision[:, :-1] = (t[:, :-1] == 1) & (t[:, 1:] == 1)  # CogVLM: an image's last token goes as text
    out = torch.empty_like(h)
    for mask, router, offset in ((vision, self.gate_vis, 0), (~vision, self.gate, 1)):
      x = h[mask]
      if not len(x):
        continue
      w = torch.softmax(router(x).float(), dim=1)
      w, chosen = torch.topk(w, 2, dim=-1)
      w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
      y = torch.zeros_like(x)
      for e in range(3):
        rows, k = torch.where(chosen == e)
        y.index_add_(0, rows, self.experts[e + offset](x[rows]) * w[rows, k, None])
      out[mask] = y
    return out


def _perturb(module, scale=0.1):
  with torch.no_grad():
    for name, p in module.named_parameters():
      if 'norm' in name or name.endswith('bias'):
        p.add_(scale * torch.randn_like(p))
  return module


def _backbone(arch):
  small = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  if arch == 'phi3':
    return Phi3ForCausalLM(Phi3Config(**small))
  return LlamaForCausalLM(LlamaConfig(**small))


def _bunny(tmp_path, arch='phi3', moe=True, s2=True, seed=0, name='bunny'):
  """(the Bunny folder, a reference forward(ids, mask, pixels NCHW) -> logits, the tower's folder)."""
  torch.manual_seed(seed)
  llm = _perturb(_backbone(arch)).eval()
  tower = _perturb(SiglipVisionModel(SiglipVisionConfig(hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                                        num_attention_heads=4, image_size=32,
                                                        patch_size=8))).eval()
  vision_dir = str(tmp_path / f'{name}-siglip')
  tower.save_pretrained(vision_dir)
  width = D * (len(SCALES) if s2 else 1)
  projector = torch.nn.Sequential(torch.nn.Linear(width, D), torch.nn.GELU(), torch.nn.Linear(D, D)).eval()
  blocks = {}
  for i in (range(1, LAYERS, 2) if moe else ()):
    experts = [copy.deepcopy(llm.model.layers[i].mlp) for _ in range(4)]
    with torch.no_grad():
      for ex in experts:  # upcycled copies that have drifted apart, so the routing matters
        for p in ex.parameters():
          p.add_(0.05 * torch.randn_like(p))
    gate, gate_vis = torch.nn.Linear(D, 3, bias=False), torch.nn.Linear(D, 3, bias=False)
    with torch.no_grad():
      gate.weight.normal_(0, 1.0)
      gate_vis.weight.normal_(0, 1.0)
    blocks[i] = OfficialMoIIE(experts, gate, gate_vis)
    llm.model.layers[i].mlp = blocks[i]
  # The folder: its config and keys (the MoE layers' modules are named as the official block names them).
  tensors = {k: v.detach().numpy().copy() for k, v in llm.state_dict().items()}
  for key, value in tower.state_dict().items():
    # transformers 4.40's SiglipVisionModel keys, as its code saves them: under vision_model.
    tensors[f'model.vision_tower.vision_tower.vision_model.{key.removeprefix("vision_model.")}'] = (
        value.detach().numpy().copy())
  for index, module in ((0, projector[0]), (2, projector[2])):
    tensors[f'model.mm_projector.{index}.weight'] = module.weight.detach().numpy().copy()
    tensors[f'model.mm_projector.{index}.bias'] = module.bias.detach().numpy().copy()
  cfg = {k: v for k, v in llm.config.to_dict().items() if k not in ('rope_parameters', 'transformers_version')}
  cfg.update(rope_theta=10000.0, rope_scaling=None)
  model_type = {('phi3', True): 'bunny-mm-phi3-moe-s', ('llama', True): 'bunny-mm-llama3-moe-s',
                ('phi3', False): 'bunny-phi3', ('llama', False): 'bunny-llama'}[arch, moe]
  cfg.update(model_type=model_type, architectures=['Bunny'], mm_vision_tower='google/siglip-so400m-patch14-384',
             mm_projector_type='mlp2x_gelu', mm_hidden_size=width, use_mm_proj=True, use_s2=s2,
             image_aspect_ratio='pad', tokenizer_model_max_length=256)
  if s2:
    cfg['s2_scales'] = ','.join(map(str, SCALES))
  if moe:
    cfg.update(num_experts=4, num_experts_per_tok=2, vis_router_aux_loss_coef=0.001, lan_router_aux_loss_coef=0.001,
               router_jitter_noise=0.0)
  out = str(tmp_path / name)
  hf.write_folder(out, cfg, tensors, max_shard_bytes=200_000)  # sharded, with an index

  def reference(ids, mask, pixels):
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
    image = ids == V
    with torch.no_grad():
      if s2:
        feats = torch_s2_features(tower, pixels, SCALES)
      else:
        feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
      embeds = llm.model.embed_tokens(torch.where(image, 0, ids))
      embeds[image] = projector(feats).reshape(-1, D)
      for block in blocks.values():
        block.token_type = image.long()
      return llm(inputs_embeds=embeds, attention_mask=mask).logits.numpy()

  return out, reference, vision_dir


def _inputs(size):
  rng = np.random.default_rng(3)
  text = lambda n: rng.integers(3, V, size=n)
  rows = [np.concatenate([text(3), np.full(PATCHES, V), text(5)]),
          np.concatenate([np.full(PATCHES, V), text(4)])]
  t = max(map(len, rows))
  ids = np.zeros((2, t), np.int64)
  mask = np.zeros((2, t), np.int64)
  for r, row in enumerate(rows):  # right padding with pad id 0
    ids[r, :len(row)], mask[r, :len(row)] = row, 1
  pixels = rng.standard_normal((2, 3, size, size)).astype(np.float32)
  return ids, mask, pixels


@pytest.mark.parametrize('arch,moe,s2', [('phi3', True, True), ('llama', True, False), ('phi3', False, False)])
def test_official_folder_converts_and_equals_its_pytorch_forward(tmp_path, arch, moe, s2):
  src, reference, vision_dir = _bunny(tmp_path, arch, moe, s2)
  out = str(tmp_path / 'ours')
  # Its config names the tower only by Hub name (here a stand-in's): --vision gives the tiny tower's shape.
  assert convert_cli.main(['--moiie', src, '--vision', vision_dir, '--out', out]) == 0
  cfg, model, meta = folder.load_folder(out)
  assert meta['template'] == ('phi3' if arch == 'phi3' else 'llama3') and meta['pad_to_square']
  assert cfg.vision.s2_scales == (SCALES if s2 else ())
  if moe:
    m = cfg.llm.moe
    assert (m.variant, m.n_vision, m.n_shared, m.n_language, m.modality_rule) == ('moiie', 1, 2, 1, 'official')
    assert cfg.llm.moe_layers == (1, 3)
  ids, mask, pixels = _inputs(SCALES[-1] if s2 else 32)
  want = reference(ids, mask, torch.from_numpy(pixels))
  got = np.asarray(model(jnp.asarray(np.where(ids == V, cfg.image_token_id, ids), jnp.int32),
                         jnp.asarray(pixels.transpose(0, 2, 3, 1)), attention_mask=jnp.asarray(mask, jnp.int32)).logits)
  valid = mask.astype(bool)
  assert np.abs(got[valid] - want[valid]).max() <= TOL


def test_export_import_is_bit_identical_and_the_config_complete(tmp_path):
  src, _, vision_dir = _bunny(tmp_path, 'phi3', True, True)
  ours = str(tmp_path / 'ours')
  assert convert_cli.main(['--moiie', src, '--vision', vision_dir, '--out', ours]) == 0
  exported = str(tmp_path / 'exported')
  assert export_cli.main(['--checkpoint', ours, '--format', 'moiie', '--out', exported]) == 0
  a, b = hf.read_tensors(src), hf.read_tensors(exported)
  # SigLIP's attention-pooling head is in the source (SiglipVisionModel has one) but LLaVA-style models never run
  # it, so we neither keep nor write it; its loader leaves the unused head freshly initialised.
  a = {k: v for k, v in a.items() if '.vision_model.head.' not in k}
  assert set(a) == set(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
  cfg = hf.read_config(exported)
  missing = [f for f in READ_FIELDS['phi3'] + MOE_FIELDS + MM_FIELDS if f not in cfg]
  assert not missing, missing
  assert cfg['model_type'] == 'bunny-mm-phi3-moe-s' and cfg['architectures'] == ['BunnyMMSPhi3MoEForCausalLM']
  assert cfg['mm_hidden_size'] == 3 * D and cfg['use_s2'] and cfg['s2_scales'] == '32,64,96'
  # ... and back in: the same parameters, bit for bit.
  again = str(tmp_path / 'again')
  assert convert_cli.main(['--moiie', exported, '--vision', vision_dir, '--out', again]) == 0
  from flax import nnx
  first = nnx.to_flat_state(nnx.state(folder.load_folder(ours)[1], nnx.Param))
  second = dict(nnx.to_flat_state(nnx.state(folder.load_folder(again)[1], nnx.Param)))
  for path, value in first:
    assert np.array_equal(np.asarray(value.get_value()), np.asarray(second[path].get_value())), path


def test_llama_export_config_holds_its_fields(tmp_path):
  src, _, vision_dir = _bunny(tmp_path, 'llama', True, False)
  ours, exported = str(tmp_path / 'ours'), str(tmp_path / 'exported')
  assert convert_cli.main(['--moiie', src, '--vision', vision_dir, '--out', ours]) == 0
  assert export_cli.main(['--checkpoint', ours, '--format', 'moiie', '--out', exported]) == 0
  cfg = hf.read_config(exported)
  assert not [f for f in READ_FIELDS['llama'] + MOE_FIELDS + MM_FIELDS if f not in cfg]
  assert cfg['model_type'] == 'bunny-mm-llama3-moe-s' and not cfg['use_s2']


def _edit(src, tmp_path, name, config=None, tensors=None):
  cfg = hf.read_config(src)
  ts = hf.read_tensors(src)
  if config:
    config(cfg)
  if tensors:
    tensors(ts)
  out = str(tmp_path / name)
  hf.write_folder(out, cfg, ts, max_shard_bytes=200_000)
  return out


def test_bad_official_folders_give_one_line(tmp_path, capsys):
  src, _, vision_dir = _bunny(tmp_path, 'phi3', True, False)
  index = json.load(open(os.path.join(src, 'model.safetensors.index.json')))
  shards = sorted(set(index['weight_map'].values()))
  assert len(shards) > 1
  cases = {
      'unknown model_type': (dict(config=lambda c: c.update(model_type='bunny-mm-phi3-moe')), 'bunny-mm-phi3-moe'),
      'eight experts': (dict(config=lambda c: c.update(num_experts=8)), 'num_experts=8'),
      's2 weights, non-s2 config': (dict(tensors=lambda t: t.update({
          'model.mm_projector.0.weight': np.zeros((D, 3 * D), np.float32)})), 'use_s2'),
      'missing expert': (dict(tensors=lambda t: t.pop('model.layers.3.mlp.experts.2.down_proj.weight')),
                         'model.layers.3.mlp.experts.2.down_proj.weight is missing'),
      'missing router': (dict(tensors=lambda t: t.pop('model.layers.1.mlp.gate_vis.weight')),
                         'model.layers.1.mlp.gate_vis.weight is missing'),
  }
  for name, (edit, needle) in cases.items():
    bad = _edit(src, tmp_path, name.replace(' ', '-').replace(',', ''), **edit)
    _check_one_line(capsys, tmp_path, name, bad, needle, vision_dir)
  # A shard listed in the index but missing, and a shard cut short.
  gone = _edit(src, tmp_path, 'gone')
  os.remove(os.path.join(gone, shards[1]))
  _check_one_line(capsys, tmp_path, 'gone', gone, f'lists shard {shards[1]}, which is missing', vision_dir)
  cut = _edit(src, tmp_path, 'cut')
  path = os.path.join(cut, shards[0])
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 100)
  _check_one_line(capsys, tmp_path, 'cut', cut, 'truncated', vision_dir)


def test_export_refuses_what_the_official_code_cannot_hold():
  import dataclasses
  from moiie_jax.convert import bunny
  from moiie_jax.convert.errors import ConvertError
  from moiie_jax.models import presets
  base = presets.lvlm_config('tiny-phi3', 'tiny-siglip', presets.moe_config('moiie', 4))
  for moe, needle in ((presets.moe_config('vanilla', 4), "variant='vanilla'"),
                      (presets.moe_config('moiie', 8), '2 vision, 4 shared'),
                      (presets.moe_config('moiie', 4, placement='all'), 'odd layers')):
    with pytest.raises(ConvertError, match=needle):
      bunny.to_bunny(dataclasses.replace(base, llm=dataclasses.replace(base.llm, moe=moe)), {})
  with pytest.raises(ConvertError, match="architecture='phi'"):
    bunny.to_bunny(presets.lvlm_config('tiny-phi2', 'tiny-siglip'), {})


def _check_one_line(capsys, tmp_path, name, folder_path, needle, vision_dir):
  out = str(tmp_path / f'out-{name.replace(" ", "-").replace(",", "")}')
  capsys.readouterr()
  assert convert_cli.main(['--moiie', folder_path, '--vision', vision_dir, '--out', out]) == 2, name
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and needle in err[0], (name, err)
  assert not os.path.exists(out), name
