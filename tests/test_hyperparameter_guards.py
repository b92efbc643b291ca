"""Hyperparameters MAC cannot use: clear errors when concrete, a guarded and
counted step when traced, and statistics dropped as non-finite counted."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax import linen as mac_linen
from tests import reference
from tests import small_mlp

DAMPING, DECAY = 0.5, 0.9


@pytest.fixture(scope='module')
def mlp():
  """Params, a plan and the gradients/statistics of three batches."""
  return small_mlp.planned_batches(seed=0)


def _mean(inter, layer):
  return np.asarray(inter[layer][mac_optax.MEAN][0], np.float64)[0]


def _expected(grads, means, layer):
  """The float64 MAC update of `layer` for an already debiased ``â``."""
  g = grads[layer]
  means = np.concatenate([means, [1.0]])   # the bias coordinate
  d_out = g['kernel'].shape[-1]
  return reference.dense_update(g['kernel'], g['bias'],
                                np.tile(means, (d_out, 1)), DAMPING)


@pytest.fixture(scope='module')
def injected(mlp):
  params, plan, _ = mlp
  tx = optax.inject_hyperparams(
      mac_optax.mac, static_args=('cov_every', 'inv_every'))(
          damping=DAMPING, stat_decay=DECAY, plan=plan)
  return tx, jax.jit(tx.update)


INVALID = [('damping', -1.0), ('damping', 0.0), ('damping', np.nan),
           ('damping', np.inf), ('stat_decay', 1.0), ('stat_decay', 1.5),
           ('stat_decay', -0.1)]


@pytest.mark.parametrize('name,value', INVALID)
def test_an_invalid_traced_hyperparameter_passes_the_gradient_and_is_counted(
    mlp, injected, name, value):
  params, _, batches = mlp
  tx, update = injected
  state = tx.init(params)
  _, state = update(batches[0][0], state, params,
                    intermediates=batches[0][1])
  before = mac_optax.diagnostics.find_mac_state(state)

  # Two steps with the invalid value: the gradient comes back unchanged,
  # nothing is folded or refreshed, and both steps are counted.
  state.hyperparams[name] = jnp.asarray(value, jnp.float32)
  for grads, inter in batches[1:]:
    updates, state = update(grads, state, params, intermediates=inter)
    jax.tree.map(np.testing.assert_array_equal, updates, grads)
  mac_state = mac_optax.diagnostics.find_mac_state(state)
  assert int(mac_state.invalid_steps) == 2
  assert mac_optax.diagnostics.counters(state)['invalid_steps'] == 2
  for key, layer in mac_state.layers.items():
    for field in ('mean', 'count', 'used'):
      np.testing.assert_array_equal(getattr(layer, field),
                                    getattr(before.layers[key], field))

  # Valid again: the update is MAC's on the EMA of the valid steps only.
  state.hyperparams[name] = jnp.asarray(
      DAMPING if name == 'damping' else DECAY, jnp.float32)
  grads, inter = batches[2]
  updates, state = update(grads, state, params, intermediates=inter)
  for layer in ('Dense_0', 'Dense_1'):
    a1, a2 = _mean(batches[0][1], layer), _mean(inter, layer)
    debiased = (DECAY * (1 - DECAY) * a1 + (1 - DECAY) * a2) / (1 - DECAY**2)
    kernel, bias = _expected(grads, debiased, layer)
    reference.assert_close(updates[layer]['kernel'], kernel)
    reference.assert_close(updates[layer]['bias'], bias)
  assert int(mac_optax.diagnostics.find_mac_state(state).invalid_steps) == 2


def test_traced_damping_given_to_mac_itself_is_guarded(mlp):
  params, plan, batches = mlp
  grads, inter = batches[0]

  @jax.jit
  def step(damping):
    tx = mac_optax.mac(damping, DECAY, plan=plan)
    return tx.update(grads, tx.init(params), intermediates=inter)

  updates, state = step(jnp.asarray(-1.0))
  jax.tree.map(np.testing.assert_array_equal, updates, grads)
  assert int(state.invalid_steps) == 1
  assert all(int(layer.count) == 0 for layer in state.layers.values())
  updates, state = step(jnp.asarray(DAMPING))
  assert int(state.invalid_steps) == 0
  kernel, _ = _expected(grads, _mean(inter, 'Dense_1'), 'Dense_1')
  reference.assert_close(updates['Dense_1']['kernel'], kernel)


def test_the_guard_keeps_the_state_structure_and_one_trace(mlp, injected):
  params, _, batches = mlp
  tx, _ = injected
  traces = []

  @jax.jit
  def update(grads, state, inter):
    traces.append(None)
    return tx.update(grads, state, params, intermediates=inter)

  state = tx.init(params)
  structure = jax.tree.structure(state)
  for damping, (grads, inter) in zip((DAMPING, -1.0, DAMPING), batches):
    state.hyperparams['damping'] = jnp.asarray(damping, jnp.float32)
    _, state = update(grads, state, inter)
    assert jax.tree.structure(state) == structure
  assert len(traces) == 1


def test_concrete_invalid_values_still_raise_at_construction():
  with pytest.raises(ValueError, match='damping must be > 0'):
    mac_optax.mac(damping=jnp.asarray(-1.0))
  with pytest.raises(ValueError, match=r'stat_decay must be in \[0, 1\)'):
    mac_optax.mac(stat_decay=1.0)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(damping='1.0'), TypeError,
     r"damping must be a real number.*got str '1.0'"),
    (dict(damping=None), TypeError, r'damping must be a real number.*None'),
    (dict(damping=jnp.ones(3)), ValueError,
     r'damping must be a scalar.*shape \(3,\).*inject_hyperparams'),
    (dict(damping=np.ones(1)), ValueError, r'damping.*shape \(1,\)'),
    (dict(stat_decay=jnp.array([0.9, 0.95])), ValueError,
     r'stat_decay must be a scalar.*shape \(2,\)'),
    (dict(stat_decay='0.9'), TypeError, r'stat_decay must be a real number'),
    (dict(stat_decay=jnp.array([True])), TypeError,
     r'stat_decay must be a real number.*dtype bool'),
    (dict(cov_every='5'), TypeError, r'cov_every must be an integer'),
])
def test_hyperparameters_that_are_not_one_number_raise_naming_them(
    kwargs, error, match):
  with pytest.raises(error, match=match):
    mac_optax.mac(**kwargs)
  with pytest.raises(error, match=match):
    mac_optax.mac_sgd(0.1, **kwargs)


def test_a_damping_vector_under_inject_hyperparams_raises_at_init():
  params = small_mlp.random_params(np.zeros((2, 5), np.float32))
  tx = optax.inject_hyperparams(mac_optax.mac_sgd)(learning_rate=0.1,
                                                   damping=jnp.ones(3))
  with pytest.raises(ValueError, match=r'damping must be a scalar'):
    tx.init(params)


# ------------------------------------------------- non-finite statistics --


def test_a_non_finite_statistic_is_dropped_and_counted(mlp):
  params, plan, batches = mlp
  tx = mac_optax.mac(DAMPING, DECAY, plan=plan)
  update = jax.jit(tx.update)
  state = tx.init(params)
  grads, inter = batches[0]
  bad = jax.tree.map(lambda a: a, inter)
  bad['Dense_0'][mac_optax.MEAN] = (
      inter['Dense_0'][mac_optax.MEAN][0].at[0, 1].set(jnp.inf),)
  _, state = update(grads, state, intermediates=bad)
  _, state = update(grads, state, intermediates=inter)
  counters = mac_optax.diagnostics.counters(state)
  assert int(counters['Dense_0/skipped']) == 1
  assert int(counters['Dense_1/skipped']) == 0
  assert int(counters['invalid_steps']) == 0
  assert int(state.layers['Dense_0'].count) == 1
  assert int(state.layers['Dense_1'].count) == 2
  # The good statistic alone makes the EMA (no zero folded for the bad one).
  np.testing.assert_allclose(state.layers['Dense_0'].used[0],
                             _mean(inter, 'Dense_0'), rtol=1e-6)


_F16 = dict(dtype=jnp.float16, param_dtype=jnp.float16)


def test_float16_activations_whose_sum_overflows_give_the_float64_mean():
  """4096 inputs near 2000 sum to ~8e6, past float16's 65504."""
  rng = np.random.default_rng(0)
  x = rng.uniform(1000.0, 3000.0, size=(256, 16, 3)).astype(np.float16)
  with np.errstate(over='ignore'):
    assert np.isinf(np.sum(x, axis=(0, 1), dtype=np.float16)).all()
  mask = rng.integers(0, 2, size=x.shape[:2]).astype(bool)
  x64 = x.astype(np.float64)

  def statistic(model, mask=None):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables)
    with mac_linen.capture(token_mask=mask):
      _, v = jax.jit(lambda x: model.apply(variables, x,
                                           mutable=['intermediates']))(x)
    (stat,) = jax.tree.leaves(v['intermediates'])
    assert stat.dtype == jnp.float32 and np.isfinite(stat).all()
    return np.asarray(stat)

  np.testing.assert_allclose(statistic(nn.Dense(4, **_F16))[0],
                             x64.mean((0, 1)), rtol=1e-6)
  np.testing.assert_allclose(statistic(nn.Dense(4, **_F16), mask)[0],
                             x64[mask].mean(0), rtol=1e-6)
  # The conv's mean patch: tap k reads x[t + k - 1] ('SAME' zero padding).
  padded = np.pad(x64, ((0, 0), (1, 1), (0, 0)))
  patch = np.stack([padded[:, k:k + 16].mean((0, 1)) for k in range(3)])
  np.testing.assert_allclose(
      statistic(nn.Conv(2, (3,), padding='SAME', **_F16))[0],
      patch.reshape(-1), rtol=1e-6)
