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


@pytest.mark.parametrize('g, t, window', [(2, 12, None), (4, 9, 4), (1, 3, None)])
def test_hand_written_backward_equals_autodiff_of_plain_attention(g, t, window):
  """The custom VJP against autodiff of the textbook formula (K/V repeated per query head), with a left-padded
  row whose padding queries see no key and still receive a cotangent (their gradients must be 0, as the mask's
  select gives), a sliding window, grouped heads, and the decoding layout (t = 3: R * T < H)."""
  b, n, h = 2, 4, 16
  rng = np.random.default_rng(g + t)
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, g, t, h)), jnp.float32) for _ in range(2))
  valid = jnp.asarray(np.arange(t)[None, :] >= np.array([[0], [2]]))
  mask = attn.attention_mask(jnp.arange(t, dtype=jnp.int32), valid, window)
  w = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)  # a cotangent on every query, padding too

  def plain(q, k, v):
    kr, vr = (jnp.repeat(x, n // g, axis=1) for x in (k, v))  # [B, N, S, H]
    s = jnp.einsum('btnh,bnsh->bnts', q, kr) * h ** -0.5
    s = jnp.where(mask[:, None], s, jnp.finfo(jnp.float32).min)
    return jnp.einsum('bnts,bnsh->btnh', jax.nn.softmax(s, axis=-1), vr)

  ours = lambda q, k, v: attn.dot_product_attention(q, k, v, mask, h ** -0.5)
  want, dwant = jax.value_and_grad(lambda *a: jnp.sum(plain(*a) * w), argnums=(0, 1, 2))(q, k, v)
  got, dgot = jax.value_and_grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, e in zip(dgot, dwant):
    np.testing.assert_allclose(a, e, atol=2e-5)
  assert np.all(np.asarray(dgot[0])[1, :2] == 0)  # padding queries: no gradient


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
