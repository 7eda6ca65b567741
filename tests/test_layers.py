"""The package's layers point down (STYLE.md): models/ imports nothing of ours above it, parallel/ and convert/ build
on models/ (convert also on store/, the params I/O both it and train/ share), train/, infer/, evaluate/ and the
CLIs sit on top. Checked on every import statement, function-level imports included."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'moiie_jax'

# Subpackage -> the subpackages of ours it may import (itself always allowed). CLI modules (`__main__.py`) may
# import anything, as may the top-level CLI modules.
ALLOWED = {
    'models': set(),
    'store': {'models'},
    'parallel': {'models'},
    'convert': {'models', 'store'},
    'data': set(),
}


def _imports(path: pathlib.Path) -> set[str]:
  """The moiie_jax subpackages or top-level modules a file imports."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] if node.module != 'moiie_jax' else [f'moiie_jax.{a.name}' for a in node.names]
    else:
      continue
    out.update(n.split('.')[1] for n in names if n.startswith('moiie_jax.'))
  return out


@pytest.mark.parametrize('layer', sorted(ALLOWED))
def test_layer_imports_point_down(layer):
  bad = []
  for path in sorted((PACKAGE / layer).rglob('*.py')):
    if path.name == '__main__.py':
      continue
    for dep in sorted(_imports(path) - ALLOWED[layer] - {layer}):
      bad.append(f'{path.relative_to(PACKAGE.parent)} imports moiie_jax.{dep}')
  assert not bad, f'{layer}/ may import only {sorted(ALLOWED[layer])} of ours:\n' + '\n'.join(bad)


def test_the_checker_sees_imports(tmp_path):
  f = tmp_path / 'm.py'
  f.write_text('from moiie_jax.train import step\ndef g():\n  from moiie_jax import compile_cache\n')
  assert _imports(f) == {'train', 'compile_cache'}
