"""Chat templates, loss masks, image-token expansion and truncation against independent references.

References: the HF tokenizer (transformers.PreTrainedTokenizerFast over the same tokenizer.json) for input_ids,
and a re-implementation of Bunny's count-based masking (`preprocess_bunny`, `preprocess_bunny_with_bos`,
`preprocess_plain` with `tokenizer_image_token`) for labels. Tiny byte-level BPE tokenizers are trained locally.
"""

import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moiie_jax.data import conversations as C
from moiie_jax.data.records import Conversation, RecordError, parse_record

N_IMG = 5
CORPUS = [
    C.BUNNY_SYSTEM,
    'USER: What is shown in the picture? ASSISTANT: A red bus parked near the station.',
    'USER: Describe the scene in detail. ASSISTANT: Two people are walking a dog along the river.',
    'How many cats are there? There are three cats sleeping on a sofa.',
    'Is it raining? No, the sky is clear and blue. Why? Because the sun is shining.',
]
SPECIALS = {
    'phi3': (['<|endoftext|>', '<image>'], {'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'}),
    'llama3': (['<|begin_of_text|>', '<|end_of_text|>', '<image>'],
               {'bos_token': '<|begin_of_text|>', 'eos_token': '<|end_of_text|>'}),
}
TURNS_IMAGE = (('<image>\nWhat is shown in the picture?', 'A red bus parked near the station.'),
               ('How many cats are there?', 'Three.'),
               ('Why?', 'Because the sun is shining.'))
TURNS_TEXT = (('Is it raining?', 'No, the sky is clear.'), ('Describe the scene.', 'Two people walk a dog.'))


def _byte_level_tokenizer(folder: str, kind: str) -> str:
  specials, config = SPECIALS[kind]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  post = [processors.ByteLevel(trim_offsets=False)]
  if kind == 'llama3':  # LLaMA-3's tokenizer.json prepends <|begin_of_text|> in its post-processor
    post.append(processors.TemplateProcessing(single='<|begin_of_text|> $A',
                                              special_tokens=[('<|begin_of_text|>', 0)]))
  tok.post_processor = processors.Sequence(post)
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, 'tokenizer.json'))
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', **config}, f)
  return folder


@pytest.fixture(scope='module')
def toks(tmp_path_factory):
  out = {}
  for kind in SPECIALS:
    folder = _byte_level_tokenizer(str(tmp_path_factory.mktemp(kind)), kind)
    _, config = SPECIALS[kind]
    out[kind] = (C.TextTokenizer.from_pretrained(folder),
                 PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, 'tokenizer.json'), **config))
  return out


# ------------------------------------------------------------------------------------- Bunny's masking (oracle)
def _tokenizer_image_token(prompt, hf):
  """Bunny's mm_utils.tokenizer_image_token with IMAGE_TOKEN_INDEX = -200."""
  chunks = [hf(chunk).input_ids for chunk in prompt.split('<image>')]
  ids, offset = [], 0
  if chunks and chunks[0] and chunks[0][0] == hf.bos_token_id:
    offset = 1
    ids.append(chunks[0][0])
  sep = [-200] * (offset + 1)
  for x in [x for pair in zip(chunks, [sep] * len(chunks)) for x in pair][:-1]:
    ids.extend(x[offset:])
  return ids


def _bunny_reference(template, turns, hf, has_image):
  """(input_ids, labels) as Bunny's data_utils computes them, image placeholder expanded to N_IMG afterwards."""
  tok_len = (lambda s: len(_tokenizer_image_token(s, hf))) if has_image else (lambda s: len(hf(s).input_ids))
  if template.plain:
    eos = hf.eos_token
    text = '<image>' + turns[0][1] + eos
    ids = _tokenizer_image_token(text, hf)
    labels = list(ids)
    n = len(_tokenizer_image_token('<image>', hf))
    labels[:n] = [-100] * n
  else:
    with_bos = hf.bos_token_id is not None
    seps = [template.sep, template.sep2]
    prompt = template.system + seps[0]
    for i, msg in enumerate(m for turn in turns for m in turn):
      prompt += template.roles[i % 2] + ': ' + msg + seps[i % 2]
    ids = _tokenizer_image_token(prompt, hf) if has_image else hf(prompt).input_ids
    labels = list(ids)
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    total_len = sum(1 for t in ids if t != pad_id)
    sep = template.sep + template.roles[1] + ': '
    cur_len = 1 if with_bos else 0
    labels[:cur_len] = [-100] * cur_len
    ends = 0
    for rou in prompt.split(template.sep2):
      if rou == '':
        break
      parts = rou.split(sep)
      assert len(parts) == 2
      parts[0] += sep
      round_len = tok_len(rou)
      instruction_len = tok_len(parts[0]) - (2 if with_bos else 1)
      if not with_bos:
        round_len += 1
      ends += 1
      labels[cur_len:cur_len + instruction_len] = [-100] * instruction_len
      cur_len += round_len
    labels[cur_len:] = [-100] * (len(labels) - cur_len)
    if pad_id == hf.eos_token_id:
      cur_len -= ends
    assert cur_len == total_len, 'Bunny would report a tokenization mismatch and mask the whole sample'
  image_id = hf.convert_tokens_to_ids('<image>')
  out_ids, out_labels = [], []
  for t, l in zip(ids, labels):
    if t == -200:
      out_ids += [image_id] * N_IMG
      out_labels += [-100] * N_IMG
    else:
      out_ids.append(t)
      out_labels.append(l)
  return out_ids, out_labels


@pytest.mark.parametrize('kind', ['phi3', 'llama3'])
@pytest.mark.parametrize('turns', [TURNS_IMAGE, TURNS_TEXT], ids=['image', 'text'])
def test_chat_template_matches_hf_tokenizer_and_bunny_masking(toks, kind, turns):
  ours, hf = toks[kind]
  template = C.get_template(kind)
  conv = Conversation('r1', 'x.png' if turns is TURNS_IMAGE else None, turns)
  image_id = ours.image_placeholder_id
  ids, labels = C.encode_conversation(conv, template, ours, num_image_tokens=N_IMG, image_token_id=image_id)
  text, _ = template.render(turns, ours.eos_token)
  assert text.startswith(C.BUNNY_SYSTEM + ' USER: ')
  # input_ids: what the HF tokenizer gives for the text with <image> expanded, as HF LLaVA processors do.
  want_ids = hf(text.replace('<image>', '<image>' * N_IMG)).input_ids
  assert ids.tolist() == want_ids
  assert (ids[0] == hf.bos_token_id) == (kind == 'llama3')
  ref_ids, ref_labels = _bunny_reference(template, turns, hf, conv.has_image)
  assert ids.tolist() == ref_ids
  assert labels.tolist() == ref_labels
  # In words: the answers (with their leading space) and the end token after each, nothing else.
  end = template.sep2
  assert hf.decode([t for t in labels if t != -100]) == ''.join(' ' + a + end for _, a in turns)
  assert int(np.sum(ids == image_id)) == (N_IMG if conv.has_image else 0)
  assert np.all(labels[ids == image_id] == -100)


@pytest.mark.parametrize('kind', ['phi3', 'llama3'])
def test_plain_template_caption_loss_only(toks, kind):
  ours, hf = toks[kind]
  template = C.get_template('plain')
  turns = (('Render a clear summary of the photo.\n<image>', 'A red bus parked near the station.'),)
  conv = parse_record({'id': 'c', 'image': 'c.png', 'conversations': [
      {'from': 'human', 'value': turns[0][0]}, {'from': 'gpt', 'value': turns[0][1]}]}, 'f.json')
  ids, labels = C.encode_conversation(conv, template, ours, num_image_tokens=N_IMG,
                                      image_token_id=ours.image_placeholder_id)
  ref_ids, ref_labels = _bunny_reference(template, conv.turns, hf, True)
  assert ids.tolist() == ref_ids and labels.tolist() == ref_labels
  assert hf.decode([t for t in labels if t != -100]) == turns[0][1] + hf.eos_token
  with pytest.raises(RecordError, match='one \\(image, caption\\) turn'):
    C.encode_conversation(Conversation('two', 'c.png', conv.turns * 2), template, ours, num_image_tokens=N_IMG,
                          image_token_id=0)


def test_image_token_missing_from_vocab_gets_configured_id(tmp_path):
  """A checkpoint tokenizer without `<image>`: the placeholder is added in memory, expanded to image_token_id."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>'],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / 'tokenizer.json'))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<|endoftext|>'}))
  ours = C.TextTokenizer.from_pretrained(str(tmp_path))
  assert not ours.image_token_in_vocab
  conv = Conversation('r', 'x.png', (('<image>\nWhat is shown?', 'A bus.'),))
  # An id the tokenizer never emits (LLaVA checkpoints put <image> past the text vocabulary).
  ids, labels = C.encode_conversation(conv, C.get_template('phi3'), ours, num_image_tokens=3, image_token_id=320)
  blocks = C.image_blocks(ids, 320)
  assert len(blocks) == 1 and blocks[0][1] - blocks[0][0] == 3
  assert ours.image_placeholder_id not in ids.tolist()
  hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / 'tokenizer.json'), eos_token='<|endoftext|>')
  text, _ = C.get_template('phi3').render(conv.turns, ours.eos_token)
  before, after = text.split('<image>')
  assert ids[:blocks[0][0]].tolist() == hf(before).input_ids
  assert ids[blocks[0][1]:].tolist() == hf(after).input_ids
  # An image_token_id that is also a text token would be taken for image positions by the model.
  text_token = int(ids[-2])
  with pytest.raises(RecordError, match='never emits'):
    C.encode_conversation(conv, C.get_template('phi3'), ours, num_image_tokens=3, image_token_id=text_token)


def test_generation_prompt_is_the_training_prefix(toks):
  ours, _ = toks['llama3']
  template = C.get_template('llama3')
  conv = Conversation('r', 'x.png', TURNS_IMAGE[:2])
  ids, labels = C.encode_conversation(conv, template, ours, num_image_tokens=N_IMG,
                                      image_token_id=ours.image_placeholder_id)
  prompt = C.encode_prompt(TURNS_IMAGE[:1], TURNS_IMAGE[1][0], template, ours, num_image_tokens=N_IMG,
                           image_token_id=ours.image_placeholder_id)
  first_target_of_turn2 = np.flatnonzero(labels != -100)[-len(ours.encode(' Three.<|end_of_text|>')) + 1]
  assert ids[:first_target_of_turn2].tolist() == prompt.tolist()


@pytest.mark.parametrize('mode', ['drop', 'cut_text'])
def test_truncation_never_splits_an_image(toks, mode):
  ours, _ = toks['phi3']
  template = C.get_template('phi3')
  image_id = ours.image_placeholder_id
  conv = Conversation('long', 'x.png', TURNS_IMAGE)
  ids, labels = C.encode_conversation(conv, template, ours, num_image_tokens=N_IMG, image_token_id=image_id)
  (start, end), = C.image_blocks(ids, image_id)
  first_target = int(np.flatnonzero(labels != -100)[0])
  outcomes = set()
  for max_length in range(1, len(ids) + 3):
    try:
      out_ids, out_labels = C.truncate(ids, labels, max_length, image_token_id=image_id, mode=mode,
                                       record_id='long', where='f.json')
    except RecordError as e:
      assert e.kind == 'too_long' and "'long'" in str(e) and 'f.json' in str(e)
      assert max_length < len(ids)
      if mode == 'cut_text':
        assert max_length < end or max_length <= first_target
      outcomes.add('dropped')
      continue
    outcomes.add('kept' if len(out_ids) == len(ids) else 'cut')
    assert len(out_ids) <= max_length and len(out_ids) == len(out_labels)
    assert int(np.sum(out_ids == image_id)) == N_IMG  # the whole image or nothing
    assert out_ids.tolist() == ids[:len(out_ids)].tolist()
    assert np.any(out_labels != -100)
  assert outcomes == ({'dropped', 'kept'} if mode == 'drop' else {'dropped', 'kept', 'cut'})


@pytest.mark.parametrize('record, detail', [
    ({'id': 'a', 'image': 'x.png'}, 'missing key "conversations"'),
    ({'id': 'b', 'conversations': [{'from': 'gpt', 'value': 'hi'}, {'from': 'human', 'value': 'yo'}]},
     "expected 'human'"),
    ({'id': 'c', 'conversations': [{'from': 'human', 'value': '<image>\nq'}, {'from': 'gpt', 'value': 'a'}]},
     'has no "image"'),
    ({'id': 'd', 'image': 'x.png', 'conversations': [{'from': 'human', 'value': 'q'}, {'from': 'gpt', 'value': 'a'}]},
     'appears 0x'),
    ({'id': 'e', 'image': 'x.png', 'conversations': [{'from': 'human', 'value': '<image>q'},
                                                     {'from': 'gpt', 'value': '<image>'}]}, '(gpt) contains'),
    ({'id': 'f', 'conversations': [{'from': 'human', 'value': 'q'}]}, 'even count'),
    ({'id': 'g', 'conversations': [{'from': 'human', 'value': 3}, {'from': 'gpt', 'value': 'a'}]}, 'must be a string'),
])
def test_malformed_records_name_id_and_file(record, detail):
  with pytest.raises(RecordError) as info:
    parse_record(record, 'data/train.json', 7)
  assert info.value.kind == 'malformed'
  assert detail in str(info.value) and f"'{record['id']}'" in str(info.value) and 'data/train.json' in str(info.value)


def test_image_placeholder_moved_to_front():
  conv = parse_record({'id': 1, 'image': 'x.png', 'conversations': [
      {'from': 'human', 'value': 'What is this?\n<image>'}, {'from': 'gpt', 'value': 'A bus.'}]}, 'f.json')
  assert conv.id == '1' and conv.turns == (('<image>\nWhat is this?', 'A bus.'),)
