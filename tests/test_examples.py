"""The README's Python snippets run, and the digits demo runs end to end."""

import pathlib
import re

import jax
import numpy as np
import pytest

import mac_optax
from tests import markdown_snippets
from tests.example_scripts import load_example

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_snippets():
  """``(line, code)`` of every tested ```python block of README.md, in order."""
  return markdown_snippets.python_blocks(ROOT / 'README.md')


def load_demo():
  return load_example('digits_cnn')


def test_readme_snippets_run():
  snippets = readme_snippets()
  assert any('intermediates=inter' in code for _, code in snippets), (
      "README lost the usage snippet with tx.update(..., intermediates=...)")
  namespace = markdown_snippets.run_python_blocks(ROOT / 'README.md',
                                                  'README.md')
  # The usage snippet's model mixes Conv, DenseGeneral and Dense: all three
  # must have been preconditioned (state created), and the step be finite.
  state = namespace['opt_state']
  mac_states = [s for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda s: isinstance(s, mac_optax.MacState))
                if isinstance(s, mac_optax.MacState)]
  assert mac_states, 'no MacState in the README optimizer state'
  assert {'Conv_0', 'DenseGeneral_0', 'Dense_0'} <= set(mac_states[0].layers)
  for leaf in jax.tree_util.tree_leaves(namespace['params']):
    assert np.all(np.isfinite(leaf))
  # Each coverage table printed in the README is what its plan prints.
  text = (ROOT / 'README.md').read_text(encoding='utf-8')
  shown = re.findall(r'^```text\n(MAC layer plan.*?)\n```', text, re.S | re.M)
  printed = {str(v) for v in namespace.values()
             if isinstance(v, mac_optax.LayerPlan)}
  assert len(shown) == 2, 'README lost the linen / NNX coverage tables'
  for table in shown:
    assert table in printed, f'README table differs from print(plan):\n{table}'


def test_demo_runs_a_few_steps(capsys):
  demo = load_demo()
  results = demo.main(['--steps', '3', '--batch-size', '32', '--no-progress'])
  assert [r['optimizer'] for r in results] == ['MAC', 'SGD']
  for r in results:
    assert np.isfinite(r['train_loss'])
    assert 0.0 <= r['test_acc'] <= 1.0 and 0.0 <= r['train_acc'] <= 1.0
  out = capsys.readouterr().out
  assert 'test acc' in out and 'MAC' in out and 'SGD' in out


def test_demo_batches_are_shuffled_epochs():
  demo = load_demo()
  batches = demo.batch_indices(100, 32, 7, seed=0)  # 3 batches per epoch
  assert batches.shape == (7, 32)
  for epoch in range(2):
    seen = batches[3 * epoch:3 * epoch + 3].ravel()
    assert len(set(seen.tolist())) == 96  # no repeats within an epoch
  assert not np.array_equal(batches[:3], batches[3:6])


def test_demo_epochs_flag():
  demo = load_demo()
  args = demo.parse_args(['--epochs', '2.5', '--seed', '3', '--mac-lr', '0.05'])
  assert args.epochs == 2.5 and args.seed == 3 and args.mac_lr == 0.05
  with pytest.raises(SystemExit):  # --steps and --epochs are exclusive
    demo.parse_args(['--steps', '3', '--epochs', '1'])
