"""Blockwise attention (bounded score memory for long training sequences) equals whole-sequence attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moiie_jax.models import attention as attn
from moiie_jax.models import presets
from moiie_jax.models.decoder import CausalLM


@pytest.mark.parametrize('t,chunk,window', [(20, 8, None), (24, 8, 5), (16, 16, None)])
def test_chunked_attention_equals_whole_sequence(t, chunk, window):
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
  blocks = lambda q, k, v: attn.chunked_attention(q, k, v, mask, h ** -0.5, chunk)
  (_, want), dwant = jax.value_and_grad(lambda *a: loss(whole, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (_, got), dgot = jax.value_and_grad(lambda *a: loss(blocks, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-5)
  for a, e in zip(dgot, dwant):
    np.testing.assert_allclose(a, e, atol=1e-5)


def test_decoder_logits_do_not_depend_on_the_attention_chunk():
  cfg = dataclasses.replace(presets.LLM_PRESETS['tiny-llama'], attention_chunk=0)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
  mask = jnp.ones_like(ids).at[1, :7].set(0)
  whole = CausalLM(cfg, rngs=nnx.Rngs(0))
  chunked = nnx.merge(nnx.graphdef(CausalLM(dataclasses.replace(cfg, attention_chunk=16), rngs=nnx.Rngs(0))),
                      nnx.state(whole))
  want = whole(ids, attention_mask=mask).logits
  got = chunked(ids, attention_mask=mask).logits
  np.testing.assert_allclose(got, want, atol=1e-4)
