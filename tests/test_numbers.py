"""Every measured number in README.md and docs/ comes from a script that reproduces it.

- Benchmark numbers (README.md's Benchmarks section, the text of
  docs/benchmarks.md before its examples section) appear verbatim in
  benchmarks/RESULTS.md, which benchmarks/run.py writes (not rerun here: hours
  of CPU).
- The learning-rate table of docs/hyperparameters.md is the "best lr" column
  of RESULTS.md's §5 and §5b tables, row by row.
- Example numbers (docs/benchmarks.md, section Examples) are quoted
  as the rows an example prints, cut before the wall-clock column, each under
  the exact command that prints them. The fast test checks that pairing; the
  slow tests (``pytest -m slow tests/test_numbers.py``) rerun each command and
  compare the quoted rows with what it prints.
"""

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / 'benchmarks' / 'RESULTS.md'
BENCHMARKS_PAGE = ROOT / 'docs' / 'benchmarks.md'
EXAMPLES_HEADING = '## Examples'

# A number: digits with optional decimal/thousands parts, and what makes it a
# measurement rather than a bare count (a ratio sign, a range, a spread).
_NUMBER = re.compile(
    r'(?<![\w.])\d+(?:[.,]\d+)*(?:\s*[–-]\s*\d+(?:[.,]\d+)*)?'
    r'(?:\s*×|\s*±\s*\d+(?:\.\d+)?)?(?![\w])')


def _squash(text: str) -> str:
  return re.sub(r'\s+', ' ', text)


def _section(text: str, heading: str) -> str:
  """The text under `heading` up to the next heading of the same level."""
  start = text.index(heading + '\n')
  level = heading.split(' ')[0]
  rest = text[start + len(heading):]
  end = re.search(rf'^{level} ', rest, re.M)
  return rest[:end.start()] if end else rest


def _prose(text: str) -> str:
  """`text` without its fenced code blocks and link targets."""
  text = re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)
  return re.sub(r'\]\([^)]*\)', ']', text)


def benchmark_texts() -> dict[str, str]:
  readme = (ROOT / 'README.md').read_text(encoding='utf-8')
  page = BENCHMARKS_PAGE.read_text(encoding='utf-8')
  return {
      'README.md, Benchmarks': _prose(_section(readme, '## Benchmarks')),
      'docs/benchmarks.md, introduction': _prose(
          page.split(EXAMPLES_HEADING)[0].split('\n', 1)[1]),
  }


@pytest.mark.parametrize('where', list(benchmark_texts()))
def test_benchmark_numbers_are_quoted_from_results(where):
  results = _squash(RESULTS.read_text(encoding='utf-8'))
  numbers = [_squash(m.group(0)) for m in
             _NUMBER.finditer(benchmark_texts()[where])]
  assert numbers, f'{where}: no numbers found (section renamed?)'
  missing = [n for n in numbers if n not in results]
  assert not missing, (f'{where} quotes numbers that benchmarks/RESULTS.md '
                       f'does not state: {missing}')
  # Dated and attributed: the measuring date and library commit it names.
  text = benchmark_texts()[where]
  assert re.search(r'\b20\d\d-\d\d-\d\d\b', text), f'{where}: no date'
  commits = re.findall(r'\bcommit ([0-9a-f]{7,40})\b', text)
  assert commits and all(c in results for c in commits), (where, commits)


def example_quotes() -> list[tuple[str, list[str]]]:
  """``(command, quoted rows)`` of each example quoted in docs/benchmarks.md."""
  section = _section(BENCHMARKS_PAGE.read_text(encoding='utf-8'),
                     EXAMPLES_HEADING)
  pairs = re.findall(r'^```bash\n(python3 examples/[^\n]*)\n```\s*\n'
                     r'```text\n(.*?)\n```', section, re.S | re.M)
  return [(command, [line.rstrip() for line in rows.splitlines()])
          for command, rows in pairs]


def test_each_quoted_example_row_sits_under_its_command():
  quotes = example_quotes()
  assert len(quotes) >= 3, 'docs/benchmarks.md lost its example quotes'
  section = _section(BENCHMARKS_PAGE.read_text(encoding='utf-8'),
                     EXAMPLES_HEADING)
  # Every text block of the section is one of the quoted outputs.
  assert len(re.findall(r'^```text\n', section, re.M)) == len(quotes)
  for command, rows in quotes:
    script = ROOT / shlex.split(command)[1]
    assert script.exists(), command
    assert len(rows) >= 2 and 'optimizer' in rows[0], (command, rows)
    for row in rows:
      assert not re.search(r'\b(s|seconds?|time)\b', row), (
          f'{command}: quoted row has a wall-clock column: {row!r}')


@pytest.mark.slow
@pytest.mark.parametrize('command', [c for c, _ in example_quotes()])
def test_quoted_example_reproduces(command, tmp_path):
  rows = dict(example_quotes())[command]
  argv = shlex.split(command)
  assert argv[0] == 'python3'
  if '--out' not in argv and argv[1].endswith(('vit_digits.py',
                                                'char_gpt.py',
                                                'gemma_decoder.py')):
    argv += ['--out', str(tmp_path)]   # the plots, not the printed numbers
  result = subprocess.run([sys.executable] + argv[1:], cwd=ROOT, text=True,
                          capture_output=True, check=False, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = [line.rstrip() for line in result.stdout.splitlines()]
  for row in rows:
    assert any(line.startswith(row) for line in printed), (
        f'{command} no longer prints {row!r}; it printed:\n{result.stdout}')


def best_learning_rates(section_heading: str) -> dict[tuple[str, str], str]:
  """``{(task, optimizer): best lr}`` from one convergence section of RESULTS."""
  section = _section(RESULTS.read_text(encoding='utf-8'), section_heading)
  found = {}
  for task, body in re.findall(r'^### (\S+)\n(.*?)(?=^### |\Z)', section,
                               re.S | re.M):
    for optimizer, lr in re.findall(r'^\| ([^|]+?) \| ([0-9.]+) \|', body,
                                    re.M):
      found[(task, optimizer)] = lr
  return found


def test_hyperparameter_guide_quotes_the_best_learning_rates():
  """docs/hyperparameters.md's learning-rate table is the report's "best lr"."""
  runs = {'§5': best_learning_rates('## 5. Convergence on real data'),
          '§5b': best_learning_rates(
              '## 5b. Convergence with Muon and compositions (`peers` run)')}
  assert ('pydoc-einsum-decoder', 'MAC→Adam') in runs['§5b'], runs['§5b']
  page = (ROOT / 'docs' / 'hyperparameters.md').read_text(encoding='utf-8')
  header, _, *rows = re.search(r'^\| task \| run \|.*?\n(?=\n)', page,
                               re.S | re.M).group(0).splitlines()
  optimizers = [c.strip() for c in header.strip('|').split('|')][2:]
  assert optimizers == ['SGD-momentum', 'MAC', 'AdamW', 'MAC→Adam'], header
  assert len(rows) == 9, rows
  for row in rows:
    task, run, *lrs = [c.strip() for c in row.strip('|').split('|')]
    for optimizer, lr in zip(optimizers, lrs):
      assert lr == runs[run].get((task, optimizer), '–'), (row, optimizer)
