"""The documentation: every Python block of docs/*.md runs; the site builds with -W."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

import mac_optax

from tests import markdown_snippets

DOCS = pathlib.Path(__file__).resolve().parent.parent / 'docs'
PAGES = sorted(DOCS.glob('*.md'))


def test_docs_pages_exist():
  names = {page.stem for page in PAGES}
  assert {'index', 'getting_started', 'how_it_works', 'supported_layers',
          'attention', 'scaling', 'paper_parity', 'api',
          'benchmarks'} <= names


@pytest.mark.parametrize('page', PAGES, ids=[p.name for p in PAGES])
def test_docs_page_python_blocks_run(page):
  namespace = markdown_snippets.run_python_blocks(page, f'docs/{page.name}')
  # A coverage table shown on a page is what the page's plan prints.
  printed = {str(v) for v in namespace.values()
             if isinstance(v, mac_optax.LayerPlan)}
  for table in re.findall(r'^```text\n(MAC layer plan.*?)\n```',
                          page.read_text(encoding='utf-8'), re.S | re.M):
    assert table in printed, f'{page.name}: table differs from print(plan)'


def test_getting_started_shows_linen_nnx_and_train_state():
  code = '\n'.join(c for _, c in markdown_snippets.python_blocks(
      DOCS / 'getting_started.md'))
  for needle in ('mac_linen.capture()', 'mac_nnx.capture()',
                 'mac_optax.TrainState', 'intermediates=inter'):
    assert needle in code, needle


_BUILD_NEEDS = ('sphinx', 'myst_parser', 'furo')


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in _BUILD_NEEDS),
    reason="the docs build needs the 'docs' extra: pip install -e '.[docs]'")
def test_docs_build_with_warnings_as_errors(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b',
       'html', '-d', str(tmp_path / 'doctrees'), str(DOCS),
       str(tmp_path / 'html')],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (tmp_path / 'html' / 'api.html').exists()
