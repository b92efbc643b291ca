"""Smoke test of benchmarks/compile_cost.py: one quick model measured once."""

from benchmarks import compile_cost


def test_measure_counts_ops_and_times_both_steps():
  result = compile_cost.measure('MLP', quick=True, compile_repeats=1,
                                repeats=1, inner=1)
  assert result['update']['layers'] == 3
  assert result['update']['ops'] > 0
  assert result['step_info']['mac']['ops'] > result['step_info']['sgd']['ops']
  assert set(result['step']) == {'sgd', 'mac'}


def test_inlined_ops_count_a_called_function_once_per_call():
  import jax  # pylint: disable=import-outside-toplevel
  inner = jax.jit(lambda x: x * 2.0 + 1.0)   # multiply, add (+ constants)
  once = compile_cost.inlined_ops(
      jax.jit(inner).lower(1.0).as_text())
  thrice = compile_cost.inlined_ops(
      jax.jit(lambda x: inner(inner(inner(x)))).lower(1.0).as_text())
  assert once > 0
  assert thrice == 3 * once


def test_scanned_decoders_lower_to_the_same_step_at_every_depth():
  """`--scan-depths`'s decoders (attention in the scanned block), both ways."""
  from benchmarks import models  # pylint: disable=import-outside-toplevel
  batch = models.synthetic_batch('tokens', (8,), 2, 96)
  for framework in ('nn.scan', 'nnx.scan'):
    ops = []
    for depth in (1, 3):
      step, args = compile_cost._scan_step(framework, depth, 'mac', batch)  # pylint: disable=protected-access
      ops.append(compile_cost.inlined_ops(step.lower(*args).as_text()))
    assert ops[0] == ops[1] > 0, (framework, ops)
