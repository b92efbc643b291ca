"""Smoke test of benchmarks/compile_cost.py: one quick model measured once."""

from benchmarks import compile_cost


def test_measure_counts_ops_and_times_both_steps():
  result = compile_cost.measure('MLP', quick=True, compile_repeats=1,
                                repeats=1, inner=1)
  assert result['update']['layers'] == 3
  assert result['update']['ops'] > 0
  assert result['step_info']['mac']['ops'] > result['step_info']['sgd']['ops']
  assert set(result['step']) == {'sgd', 'mac'}
