"""A tiktoken BPE file (Qwen v1's `qwen.tiktoken`) as a Hugging Face `tokenizer.json`, so Qwen models run here.

tiktoken stores byte-level BPE as ranks: one line per token, `base64(token bytes) rank`; encoding merges, within
each pre-tokenised piece, the adjacent pair whose concatenation has the lowest rank, until none is in the table.
A `tokenizers` BPE model with merges in rank order does the same: the merges are recovered by running that very
procedure on each multi-byte token with only the lower-ranked tokens allowed (the two parts it ends with), as
transformers' TikTokenConverter does. Bytes map to unicode characters as GPT-2's byte-level BPE maps them.

Qwen v1's pre-tokeniser pattern and special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then
`<|extra_0|>` ... `<|extra_204|>`, numbered after the ranks) are Qwen's tokenization_qwen.py constants.
"""

from __future__ import annotations

import base64
import json
import os

from moiie_jax.convert.errors import ConvertError

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIALS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>') + tuple(f'<|extra_{i}|>' for i in range(205))


def read_ranks(path: str) -> dict[bytes, int]:
  """{token bytes: rank} from a .tiktoken file; a malformed line is an error naming it."""
  ranks = {}
  try:
    with open(path, 'rb') as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          token, rank = line.split()
          ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
          raise ConvertError(f'{path}:{n}: expected "<base64 token> <rank>" ({e})') from None
  except OSError as e:
    raise ConvertError(f'{path}: cannot read ({e})') from e
  return ranks


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (what tokenizers' ByteLevel uses)."""
  keep = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
  chars, extra = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(keep, map(chr, chars)))


def _split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
  """tiktoken's merge loop on `token`, allowing only tokens ranked below max_rank."""
  parts = [bytes([b]) for b in token]
  while True:
    best, best_rank = None, None
    for i in range(len(parts) - 1):
      rank = ranks.get(parts[i] + parts[i + 1])
      if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
        best, best_rank = i, rank
    if best is None:
      return parts
    parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]


def tokenizer_json(ranks: dict[bytes, int], pattern: str = QWEN_PATTERN,
                   specials: tuple[str, ...] = QWEN_SPECIALS) -> dict:
  """The tokenizer.json dict of a byte-level BPE with these ranks, pre-tokeniser pattern and special tokens."""
  byte_char = _bytes_to_unicode()
  text = lambda b: ''.join(byte_char[x] for x in b)
  vocab = {text(token): rank for token, rank in ranks.items()}
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    if len(token) < 2:
      continue
    parts = _split(ranks, token, rank)
    if len(parts) != 2:
      raise ConvertError(f'tiktoken ranks: token {token!r} (rank {rank}) is not the merge of two lower-ranked '
                         f'tokens, so no BPE merge list reproduces it')
    merges.append(f'{text(parts[0])} {text(parts[1])}')
  first = max(ranks.values()) + 1
  added = [dict(id=first + i, content=s, single_word=False, lstrip=False, rstrip=False, normalized=False,
                special=True) for i, s in enumerate(specials)]
  return {
      'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': added, 'normalizer': None,
      'pre_tokenizer': {'type': 'Sequence', 'pretokenizers': [
          {'type': 'Split', 'pattern': {'Regex': pattern}, 'behavior': 'Isolated', 'invert': False},
          {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False}]},
      'post_processor': None,
      'decoder': {'type': 'ByteLevel', 'add_prefix_space': True, 'trim_offsets': True, 'use_regex': True},
      'model': {'type': 'BPE', 'dropout': None, 'unk_token': None, 'continuing_subword_prefix': None,
                'end_of_word_suffix': None, 'fuse_unk': False, 'byte_fallback': False, 'ignore_merges': False,
                'vocab': vocab, 'merges': merges},
  }


def write_tokenizer_files(tiktoken_path: str, out_dir: str) -> list[str]:
  """tokenizer.json and tokenizer_config.json (eos <|endoftext|>, no BOS, as Qwen) in out_dir from a .tiktoken."""
  with open(os.path.join(out_dir, 'tokenizer.json'), 'w') as f:
    json.dump(tokenizer_json(read_ranks(tiktoken_path)), f, ensure_ascii=False)
  with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump({'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>', 'add_bos_token': False}, f)
  return ['tokenizer.json', 'tokenizer_config.json']
