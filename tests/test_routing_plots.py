"""Routing pathway statistics: shares sum to 1, known layouts give known shares, figures are written."""

import json

import numpy as np
import pytest

from moiie_jax.evaluate import routing

TEXT, IMAGE = routing.MODALITIES.index('text'), routing.MODALITIES.index('image')


def _random_stats(rng, n_layers=3, n_experts=4):
  slots = rng.integers(0, 50, size=(n_layers, 2, n_experts)).astype(np.float64)
  weights = slots * rng.uniform(0.2, 0.8, size=slots.shape)
  return slots, weights


def test_shares_sum_to_one_and_empty_layers_are_zero():
  rng = np.random.default_rng(0)
  slots, weights = _random_stats(rng)
  slots[1, IMAGE] = 0.0  # layer 1 saw no image token
  weights[1, IMAGE] = 0.0
  summary = routing.summarize(slots, weights, [1, 3, 5], n_vision=1, n_shared=2, n_language=1)
  for layer in summary['layers']:
    for m in routing.MODALITIES:
      entry = layer[m]
      if not entry['has_tokens']:
        assert sum(entry['slot_share'].values()) == 0.0 and sum(entry['expert_weight_share']) == 0.0
        continue
      for key in ('slot_share', 'weight_share'):
        assert sum(entry[key].values()) == pytest.approx(1.0)
      for key in ('expert_slot_share', 'expert_weight_share'):
        assert sum(entry[key]) == pytest.approx(1.0)
  assert summary['layers'][1]['image']['has_tokens'] is False
  assert summary['layers'][0]['text']['n_slots'] == pytest.approx(slots[0, TEXT].sum())
  # Group share = sum of its experts' shares; the overall entry pools the layers.
  entry = summary['layers'][2]['text']
  assert entry['weight_share']['shared'] == pytest.approx(sum(entry['expert_weight_share'][1:3]))
  assert summary['overall']['image']['expert_slot_share'][0] == pytest.approx(
      slots[:, IMAGE, 0].sum() / slots[:, IMAGE].sum())
  assert summary['expert_labels'] == ['V', 'S1', 'S2', 'L']
  assert summary['expert_groups'] == ['vision', 'shared', 'shared', 'language']


def test_image_tokens_routed_only_to_vision_experts_give_full_vision_share():
  n_vision, n_shared, n_language = 2, 2, 4  # the paper's balanced 8-expert layout
  slots = np.zeros((2, 2, 8))
  slots[:, IMAGE, :2] = [[30.0, 10.0], [5.0, 35.0]]
  slots[:, TEXT, 2:] = 7.0
  weights = slots * 0.5
  summary = routing.summarize(slots, weights, [1, 3], n_vision, n_shared, n_language)
  for layer in summary['layers']:
    assert layer['image']['slot_share'] == {'vision': 1.0, 'shared': 0.0, 'language': 0.0}
    assert layer['image']['weight_share']['vision'] == pytest.approx(1.0)
    assert layer['text']['slot_share']['vision'] == 0.0
    assert layer['text']['slot_share']['shared'] == pytest.approx(2 / 6)
  assert summary['layers'][0]['image']['expert_slot_share'][:2] == pytest.approx([0.75, 0.25])
  np.testing.assert_allclose(routing.group_shares(summary, 'slots')[:, IMAGE], [[1, 0, 0], [1, 0, 0]])
  assert '100.0 /   0.0 /   0.0' in routing.format_table(summary)


def test_stats_accumulate_and_bad_shapes_raise():
  rng = np.random.default_rng(1)
  stats = routing.RoutingStats()
  a, b = _random_stats(rng), _random_stats(rng)
  stats.add(*a)
  stats.add(*b)
  np.testing.assert_allclose(stats.slot_counts, a[0] + b[0])
  with pytest.raises(ValueError, match=r'expected shape \[L, 2, 5\]'):
    routing.summarize(a[0], a[1], [0, 1, 2], 1, 3, 1)
  with pytest.raises(ValueError, match='layer_ids'):
    routing.summarize(a[0], a[1], [0, 1], 1, 2, 1)
  with pytest.raises(ValueError, match='non-negative'):
    routing.summarize(-a[0], a[1], [0, 1, 2], 1, 2, 1)
  with pytest.raises(ValueError, match='do not match'):
    stats.add(np.zeros((1, 2, 4)), np.zeros((1, 2, 4)))


def test_plots_and_json_are_written(tmp_path):
  rng = np.random.default_rng(2)
  slots, weights = _random_stats(rng, n_layers=4)
  slots[2] = 0.0  # a layer with no tokens at all still plots
  weights[2] = 0.0
  summary = routing.summarize(slots, weights, [1, 3, 5, 7], 1, 2, 1)
  paths = routing.plot_pathways(summary, str(tmp_path / 'figs'))
  assert len(paths) == 4
  for path in paths:
    with open(path, 'rb') as f:
      data = f.read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 1000
  json_path = routing.write_json(summary, str(tmp_path / 'routing.json'))
  with open(json_path) as f:
    assert json.load(f)['layer_ids'] == [1, 3, 5, 7]
