"""Text generation for the LVLM: prefill, then KV-cache decoding in a jitted while_loop; batched, left-padded, bucketed.

    gen = Generator.from_folder('ckpt/phi3_moiie', batch_size=8)
    gen.generate([Prompt('What is in the image?', image='cat.jpg')], max_new_tokens=64)  # -> ['A cat ...']

Two levels:
  generate_ids  token arrays in, token arrays out. Two jitted programs, called back to back on the device: the
                prefill over the left-padded prompt (one per batch size, prompt bucket and new-token bucket), then
                a `lax.while_loop` of one-token steps against the KV cache (donated) that ends when every row has
                produced an EOS or used its budget (one per batch, buckets and sampler kind). `stream_ids` runs the
                same loop in chunks (its stop step is an argument), yielding tokens as they come.
  Generator     text in, text out (`stream` yields the growing answer): chat template, `<image>` expansion, image loading, batches of a fixed size,
                per-item errors, and stop strings (checked on the host after decoding, since the loop runs on the
                device).

Compilation: prompts are padded on the left up to `bucket_length(T)`, the new-token budget up to a multiple of
`NEW_TOKEN_STEP`, and a Generator pads its last batch up to its batch size, so an evaluation compiles a handful of
programs rather than one per prompt. Extra left padding is exact: padded slots are masked out and positions
count real tokens only (the decoder's cache convention).

Routing is deterministic: routers pick their top-k without noise and, by default, MoE layers run dropless
(`capacity_factor=0.0`), so an answer does not depend on the other prompts in its batch.

B batch, T prompt tokens (bucketed), S cache slots (T + new-token bucket), V vocabulary, N new-token bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moiie_jax.models.config import LVLMConfig
from moiie_jax.models.lvlm import LVLM

IMAGE_PLACEHOLDER = '<image>'
NEW_TOKEN_STEP = 64  # the new-token budget is compiled in multiples of this
MAX_EOS_IDS = 8  # EOS ids travel as a fixed-size array (padded with -1) so they never change the program


class PromptError(ValueError):
  """A prompt cannot be generated from (empty, too long, a bad or missing image); the message names the item."""


# -------------------------------------------------------------------------------------------------- sampling
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is picked. temperature <= 0 is greedy (argmax); top_k = 0 and top_p = 1 disable those
  filters. `stop` strings end an answer (cut on the host after decoding)."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  stop: tuple[str, ...] = ()

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0

  def validate(self) -> None:
    if not 0 < self.top_p <= 1:
      raise ValueError(f'SamplingConfig.top_p={self.top_p}: expected a value in (0, 1]')
    if self.top_k < 0:
      raise ValueError(f'SamplingConfig.top_k={self.top_k}: expected >= 0 (0 disables top-k)')
    if any(not isinstance(s, str) or not s for s in self.stop):
      raise ValueError(f'SamplingConfig.stop={self.stop!r}: expected non-empty strings')


def sample_logits(logits_bv: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  greedy: bool, top_k: int, use_top_p: bool) -> jax.Array:
  """Next tokens int32[B] from logits float32[B, V].

  Greedy takes the argmax (the first one on ties, as torch does). Otherwise logits are divided by `temperature`,
  then tokens outside the top_k and outside the smallest set whose probability reaches top_p are removed (the
  most likely token always stays), and one token is drawn.
  """
  if greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  x = logits_bv.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k > 0:
    kth = jax.lax.top_k(x, min(top_k, x.shape[-1]))[0][:, -1:]  # [B, 1]
    x = jnp.where(x < kth, neg, x)
  if use_top_p:
    desc = -jnp.sort(-x, axis=-1)  # [B, V], descending
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = before < top_p
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)  # smallest kept logit, [B, 1]
    x = jnp.where(x < cutoff, neg, x)
  return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)


# -------------------------------------------------------------------------------------------------- shapes
def bucket_length(n: int, step: int = 64, minimum: int = 16) -> int:
  """The compiled length for n tokens: the smallest of minimum, 2 * minimum, ... up to `step`, then multiples of
  `step`, that holds n. Bounds the number of programs while wasting at most `step` slots on long prompts."""
  if n < 1:
    raise ValueError(f'bucket_length: n={n}, expected >= 1')
  b = minimum
  while b < min(n, step):
    b *= 2
  return b if n <= b else -(-n // step) * step


def left_pad(seqs: Sequence[np.ndarray], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads int token sequences: (input_ids int32[B, L], attention_mask int32[B, L]), L = `length` or the
  longest sequence."""
  longest = max(len(s) for s in seqs)
  length = longest if length is None else length
  if length < longest:
    raise ValueError(f'left_pad: length={length} is shorter than the longest sequence ({longest} tokens)')
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    if len(s):
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = 1
  return ids, mask


def _check_left_padded(mask: np.ndarray) -> np.ndarray:
  """Row lengths int[B]; every row must be 0...0 1...1 with at least one 1."""
  lengths = mask.sum(axis=1)
  for i, row in enumerate(mask):
    n = int(lengths[i])
    if n == 0:
      raise ValueError(f'attention_mask: row {i} has no tokens')
    if not (row[-n:] == 1).all():
      raise ValueError(f'attention_mask: row {i} is not left-padded (expected 0...0 1...1, the prompt at the end)')
  return lengths


# -------------------------------------------------------------------------------------------------- the program
@functools.partial(jax.jit, static_argnames=('graphdef', 'num_new'))
def _prefill(graphdef, state, input_ids, prompt_mask, pixel_values, *, num_new: int):
  """input_ids, prompt_mask: int32[B, T] left-padded; pixel_values float32[B, H, W, C] or None.

  Returns (logits float32[B, V] of each row's last prompt token, the KV cache of S = T + num_new slots holding the
  prompt, the cache-wide attention mask int32[B, S])."""
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  b, t = input_ids.shape
  # The whole cache is marked real in advance: causality over slots hides the slots not written yet.
  mask_bs = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((b, num_new), jnp.int32)], axis=1)
  cache = lm.init_cache(b, t + num_new)
  embeds, modality = model.embed(input_ids, pixel_values)
  hidden, _, cache = lm.model(inputs_embeds=embeds, attention_mask=mask_bs, modality=modality, cache=cache)
  # Left padding puts every row's last prompt token in the last slot; only its logits are needed.
  return lm.logits(hidden[:, -1:])[:, 0], cache, mask_bs


def _start_carry(logits, cache, limits, pad_id: int, rng, num_new: int, return_logits: bool) -> dict:
  """The decoding loop's state before its first step (see `_decode`)."""
  b = logits.shape[0]
  carry = dict(i=jnp.zeros((), jnp.int32), tokens=jnp.full((b, num_new), pad_id, jnp.int32),
               # The carry is donated to the loop: the caller's key is copied, not consumed.
               done=jnp.asarray(limits) <= 0, logits=logits, cache=cache, rng=jnp.asarray(rng).copy())
  if return_logits:
    carry['all_logits'] = jnp.zeros((b, num_new, logits.shape[-1]), jnp.float32)
  return carry


@functools.partial(jax.jit, static_argnames=('graphdef', 'greedy', 'top_k', 'use_top_p'), donate_argnames=('carry',))
def _decode(graphdef, state, carry, mask_bs, limits, eos_ids, pad_id, temperature, top_p, stop, *, greedy: bool,
            top_k: int, use_top_p: bool):
  """Decoding steps after `_prefill`, from step carry['i'] until step `stop` (int32[]) or every row is done.

  carry: {i int32[], tokens int32[B, N] (pad_id after a row's end; N the cache's free slots), done bool[B],
  logits float32[B, V] to pick the next token from, cache, rng, and optionally all_logits float32[B, N, V]};
  limits int32[B] new tokens allowed per row; eos_ids int32[MAX_EOS_IDS] (-1 = unused). Returns the carry after
  the last step run: one program serves a whole answer at once and a stream of chunks (`stop` is dynamic), and the
  cache is updated in place (the carry is donated)."""
  b, num_new = carry['tokens'].shape
  prompt_len = jnp.sum(mask_bs, axis=1) - num_new  # [B] real prompt tokens
  # The weights ride in the carry, unchanged, so the body merges the model at its own trace level (nnx transforms
  # inside the model, the scan over layers, refuse variables from an outer trace).
  carry = dict(carry, state=state)
  stop = jnp.minimum(stop, num_new)

  def cond(c):
    return (c['i'] < stop) & ~jnp.all(c['done'])

  def body(c):
    i = c['i']
    rng, key = jax.random.split(c['rng'])
    tok = sample_logits(c['logits'], key, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    tok = jnp.where(c['done'], pad_id, tok)
    out = dict(c, i=i + 1, rng=rng, tokens=c['tokens'].at[:, i].set(tok))
    if 'all_logits' in c:
      out['all_logits'] = c['all_logits'].at[:, i].set(c['logits'])
    out['done'] = c['done'] | jnp.any(tok[:, None] == eos_ids[None, :], axis=1) | (i + 1 >= limits)
    # Decoding steps go straight to the LLM: a generated id is always text (HF looks it up in the embedding too).
    # Positions are given (the decoder's default, a cumsum over the whole cache, would cost O(S) or more per step).
    step = nnx.merge(graphdef, c['state']).language_model(tok[:, None], attention_mask=mask_bs, cache=c['cache'],
                                                     positions=(prompt_len + i)[:, None].astype(jnp.int32),
                                                     modality=jnp.zeros((b, 1), jnp.int32))
    out['logits'], out['cache'] = step.logits[:, 0], step.cache
    return out

  carry = jax.lax.while_loop(cond, body, carry)
  carry.pop('state')  # not an output: returning the weights would copy them
  return carry


@dataclasses.dataclass
class _Run:
  """What `_start` prepared: the decoding program's arguments and the loop state after the prompt."""
  graphdef: Any
  state: Any
  carry: dict
  args: tuple  # mask_bs, limits, eos_ids, pad_id, temperature, top_p
  static: dict  # greedy, top_k, use_top_p
  max_new_tokens: int
  prefill_s: float

  def step(self, stop: int) -> None:
    self.carry = _decode(self.graphdef, self.state, self.carry, *self.args, jnp.asarray(stop, jnp.int32),
                         **self.static)


def _start(model: LVLM, input_ids, attention_mask, pixel_values, *, max_new_tokens: int, sampling: SamplingConfig,
           eos_ids: Sequence[int], pad_id: int, rng, max_positions: int | None, return_logits: bool,
           wait: bool) -> _Run:
  """Checks the batch, pads it to its bucket, runs the prompt (`_prefill`) and sets up the decoding loop."""
  cfg: LVLMConfig = model.cfg
  sampling.validate()
  ids = np.asarray(input_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'input_ids: expected int[B, T], got {ids.dtype}{list(ids.shape)}')
  mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
  if mask.shape != ids.shape:
    raise ValueError(f'attention_mask: shape {list(mask.shape)} differs from input_ids {list(ids.shape)}')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens}: expected >= 1')
  if len(eos_ids) > MAX_EOS_IDS:
    raise ValueError(f'eos_ids: at most {MAX_EOS_IDS} ids, got {len(eos_ids)}')
  lengths = _check_left_padded(mask)
  n_image = ((ids == cfg.image_token_id) & (mask == 1)).sum(axis=1)
  for row, n in enumerate(n_image):
    if n not in (0, cfg.num_image_tokens):
      raise ValueError(f'input_ids: row {row} holds {n} image tokens (id {cfg.image_token_id}); expected 0 or '
                       f'{cfg.num_image_tokens} (the placeholder expanded to cfg.num_image_tokens copies)')
    if n and pixel_values is None:
      raise ValueError(f'input_ids: row {row} holds image tokens but pixel_values is None')
  if pixel_values is not None:
    v = cfg.vision
    want = (ids.shape[0], v.input_size, v.input_size, v.num_channels)
    if tuple(np.shape(pixel_values)) != want:
      raise ValueError(f'pixel_values: expected float32{list(want)} (channels last), got '
                       f'{list(np.shape(pixel_values))}')
  max_positions = cfg.llm.max_position_embeddings if max_positions is None else max_positions
  room = max_positions - lengths
  if (room < 1).any():
    row = int(np.argmin(room))
    raise ValueError(f'input_ids: row {row} has {int(lengths[row])} tokens; the context holds {max_positions}, '
                     f'which leaves no room for an answer')
  # Pad to the bucket on the left: the program is keyed on shapes, not on this batch's longest prompt.
  t = bucket_length(ids.shape[1])
  if t > ids.shape[1]:
    extra = t - ids.shape[1]
    ids = np.concatenate([np.full((ids.shape[0], extra), pad_id, ids.dtype), ids], axis=1)
    mask = np.concatenate([np.zeros((mask.shape[0], extra), np.int32), mask], axis=1)
  num_new = -(-max_new_tokens // NEW_TOKEN_STEP) * NEW_TOKEN_STEP
  limits = np.minimum(max_new_tokens, room).astype(np.int32)
  eos = np.full((MAX_EOS_IDS,), -1, np.int32)
  eos[:len(eos_ids)] = list(eos_ids)
  rng = jax.random.PRNGKey(sampling.seed) if rng is None else rng
  graphdef, state = nnx.split(model)
  t0 = time.perf_counter()
  logits, cache, mask_bs = _prefill(graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                                    None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32),
                                    num_new=num_new)
  if wait:
    jax.block_until_ready(logits)
  carry = _start_carry(logits, cache, limits, pad_id, rng, num_new, return_logits)
  args = (mask_bs, jnp.asarray(limits), jnp.asarray(eos), jnp.asarray(pad_id, jnp.int32),
          jnp.asarray(max(sampling.temperature, 1e-6), jnp.float32), jnp.asarray(sampling.top_p, jnp.float32))
  static = dict(greedy=sampling.greedy, top_k=int(sampling.top_k), use_top_p=sampling.top_p < 1.0)
  return _Run(graphdef, state, carry, args, static, max_new_tokens, time.perf_counter() - t0)


def generate_ids(model: LVLM, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                 pixel_values: np.ndarray | None = None, *, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), eos_ids: Sequence[int] = (), pad_id: int = 0,
                 rng: jax.Array | None = None, max_positions: int | None = None, return_logits: bool = False,
                 timings: dict | None = None):
  """Generates up to max_new_tokens tokens for each row of a left-padded batch.

  Args:
    model: the LVLM (weights loaded).
    input_ids: int32[B, T], left-padded, image placeholders already expanded (num_image_tokens copies of
      cfg.image_token_id in a row with an image, none in a row without).
    attention_mask: int32[B, T], 1 for real tokens, 0 for padding (left); None means no padding.
    pixel_values: float32[B, H, W, C] (rows without an image may hold anything), or None when no row has an image.
    max_new_tokens: the token budget per row.
    sampling: greedy by default (see SamplingConfig); `sampling.stop` is ignored here (text level).
    eos_ids: token ids that end a row (kept in the output; later positions hold pad_id).
    pad_id: the id used for padding, in the prompt and after a row's end.
    rng: a PRNG key for sampling; defaults to PRNGKey(sampling.seed).
    max_positions: the model's context (default cfg.llm.max_position_embeddings); a row stops when it is full.
    return_logits: also return the logits each token was picked from.
    timings: if a dict, filled with prefill_s and decode_s (wall seconds, prefill waited for) and steps.
  Returns:
    tokens int32[B, max_new_tokens] (numpy), and with return_logits also logits float32[B, max_new_tokens, V].
  """
  run = _start(model, input_ids, attention_mask, pixel_values, max_new_tokens=max_new_tokens, sampling=sampling,
               eos_ids=eos_ids, pad_id=pad_id, rng=rng, max_positions=max_positions, return_logits=return_logits,
               wait=timings is not None)
  t1 = time.perf_counter()
  run.step(run.carry['tokens'].shape[1])
  tokens = np.asarray(run.carry['tokens'])[:, :max_new_tokens]
  if timings is not None:
    timings.update(prefill_s=run.prefill_s, decode_s=time.perf_counter() - t1, steps=int(run.carry['i']))
  if return_logits:
    return tokens, np.asarray(run.carry['all_logits'])[:, :max_new_tokens]
  return tokens


def stream_ids(model: LVLM, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
               pixel_values: np.ndarray | None = None, *, max_new_tokens: int,
               sampling: SamplingConfig = SamplingConfig(), eos_ids: Sequence[int] = (), pad_id: int = 0,
               rng: jax.Array | None = None, max_positions: int | None = None, chunk: int = 1) -> Iterator[np.ndarray]:
  """`generate_ids` as a stream: yields int32[B, n] (numpy) new tokens every `chunk` steps, as they are made, until
  every row is done or max_new_tokens; concatenated they are generate_ids' tokens (same sampling key sequence).
  The same two programs as generate_ids serve it (the stop step is an argument), and the KV cache stays on the
  device between chunks. Arguments as for generate_ids."""
  if chunk < 1:
    raise ValueError(f'chunk={chunk}: expected >= 1')
  run = _start(model, input_ids, attention_mask, pixel_values, max_new_tokens=max_new_tokens, sampling=sampling,
               eos_ids=eos_ids, pad_id=pad_id, rng=rng, max_positions=max_positions, return_logits=False,
               wait=False)
  done = 0
  while done < max_new_tokens:
    run.step(min(done + chunk, max_new_tokens))
    i = int(run.carry['i'])
    if i > done:
      yield np.asarray(run.carry['tokens'][:, done:i])
    if i < min(done + chunk, max_new_tokens) or bool(np.all(np.asarray(run.carry['done']))):
      return  # every row ended before the chunk did
    done = i


def inference_model(model: LVLM, capacity_factor: float | None = 0.0) -> LVLM:
  """The model with its MoE layers run at `capacity_factor` (0 = dropless; None = MoEConfig.eval_capacity_factor,
  else the training value). Same weights, shared not copied; a dense model is returned as it is."""
  cfg = model.cfg
  moe = cfg.llm.moe
  if not moe.is_moe:
    return model
  if capacity_factor is None:
    capacity_factor = moe.capacity_factor if moe.eval_capacity_factor is None else moe.eval_capacity_factor
  if capacity_factor == moe.capacity_factor:
    return model
  new_cfg = dataclasses.replace(cfg, llm=dataclasses.replace(
      cfg.llm, moe=dataclasses.replace(moe, capacity_factor=float(capacity_factor))))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LVLM(new_cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


# -------------------------------------------------------------------------------------------------- text level
@dataclasses.dataclass(frozen=True)
class Prompt:
  """One request. `image`: a path, a PIL image, uint8[H, W, 3] RGB pixels (preprocessed here), float32[H, W, C]
  pixel_values already preprocessed for the tower, or None. `history`: earlier (question, answer) turns of a chat;
  the image placeholder goes into the first question."""
  text: str
  image: Any = None
  history: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Result:
  """One answer, or the error that kept the prompt from being answered."""
  text: str | None
  error: str | None = None
  prompt_tokens: int = 0
  new_tokens: int = 0


def _read_generation_eos(folder: str) -> list[int]:
  path = os.path.join(folder, 'generation_config.json')
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    eos = json.load(f).get('eos_token_id')
  return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class Generator:
  """Answers Prompts with an LVLM: template, tokenizer, image preprocessing, fixed-size batches, stopping.

  template: a `ChatTemplate` (conversations.get_template) that wraps each question, or None to tokenise the text
  exactly as given (the tokenizer's BOS prefix included), `<image>` marking where the image goes.
  """

  def __init__(self, model: LVLM, cfg: LVLMConfig, tokenizer, template=None, *, image_config=None,
               batch_size: int = 8, capacity_factor: float | None = 0.0, eos_ids: Sequence[int] = (),
               stop: Sequence[str] = (), max_prompt_tokens: int | None = None):
    from moiie_jax.data import images  # pylint: disable=g-import-not-at-top
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size}: expected >= 1')
    self.cfg = cfg
    self.model = inference_model(model, capacity_factor)
    self.tokenizer = tokenizer
    self.template = template
    self.image_config = image_config or images.config_for_tower(cfg.vision.architecture, cfg.vision.input_size)
    self.batch_size = batch_size
    self.max_positions = cfg.llm.max_position_embeddings
    self.max_prompt_tokens = min(max_prompt_tokens or self.max_positions, self.max_positions - 1)
    ids = [tokenizer.eos_id, *eos_ids]
    cfg_eos = cfg.llm.eos_token_id
    ids += [] if cfg_eos is None else [cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos)
    self.stop = list(stop)
    if template is not None and not template.plain:
      end = template.end_token(tokenizer.eos_token)
      end_id = tokenizer.tokenizer.token_to_id(end)
      if end_id is not None and tokenizer.tokenizer.encode(end, add_special_tokens=False).ids == [end_id]:
        ids.append(end_id)
      else:
        self.stop.append(end)  # a multi-token end marker: cut on the host
    self.eos_ids = tuple(dict.fromkeys(int(i) for i in ids))[:MAX_EOS_IDS]

  @classmethod
  def from_folder(cls, folder: str, *, template: str | None = 'auto', **kwargs) -> Generator:
    """A Generator for a converted-checkpoint folder. template: 'auto' (meta.json's), a template name, or None /
    'none' (raw text)."""
    from moiie_jax.convert import folder as folder_lib  # pylint: disable=g-import-not-at-top
    from moiie_jax.data import conversations, images  # pylint: disable=g-import-not-at-top
    cfg, model, meta = folder_lib.load_folder(folder)
    tokenizer = conversations.TextTokenizer.from_pretrained(folder)
    if template == 'auto':
      template = meta.get('template')
      if template is None:
        raise ValueError(f'{folder}/meta.json: no "template"; pass a template name or none (raw prompts)')
    tmpl = None if template in (None, 'none') else conversations.get_template(template)
    kwargs.setdefault('image_config', images.config_for_tower(
        cfg.vision.architecture, cfg.vision.input_size, pad_to_square=bool(meta.get('pad_to_square', False))))
    kwargs['eos_ids'] = list(kwargs.get('eos_ids', ())) + _read_generation_eos(folder)
    return cls(model, cfg, tokenizer, tmpl, **kwargs)

  # ------------------------------------------------------------------------------------------------ encoding
  def pixels(self, image: Any, where: str = 'prompt') -> np.ndarray | None:
    """pixel_values float32[H, W, C] for a Prompt.image (see Prompt), or None."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from moiie_jax.data import images  # pylint: disable=g-import-not-at-top
    if image is None:
      return None
    cfg = self.image_config
    try:
      if isinstance(image, (str, os.PathLike)):
        return images.load_and_preprocess(image, cfg)
      if isinstance(image, Image.Image):
        return images.preprocess(image.convert('RGB'), cfg)
    except images.ImageError as e:
      raise PromptError(f'{where}: {e}') from e
    arr = np.asarray(image)
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 3:
      return images.preprocess(Image.fromarray(arr), cfg)
    want = (cfg.height, cfg.width, self.cfg.vision.num_channels)
    if arr.shape != want or not np.issubdtype(arr.dtype, np.floating):
      raise PromptError(f'{where}: image array {arr.dtype}{list(arr.shape)}: expected uint8[H, W, 3] RGB pixels or '
                        f'float32{list(want)} pixel_values')
    return arr.astype(np.float32)

  def encode(self, prompt: Prompt, where: str = 'prompt') -> tuple[np.ndarray, np.ndarray | None]:
    """(input_ids int32[T] with the image placeholder expanded, pixel_values float32[H, W, C] or None)."""
    from moiie_jax.data import conversations  # pylint: disable=g-import-not-at-top
    text = prompt.text
    if not isinstance(text, str) or not text.strip():
      raise PromptError(f'{where}: the prompt is empty')
    pixels = self.pixels(prompt.image, where)
    history = [tuple(turn) for turn in prompt.history]
    marks = text.count(IMAGE_PLACEHOLDER) + sum(q.count(IMAGE_PLACEHOLDER) for q, _ in history)
    if pixels is not None and marks == 0:
      if self.template is None:
        raise PromptError(f'{where}: an image was given but the raw prompt (template none) has no '
                          f'{IMAGE_PLACEHOLDER} marking where it goes')
      if history:  # LLaVA's layout: the image opens the conversation's first question
        history[0] = (f'{IMAGE_PLACEHOLDER}\n{history[0][0]}', history[0][1])
      else:
        text = f'{IMAGE_PLACEHOLDER}\n{text}'
      marks = 1
    if marks and pixels is None:
      raise PromptError(f'{where}: the prompt holds {IMAGE_PLACEHOLDER} but no image was given')
    if marks > 1:
      raise PromptError(f'{where}: the prompt holds {marks} {IMAGE_PLACEHOLDER} placeholders; one image per prompt')
    kw = dict(num_image_tokens=self.cfg.num_image_tokens, image_token_id=self.cfg.image_token_id)
    if self.template is None:
      raw = ''.join(q + a for q, a in history) + text
      ids = np.asarray(self.tokenizer.encode(raw), np.int32)
      is_image = ids == self.tokenizer.image_placeholder_id
      ids = np.repeat(np.where(is_image, self.cfg.image_token_id, ids), np.where(is_image, kw['num_image_tokens'],
                                                                                 1)).astype(np.int32)
    else:
      ids = conversations.encode_prompt(history, text, self.template, self.tokenizer, **kw)
    if len(ids) > self.max_prompt_tokens:
      raise PromptError(f'{where}: the prompt is {len(ids)} tokens (image included), longer than the '
                        f'{self.max_prompt_tokens} the model\'s context of {self.max_positions} leaves for a prompt')
    return ids, pixels

  def decode(self, tokens: np.ndarray, stop: Sequence[str] = ()) -> tuple[str, int]:
    """(answer text, number of generated tokens) from one row of generate_ids' output."""
    tokens = [int(t) for t in tokens]
    n = len(tokens)
    for k, tok in enumerate(tokens):
      if tok in self.eos_ids:
        n = k + 1
        tokens = tokens[:k]
        break
    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
    cut = min([text.find(s) for s in (*self.stop, *stop) if s in text], default=len(text))
    return text[:cut].strip(), n

  # ------------------------------------------------------------------------------------------------ generating
  def _encode_all(self, prompts: Sequence[Prompt], names: Sequence[str] | None) -> tuple[list, list]:
    names = [f'prompt {i}' for i in range(len(prompts))] if names is None else list(names)
    if len(names) != len(prompts):
      raise ValueError(f'{len(names)} names for {len(prompts)} prompts')
    results: list[Result | None] = [None] * len(prompts)
    encoded = []
    for i, prompt in enumerate(prompts):
      try:
        encoded.append((i, *self.encode(prompt, names[i])))
      except PromptError as e:
        results[i] = Result(text=None, error=str(e))
    return encoded, results

  def _run(self, encoded: list, results: list, max_new_tokens: int, sampling: SamplingConfig,
           batch_offset: int = 0) -> list[Result]:
    sampling.validate()
    blank = None
    for start in range(0, len(encoded), self.batch_size):
      chunk = encoded[start:start + self.batch_size]
      rows = chunk + [chunk[0]] * (self.batch_size - len(chunk))  # fixed batch size: one program per bucket
      ids, mask = left_pad([r[1] for r in rows], self.tokenizer.pad_id)
      pixels = None
      if any(r[2] is not None for r in rows):
        if blank is None:
          blank = np.zeros_like(next(r[2] for r in rows if r[2] is not None))
        pixels = np.stack([blank if r[2] is None else r[2] for r in rows])
      rng = jax.random.fold_in(jax.random.PRNGKey(sampling.seed), batch_offset + start // self.batch_size)
      tokens = generate_ids(self.model, ids, mask, pixels, max_new_tokens=max_new_tokens, sampling=sampling,
                            eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_id, rng=rng,
                            max_positions=self.max_positions)
      for (i, prompt_ids, _), row in zip(chunk, tokens):
        text, n = self.decode(row, sampling.stop)
        results[i] = Result(text=text, prompt_tokens=len(prompt_ids), new_tokens=n)
    return results

  def stream(self, prompt: Prompt, max_new_tokens: int = 128, sampling: SamplingConfig = SamplingConfig(),
             chunk: int = 1) -> Iterator[str]:
    """The answer to one prompt as it is generated: yields the text so far after every `chunk` new tokens (cut
    at EOS and the stop strings, as `generate` cuts it); the last text yielded is `generate([prompt])[0]`, token
    for token (the batch is laid out as `generate` lays it out, so sampling draws the same numbers). Raises
    PromptError for a bad prompt before generating."""
    for text, _ in self.stream_tokens(self.encode(prompt), max_new_tokens, sampling, chunk):
      yield text

  def stream_tokens(self, encoded: tuple[np.ndarray, np.ndarray | None], max_new_tokens: int = 128,
                    sampling: SamplingConfig = SamplingConfig(), chunk: int = 1) -> Iterator[tuple[str, list[int]]]:
    """`stream` for an already encoded prompt (`encode`'s ids and pixels): yields (text so far, the answer's token
    ids so far, EOS excluded)."""
    sampling.validate()
    ids, pixels = encoded
    batch, mask = left_pad([ids] * self.batch_size, self.tokenizer.pad_id)
    pixel_values = None if pixels is None else np.stack([pixels] * self.batch_size)
    rng = jax.random.fold_in(jax.random.PRNGKey(sampling.seed), 0)
    tokens: list[int] = []
    for new in stream_ids(self.model, batch, mask, pixel_values, max_new_tokens=max_new_tokens, sampling=sampling,
                          eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_id, rng=rng,
                          max_positions=self.max_positions, chunk=chunk):
      tokens += [int(t) for t in new[0]]
      text, n = self.decode(np.asarray(tokens), sampling.stop)
      yield text, tokens[:n - 1] if n and tokens[n - 1] in self.eos_ids else tokens[:n]

  def generate_results(self, prompts: Sequence[Prompt], max_new_tokens: int = 128,
                       sampling: SamplingConfig = SamplingConfig(), names: Sequence[str] | None = None,
                       batch_offset: int = 0) -> list[Result]:
    """One Result per prompt; a prompt that cannot be encoded gets Result(text=None, error=message) and the others
    go on. `names` label the items in error messages (default 'prompt <index>'). batch_offset: the index of the
    first batch in a longer job asked a batch per call, so that each batch samples with its own key."""
    encoded, results = self._encode_all(prompts, names)
    return self._run(encoded, results, max_new_tokens, sampling, batch_offset)

  def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 128,
               sampling: SamplingConfig = SamplingConfig()) -> list[str]:
    """Answers, one per prompt; raises PromptError (naming the prompt) before generating if any prompt is bad."""
    encoded, results = self._encode_all(prompts, None)
    errors = [r.error for r in results if r is not None]
    if errors:
      raise PromptError(errors[0] + (f' (and {len(errors) - 1} more bad prompts)' if len(errors) > 1 else ''))
    return [r.text for r in self._run(encoded, results, max_new_tokens, sampling)]
