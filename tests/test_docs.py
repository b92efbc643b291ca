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


def test_getting_started_shows_linen_nnx_train_state_and_batch_norm():
  code = '\n'.join(c for _, c in markdown_snippets.python_blocks(
      DOCS / 'getting_started.md'))
  for needle in ('mac_linen.capture()', 'mac_nnx.capture(net)',
                 'mac_optax.TrainState', 'intermediates=inter',
                 "mutable=['batch_stats', 'intermediates']",
                 "rngs={'dropout': key}", 'nn.BatchNorm', 'nn.Dropout'):
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


def _ci_command(name: str) -> str:
  """The README command that .ci/run greps for (`TEST`, `DOCS`), as a regex."""
  script = (DOCS.parent / '.ci' / 'run').read_text(encoding='utf-8')
  pattern = re.search(rf'^{name}_PATTERN="(.*)"$', script, re.M).group(1)
  assert f'grep -m1 -E -- "${name}_PATTERN" README.md' in script, name
  return pattern.replace('\\$', '$')   # the shell's escape of `$`


@pytest.mark.parametrize('name', ['TEST', 'DOCS'])
def test_readme_holds_the_commands_ci_runs(name):
  """CI runs the README's test and docs commands as written there."""
  readme = (DOCS.parent / 'README.md').read_text(encoding='utf-8')
  assert re.search(_ci_command(name), readme, re.M), name


def test_docs_index_and_readme_link_the_guides():
  readme = (DOCS.parent / 'README.md').read_text(encoding='utf-8')
  index = (DOCS / 'index.md').read_text(encoding='utf-8')
  docs_command = re.search(_ci_command('DOCS'), readme, re.M).group(0)
  assert docs_command in index
  assert '(docs/when_to_use_mac.md)' in readme
  assert '(docs/hyperparameters.md)' in readme
  assert 'Muon' in readme.split('## Benchmarks')[1].split('\n## ')[0]
