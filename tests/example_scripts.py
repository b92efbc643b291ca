"""Loads a script of ``examples/`` as a module, the way ``python examples/x.py`` would."""

import importlib.util
import os
import pathlib
import sys
import types

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


def load_example(name: str) -> types.ModuleType:
  """Imports ``examples/<name>.py``.

  The examples folder goes on ``sys.path`` (the scripts share helper modules)
  and the module is registered in ``sys.modules`` before it runs, as dataclasses
  (Flax modules among them) need. ``XLA_FLAGS`` is restored afterwards, since a
  script may ask for host devices that this test process must not change.
  """
  if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  saved = os.environ.get('XLA_FLAGS')
  try:
    spec.loader.exec_module(module)
  finally:
    if saved is None:
      os.environ.pop('XLA_FLAGS', None)
    else:
      os.environ['XLA_FLAGS'] = saved
  return module
