"""Chat templates, tokenisation and loss masks: a validated Conversation -> (input_ids, labels).

Templates follow the MoIIE reference code (the Bunny codebase, `bunny/conversation.py`):

  phi3    (Bunny's `bunny`, sep2 `<|endoftext|>`, no BOS)
          "{system} USER: <image>\\n{q1} ASSISTANT: {a1}<|endoftext|>USER: {q2} ASSISTANT: {a2}<|endoftext|>"
  llama3  (Bunny's `llama`) the same layout with `<|end_of_text|>`, after the tokenizer's BOS `<|begin_of_text|>`
  plain   stage-1 captions: "<image>{caption}{eos}"; the human text is dropped (Bunny's preprocess_plain)
  demo    the synthetic demo: "USER: <image>\\n{q} ASSISTANT: {a}</s>" (no system prompt)

Labels (unshifted, HF convention) are -100 everywhere except on the assistant answers and the end token after each
answer, as Bunny's masking yields. Instead of Bunny's token counting (which depends on how a tokenizer splits a
trailing space), the whole prompt is tokenised once with character offsets and a token is a target when its span
overlaps an answer span; input_ids therefore equal what the HF tokenizer gives for the same text.

Images: the `<image>` placeholder is one atomic token (added to the tokenizer in memory when a checkpoint lacks it)
and is expanded after tokenisation to `num_image_tokens` copies of `image_token_id`, as HF LLaVA processors do.
Truncation never splits that block: an over-long sample is dropped, or its text tail is cut when the image block
and at least one answer token still fit (`truncation='cut_text'`); otherwise `RecordError('too_long')`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
import tokenizers

from moiie_jax.data.records import IMAGE_PLACEHOLDER, Conversation, RecordError

IGNORE_INDEX = -100
TRUNCATION_MODES = ('drop', 'cut_text')
BUNNY_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")


# ---------------------------------------------------------------------------------------------------- templates
@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Bunny's SeparatorStyle.TWO (`plain=False`) or PLAIN conversation layout."""
  name: str
  system: str = ''
  roles: tuple[str, str] = ('USER', 'ASSISTANT')
  sep: str = ' '  # after the system prompt and after each user message
  sep2: str | None = None  # after each answer (a loss target); None = the tokenizer's EOS token
  plain: bool = False

  def end_token(self, eos_token: str) -> str:
    return self.sep2 if self.sep2 is not None else eos_token

  def render(self, turns: Sequence[tuple[str, str]], eos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """Full training text and the character spans [start, end) of the loss targets (answers + end tokens)."""
    end = self.end_token(eos_token)
    if self.plain:
      if len(turns) != 1 or IMAGE_PLACEHOLDER not in turns[0][0]:
        raise ValueError(f'template {self.name!r} takes one (image, caption) turn; got {len(turns)} turn(s)'
                         f'{"" if turns and IMAGE_PLACEHOLDER in turns[0][0] else " without an image"}')
      text = IMAGE_PLACEHOLDER
      start = len(text)
      text += turns[0][1] + end
      return text, [(start, len(text))]
    text = self.system + self.sep if self.system else ''
    spans = []
    for question, answer in turns:
      text += f'{self.roles[0]}: {question}{self.sep}{self.roles[1]}: '
      start = len(text)
      text += answer + end
      spans.append((start, len(text)))
    return text, spans

  def render_prompt(self, turns: Sequence[tuple[str, str]], question: str, eos_token: str) -> str:
    """Generation prompt: earlier (question, answer) turns, then `question` and the open assistant role."""
    if self.plain:
      return IMAGE_PLACEHOLDER
    text = self.system + self.sep if self.system else ''
    for q, a in turns:
      text += f'{self.roles[0]}: {q}{self.sep}{self.roles[1]}: {a}{self.end_token(eos_token)}'
    # Bunny appends `ASSISTANT:` without the trailing space; the answer's first token carries it.
    return text + f'{self.roles[0]}: {question}{self.sep}{self.roles[1]}:'


TEMPLATES = {
    'phi3': ChatTemplate('phi3', system=BUNNY_SYSTEM, sep2='<|endoftext|>'),
    'llama3': ChatTemplate('llama3', system=BUNNY_SYSTEM, sep2='<|end_of_text|>'),
    # MoE-LLaVA's conv_phi / conv_stablelm / conv_qwen: the same text for all three backbones, no BOS.
    'moe_llava': ChatTemplate('moe_llava', system=BUNNY_SYSTEM, sep2='<|endoftext|>'),
    'plain': ChatTemplate('plain', roles=('', ''), sep='', plain=True),
    'demo': ChatTemplate('demo', sep2='</s>'),
}


def get_template(name: str, **overrides: Any) -> ChatTemplate:
  """A template by name (phi3 | llama3 | moe_llava | plain | demo); `overrides` replace fields, e.g. sep2='\\n'
  for Bunny's original plain captions."""
  if name not in TEMPLATES:
    raise ValueError(f'chat template {name!r}: expected one of {sorted(TEMPLATES)}')
  return dataclasses.replace(TEMPLATES[name], **overrides) if overrides else TEMPLATES[name]


# ---------------------------------------------------------------------------------------------------- tokenizer
def _token_content(value: Any) -> str | None:
  if isinstance(value, dict):
    return value.get('content')
  return value


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: cannot read ({e})') from e


class TextTokenizer:
  """A `tokenizers.Tokenizer` plus the special tokens a template needs (EOS, pad, optional BOS, `<image>`).

  Loaded from a checkpoint folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json), the files HF
  `save_pretrained` writes. transformers is not needed at run time.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_token: str, pad_token: str | None = None,
               bos_token: str | None = None, add_bos: bool | None = None, source: str = '<tokenizer>'):
    self.tokenizer = tokenizer
    self.source = source
    self.eos_token = eos_token
    self.eos_id = self.single_token_id(eos_token, 'eos_token')
    # LLaMA-3 (Bunny) pads with EOS; the collator only pads, attention_mask tells padding apart.
    self.pad_token = pad_token or eos_token
    self.pad_id = self.single_token_id(self.pad_token, 'pad_token')
    self.bos_token = bos_token
    self.bos_id = self.single_token_id(bos_token, 'bos_token') if bos_token else None
    # Tokens the tokenizer's post-processor puts in front of a text (BOS), found by encoding with and without it.
    with_special = tokenizer.encode('a', add_special_tokens=True).ids
    plain = tokenizer.encode('a', add_special_tokens=False).ids
    prefix = []
    for k in range(len(with_special) - len(plain) + 1):
      if with_special[k:k + len(plain)] == plain:
        prefix = with_special[:k]
        break
    if add_bos is not None:
      if add_bos and self.bos_id is None:
        raise ValueError(f'{source}: add_bos_token is true but there is no bos_token')
      prefix = [self.bos_id] if add_bos else []
    self.prefix_ids = list(prefix)
    placeholder = tokenizer.token_to_id(IMAGE_PLACEHOLDER)
    if placeholder is None or tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False).ids != [placeholder]:
      # Not an atomic token in this checkpoint: make it one in memory. Its id only marks the position; it becomes
      # the model's image_token_id when expanded.
      tokenizer.add_special_tokens([tokenizers.AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)])
      placeholder = tokenizer.token_to_id(IMAGE_PLACEHOLDER)
      self.image_token_in_vocab = False
    else:
      self.image_token_in_vocab = True
    self.image_placeholder_id = placeholder

  def single_token_id(self, token: str, field: str = 'token') -> int:
    """The id of `token`, which must encode to exactly that one token (a special or added token)."""
    ids = self.tokenizer.encode(token, add_special_tokens=False).ids
    tid = self.tokenizer.token_to_id(token)
    if tid is None or ids != [tid]:
      raise ValueError(f'{self.source}: {field}={token!r} is not a single (special) token of this tokenizer '
                       f'(encodes to {ids})')
    return tid

  @classmethod
  def from_pretrained(cls, path: str, *, eos_token: str | None = None, pad_token: str | None = None,
                      bos_token: str | None = None, add_bos: bool | None = None) -> TextTokenizer:
    """Loads `path/tokenizer.json` (or the file `path`) and the special tokens from tokenizer_config.json /
    special_tokens_map.json beside it; arguments override the files."""
    path = os.fspath(path)
    folder, file = (path, os.path.join(path, 'tokenizer.json')) if os.path.isdir(path) else (
        os.path.dirname(path), path)
    if not os.path.isfile(file):
      raise ValueError(f'{file}: no tokenizer.json (expected a converted checkpoint folder or a tokenizer.json file)')
    try:
      tok = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on bad files
      raise ValueError(f'{file}: cannot load the tokenizer ({e})') from e
    config = _read_json(os.path.join(folder, 'tokenizer_config.json'))
    special = _read_json(os.path.join(folder, 'special_tokens_map.json'))

    def pick(name: str, override: str | None) -> str | None:
      return override or _token_content(config.get(name)) or _token_content(special.get(name))

    eos = pick('eos_token', eos_token)
    if not eos:
      raise ValueError(f'{folder}: no eos_token in tokenizer_config.json or special_tokens_map.json; pass eos_token')
    if add_bos is None and 'add_bos_token' in config:
      add_bos = bool(config['add_bos_token'])
    return cls(tok, eos_token=eos, pad_token=pick('pad_token', pad_token), bos_token=pick('bos_token', bos_token),
               add_bos=add_bos, source=file)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str) -> int:
    tid = self.tokenizer.token_to_id(token)
    if tid is None:
      raise ValueError(f'{self.source}: token {token!r} is not in the vocabulary')
    return tid

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """ids: int32[T] (with the BOS prefix), offsets: int32[T, 2] character spans ((0, 0) for the prefix)."""
    enc = self.tokenizer.encode(text, add_special_tokens=False)
    n = len(self.prefix_ids)
    ids = np.asarray(self.prefix_ids + enc.ids, np.int32)
    offsets = np.zeros((n + len(enc.ids), 2), np.int32)
    if enc.ids:
      offsets[n:] = np.asarray(enc.offsets, np.int32)
    return ids, offsets

  def encode(self, text: str) -> list[int]:
    return self.encode_with_offsets(text)[0].tolist()

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------------------------------- encoding
def _expand_images(ids: np.ndarray, labels: np.ndarray, placeholder: int, image_token_id: int,
                   num_image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  is_image = ids == placeholder
  repeats = np.where(is_image, num_image_tokens, 1)
  ids = np.where(is_image, image_token_id, ids)
  return np.repeat(ids, repeats).astype(np.int32), np.repeat(labels, repeats).astype(np.int32)


def encode_conversation(conv: Conversation, template: ChatTemplate, tokenizer: TextTokenizer, *,
                        num_image_tokens: int, image_token_id: int, where: str = '') -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, labels): int32[T] each; labels == input_ids on answer tokens, -100 elsewhere (image included)."""
  try:
    text, spans = template.render(conv.turns, tokenizer.eos_token)
  except ValueError as e:
    raise RecordError('malformed', conv.id, where, str(e)) from e
  ids, offsets = tokenizer.encode_with_offsets(text)
  target = np.zeros(len(ids), bool)
  for a, b in spans:
    target |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
  # A target token may itself be `<image>` only if a record put one in an answer; parse_record forbids that.
  labels = np.where(target, ids, IGNORE_INDEX).astype(np.int32)
  n_images = int(np.sum(ids == tokenizer.image_placeholder_id))
  if n_images != int(conv.has_image):
    raise RecordError('malformed', conv.id, where, f'the rendered prompt holds {n_images} {IMAGE_PLACEHOLDER} tokens, '
                      f'expected {int(conv.has_image)} (template {template.name!r})')
  if image_token_id != tokenizer.image_placeholder_id and np.any(ids == image_token_id):
    raise RecordError('malformed', conv.id, where, f'the text itself produces image_token_id={image_token_id} '
                      f'({tokenizer.tokenizer.id_to_token(image_token_id)!r}); the model would take it for an image '
                      f'token (choose an image_token_id the tokenizer never emits)')
  return _expand_images(ids, labels, tokenizer.image_placeholder_id, image_token_id, num_image_tokens)


def encode_prompt(turns: Sequence[tuple[str, str]], question: str, template: ChatTemplate, tokenizer: TextTokenizer,
                  *, num_image_tokens: int, image_token_id: int) -> np.ndarray:
  """input_ids int32[T] of a generation prompt (`<image>` in `question` or an earlier turn is expanded)."""
  ids, _ = tokenizer.encode_with_offsets(template.render_prompt(turns, question, tokenizer.eos_token))
  labels = np.zeros_like(ids)
  return _expand_images(ids, labels, tokenizer.image_placeholder_id, image_token_id, num_image_tokens)[0]


def image_blocks(input_ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
  """[start, end) of each run of consecutive image tokens."""
  is_image = np.concatenate([[False], input_ids == image_token_id, [False]])
  edges = np.flatnonzero(is_image[1:] != is_image[:-1])
  return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def truncate(input_ids: np.ndarray, labels: np.ndarray, max_length: int, *, image_token_id: int, mode: str,
             record_id: str = '?', where: str = '') -> tuple[np.ndarray, np.ndarray]:
  """Fits a sample into max_length tokens without ever splitting an image block.

  mode 'drop': an over-long sample raises RecordError('too_long'). mode 'cut_text': the tail is cut when the cut
  falls after every image block and at least one answer token is left; otherwise RecordError('too_long').
  """
  if mode not in TRUNCATION_MODES:
    raise ValueError(f'truncation={mode!r}: expected one of {list(TRUNCATION_MODES)}')
  length = len(input_ids)
  if length <= max_length:
    return input_ids, labels
  if mode == 'drop':
    raise RecordError('too_long', record_id, where, f'{length} tokens exceed max_length={max_length}')
  for start, end in image_blocks(input_ids, image_token_id):
    if end > max_length:
      raise RecordError('too_long', record_id, where, f'{length} tokens exceed max_length={max_length} and the '
                        f'image tokens [{start}, {end}) would be cut')
  input_ids, labels = input_ids[:max_length], labels[:max_length]
  if not np.any(labels != IGNORE_INDEX):
    raise RecordError('too_long', record_id, where, f'{length} tokens exceed max_length={max_length}; no answer '
                      f'token is left after cutting the text')
  return input_ids, labels
