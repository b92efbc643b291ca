"""`mac_optax.multi_steps`: k micro-batches == one batch k times larger."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from tests import small_mlp

K = 4
MICRO = 3
OUTER_STEPS = 2


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(OUTER_STEPS, K * MICRO, 5)).astype(np.float32)
  x += np.linspace(-1, 2, 5, dtype=np.float32)  # a mean input far from 0
  y = rng.integers(0, 3, size=(OUTER_STEPS, K * MICRO)).astype(np.int32)
  return x, y


def _train(tx, params, batches):
  @jax.jit
  def step(params, state, x, y):
    grads, inter = small_mlp.grads_and_statistics(params, x, y)
    updates, state = tx.update(grads, state, params, intermediates=inter)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for x, y in batches:
    params, state = step(params, state, x, y)
  return params, state


def _inner(like):
  return mac_optax.mac_sgd(0.1, momentum=0.9, damping=0.3, stat_decay=0.8,
                           intermediates_like=like)


def _micro_batches(x, y):
  return [(x[t, j * MICRO:(j + 1) * MICRO], y[t, j * MICRO:(j + 1) * MICRO])
          for t in range(OUTER_STEPS) for j in range(K)]


@pytest.fixture(scope='module')
def big_batch_run():
  x, y = _data()
  params = small_mlp.random_params(x[0], seed=1)
  like = small_mlp.intermediates_like(params, x[0])
  return _train(_inner(like), params, list(zip(x, y)))


def _mac_state(state):
  return [s for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda s: isinstance(s, mac_optax.MacState))
          if isinstance(s, mac_optax.MacState)][0]


def test_micro_batches_equal_one_big_batch(big_batch_run):
  x, y = _data()
  params = small_mlp.random_params(x[0], seed=1)
  like = small_mlp.intermediates_like(params, x[0, :MICRO])
  tx = mac_optax.multi_steps(_inner(like), K, intermediates_like=like)
  got_params, got_state = _train(tx, params, _micro_batches(x, y))
  want_params, want_state = big_batch_run
  for got, want in zip(jax.tree_util.tree_leaves(got_params),
                       jax.tree_util.tree_leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  got_mac = _mac_state(got_state.multi_steps.inner_opt_state)
  want_mac = _mac_state(want_state)
  assert int(got_mac.step) == OUTER_STEPS  # committed steps, not micro-steps
  for key, layer in want_mac.layers.items():
    np.testing.assert_allclose(got_mac.layers[key].mean, layer.mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_mac.layers[key].count, layer.count)
  # The running mean is reset after a committed step.
  for leaf in jax.tree_util.tree_leaves(got_state.intermediates):
    np.testing.assert_array_equal(leaf, 0)


def test_plain_multisteps_loses_earlier_micro_batches(big_batch_run):
  """The control: optax.MultiSteps alone uses the last micro-batch's ā."""
  x, y = _data()
  params = small_mlp.random_params(x[0], seed=1)
  like = small_mlp.intermediates_like(params, x[0, :MICRO])
  tx = optax.MultiSteps(_inner(like), K)
  _, state = _train(tx, params, _micro_batches(x, y))
  got = _mac_state(state.inner_opt_state).layers['Dense_0'].mean
  want = _mac_state(big_batch_run[1]).layers['Dense_0'].mean
  assert not np.allclose(got, want, rtol=1e-3)


def test_skipped_micro_step_is_not_accumulated():
  x, y = _data()
  params = small_mlp.random_params(x[0], seed=1)
  like = small_mlp.intermediates_like(params, x[0, :MICRO])

  def skip_nonfinite(updates, gradient_step, params):
    del gradient_step, params
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(u))
                                  for u in jax.tree_util.tree_leaves(updates)]))
    return jnp.logical_not(finite), ()

  tx = mac_optax.multi_steps(_inner(like), 2, intermediates_like=like,
                             should_skip_update_fn=skip_nonfinite)
  update = jax.jit(
      lambda g, s, i: tx.update(g, s, params, intermediates=i))
  state = tx.init(params)
  grads = jax.tree_util.tree_map(lambda p: 0.1 * p, params)
  inter = jax.tree_util.tree_map(
      lambda s: jnp.ones(s.shape, s.dtype), like)
  _, state = update(grads, state, inter)
  after_first = state.intermediates
  bad = jax.tree_util.tree_map(lambda g: g * jnp.nan, grads)
  _, state = update(bad, state, inter)
  for a, b in zip(jax.tree_util.tree_leaves(after_first),
                  jax.tree_util.tree_leaves(state.intermediates)):
    np.testing.assert_array_equal(a, b)
  assert int(state.multi_steps.mini_step) == 1


def test_intermediates_must_match_the_template():
  x, _ = _data()
  params = small_mlp.random_params(x[0], seed=1)
  like = small_mlp.intermediates_like(params, x[0])
  tx = mac_optax.multi_steps(_inner(like), 2, intermediates_like=like)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match='intermediates_like'):
    tx.update(grads, state, params, intermediates={'Dense_0': like['Dense_0']})
  with pytest.raises(ValueError, match='intermediates='):
    tx.update(grads, state, params)
