"""LLaVA-format conversation records: reading JSON / JSONL files and validating single records.

A record, as in LLaVA-Instruct / LLaVA-Pretrain / Bunny-695K:

  {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                     {"from": "gpt", "value": "The bus is white and red."}, ...]}

`image` is optional (text-only records); the `<image>` placeholder appears exactly once, in a human turn, iff the
record has an image. Turns alternate human, gpt, starting with human and ending with gpt.

Reading is cheap and never raises for a bad record: `LlavaJsonSource` keeps each record as raw JSON bytes (one
buffer plus offsets, so it pickles quickly to worker processes) and `parse_record` validates one record when the
pipeline needs it, raising `RecordError(kind='malformed')` that names the record id and file. Only an unreadable
file, or a `.json` file that is not a JSON list, fails at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping

import numpy as np

IMAGE_PLACEHOLDER = '<image>'
HUMAN_ROLES = ('human', 'user')
GPT_ROLES = ('gpt', 'assistant')
ERROR_KINDS = ('malformed', 'missing_image', 'corrupt_image', 'too_long')


class RecordError(ValueError):
  """A record cannot be used. kind: malformed | missing_image | corrupt_image | too_long."""

  def __init__(self, kind: str, record_id: str, where: str, detail: str):
    super().__init__(f'record {record_id!r} in {where}: {detail}')
    self.kind = kind
    self.record_id = record_id
    self.where = where
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class Conversation:
  """A validated record.

  turns: ((human text, gpt text), ...) with the `<image>` placeholder moved to the front of its human turn as
  `<image>\\n...` (Bunny's preprocess_multimodal), so templates see one canonical layout.
  """
  id: str
  image: str | None
  turns: tuple[tuple[str, str], ...]

  @property
  def has_image(self) -> bool:
    return self.image is not None


def parse_record(obj: Any, where: str, index: int | None = None) -> Conversation:
  """Validates one decoded record; `where` (the file) and `index` go into error messages."""
  fallback_id = f'#{index}' if index is not None else '?'
  if not isinstance(obj, Mapping):
    raise RecordError('malformed', fallback_id, where, f'expected a JSON object, got {type(obj).__name__}')
  raw_id = obj.get('id', fallback_id)
  record_id = str(raw_id)

  def bad(detail: str) -> RecordError:
    return RecordError('malformed', record_id, where, detail)

  if 'conversations' not in obj:
    raise bad(f'missing key "conversations" (keys: {sorted(obj)})')
  messages = obj['conversations']
  if not isinstance(messages, list) or not messages:
    raise bad('"conversations" must be a non-empty list of {"from", "value"} objects')
  image = obj.get('image')
  if image is not None and (not isinstance(image, str) or not image.strip()):
    raise bad(f'"image" must be a non-empty file name, got {image!r}')
  if len(messages) % 2:
    raise bad(f'{len(messages)} messages: expected human/gpt pairs (an even count ending with gpt)')
  placeholders = 0
  turns = []
  for i in range(0, len(messages), 2):
    pair = []
    for j, roles in ((i, HUMAN_ROLES), (i + 1, GPT_ROLES)):
      msg = messages[j]
      if not isinstance(msg, Mapping) or 'from' not in msg or 'value' not in msg:
        raise bad(f'conversations[{j}] must be an object with "from" and "value"')
      if msg['from'] not in roles:
        raise bad(f'conversations[{j}].from={msg["from"]!r}: expected {roles[0]!r} (turns alternate human, gpt, '
                  f'starting with human)')
      if not isinstance(msg['value'], str):
        raise bad(f'conversations[{j}].value must be a string, got {type(msg["value"]).__name__}')
      pair.append(msg['value'])
    human, gpt = pair
    if IMAGE_PLACEHOLDER in gpt:
      raise bad(f'conversations[{i + 1}] (gpt) contains {IMAGE_PLACEHOLDER}')
    count = human.count(IMAGE_PLACEHOLDER)
    if count:
      placeholders += count
      human = IMAGE_PLACEHOLDER + '\n' + human.replace(IMAGE_PLACEHOLDER, '').strip()
    turns.append((human, gpt))
  if image is None and placeholders:
    raise bad(f'{IMAGE_PLACEHOLDER} appears {placeholders}x but the record has no "image"')
  if image is not None and placeholders != 1:
    raise bad(f'has image {image!r} but {IMAGE_PLACEHOLDER} appears {placeholders}x in the human turns '
              f'(expected exactly once)')
  return Conversation(record_id, image, tuple(turns))


# ------------------------------------------------------------------------------------------------------ reading
def _is_json_object(line: bytes) -> bool:
  """A first line that is a whole JSON object marks a JSONL file, whatever its extension."""
  if not line.startswith(b'{'):
    return False
  try:
    return isinstance(json.loads(line), dict)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return False


def _iter_raw(path: str) -> Iterator[bytes]:
  """Raw JSON bytes of each record in a `.json` list or a `.jsonl` file (bad JSONL lines are kept, raw)."""
  try:
    with open(path, 'rb') as f:
      first_line = f.readline().strip()
      f.seek(0)
      if path.endswith('.jsonl') or _is_json_object(first_line):
        for line in f:
          line = line.strip()
          if line:
            yield line
        return
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e}); expected a list of LLaVA records or a .jsonl file') from e
  except OSError as e:
    raise ValueError(f'{path}: cannot read the conversation file ({e})') from e
  if not isinstance(data, list):
    raise ValueError(f'{path}: expected a JSON list of records, got {type(data).__name__}')
  for obj in data:
    yield json.dumps(obj, ensure_ascii=False).encode()


class LlavaJsonSource:
  """Random access over the records of a LLaVA JSON/JSONL file (a grain RandomAccessDataSource).

  Elements: {'record': raw JSON bytes, 'index': int, 'where': file name, 'image_bytes': None}. The image folder is
  not touched here: images are opened lazily by the pipeline (in worker processes).
  """

  def __init__(self, path: str, image_folder: str | None = None):
    self.path = os.fspath(path)
    self.image_folder = image_folder
    chunks = list(_iter_raw(self.path))
    lengths = np.fromiter((len(c) for c in chunks), np.int64, len(chunks))
    self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    self._buffer = b''.join(chunks)

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'{self.path}: record index {index} out of range [0, {len(self)})')
    raw = self._buffer[self._offsets[index]:self._offsets[index + 1]]
    return {'record': raw, 'index': index, 'where': self.path, 'image_bytes': None}

  def __repr__(self) -> str:
    return f'LlavaJsonSource({self.path!r}, {len(self)} records)'


def decode_record(raw: bytes | str, where: str, index: int) -> Conversation:
  """Raw JSON of one record -> validated Conversation (RecordError 'malformed' on bad JSON or structure)."""
  try:
    obj = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RecordError('malformed', f'#{index}', where, f'line is not valid JSON ({e})') from e
  return parse_record(obj, where, index)


def read_records(path: str) -> list[Conversation]:
  """Reads and validates every record (raising on the first bad one): for tools and tests, not the hot path."""
  return [decode_record(raw, path, i) for i, raw in enumerate(_iter_raw(path))]


def write_records(path: str, records: list[Mapping[str, Any]]) -> None:
  """Writes LLaVA records as a JSON list (`.json`) or one object per line (`.jsonl`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    if path.endswith('.jsonl'):
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + '\n')
    else:
      json.dump(list(records), f, ensure_ascii=False, indent=1)
