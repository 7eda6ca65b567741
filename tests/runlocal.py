"""The Phi-3 paper recipe's runlocal form with dotted-key overrides, shared by the training tests."""

import os

from moiie_jax.train import recipe

PHI3 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'phi3_mini_moiie.py')


def phi3_config(arg, **changes):
  """configs/phi3_mini_moiie.py:ARG,runlocal=True with `changes` ({'optimizer.lr.experts': 1e-3, ...}) applied."""
  c = recipe.load(f'{PHI3}:{arg},runlocal=True')
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
