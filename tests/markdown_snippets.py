"""Runs the Python blocks of a Markdown page (README.md, docs/*.md) as tests.

Every ```` ```python ```` block of a page runs, in order, in one namespace per
page, so a page reads as one program. A block preceded by the line
``<!-- not tested -->`` is left out.
"""

import pathlib
import re
from typing import Any, Optional

import pytest

SKIP_MARK = '<!-- not tested -->'
_BLOCK = re.compile(r'^```python\n(.*?)^```', re.S | re.M)


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
  """``(line, code)`` of every tested ```python block of `path`, in order."""
  text = pathlib.Path(path).read_text(encoding='utf-8')
  blocks = []
  for match in _BLOCK.finditer(text):
    before = text[:match.start()].rstrip().splitlines()
    if before and before[-1].strip() == SKIP_MARK:
      continue
    blocks.append((text.count('\n', 0, match.start()) + 1, match.group(1)))
  return blocks


def run_python_blocks(path: pathlib.Path, name: str,
                      namespace: Optional[dict[str, Any]] = None
                      ) -> dict[str, Any]:
  """Executes the blocks of `path`; fails the test naming the block's line.

  Args:
    path: the Markdown file.
    name: how the file is named in tracebacks and failures (``README.md``).
    namespace: the globals to run in (a fresh one by default).

  Returns:
    The namespace after the last block, for assertions on its variables.
  """
  namespace = {'__name__': 'snippets'} if namespace is None else namespace
  for line, code in python_blocks(path):
    try:
      exec(compile(code, f'{name}:{line}', 'exec'), namespace)  # pylint: disable=exec-used
    except Exception as error:  # pylint: disable=broad-except
      pytest.fail(f'{name} python block at line {line} failed: '
                  f'{type(error).__name__}: {error}')
  return namespace
