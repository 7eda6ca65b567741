"""Blockwise attention (bounded score memory for long training sequences; causal blocks that skip the later keys)
equals whole-sequence attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moiie_jax.models import attention as attn
from moiie_jax.models import presets
from moiie_jax.models.decoder import CausalLM


@pytest.mark.parametrize('kind,t,chunk,window', [
    ('chunked', 20, 8, None), ('chunked', 24, 8, 5), ('chunked', 16, 16, None),
    ('causal', 20, 2, None), ('causal', 23, 3, 5), ('causal', 16, 1, None), ('causal', 5, 8, None)])
def test_blockwise_attention_equals_whole_sequence(kind, t, chunk, window):
  """chunk: the block size (chunked) or the number of blocks (causal)."""
  b, n, g, h = 2, 4, 2, 8
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, g, t, h)), jnp.float32) for _ in range(2))
  valid = jnp.asarray(np.arange(t)[None, :] >= np.array([[0], [3]]))  # row 1 left-padded
  mask = attn.attention_mask(jnp.arange(t, dtype=jnp.int32), valid, window)

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(jnp.where(valid[:, :, None, None], out, 0.0) * jnp.cos(out)), out

  whole = lambda q, k, v: attn.dot_product_attention(q, k, v, mask, h ** -0.5)
  fn = attn.chunked_attention if kind == 'chunked' else attn.causal_block_attention
  blocks = lambda q, k, v: fn(q, k, v, mask, h ** -0.5, chunk)
  # Jitted: one compile per function instead of one per eager op (the eager form took 4-17 s per case).
  grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True))
  (_, want), dwant = grad(whole)(q, k, v)
  (_, got), dgot = grad(blocks)(q, k, v)
  # Chunks keep every key, so every query matches; a causal block's fully masked query (row 1's left padding)
  # averages over its block's keys instead: never meaningful, not compared.
  keep = np.ones(valid.shape, bool) if kind == 'chunked' else np.asarray(valid)
  np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], atol=1e-5)
  for a, e in zip(dgot, dwant):
    np.testing.assert_allclose(a, e, atol=1e-5)


@pytest.mark.parametrize('field,value', [('attention_chunk', 16), ('attention_causal_blocks', 3)])
def test_decoder_logits_do_not_depend_on_the_attention_blocks(field, value):
  cfg = dataclasses.replace(presets.LLM_PRESETS['tiny-llama'], attention_chunk=0, attention_causal_blocks=1)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
  mask = jnp.ones_like(ids).at[1, :7].set(0).at[0, 33:].set(0)  # row 1 left-padded, row 0 right-padded
  whole = CausalLM(cfg, rngs=nnx.Rngs(0))
  blocked = nnx.merge(nnx.graphdef(CausalLM(dataclasses.replace(cfg, **{field: value}), rngs=nnx.Rngs(0))),
                      nnx.state(whole))
  # Jitted: one compile per model instead of one per eager op.
  logits = nnx.jit(lambda model, ids, mask: model(ids, attention_mask=mask).logits)
  want, got = logits(whole, ids, mask), logits(blocked, ids, mask)
  # Chunks compare at every token; causal blocks at the real ones (see above).
  keep = np.ones(mask.shape, bool) if field == 'attention_chunk' else np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], atol=1e-4)


def test_attention_causal_blocks_is_checked():
  from moiie_jax.models.config import ConfigError
  with pytest.raises(ConfigError, match='attention_causal_blocks=0'):
    dataclasses.replace(presets.LLM_PRESETS['tiny-llama'], attention_causal_blocks=0).validate()
