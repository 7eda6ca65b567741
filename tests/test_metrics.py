"""Benchmark metrics and the benchmark registry against hand-computed values on tiny fixtures."""

import csv
import json
import os
import random

import pytest

from moiie_jax.evaluate import benchmarks
from moiie_jax.evaluate import metrics
from moiie_jax.evaluate import prompts


def _write_jsonl(path, rows):
  with open(path, 'w') as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')
  return str(path)


@pytest.fixture
def image_dir(tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  for name in ('a.jpg', 'b.jpg', 'c.jpg'):
    (folder / name).write_bytes(b'\xff\xd8')
  return str(folder)


# --- VQA ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('raw, expected', [
    ('Two', '2'),
    ('The dog.', 'dog'),
    ('dont', "don't"),
    ('t-shirt', 't shirt'),          # a mark inside a word becomes a space
    ('1,000', '1000'),               # commas go first
    ("a man's hat", "man 's hat"),   # article dropped, possessive split as the official tokenizer does
    ('Yes!', 'yes'),
    ('  Ten\tapples ', '10 apples'),
])
def test_normalize_vqa_answer(raw, expected):
  assert metrics.normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_ten_answers():
  answers = ['dog'] * 2 + ['cat'] * 8
  # 2 of the 10 leave-one-out subsets keep 1 'dog' (1/3), 8 keep 2 (2/3): (2/3 + 16/3) / 10 = 0.6.
  assert metrics.vqa_accuracy('Dog', answers) == pytest.approx(0.6)
  answers3 = ['dog'] * 3 + ['cat'] * 7
  assert metrics.vqa_accuracy('a dog.', answers3) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
  assert metrics.vqa_accuracy('Two', ['2', '2', 'two', '2'] + ['3'] * 6) == pytest.approx(1.0)
  assert metrics.vqa_accuracy('bird', answers) == 0.0


def test_vqa_accuracy_single_answer_is_exact_match_after_normalisation():
  assert metrics.vqa_accuracy('The dog.', ['dog']) == 1.0
  assert metrics.vqa_accuracy('dogs', ['dog']) == 0.0


# --- POPE --------------------------------------------------------------------------------------------------------


def test_pope_metrics():
  preds = ['Yes', 'No, there is not.', 'Yes.', 'There is no dog', 'yes', 'I think not']
  labels = ['yes', 'no', 'no', 'yes', 'yes', 'no']
  m = metrics.pope_metrics(preds, labels)
  assert (m['TP'], m['FP'], m['TN'], m['FN']) == (2, 1, 2, 1)
  assert m['precision'] == pytest.approx(2 / 3)
  assert m['recall'] == pytest.approx(2 / 3)
  assert m['f1'] == pytest.approx(2 / 3)
  assert m['accuracy'] == pytest.approx(4 / 6)
  assert m['yes_ratio'] == pytest.approx(0.5)
  # eval_pope.py looks only at 'No', 'no', 'not' as words of the first sentence.
  assert metrics.pope_parse('No.') == 'no'
  assert metrics.pope_parse('Yes. But no hat.') == 'yes'
  assert metrics.pope_parse('Not sure') == 'yes'


def test_pope_benchmark_per_split(tmp_path, image_dir):
  rows = [{'question_id': i, 'image': 'a.jpg', 'text': 'Is there a dog in the image?', 'label': label,
           'category': split} for i, (label, split) in enumerate(
               [('yes', 'random'), ('no', 'random'), ('yes', 'adversarial'), ('no', 'adversarial')])]
  bench = benchmarks.get_benchmark('pope')
  items = bench.load(_write_jsonl(tmp_path / 'pope.jsonl', rows), image_dir)
  scores = bench.score(items, ['Yes', 'No', 'No', 'Yes'])
  assert scores['splits']['random']['f1'] == pytest.approx(100.0)
  assert scores['splits']['adversarial']['f1'] == 0.0
  assert scores['f1'] == pytest.approx(50.0)
  text, image = bench.prompt(items[0])
  assert text == '<image>\nIs there a dog in the image?\nAnswer the question using a single word or phrase.'
  assert image == os.path.join(image_dir, 'a.jpg')


def test_pope_failed_item_is_excluded_and_counted(tmp_path, image_dir):
  # An item that could not be answered (None) must not score as eval_pope.py's reading of '' ('yes').
  rows = [{'question_id': i, 'image': 'a.jpg', 'text': 'Is there a dog?', 'label': label, 'category': 'random'}
          for i, label in enumerate(['yes', 'no', 'no'])]
  bench = benchmarks.get_benchmark('pope')
  items = bench.load(_write_jsonl(tmp_path / 'pope.jsonl', rows), image_dir)
  scores = bench.score(items, {'0': 'Yes', '1': 'No', '2': None})
  assert scores['n'] == 3 and scores['n_failed'] == 1
  split = scores['splits']['random']
  assert (split['n'], split['n_failed'], split['TP'], split['TN'], split['FP']) == (2, 1, 1, 1, 0)
  assert split['accuracy'] == pytest.approx(100.0) and scores['f1'] == pytest.approx(100.0)
  paths = bench.write_predictions(items, {'0': 'Yes', '1': 'No', '2': None}, str(tmp_path / 'out'))
  with open(paths[0]) as f:
    answers = [json.loads(line) for line in f]
  assert answers[2]['text'] == '' and answers[2]['failed'] and 'failed' not in answers[0]


# --- MME ---------------------------------------------------------------------------------------------------------


def test_mme_scores_acc_plus():
  records = [
      ('existence', 'img1', 'Yes', 'Yes'), ('existence', 'img1', 'No', 'Yes, there is'),  # one of two right
      ('existence', 'img2', 'Yes', 'yes'), ('existence', 'img2', 'No', 'No'),            # both right
      ('code_reasoning', 'img3', 'Yes', 'Maybe'), ('code_reasoning', 'img3', 'No', 'nope'),
  ]
  s = metrics.mme_scores(records)
  assert s['subtasks']['existence']['acc'] == pytest.approx(0.75)
  assert s['subtasks']['existence']['acc_plus'] == pytest.approx(0.5)
  assert s['subtasks']['existence']['score'] == pytest.approx(125.0)
  assert s['subtasks']['code_reasoning']['score'] == pytest.approx(50.0)  # acc 1/2, acc+ 0
  assert s['perception'] == pytest.approx(125.0)
  assert s['cognition'] == pytest.approx(50.0)
  assert 'OCR' in s['missing_subtasks']
  assert metrics.mme_parse("It's not") == 'other'


def test_mme_prompt_removes_its_yes_no_line(tmp_path, image_dir):
  # As in LLaVA's llava_mme.jsonl: category 'default', the subtask is the question_id's first path part.
  rows = [{'question_id': 'existence/a.jpg', 'image': 'a.jpg', 'category': 'default', 'answer': 'Yes',
           'text': 'Is there a dog in this image? Please answer yes or no.'}]
  bench = benchmarks.BENCHMARKS['mme']
  items = bench.load(_write_jsonl(tmp_path / 'mme.jsonl', rows), image_dir)
  assert items[0].category == 'existence'
  assert bench.prompt(items[0])[0] == ('<image>\nIs there a dog in this image?\n'
                                       'Answer the question using a single word or phrase.')


def test_mme_questions_sharing_an_id_are_both_scored(tmp_path):
  # MME_Benchmark_release_version's layouts: '<subtask>/images/' + 'questions_answers_YN/', or both in '<subtask>/'.
  root = tmp_path / 'MME_Benchmark_release_version'
  (root / 'artwork' / 'images').mkdir(parents=True)
  (root / 'artwork' / 'questions_answers_YN').mkdir()
  (root / 'existence').mkdir()
  (root / 'artwork' / 'images' / '10002.jpg').write_bytes(b'\xff\xd8')
  (root / 'artwork' / 'questions_answers_YN' / '10002.txt').write_text(
      'Is this artwork created by Monet? Please answer yes or no.\tYes\n'
      'Is this artwork created by Dali? Please answer yes or no.\tNo\n')
  (root / 'existence' / '006040.jpg').write_bytes(b'\xff\xd8')
  # LLaVA's llava_mme.jsonl: no answers (read from the files above), question_id shared by an image's questions.
  llava = [{'question_id': 'artwork/10002.jpg', 'image': 'artwork/images/10002.jpg', 'category': 'default',
            'text': f'Is this artwork created by {who}? Please answer yes or no.\n'
                    'Answer the question using a single word or phrase.'} for who in ('Monet', 'Dali')]
  # lmms-lab/MME exported to JSONL: question / answer / category, the same question_id for both questions.
  lmms = [{'question_id': 'existence/006040.jpg', 'image': 'existence/006040.jpg', 'category': 'existence',
           'question': f'Is there a {what} in this image? Please answer yes or no.', 'answer': truth}
          for what, truth in (('dog', 'Yes'), ('cat', 'No'))]
  bench = benchmarks.get_benchmark('mme')
  items = bench.load(_write_jsonl(tmp_path / 'mme.jsonl', llava + lmms), str(root))
  assert [it.key for it in items] == ['artwork/10002.jpg', 'artwork/10002.jpg#1', 'existence/006040.jpg',
                                      'existence/006040.jpg#1']
  assert [it.answer for it in items] == ['Yes', 'No', 'Yes', 'No']
  assert [it.category for it in items] == ['artwork', 'artwork', 'existence', 'existence']
  scores = bench.score(items, {items[0].key: 'Yes', items[1].key: 'Yes', items[2].key: 'Yes', items[3].key: 'No'})
  assert scores['subtasks']['artwork']['n_questions'] == 2 and scores['subtasks']['artwork']['acc'] == 0.5
  assert scores['subtasks']['artwork']['acc_plus'] == 0.0
  assert scores['subtasks']['existence']['score'] == pytest.approx(200.0)
  # A failed question is left out of acc and its image out of acc+.
  scores = bench.score(items, {items[0].key: 'Yes', items[1].key: None, items[2].key: 'Yes', items[3].key: 'No'})
  assert scores['n_failed'] == 1 and scores['subtasks']['artwork']['acc'] == 1.0
  assert scores['subtasks']['artwork']['score'] is None and 'artwork' in scores['missing_subtasks']
  assert scores['perception'] == pytest.approx(200.0)
  # The same question twice under one id is still refused, and a missing ground truth is named.
  with pytest.raises(benchmarks.BenchmarkDataError, match='line 3: .*same question already on line 1'):
    bench.load(_write_jsonl(tmp_path / 'dup.jsonl', lmms + lmms[:1]), str(root))
  no_truth = [dict(lmms[0], answer=None)]
  with pytest.raises(benchmarks.BenchmarkDataError, match=r'no field "answer".*existence/006040\.txt'):
    bench.load(_write_jsonl(tmp_path / 'no_truth.jsonl', no_truth), str(root))


# --- Multiple choice ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('response, expected', [
    ('B', 'B'), ('(B)', 'B'), ('B.', 'B'), ('b', 'B'), ('The answer is C.', 'C'), ('Answer: (D)', 'D'),
    ('C. red fox', 'C'), ('dog', 'B'), ('It is a red fox.', 'C'), ("I don't know", None), ('', None),
])
def test_extract_choice(response, expected):
  assert metrics.extract_choice(response, ['cat', 'dog', 'red fox', 'fox']) == expected


def test_mmbench_circular(tmp_path, image_dir):
  rows = [{'index': 1, 'image': 'a.jpg', 'question': 'What animal?', 'hint': 'nan', 'A': 'cat', 'B': 'dog',
           'C': 'cow', 'D': 'pig', 'answer': 'B', 'category': 'animals'},
          {'index': 2, 'image': 'b.jpg', 'question': 'What colour?', 'hint': 'Look closely.', 'A': 'red',
           'B': 'blue', 'C': 'green', 'answer': 'C', 'category': 'colours'}]
  bench = benchmarks.BENCHMARKS['mmbench']
  items = bench.load(_write_jsonl(tmp_path / 'mmbench.tsv.jsonl', rows), image_dir)
  assert len(items) == 4 + 3
  # Round k shows the options shifted by k under the letters A, B, ...: 'dog' is B, A, D, C.
  assert [it.answer for it in items[:4]] == ['B', 'A', 'D', 'C']
  assert bench.prompt(items[1])[0] == ('<image>\nWhat animal?\nA. dog\nB. cow\nC. pig\nD. cat\n'
                                       "Answer with the option's letter from the given choices directly.")
  assert bench.prompt(items[4])[0].startswith('<image>\nLook closely.\nWhat colour?\nA. red\n')
  # Question 1 right in every round, question 2 right in round 0 only ('green' answered as text each time).
  preds = {it.key: it.answer for it in items[:4]}
  preds.update({items[4].key: 'green', items[5].key: 'C', items[6].key: 'C'})
  scores = bench.score(items, preds)
  assert scores['accuracy'] == pytest.approx(50.0)
  assert scores['accuracy_single_pass'] == pytest.approx(100.0)
  assert scores['categories'] == {'animals': 100.0, 'colours': 0.0}
  paths = bench.write_predictions(items, preds, str(tmp_path / 'out'))
  with open([p for p in paths if p.endswith('.tsv')][0]) as f:
    table = list(csv.reader(f, delimiter='\t'))
  assert table[0] == ['index', 'question', 'A', 'B', 'C', 'D', 'prediction', 'answer', 'category']
  assert table[1][:7] == ['1', 'What animal?', 'cat', 'dog', 'cow', 'pig', 'B']
  assert table[2][2:7] == ['red', 'blue', 'green', '', 'green']


def test_scienceqa_prompt_and_img_only(tmp_path, image_dir):
  rows = [{'question_id': 'p1', 'image': 'a.jpg', 'question': 'Which is a mammal?', 'choices': ['frog', 'whale'],
           'answer': 1, 'hint': 'Whales breathe air.'},
          {'question_id': 'p2', 'question': 'Which is hot?', 'choices': ['ice', 'fire'], 'answer': 1, 'hint': ''}]
  bench = benchmarks.BENCHMARKS['scienceqa_img']
  items = bench.load(_write_jsonl(tmp_path / 'sqa.jsonl', rows), image_dir)
  assert [it.key for it in items] == ['p1']
  assert bench.prompt(items[0])[0] == ('<image>\nContext: Whales breathe air.\nWhich is a mammal?\nA. frog\n'
                                       "B. whale\nAnswer with the option's letter from the given choices directly.")
  assert bench.score(items, ['The answer is B.'])['accuracy'] == 100.0


def test_failed_items_are_excluded_and_counted_in_every_benchmark(tmp_path, image_dir):
  # A failed item (None) is neither right nor wrong: each metric is the one of the answered items alone.
  vqa = [{'question_id': i, 'image': 'a.jpg', 'question': 'What?', 'answers': ['dog'] * 10} for i in range(2)]
  mc = [{'question_id': i, 'image': 'a.jpg', 'question': 'Which?', 'options': ['cat', 'dog'], 'answer': 'B'}
        for i in range(2)]
  mmb = [{'index': i, 'image': 'a.jpg', 'question': 'Which?', 'A': 'cat', 'B': 'dog', 'answer': 'B'}
         for i in range(2)]
  mmmu = [{'id': f'validation_Art_{i}', 'image': 'a.jpg', 'question': 'Which?', 'options': ['cat', 'dog'],
           'answer': 'B', 'question_type': 'multiple-choice'} for i in range(2)]
  for name, rows, right in [('vqav2', vqa, 'dog'), ('gqa', [dict(r, answer='dog') for r in vqa], 'dog'),
                            ('ai2d', mc, 'B'), ('seed_image', mc, 'B'), ('mmbench', mmb, None), ('mmmu', mmmu, 'B')]:
    bench = benchmarks.get_benchmark(name)
    items = bench.load(_write_jsonl(tmp_path / f'{name}.jsonl', rows), image_dir)
    # Item 0 answered right (every round for MMBench), everything of question 1 failed.
    preds = {it.key: (None if it.question_id == 1 else right or it.answer) for it in items}
    scores = bench.score(items, preds)
    assert scores['n_failed'] == sum(it.question_id == 1 for it in items), name
    assert scores['accuracy'] == pytest.approx(100.0), (name, scores)
    bench.write_predictions(items, preds, str(tmp_path / name))  # failed items written as empty answers


# --- MMMU --------------------------------------------------------------------------------------------------------


def test_mmmu_parse_multi_choice():
  choices = ['A', 'B', 'C', 'D']
  index2ans = {'A': 'nucleus', 'B': 'mitochondria', 'C': 'ribosome', 'D': 'golgi'}
  assert metrics.mmmu_parse_multi_choice('The answer is (B).', choices, index2ans) == 'B'
  assert metrics.mmmu_parse_multi_choice('A', choices, index2ans) == 'A'
  assert metrics.mmmu_parse_multi_choice("I think it's B or C, final C.", choices, index2ans) == 'C'
  assert metrics.mmmu_parse_multi_choice('The power house of the cell is the mitochondria', choices,
                                         index2ans) == 'B'
  guess = metrics.mmmu_parse_multi_choice('no idea', choices, index2ans, random.Random(42))
  assert guess == random.Random(42).choice(choices)


def test_mmmu_parse_open_numbers_and_strings():
  parsed = metrics.mmmu_parse_open('The answer is 3,000.')
  assert 3000.0 in parsed
  assert metrics.mmmu_eval_open('3000', parsed)
  assert not metrics.mmmu_eval_open('3', parsed)
  parsed = metrics.mmmu_parse_open('So the capital is Paris')
  assert parsed == ['paris']
  assert metrics.mmmu_eval_open('Paris', parsed)
  assert metrics.mmmu_eval_open(['London', 'paris'], parsed)
  assert metrics.mmmu_normalize_str('1,234.567') == [1234.57]
  assert metrics.mmmu_normalize_str('B') == [' b', 'b ']
  assert metrics.mmmu_parse_open('x = 2.5') == [2.5]  # '=' counts as an indicator in the last sentence


def test_mmmu_benchmark(tmp_path, image_dir):
  rows = [{'id': 'validation_Art_Theory_1', 'image': 'a.jpg', 'question': 'Who painted <image 1>?',
           'options': "['Monet', 'Manet']", 'answer': 'A', 'question_type': 'multiple-choice'},
          {'id': 'validation_Math_2', 'question': 'What is 2+2?', 'options': '[]', 'answer': '4',
           'question_type': 'open'}]
  bench = benchmarks.BENCHMARKS['mmmu']
  items = bench.load(_write_jsonl(tmp_path / 'mmmu.jsonl', rows), image_dir)
  assert bench.prompt(items[0]) == ('<image>\nWho painted <image 1>?\n(A) Monet\n(B) Manet\n\n'
                                    "Answer with the option's letter from the given choices directly.",
                                    os.path.join(image_dir, 'a.jpg'))
  assert bench.prompt(items[1]) == ('What is 2+2?\nAnswer the question using a single word or phrase.', None)
  scores = bench.evaluate(items, ['(A) Monet', 'The result is 4.'], str(tmp_path / 'out'))
  assert scores['accuracy'] == 100.0
  assert scores['subjects'] == {'Art_Theory': {'n': 1, 'accuracy': 100.0}, 'Math': {'n': 1, 'accuracy': 100.0}}
  with open(tmp_path / 'out' / 'mmmu_submission.json') as f:
    assert json.load(f) == {'validation_Art_Theory_1': 'A', 'validation_Math_2': 'The result is 4.'}
  assert (tmp_path / 'out' / 'mmmu_scores.json').stat().st_size > 0


# --- Registry, formats, server files -----------------------------------------------------------------------------


def test_vqav2_load_prompt_score_and_submission(tmp_path, image_dir):
  rows = [{'question_id': 7, 'image': 'a.jpg', 'text': 'What is this?\nAnswer the question using a single word or '
           'phrase.', 'answers': ['dog'] * 2 + ['cat'] * 8},
          {'question_id': 8, 'image': 'b.jpg', 'question': 'How many?', 'answers': [{'answer': '2'}] * 10}]
  bench = benchmarks.get_benchmark('vqav2')
  items = bench.load(_write_jsonl(tmp_path / 'vqa.jsonl', rows), image_dir)
  assert bench.prompt(items[0])[0] == '<image>\nWhat is this?\nAnswer the question using a single word or phrase.'
  scores = bench.evaluate(items, ['Dog', 'Two'], str(tmp_path / 'out'))
  assert scores['accuracy'] == pytest.approx(80.0)  # (0.6 + 1.0) / 2
  with open(tmp_path / 'out' / 'vqav2_submission.json') as f:
    assert json.load(f) == [{'question_id': 7, 'answer': 'dog'}, {'question_id': 8, 'answer': '2'}]
  with open(tmp_path / 'out' / 'vqav2_scores.json') as f:
    assert json.load(f)['accuracy'] == pytest.approx(80.0)


def test_textvqa_ocr_prompt(tmp_path, image_dir):
  rows = [{'question_id': 1, 'image': 'a.jpg', 'question': 'what brand?', 'ocr_tokens': ['Nikon', 'D50'],
           'answers': ['nikon'] * 10}]
  items = benchmarks.BENCHMARKS['textvqa'].load(_write_jsonl(tmp_path / 't.jsonl', rows), image_dir)
  assert benchmarks.BENCHMARKS['textvqa'].prompt(items[0])[0] == (
      '<image>\nwhat brand?\nReference OCR token: Nikon, D50\nAnswer the question using a single word or phrase.')
  assert benchmarks.TextVQA(use_ocr_tokens=False).prompt(items[0])[0] == (
      '<image>\nwhat brand?\nAnswer the question using a single word or phrase.')


def test_bad_data_files_name_file_line_and_field(tmp_path, image_dir):
  bench = benchmarks.BENCHMARKS['pope']
  good = {'question_id': 1, 'image': 'a.jpg', 'text': 'Is there a cat?', 'label': 'yes', 'category': 'random'}
  path = _write_jsonl(tmp_path / 'bad_json.jsonl', [good, '{not json'])
  with pytest.raises(benchmarks.BenchmarkDataError, match=r'bad_json\.jsonl, line 2: not valid JSON'):
    bench.load(path, image_dir)
  path = _write_jsonl(tmp_path / 'no_label.jsonl', [good, {k: v for k, v in good.items() if k != 'label'}])
  with pytest.raises(benchmarks.BenchmarkDataError, match=r"no_label\.jsonl, line 2: missing field 'label'"):
    bench.load(path, image_dir)
  path = _write_jsonl(tmp_path / 'maybe.jsonl', [dict(good, label='maybe')])
  with pytest.raises(benchmarks.BenchmarkDataError, match=r'line 1: field "label"'):
    bench.load(path, image_dir)
  path = _write_jsonl(tmp_path / 'dup.jsonl', [good, good])
  with pytest.raises(benchmarks.BenchmarkDataError, match='already used on line 1'):
    bench.load(path, image_dir)
  path = _write_jsonl(tmp_path / 'noimg.jsonl', [dict(good, image='missing.jpg')])
  with pytest.raises(benchmarks.BenchmarkDataError, match='missing.jpg'):
    bench.load(path, image_dir)
  path = _write_jsonl(tmp_path / 'answer.jsonl', [{'question_id': 1, 'image': 'a.jpg', 'question': 'q',
                                                   'options': ['x', 'y'], 'answer': 'C'}])
  with pytest.raises(benchmarks.BenchmarkDataError, match='"answer"'):
    benchmarks.BENCHMARKS['ai2d'].load(path, image_dir)
  with pytest.raises(KeyError, match="known benchmarks: .*'mme'.*'pope'"):
    benchmarks.get_benchmark('mm-vet')
  items = bench.load(_write_jsonl(tmp_path / 'ok.jsonl', [good]), image_dir)
  with pytest.raises(ValueError, match='2 predictions for 1 items'):
    bench.score(items, ['yes', 'no'])
  with pytest.raises(KeyError, match='no prediction'):
    bench.score(items, {'other': 'yes'})


def test_registry_covers_the_paper_benchmarks():
  assert set(benchmarks.BENCHMARKS) == {'vqav2', 'gqa', 'textvqa', 'pope', 'mme', 'mmbench', 'seed_image',
                                        'scienceqa_img', 'ai2d', 'mmmu'}
  assert prompts.strip_instruction('<image>\nQ?\nAnswer the question using a single word or phrase.') == 'Q?'
