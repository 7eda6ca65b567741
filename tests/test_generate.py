"""Generation: cached decoding equals a full forward pass, greedy decoding equals HF LLaVA's `generate`, batches
equal single prompts, EOS and context limits stop rows, the sampler's filters, and bad prompts name themselves.

The tiny MoIIE model and tokenizer here are shared with test_evaluate_cli.py (same shapes, so the same programs).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from moiie_jax.data import conversations
from moiie_jax.infer import generate as gen
from moiie_jax.models import config as config_lib
from moiie_jax.models.lvlm import LVLM

TOL = 1e-4
VOCAB = 300  # the test tokenizer's size (its `<image>` placeholder is added after, in memory)
IMAGE = 16  # 16x16 pixels, 8x8 patches: 4 image tokens


def tiny_config(vocab: int = VOCAB, variant: str = 'moiie') -> config_lib.LVLMConfig:
  """A 2-layer MoIIE LVLM (layer 1 is the expert layer) with a 1-layer SigLIP tower."""
  moe = config_lib.MoEConfig(variant=variant, n_vision=1, n_shared=2, n_language=1, top_k=2)
  llm = config_lib.LLMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             initializer_range=0.1, eos_token_id=2, moe=moe)
  vision = config_lib.VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=IMAGE, patch_size=8)
  return config_lib.LVLMConfig(llm=llm, vision=vision, image_token_id=vocab)


def write_tokenizer(folder: str) -> str:
  """A byte-level BPE tokenizer of exactly VOCAB tokens (`<pad>` 0, `<s>` 1, `</s>` 2), trained on a few lines."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=['<pad>', '<s>', '</s>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ['USER: What is in the image? ASSISTANT: A red square on a blue background.',
            'Is there a circle in the image? Answer the question using a single word or phrase.',
            'yes no red green blue square circle triangle color shape'] * 20
  tok.train_from_iterator(corpus, trainer)
  assert tok.get_vocab_size() == VOCAB
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, 'tokenizer.json'))
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump({'eos_token': '</s>', 'bos_token': '<s>', 'pad_token': '<pad>', 'add_bos_token': True}, f)
  return folder


@pytest.fixture(scope='module')
def model():
  return LVLM(tiny_config(), rngs=nnx.Rngs(0))


def _prompt(rs, n: int, image: bool, vocab: int = VOCAB, image_id: int = VOCAB, n_image: int = 4, at: int = 1):
  ids = rs.randint(3, vocab, n).astype(np.int32)
  if image:
    ids[at:at + n_image] = image_id
  return ids


@pytest.fixture(scope='module')
def batch():
  """Three rows of different lengths (left-padded): image, text only, image."""
  rs = np.random.RandomState(0)
  seqs = [_prompt(rs, 9, True), _prompt(rs, 5, False), _prompt(rs, 14, True)]
  pixels = rs.randn(3, IMAGE, IMAGE, 3).astype(np.float32)
  return seqs, pixels


@pytest.fixture(scope='module')
def batch_out(model, batch):
  seqs, pixels = batch
  ids, mask = gen.left_pad(seqs, 0)
  return gen.generate_ids(model, ids, mask, pixels, max_new_tokens=6, return_logits=True)


def test_cached_decoding_matches_full_forward(model, batch, batch_out):
  """Every step's logits (prefill + cache) equal a full forward pass over prompt + tokens so far, per row."""
  seqs, pixels = batch
  tokens, logits = batch_out
  assert tokens.shape == (3, 6) and logits.shape == (3, 6, VOCAB)
  full = [np.concatenate([s, t]) for s, t in zip(seqs, tokens)]
  # Right padding never reaches earlier positions (causal, dropless experts): one reference program for all rows.
  length = max(len(f) for f in full)
  ids = np.stack([np.pad(f, (0, length - len(f))) for f in full])
  mask = np.stack([np.arange(length) < len(f) for f in full]).astype(np.int32)
  has_image = np.array([True, False, True])
  ref = nnx.jit(lambda m, i, p, a: m(i, p, attention_mask=a).logits)(
      model, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
  for r, s in enumerate(seqs):
    want = np.asarray(ref[r, len(s) - 1:len(s) + 5])  # the logits that predict tokens 0..5
    diff = np.abs(want - logits[r]).max()
    assert diff <= TOL, f'row {r} (image={has_image[r]}): cached logits differ by {diff}'
    np.testing.assert_array_equal(tokens[r], want.argmax(-1))


def test_scanned_layers_decode():
  """With cfg.scan_layers (nnx.scan over layers inside the decoding while_loop) cached decoding is exact too."""
  import dataclasses
  cfg = tiny_config()
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, scan_layers=True))
  scanned = LVLM(cfg, rngs=nnx.Rngs(2))
  rs = np.random.RandomState(3)
  prompt = _prompt(rs, 11, True)[None]
  pixels = rs.randn(1, IMAGE, IMAGE, 3).astype(np.float32)
  tokens, logits = gen.generate_ids(scanned, prompt, None, pixels, max_new_tokens=4, return_logits=True)
  full = np.concatenate([prompt[0], tokens[0]])[None]
  ref = nnx.jit(lambda m, i, p: m(i, p).logits)(scanned, jnp.asarray(full), jnp.asarray(pixels))
  np.testing.assert_allclose(logits[0], np.asarray(ref[0, 10:14]), atol=TOL)


def test_batched_equals_one_by_one(model, batch, batch_out):
  seqs, pixels = batch
  tokens, logits = batch_out
  for r, s in enumerate(seqs):
    one, one_logits = gen.generate_ids(model, s[None], None, pixels[r:r + 1], max_new_tokens=6, return_logits=True)
    np.testing.assert_array_equal(one[0], tokens[r], err_msg=f'row {r}')
    assert np.abs(one_logits[0] - logits[r]).max() <= TOL


def test_eos_and_context_limit_stop_rows(model, batch, batch_out):
  seqs, pixels = batch
  tokens, _ = batch_out
  ids, mask = gen.left_pad(seqs, 0)
  eos = int(tokens[0, 2])
  out = gen.generate_ids(model, ids, mask, pixels, max_new_tokens=6, eos_ids=[eos], pad_id=0, return_logits=True)[0]
  for r in range(3):
    hits = np.flatnonzero(tokens[r] == eos)
    end = hits[0] + 1 if hits.size else 6
    np.testing.assert_array_equal(out[r, :end], tokens[r, :end])
    assert (out[r, end:] == 0).all(), f'row {r} went on after EOS: {out[r]}'
  # A context of 17 positions leaves row 2 (14 tokens) 3 new tokens; the others are unaffected.
  out = gen.generate_ids(model, ids, mask, pixels, max_new_tokens=6, max_positions=17, return_logits=True)[0]
  np.testing.assert_array_equal(out[2, :3], tokens[2, :3])
  assert (out[2, 3:] == 0).all()
  np.testing.assert_array_equal(out[:2], tokens[:2])


def test_greedy_matches_hf_llava(tmp_path):
  """A tiny random LlavaForConditionalGeneration, converted, generates HF's greedy tokens (left-padded batch)."""
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
  from moiie_jax.convert import sources
  vocab = 96
  torch.manual_seed(0)
  hf_cfg = LlavaConfig(
      text_config=LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
      vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=IMAGE, patch_size=8, projection_dim=16),
      image_token_id=vocab - 1, vision_feature_layer=-2)
  hf = LlavaForConditionalGeneration(hf_cfg).eval()
  hf.save_pretrained(tmp_path / 'llava')
  cfg, state = sources.from_llava(str(tmp_path / 'llava'))
  assert cfg.num_image_tokens == 4 and cfg.image_token_id == vocab - 1
  ours = nnx.merge(nnx.split(nnx.eval_shape(lambda: LVLM(cfg, rngs=nnx.Rngs(0))))[0], state)
  rs = np.random.RandomState(1)
  seqs = [_prompt(rs, n, True, vocab - 1, vocab - 1) for n in (9, 13)]
  ids, mask = gen.left_pad(seqs, 0)
  pixels = torch.randn(2, 3, IMAGE, IMAGE)
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                      pixel_values=pixels, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
  want = out[:, ids.shape[1]:].numpy()
  got = gen.generate_ids(ours, ids, mask, pixels.permute(0, 2, 3, 1).numpy(), max_new_tokens=10)
  np.testing.assert_array_equal(got, want)


def test_sampler_filters():
  logits = jnp.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 512, np.float32)))
  keys = jax.random.PRNGKey(0)

  def draw(top_k: int = 0, top_p: float | None = None) -> set:
    out = gen.sample_logits(logits, keys, jnp.float32(1.0), jnp.float32(top_p or 1.0), greedy=False, top_k=top_k,
                            use_top_p=top_p is not None)
    return set(np.asarray(out).tolist())

  assert draw() == {0, 1, 2, 3}
  assert draw(top_k=1) == {0}
  assert draw(top_k=2) == {0, 1}
  assert draw(top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.8
  assert draw(top_p=0.1) == {0}  # the most likely token always stays
  assert draw(top_p=0.81) == {0, 1, 2}
  assert (np.asarray(gen.sample_logits(logits, keys, 1.0, 1.0, greedy=True, top_k=0, use_top_p=False)) == 0).all()
  with pytest.raises(ValueError, match='top_p'):
    gen.SamplingConfig(temperature=1.0, top_p=0.0).validate()


def test_bucket_length():
  assert [gen.bucket_length(n) for n in (1, 16, 17, 33, 64, 65, 600)] == [16, 16, 32, 64, 64, 128, 640]


def test_bad_prompts_name_the_item(model, tmp_path):
  tok = conversations.TextTokenizer.from_pretrained(write_tokenizer(str(tmp_path / 'tok')))
  g = gen.Generator(model, model.cfg, tok, conversations.get_template('demo'), batch_size=2)
  bad = tmp_path / 'bad.png'
  bad.write_bytes(b'not a png')
  cases = [(gen.Prompt('  '), 'empty'),
           (gen.Prompt('What?', str(tmp_path / 'missing.png')), 'not found'),
           (gen.Prompt('What?', str(bad)), 'cannot decode'),
           (gen.Prompt('red ' * 200), 'longer than'),
           (gen.Prompt('<image> What?'), 'no image was given'),
           (gen.Prompt('What?', np.zeros((3, 3), np.float32)), 'expected uint8')]
  results = g.generate_results([p for p, _ in cases], 4, names=[f'item {i}' for i in range(len(cases))])
  for i, ((_, message), r) in enumerate(zip(cases, results)):
    assert r.text is None and f'item {i}' in r.error and message in r.error, r
  with pytest.raises(gen.PromptError, match='prompt 0: the prompt is empty'):
    g.generate([gen.Prompt('')])
  raw = gen.Generator(model, model.cfg, tok, None)
  with pytest.raises(gen.PromptError, match='has no <image>'):
    raw.encode(gen.Prompt('What?', np.zeros((IMAGE, IMAGE, 3), np.uint8)))
  # The demo template wraps the question and expands the image into 4 image tokens after BOS.
  ids, pixels = g.encode(gen.Prompt('What?', np.zeros((IMAGE, IMAGE, 3), np.uint8)))
  assert ids[0] == tok.bos_id and (ids == VOCAB).sum() == 4 and pixels.shape == (IMAGE, IMAGE, 3)
  assert g.eos_ids == (2,)


@pytest.mark.parametrize('sampling', [gen.SamplingConfig(), gen.SamplingConfig(temperature=0.8, top_p=0.9, seed=3)])
def test_stream_yields_generate_ids_tokens_as_they_come(model, batch, sampling):
  seqs, pixels = batch
  ids, mask = gen.left_pad(seqs, 0)
  kw = dict(max_new_tokens=7, sampling=sampling, eos_ids=(5,), rng=jax.random.PRNGKey(11))
  whole = gen.generate_ids(model, ids, mask, pixels, **kw)
  before = gen._decode._cache_size()  # pylint: disable=protected-access
  for chunk in (1, 3):
    pieces = list(gen.stream_ids(model, ids, mask, pixels, chunk=chunk, **kw))
    assert all(p.shape[1] <= chunk for p in pieces)
    got = np.concatenate(pieces, axis=1)
    np.testing.assert_array_equal(got, whole[:, :got.shape[1]])
    assert (whole[:, got.shape[1]:] == 0).all()  # it stopped only when every row had ended
  assert gen._decode._cache_size() == before  # pylint: disable=protected-access  (generate_ids' own program)


def test_generator_stream_ends_with_generate_text(model, tmp_path):
  tok = conversations.TextTokenizer.from_pretrained(write_tokenizer(str(tmp_path / 'tok')))
  g = gen.Generator(model, model.cfg, tok, conversations.get_template('demo'), batch_size=2)
  prompt = gen.Prompt('What is in the image?', np.full((IMAGE, IMAGE, 3), 128, np.uint8))
  for sampling in (gen.SamplingConfig(), gen.SamplingConfig(temperature=1.0, seed=4)):
    texts = list(g.stream(prompt, max_new_tokens=8, sampling=sampling))
    assert texts and texts[-1] == g.generate([prompt], max_new_tokens=8, sampling=sampling)[0]
    assert len(texts) >= 1 and all(isinstance(t, str) for t in texts)
