"""The optimizer state is a plain pytree: orbax round trip, bit-identical resume."""

import jax
import numpy as np
import pytest

import mac_optax
from tests import small_mlp
from tests.example_scripts import load_example

ocp = pytest.importorskip('orbax.checkpoint')

STEPS = 4




def test_orbax_round_trip_and_bit_identical_resume(tmp_path):
  tx, params, xs, ys = small_mlp.checkpoint_run(STEPS, 8)
  step = small_mlp.train_step(tx)
  state = tx.init(params)
  # Uninterrupted run.
  p, s = params, state
  for t in range(STEPS):
    p, s = step(p, s, xs[t], ys[t])
  straight = (p, s)

  # Run half, save, restore into a fresh template, finish.
  p, s = params, state
  for t in range(STEPS // 2):
    p, s = step(p, s, xs[t], ys[t])
  checkpointer = ocp.StandardCheckpointer()
  path = tmp_path / 'ckpt'
  checkpointer.save(path, {'params': p, 'opt_state': s})
  checkpointer.wait_until_finished()
  template = jax.eval_shape(
      lambda: {'params': params, 'opt_state': tx.init(params)})
  restored = checkpointer.restore(path, template)
  # The round trip is exact and keeps the pytree types (MacState, ...).
  assert (jax.tree_util.tree_structure(restored['opt_state'])
          == jax.tree_util.tree_structure(s))
  for a, b in zip(jax.tree_util.tree_leaves(restored),
                  jax.tree_util.tree_leaves({'params': p, 'opt_state': s})):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  p, s = restored['params'], restored['opt_state']
  for t in range(STEPS // 2, STEPS):
    p, s = step(p, s, xs[t], ys[t])

  mac_state = s[0]
  assert isinstance(mac_state, mac_optax.MacState)
  assert int(mac_state.step) == STEPS
  for a, b in zip(jax.tree_util.tree_leaves((p, s)),
                  jax.tree_util.tree_leaves(straight)):
    np.testing.assert_array_equal(a, b)  # bit-identical


def _load_example():
  return load_example('data_parallel')


@pytest.mark.slow  # ~10 s of CPU per run of the example, mostly compiling
def test_data_parallel_example_checkpoints_and_resumes(tmp_path):
  """Runs the example twice: stopped at step 3, then resumed to step 6."""
  example = _load_example()
  args = ['--steps', '6', '--batch-size', '16', '--save-every', '2',
          '--no-progress', '--ckpt-dir', str(tmp_path)]
  first = example.main(args + ['--stop-after', '3'])
  assert (first['resumed_from'], first['steps']) == (0, 3)
  assert sorted(int(p.name) for p in tmp_path.iterdir()
                if p.name.isdigit()) == [2, 3]
  resumed = example.main(args)
  assert (resumed['resumed_from'], resumed['steps']) == (3, 6)
  assert np.isfinite(resumed['train_loss'])
  # The parameters moved on from the restored ones.
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(first['params']),
      jax.tree_util.tree_leaves(resumed['params'])))
