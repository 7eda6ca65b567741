"""The chat engine behind the web app and its JSON endpoint, with no UI toolkit: load a checkpoint folder, answer a
turn of a conversation as a stream, work out the routing of the last answer and its prompt, and check JSON requests.

One model at a time; generation holds a lock a chunk of tokens at a time, so the page and the endpoint take turns
and a stopped answer (its stream simply dropped) never keeps the lock.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import threading
import time
from typing import Any, Iterator

import numpy as np
from PIL import Image

from moiie_jax.data import images
from moiie_jax.evaluate import token_routing as token_routing_lib
from moiie_jax.infer.generate import Generator, Prompt, PromptError, SamplingConfig


class CheckpointError(ValueError):
  """A folder that is not a loadable moiie_jax checkpoint; the message names it."""


class RequestError(ValueError):
  """A JSON request that cannot be answered (HTTP 400); the message names the field."""


@dataclasses.dataclass
class Reply:
  """A turn's answer so far: text, its token ids (EOS excluded), and what the routing view needs."""
  question: str
  text: str = ''
  tokens: list[int] = dataclasses.field(default_factory=list)
  prompt_ids: np.ndarray | None = None
  pixels: np.ndarray | None = None
  image: Image.Image | None = None
  seconds: float = 0.0


@dataclasses.dataclass
class RoutingData:
  """The routing of one answer and its prompt: `routing` (None for a dense model), each token's text and kind."""
  routing: token_routing_lib.TokenRouting | None
  pieces: list[str]
  kinds: list[str]
  image: Image.Image | None


def read_image(source: Any, name: str = 'image') -> Image.Image:
  """An RGB image from a path or encoded bytes; PromptError naming it if unreadable."""
  try:
    return images.load_image(source, name)
  except images.ImageError as e:
    raise PromptError(str(e)) from e


class ChatEngine:
  """A checkpoint's Generator plus what the chat needs around it."""

  def __init__(self, checkpoint: str | None = None, *, chunk: int = 1):
    self.chunk = chunk
    self.lock = threading.Lock()
    self.folder: str | None = None
    self.generator: Generator | None = None
    self._routing_model = None
    self.load_error: str | None = None  # why the last load failed (shown in the page), None after a good one
    if checkpoint:
      self.load(checkpoint)

  # ------------------------------------------------------------------------------------------------ checkpoint
  def load(self, folder: str) -> None:
    """Loads a converted-checkpoint folder; CheckpointError naming it (the model loaded before stays) if it is
    not one of ours."""
    try:
      self._load((folder or '').strip())
    except CheckpointError as e:
      self.load_error = str(e)
      raise
    self.load_error = None

  def _load(self, folder: str) -> None:
    if not folder:
      raise CheckpointError('checkpoint: no folder given')
    if not os.path.isdir(folder):
      raise CheckpointError(f'checkpoint {folder!r}: no such folder')
    for name in ('config.json', 'meta.json', 'params'):
      if not os.path.exists(os.path.join(folder, name)):
        raise CheckpointError(f'checkpoint {folder!r}: no {name}; expected a moiie_jax checkpoint folder (python -m '
                              f'moiie_jax.convert, or a training run\'s final/ folder)')
    try:
      generator = Generator.from_folder(folder, batch_size=1)
    except (ValueError, OSError, KeyError) as e:
      raise CheckpointError(f'checkpoint {folder!r}: cannot be loaded: {e}') from e
    with self.lock:
      self.folder, self.generator = folder, generator
      self._routing_model = token_routing_lib.routing_model(generator.model) if generator.cfg.llm.moe.is_moe else None

  def describe(self) -> str:
    if self.generator is None:
      return 'no checkpoint loaded'
    cfg = self.generator.cfg
    moe = cfg.llm.moe
    kind = (f'{moe.variant} MoE: {moe.n_vision} vision, {moe.n_shared} shared, {moe.n_language} language experts, '
            f'top-{moe.top_k}' if moe.is_moe else 'dense')
    template = self.generator.template.name if self.generator.template else 'none'
    return (f'{self.folder}: {cfg.vision.architecture} tower, {cfg.llm.num_hidden_layers}-layer decoder, {kind}; '
            f'template {template}, context {cfg.llm.max_position_embeddings} tokens')

  def _require(self) -> Generator:
    if self.generator is None:
      raise CheckpointError('no checkpoint loaded: give a checkpoint folder and press Load')
    return self.generator

  @property
  def num_moe_layers(self) -> int:
    cfg = self.generator.cfg if self.generator else None
    if cfg is None or not cfg.llm.moe.is_moe:
      return 0
    return len(token_routing_lib.moe_blocks(self._routing_model))

  # ------------------------------------------------------------------------------------------------ answering
  def stream(self, question: str, image: Image.Image | None, history: list[tuple[str, str]],
             max_new_tokens: int, sampling: SamplingConfig) -> Iterator[Reply]:
    """Yields the growing Reply to `question` (the image opens the conversation, LLaVA's layout). PromptError
    (empty message, prompt over the context, bad image) or CheckpointError before the first token."""
    gen = self._require()
    if not isinstance(question, str) or not question.strip():
      raise PromptError('message: the message is empty')
    if max_new_tokens < 1:
      raise PromptError(f'max_new_tokens={max_new_tokens}: expected >= 1')
    sampling.validate()
    ids, pixels = gen.encode(Prompt(question, image, tuple(history)), 'message')
    reply = Reply(question=question, prompt_ids=ids, pixels=pixels, image=image)
    t0 = time.perf_counter()
    it = gen.stream_tokens((ids, pixels), max_new_tokens, sampling, self.chunk)
    while True:
      with self.lock:  # a chunk at a time: a dropped stream never holds it
        step = next(it, None)
      if step is None:
        break
      reply.text, reply.tokens = step[0], list(step[1])
      reply.seconds = time.perf_counter() - t0
      yield reply

  def answer(self, question: str, image: Image.Image | None, history: list[tuple[str, str]],
             max_new_tokens: int, sampling: SamplingConfig) -> Reply:
    reply = Reply(question=question)
    for reply in self.stream(question, image, history, max_new_tokens, sampling):
      pass
    return reply

  # ------------------------------------------------------------------------------------------------ routing
  def routing(self, reply: Reply) -> RoutingData:
    """Where every token of the reply and its prompt went (the whole sequence run once, dropless)."""
    gen = self._require()
    ids = np.concatenate([reply.prompt_ids, np.asarray(reply.tokens, np.int32)]).astype(np.int32)
    is_image = ids == gen.cfg.image_token_id
    n_prompt = len(reply.prompt_ids)
    kinds = ['image' if is_image[i] else 'prompt' if i < n_prompt else 'answer' for i in range(len(ids))]
    pieces = ['' if is_image[i] else gen.tokenizer.decode([int(ids[i])], skip_special_tokens=False)
              for i in range(len(ids))]
    tr = None
    if self._routing_model is not None:
      with self.lock:
        tr = token_routing_lib.token_routing(self._routing_model, ids, reply.pixels)
    return RoutingData(routing=tr, pieces=pieces, kinds=kinds, image=reply.image)

  # ------------------------------------------------------------------------------------------------ JSON
  FIELDS = {'prompt': str, 'image': str, 'history': list, 'max_new_tokens': int, 'temperature': (int, float),
            'top_p': (int, float), 'top_k': int, 'seed': int, 'stop': list, 'routing': bool}

  def api_generate(self, request: Any) -> dict:
    """Answers a JSON request {"prompt", "image" (base64 of the file, or a data: URL; optional), "history"
    ([[question, answer], ...]), "max_new_tokens" (128), "temperature" (0: greedy), "top_p", "top_k", "seed",
    "stop", "routing" (false)}: {"answer", "tokens", "prompt_tokens", "new_tokens", "seconds"} plus, with routing,
    each token's top group averaged over the MoE layers. RequestError (-> HTTP 400) naming the field."""
    if not isinstance(request, dict):
      raise RequestError(f'request: expected a JSON object, got {type(request).__name__}')
    unknown = sorted(set(request) - set(self.FIELDS))
    if unknown:
      raise RequestError(f'request: unknown field {unknown[0]!r}; expected some of {", ".join(self.FIELDS)}')
    for key, kind in self.FIELDS.items():
      value = request.get(key)
      if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise RequestError(f'request field {key!r}: expected {getattr(kind, "__name__", "a number")}, got '
                           f'{type(value).__name__}')
    if 'prompt' not in request:
      raise RequestError('request: field "prompt" is missing')
    history = request.get('history') or []
    if not all(isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history):
      raise RequestError('request field "history": expected [[question, answer], ...] of strings')
    image = None
    if request.get('image'):
      data = request['image']
      data = data.split(',', 1)[1] if data.startswith('data:') else data
      try:
        raw = base64.b64decode(data, validate=True)
      except (binascii.Error, ValueError) as e:
        raise RequestError(f'request field "image": expected the image file in base64 ({e})') from e
      try:
        image = read_image(raw, 'request field "image"')
      except PromptError as e:
        raise RequestError(str(e)) from e
    sampling = SamplingConfig(temperature=float(request.get('temperature', 0.0)),
                              top_p=float(request.get('top_p', 1.0)), top_k=int(request.get('top_k', 0)),
                              seed=int(request.get('seed', 0)), stop=tuple(request.get('stop') or ()))
    try:
      reply = self.answer(request['prompt'], image, [tuple(t) for t in history],
                          int(request.get('max_new_tokens', 128)), sampling)
    except (PromptError, ValueError) as e:
      raise RequestError(str(e)) from e
    out = {'answer': reply.text, 'tokens': reply.tokens, 'prompt_tokens': int(len(reply.prompt_ids)),
           'new_tokens': len(reply.tokens), 'seconds': round(reply.seconds, 3)}
    if request.get('routing'):
      data = self.routing(reply)
      tr = data.routing
      out['routing'] = None if tr is None else {
          'layers': list(tr.layers), 'experts': list(tr.experts), 'groups': list(tr.groups),
          'tokens': [{'text': p, 'kind': k, 'top_group': g, 'group_weights': [round(float(x), 4) for x in w]}
                     for p, k, g, w in zip(data.pieces, data.kinds, tr.top_groups(), tr.group_weights())]}
    return out
