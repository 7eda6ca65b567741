"""MoE-LLaVA's checkpoints in moiie_jax: a tiny MoE-LLaVA folder (its config, key layout and DeepSpeed experts) built
from tiny random HF models, converted, and compared with a PyTorch forward of the same model assembled here from
transformers modules and a top-2 gate written from DeepSpeed's formulas; greedy generation; export -> import round
trip; bad input."""

import copy
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, StableLmConfig, StableLmForCausalLM)

from moiie_jax import export as export_cli
from moiie_jax.convert import __main__ as convert_cli
from moiie_jax.convert import folder, hf
from moiie_jax.infer.generate import generate_ids, inference_model

TOL = 1e-4
V, D, F, E, LAYERS = 96, 32, 48, 4, 4
IMAGE_TOKENS = 4  # CLIP 16 px / patch 8 = 4 patches; MoE-LLaVA drops the class token
SMALL = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256)


def _perturb(module, scale=0.1):
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith('bias') or 'norm' in name:
        p.add_(scale * torch.randn_like(p))
  return module


def _backbone(fam, vocab=V):
  small = {**SMALL, 'vocab_size': vocab}
  if fam == 'phi':
    return PhiForCausalLM(PhiConfig(**small, hidden_act='gelu_new', partial_rotary_factor=0.5))
  if fam == 'stablelm':
    return StableLmForCausalLM(StableLmConfig(**small, partial_rotary_factor=0.25, use_qkv_bias=True))
  # Qwen v1's math; its files are written in Qwen v1's layout below. Its FFN width is config.intermediate_size / 2.
  return Qwen2ForCausalLM(Qwen2Config(**small, tie_word_embeddings=False))


class DeepSpeedMoE(torch.nn.Module):
  """MoE-LLaVA's MoE layer at evaluation, without noise: DeepSpeed's top2gating written from its definition over
  the flattened batch (padding included), then the experts weighted by the renormalised kept gates."""

  def __init__(self, experts, wg, capacity_factor):
    super().__init__()
    self.experts, self.wg, self.cf = torch.nn.ModuleList(experts), wg, capacity_factor

  def forward(self, h):
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    s = x.shape[0]
    logits = x.float() @ self.wg.T.float()
    gates = torch.softmax(logits, dim=1)
    cap = math.ceil(s / E * 2 * self.cf)
    mask1 = torch.nn.functional.one_hot(gates.argmax(1), E)
    mask2 = torch.nn.functional.one_hot(logits.masked_fill(mask1.bool(), float('-inf')).argmax(1), E)
    loc1 = torch.cumsum(mask1, 0) - 1
    loc2 = torch.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdim=True)
    mask1 = mask1 * (loc1 < cap)
    mask2 = mask2 * (loc2 < cap)
    g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
    denom = torch.clamp(g1 + g2, min=torch.finfo(torch.float32).eps)
    weights = (g1 / denom)[:, None] * mask1 + (g2 / denom)[:, None] * mask2  # [S, E]
    out = sum(weights[:, e:e + 1] * self.experts[e](x) for e in range(E))
    return out.reshape(shape)


def _moe_llava(fam, tmp_path, seed=0, vocab=V):
  """(the MoE-LLaVA folder, the vision folder, a reference torch forward(ids, mask, pixels, cf) -> logits)."""
  torch.manual_seed(seed)
  llm = _perturb(_backbone(fam, vocab)).eval()
  if fam == 'phi':
    with torch.no_grad():
      llm.lm_head.bias.zero_()  # MoE-LLaVA's Phi-2 head has no bias
  tower = _perturb(CLIPVisionModel(CLIPVisionConfig(hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=16, patch_size=8))).eval()
  vision_dir = str(tmp_path / 'clip')
  tower.save_pretrained(vision_dir)
  projector = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.GELU(), torch.nn.Linear(D, D)).eval()
  moe_layers = list(range(0, LAYERS, 2))
  layers = llm.model.layers
  experts_of, gates_of = {}, {}
  for i in moe_layers:
    experts = [_perturb(copy.deepcopy(layers[i].mlp), 0.05) for _ in range(E)]
    with torch.no_grad():
      for ex in experts:  # upcycled copies that have drifted apart, so the routing matters
        for p in ex.parameters():
          p.add_(0.05 * torch.randn_like(p))
    experts_of[i], gates_of[i] = experts, torch.randn(E, D)

  # The folder: MoE-LLaVA's config and keys.
  sd = {k: v.detach().numpy().copy() for k, v in llm.state_dict().items()}
  sd.pop('lm_head.bias', None)
  prefix = 'transformer.' if fam == 'qwen' else 'model.'
  tensors = {}
  for key, value in sd.items():
    if any(key.startswith(f'model.layers.{i}.mlp.') for i in moe_layers):
      continue
    tensors.update(_qwen_v1(key, value, sd) if fam == 'qwen' else {key: value})
  for i in moe_layers:
    base = f'{prefix}layers.{i}.mlp.deepspeed_moe.' if fam != 'qwen' else f'transformer.h.{i}.mlp.deepspeed_moe.'
    tensors[base + 'gate.wg.weight'] = gates_of[i].numpy().copy()
    for j, ex in enumerate(experts_of[i]):
      for key, value in ex.state_dict().items():
        name, leaf = key.rsplit('.', 1)
        name = {'up_proj': 'w1', 'gate_proj': 'w2', 'down_proj': 'c_proj'}[name] if fam == 'qwen' else name
        tensors[f'{base}experts.deepspeed_experts.{j}.{name}.{leaf}'] = value.detach().numpy().copy()
  for key, value in tower.state_dict().items():
    tensors[f'{prefix}image_tower.image_tower.vision_model.{key.removeprefix("vision_model.")}'] = (
        value.detach().numpy().copy())
  for index, module in ((0, projector[0]), (2, projector[2])):
    tensors[f'{prefix}mm_projector.image_spatial_proj.{index}.weight'] = module.weight.detach().numpy().copy()
    tensors[f'{prefix}mm_projector.image_spatial_proj.{index}.bias'] = module.bias.detach().numpy().copy()
  hf_cfg = _qwen_v1_config(llm.config) if fam == 'qwen' else llm.config.to_dict()
  hf_cfg.update(model_type=f'moe_llava_{fam}', image_projector_type='mlp2x_gelu', mm_hidden_size=D,
                mm_vision_select_layer=-2, mm_vision_select_feature='patch', mm_image_tower='tiny-clip',
                moe=dict(moe_enable=True, moe_mode='sparse', moe_layers_idx=moe_layers, ep_size=1, top_k_experts=2,
                         capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0, use_residual=False,
                         router_aux_loss_coef=0.01, train_modules=[], num_experts=[E] * len(moe_layers)))
  hf_cfg.pop('rope_parameters', None) if fam != 'phi' else None
  if fam == 'phi':
    hf_cfg['partial_rotary_factor'] = 0.5
  elif fam == 'stablelm':
    hf_cfg['partial_rotary_factor'] = 0.25
  src = str(tmp_path / f'moe-llava-{fam}')
  hf.write_folder(src, hf_cfg, tensors)

  def forward(ids, mask, pixels, cf, image_id=V):
    for i in moe_layers:
      layers[i].mlp = DeepSpeedMoE(experts_of[i], gates_of[i], cf)
    with torch.no_grad():
      feats = tower(torch.tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states[-2][:, 1:]
      feats = projector(feats)
      ids_t = torch.tensor(ids)
      is_image = ids_t == image_id  # our placeholder id: vocab_size
      embeds = llm.model.embed_tokens(torch.where(is_image, 0, ids_t))
      for b in range(ids.shape[0]):
        rows = torch.nonzero(is_image[b])[:, 0]
        if len(rows):
          embeds[b, rows] = feats[b, :len(rows)]
      pos = np.maximum(mask.cumsum(1) - 1, 0)
      return llm(inputs_embeds=embeds, attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()

  return src, vision_dir, forward, tensors


def _qwen_v1(key, value, sd):
  """One HF Qwen2 tensor in Qwen v1's layout (q, k, v fused into c_attn; written once, at q)."""
  rename = {'model.embed_tokens.weight': 'transformer.wte.weight', 'model.norm.weight': 'transformer.ln_f.weight',
            'lm_head.weight': 'lm_head.weight'}
  if key in rename:
    return {rename[key]: value}
  i, rest = key.split('.', 3)[2], key.split('.', 3)[3]
  if rest.startswith('self_attn.') and rest.split('.')[1] in ('q_proj', 'k_proj', 'v_proj'):
    if not rest.startswith('self_attn.q_proj'):
      return {}
    leaf = rest.rsplit('.', 1)[1]
    fused = np.concatenate([sd[f'model.layers.{i}.self_attn.{n}.{leaf}'] for n in ('q_proj', 'k_proj', 'v_proj')])
    return {f'transformer.h.{i}.attn.c_attn.{leaf}': fused}
  names = {'input_layernorm.weight': 'ln_1.weight', 'post_attention_layernorm.weight': 'ln_2.weight',
           'self_attn.o_proj.weight': 'attn.c_proj.weight', 'mlp.up_proj.weight': 'mlp.w1.weight',
           'mlp.gate_proj.weight': 'mlp.w2.weight', 'mlp.down_proj.weight': 'mlp.c_proj.weight'}
  return {f'transformer.h.{i}.{names[rest]}': value}


def _qwen_v1_config(c):
  return dict(architectures=['QWenLMHeadModel'], vocab_size=c.vocab_size, hidden_size=c.hidden_size,
              intermediate_size=2 * c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
              num_attention_heads=c.num_attention_heads, layer_norm_epsilon=c.rms_norm_eps, rotary_pct=1.0,
              rotary_emb_base=10000, seq_length=c.max_position_embeddings, kv_channels=c.hidden_size //
              c.num_attention_heads, use_dynamic_ntk=True, use_logn_attn=True)


def _batch():
  rng = np.random.RandomState(3)
  ids = rng.randint(3, V, (3, 12))
  ids[0, 1:1 + IMAGE_TOKENS] = V  # rows 0 and 2 carry an image
  ids[2, 2:2 + IMAGE_TOKENS] = V
  mask = np.ones((3, 12), np.int64)
  mask[1, 8:] = 0  # right padding: DeepSpeed routes it too (it takes capacity)
  mask[2, 10:] = 0
  pixels = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
  return ids, mask, pixels


@pytest.mark.parametrize('fam', ['phi', 'stablelm', 'qwen'])
def test_converted_moe_llava_equals_its_pytorch_forward(fam, tmp_path):
  src, vision_dir, reference, tensors = _moe_llava(fam, tmp_path)
  out = str(tmp_path / 'ours')
  assert convert_cli.main(['--moe-llava', src, '--vision', vision_dir, '--out', out]) == 0
  cfg, model, meta = folder.load_folder(out)
  assert meta['template'] == 'moe_llava' and cfg.num_image_tokens == IMAGE_TOKENS
  moe = cfg.llm.moe
  assert (moe.variant, moe.n_experts, moe.gate, cfg.llm.moe_layers) == ('vanilla', E, 'deepspeed', (0, 2))
  ids, mask, pixels = _batch()
  for cf in (2.0, 0.5):  # MoE-LLaVA's evaluation capacity (no drops at E=4), and a tight one that drops
    m = inference_model(model, cf)
    logits = nnx.jit(lambda m, i, a, p: m(i, p, attention_mask=a).logits)(m, jnp.asarray(ids), jnp.asarray(mask),
                                                                           jnp.asarray(pixels))
    want = reference(ids, mask, pixels, cf)
    diff = float(np.abs(np.asarray(logits) - want)[mask.astype(bool)].max())
    assert diff <= TOL, f'{fam} cf={cf}: max |logits - PyTorch| = {diff}'

  if fam != 'phi':
    return
  # Greedy generation, token for token, against the PyTorch model's greedy loop (full forwards, no cache).
  prompt, prompt_mask = ids[:1, :8], mask[:1, :8]
  tokens = generate_ids(inference_model(model, 2.0), prompt, prompt_mask, pixels[:1], max_new_tokens=5)
  seq = prompt
  for _ in range(5):
    logits = reference(seq, np.ones_like(seq), pixels[:1], 2.0)
    seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
  np.testing.assert_array_equal(np.asarray(tokens)[0], seq[0, 8:])

  # Export -> import: MoE-LLaVA's own tensors back, bit for bit, and the same parameters again.
  back = str(tmp_path / 'exported')
  assert export_cli.main(['--checkpoint', out, '--format', 'moe-llava', '--out', back]) == 0
  exported = hf.read_tensors(back)
  assert sorted(exported) == sorted(tensors)
  for key, value in tensors.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  with open(os.path.join(back, 'config.json')) as f:
    assert json.load(f)['moe']['num_experts'] == [E, E]
  again = str(tmp_path / 'again')
  assert convert_cli.main(['--moe-llava', back, '--vision', vision_dir, '--out', again]) == 0
  _, model2, _ = folder.load_folder(again)
  flat1, flat2 = (dict(nnx.to_flat_state(nnx.state(x, nnx.Param))) for x in (model, model2))
  assert flat1.keys() == flat2.keys()
  for p in flat1:
    np.testing.assert_array_equal(np.asarray(flat1[p].get_value()), np.asarray(flat2[p].get_value()), err_msg=str(p))


def test_generator_on_a_converted_folder_answers_as_moe_llava(tmp_path):
  """The text level (`Generator.from_folder`: the folder's moe_llava template, greedy, the image spliced in)
  continues exactly as the PyTorch MoE-LLaVA model's greedy loop over the same prompt tokens."""
  from test_generate import write_tokenizer
  from moiie_jax.infer.generate import Generator, Prompt
  src, vision_dir, reference, _ = _moe_llava('phi', tmp_path, vocab=300)
  write_tokenizer(src)  # a 300-token tokenizer beside the weights, as a released folder has its own
  with open(os.path.join(src, 'tokenizer_config.json'), 'w') as f:  # no BOS, as Phi-2's tokenizer
    json.dump({'eos_token': '</s>', 'pad_token': '<pad>', 'add_bos_token': False}, f)
  out = str(tmp_path / 'ours')
  assert convert_cli.main(['--moe-llava', src, '--vision', vision_dir, '--out', out]) == 0
  gen = Generator.from_folder(out, batch_size=2)
  assert gen.template.name == 'moe_llava' and folder.read_meta(out)['pad_to_square'] is True
  pixels = np.random.RandomState(5).standard_normal((16, 16, 3)).astype(np.float32)
  prompt = Prompt('What is in the image?', image=pixels)
  ids, _ = gen.encode(prompt)
  text = gen.tokenizer.decode([int(i) for i in ids if i != gen.cfg.image_token_id], skip_special_tokens=False)
  assert text.startswith('A chat between') and text.endswith('USER: \nWhat is in the image? ASSISTANT:')
  assert int((ids == gen.cfg.image_token_id).sum()) == IMAGE_TOKENS
  results = gen.generate_results([prompt, prompt], max_new_tokens=4)
  assert results[0] == results[1]  # deterministic, batch-independent
  seq = ids[None].astype(np.int64)
  for _ in range(4):
    seq = np.concatenate([seq, reference(seq, np.ones_like(seq), pixels[None], 2.0, image_id=300)[:, -1:].argmax(
        -1)], axis=1)
  want = seq[0, len(ids):]
  stop = next((k for k, t in enumerate(want) if t in gen.eos_ids), len(want))
  assert results[0].text == gen.tokenizer.decode([int(t) for t in want[:stop]], skip_special_tokens=True).strip()


def _edit(src, tmp_path, name, config=None, drop=None):
  cfg = hf.read_config(src)
  tensors = hf.read_tensors(src)
  if config:
    config(cfg)
  if drop:
    tensors = {k: v for k, v in tensors.items() if not k.startswith(drop)}
  out = str(tmp_path / name)
  hf.write_folder(out, cfg, tensors)
  return out


def test_bad_moe_llava_folders_give_one_line(tmp_path, capsys):
  src, vision_dir, _, _ = _moe_llava('phi', tmp_path)
  cases = {
      'unknown model_type': (dict(config=lambda c: c.update(model_type='moe_llava_mistral')), 'moe_llava_mistral'),
      'no moe block': (dict(config=lambda c: c.pop('moe')), 'no `moe` block'),
      'expert count': (dict(config=lambda c: c['moe'].update(num_experts=[8, 8])), 'holds 4 experts'),
      'missing expert': (dict(drop='model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc2.bias'),
                         'deepspeed_experts.3.fc2.bias is missing'),
  }
  for name, (edit, needle) in cases.items():
    bad = _edit(src, tmp_path, name.replace(' ', '-'), **edit)
    out = str(tmp_path / f'out-{name.replace(" ", "-")}')
    capsys.readouterr()  # what building the folder printed
    assert convert_cli.main(['--moe-llava', bad, '--vision', vision_dir, '--out', out]) == 2, name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], (name, err)
    assert not os.path.exists(out), name


def test_fine_tuning_starts_from_a_converted_moe_llava_folder(tmp_path):
  """MoE-LLaVA's recipe (stage 3) initialised from one of its converted checkpoints: the same experts in the same
  layers, its gate, the converted weights as they are; a recipe with other experts is refused in one line."""
  from moiie_jax.train import loop, recipe
  from moiie_jax.train import step as step_lib
  src, vision_dir, _, _ = _moe_llava('phi', tmp_path)
  out = str(tmp_path / 'ours')
  assert convert_cli.main(['--moe-llava', src, '--vision', vision_dir, '--out', out]) == 0
  c = recipe.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs',
                               'moe_llava.py:stage=3,runlocal=True'))
  c.init.checkpoint = out
  c.model.moe.capacity_factor = 1.0  # routing fields are the recipe's to choose
  cfg, model, _ = loop.build_model(c)
  assert (cfg.llm.architecture, cfg.llm.moe.gate, cfg.llm.moe.capacity_factor) == ('phi', 'deepspeed', 1.0)
  _, converted, _ = folder.load_folder(out)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                            nnx.to_flat_state(nnx.state(converted, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
  ids, mask, pixels = _batch()
  batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pixels),
               labels=jnp.asarray(np.where(mask > 0, ids % V, -100)))
  loss, metrics = nnx.jit(lambda m, b: step_lib.loss_fn(m, b, cfg))(model, batch)
  assert np.isfinite(float(loss)) and float(metrics['aux_loss']) > 0.5  # GShard's loss: 1.0 per layer if uniform
  c.model.experts = 8
  with pytest.raises(ValueError, match='n_shared=4'):
    loop.build_model(c)


def test_siglip_models_see_728_image_tokens():
  """MoE-LLaVA's -384 models: [:, 1:] drops SigLIP's first patch (it has no class token), 728 of 729 tokens."""
  from moiie_jax.convert import moe_llava
  from moiie_jax.models import presets
  from moiie_jax.models.vision import VisionTower
  hf_cfg = {**PhiConfig(**SMALL, hidden_act='gelu_new').to_dict(), 'model_type': 'moe_llava_phi',
            'mm_image_tower': 'google/siglip-so400m-patch14-384', 'moe': dict(
                moe_enable=True, moe_layers_idx=[0, 2], top_k_experts=2, num_experts=[4, 4])}
  cfg = moe_llava.lvlm_config(hf_cfg, None, 'config.json')
  assert (cfg.vision.architecture, cfg.vision_feature_select_strategy, cfg.num_image_tokens) == (
      'siglip', 'drop_first', 728)
  tower = VisionTower(presets.VISION_PRESETS['tiny-siglip'], rngs=nnx.Rngs(0))
  pixels = jnp.asarray(np.random.RandomState(0).standard_normal((1, 32, 32, 3)), jnp.float32)
  full, dropped = tower.features(pixels, -2, 'full'), tower.features(pixels, -2, 'drop_first')
  assert dropped.shape[1] == full.shape[1] - 1 == 15
  np.testing.assert_array_equal(np.asarray(dropped), np.asarray(full[:, 1:]))


def _tiny_tiktoken(path, merges=60):
  """A byte-level BPE in tiktoken's format, trained here: 256 bytes, then the most frequent pair `merges` times."""
  import base64
  import collections
  import regex
  from moiie_jax.convert.tiktoken_bpe import QWEN_PATTERN
  corpus = ('The cat sat on the mat. The dog ate the hat! 12 cats, 3 dogs; what is in the image? '
            'A red square on a blue background.\n') * 5
  words = [[bytes([b]) for b in w.encode()] for w in regex.findall(QWEN_PATTERN, corpus)]
  ranks = {bytes([b]): b for b in range(256)}
  for _ in range(merges):
    pairs = collections.Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
    if not pairs:
      break
    (a, b), _ = pairs.most_common(1)[0]
    ranks[a + b] = len(ranks)
    for w in words:
      i = 0
      while i < len(w) - 1:
        if w[i] == a and w[i + 1] == b:
          w[i:i + 2] = [a + b]
        i += 1
  with open(path, 'w') as f:
    for token, rank in ranks.items():
      f.write(f'{base64.b64encode(token).decode()} {rank}\n')
  return ranks


def test_qwen_tiktoken_becomes_a_tokenizer_that_encodes_as_tiktoken(tmp_path):
  import regex
  import tokenizers
  from moiie_jax.convert import tiktoken_bpe
  ranks = _tiny_tiktoken(tmp_path / 'qwen.tiktoken')
  assert tiktoken_bpe.read_ranks(str(tmp_path / 'qwen.tiktoken')) == ranks
  tok = tokenizers.Tokenizer.from_str(json.dumps(tiktoken_bpe.tokenizer_json(ranks)))
  for text in ('The cat sat on the hat.', 'what is in the image?\n\nA blue dog, 12 cats!', 'Zebra 345 naïve'):
    want = [ranks[p] for piece in regex.findall(tiktoken_bpe.QWEN_PATTERN, text)
            for p in tiktoken_bpe._split(ranks, piece.encode(), len(ranks) + 1)]
    assert tok.encode(text).ids == want, text
    assert tok.decode(want) == text
  assert tok.token_to_id('<|endoftext|>') == len(ranks) and tok.token_to_id('<|extra_204|>') == len(ranks) + 207
  # A Qwen MoE-LLaVA folder ships qwen.tiktoken: the converted folder gets a tokenizer.json that our generator uses.
  from moiie_jax.data.conversations import TextTokenizer
  src, vision_dir, _, _ = _moe_llava('qwen', tmp_path)
  _tiny_tiktoken(os.path.join(src, 'qwen.tiktoken'))
  out = str(tmp_path / 'ours')
  assert convert_cli.main(['--moe-llava', src, '--vision', vision_dir, '--out', out]) == 0
  text_tok = TextTokenizer.from_pretrained(out)
  assert text_tok.eos_token == '<|endoftext|>' and text_tok.encode('The cat') == tok.encode('The cat').ids
  with pytest.raises(Exception, match='qwen.tiktoken:1'):
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'qwen.tiktoken').write_text('not-base64!! x\n')
    tiktoken_bpe.read_ranks(str(tmp_path / 'bad' / 'qwen.tiktoken'))


def test_a_folder_without_its_tower_takes_it_from_vision(tmp_path, capsys):
  src, vision_dir, _, _ = _moe_llava('stablelm', tmp_path)
  full = str(tmp_path / 'full')
  assert convert_cli.main(['--moe-llava', src, '--vision', vision_dir, '--out', full]) == 0
  bare = _edit(src, tmp_path, 'bare', drop='model.image_tower.')
  out = str(tmp_path / 'from-vision')
  assert convert_cli.main(['--moe-llava', bare, '--vision', vision_dir, '--out', out]) == 0
  (_, a, _), (_, b, meta) = folder.load_folder(full), folder.load_folder(out)
  for (p, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a, nnx.Param)), nnx.to_flat_state(nnx.state(b, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(p))
  assert any('vision tower weights from' in n for n in meta['notes'])
  capsys.readouterr()
  assert convert_cli.main(['--moe-llava', bare, '--out', str(tmp_path / 'none')]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'tiny-clip' in err[0] and '--vision' in err[0], err
