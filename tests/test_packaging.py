"""What a plain `pip install mac_optax` brings is what the package imports."""

import ast
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNTIME = {'jax', 'jaxlib', 'optax', 'flax', 'numpy'}
# Imported only inside the function that offers them, and only when asked
# (`progress=True`); the function raises naming the package otherwise.
OPTIONAL = {'tqdm'}


def _dependencies() -> set[str]:
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  return {re.match(r'[A-Za-z0-9_.-]+', d).group(0).lower()
          for d in project['dependencies']}


def test_runtime_dependencies_are_the_five():
  assert _dependencies() == RUNTIME


def test_the_package_imports_only_its_dependencies():
  module_level, in_functions = {}, {}
  for path in sorted((ROOT / 'mac_optax').rglob('*.py')):
    tree = ast.parse(path.read_text(encoding='utf-8'))
    nested = {id(n) for f in ast.walk(tree)
              if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
      else:
        continue
      where = in_functions if id(node) in nested else module_level
      for name in names:
        top = name.split('.')[0]
        if top not in sys.stdlib_module_names and top != 'mac_optax':
          where.setdefault(top, []).append(path.name)
  assert set(module_level) <= RUNTIME, module_level
  assert set(in_functions) <= RUNTIME | OPTIONAL, in_functions
  assert 'chex' not in module_level and 'chex' not in in_functions
