"""`mac_optax.TrainState`: the linen TrainState path trains with MAC."""

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax import linen as mac_linen


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


MODEL = MLP()
_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(32, 5)).astype(np.float32)
Y = _RNG.integers(0, 3, size=(32,))


def _loss_fn(apply_fn, params, x, y):
  with mac_linen.capture():
    logits, v = apply_fn({'params': params}, x, mutable=['intermediates'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, v['intermediates']


@jax.jit
def _train_step(state, x, y):
  grad_fn = jax.value_and_grad(
      lambda p: _loss_fn(state.apply_fn, p, x, y), has_aux=True)
  (loss, inter), grads = grad_fn(state.params)
  return state.apply_gradients(grads=grads, intermediates=inter), loss


def _params():
  return MODEL.init(jax.random.key(0), X)['params']


def test_train_state_steps_equal_the_plain_optax_loop():
  tx = mac_optax.mac_sgd(0.1, momentum=0.9, weight_decay=1e-3)
  state = mac_optax.TrainState.create(apply_fn=MODEL.apply, params=_params(),
                                      tx=tx)
  params, opt_state = _params(), tx.init(_params())

  @jax.jit
  def plain_step(params, opt_state):
    (_, inter), grads = jax.value_and_grad(
        lambda p: _loss_fn(MODEL.apply, p, X, Y), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   intermediates=inter)
    return optax.apply_updates(params, updates), opt_state

  losses = []
  for _ in range(5):
    state, loss = _train_step(state, X, Y)
    losses.append(float(loss))
    params, opt_state = plain_step(params, opt_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               state.params, params)
  assert int(state.step) == 5
  mac_state = mac_optax.diagnostics.find_mac_state(state.opt_state)
  assert set(mac_state.layers) == {'Dense_0', 'Dense_1'}
  assert int(mac_state.step) == 5
  assert losses[-1] < losses[0]


def test_flax_train_state_does_not_forward_intermediates():
  # Why the subclass exists: Flax's apply_gradients calls tx.update without
  # keywords, so MAC reports the statistics as missing.
  state = train_state.TrainState.create(
      apply_fn=MODEL.apply, params=_params(), tx=mac_optax.mac_sgd(0.1))
  grads = jax.tree.map(jnp.ones_like, state.params)
  with pytest.raises(ValueError, match='mac_optax.TrainState'):
    state.apply_gradients(grads=grads)


def test_baseline_optimizers_ignore_intermediates():
  # The same step serves SGD: keywords the optimizer does not take are dropped.
  state = mac_optax.TrainState.create(apply_fn=MODEL.apply, params=_params(),
                                      tx=optax.sgd(0.1))
  state, _ = _train_step(state, X, Y)
  (_, _), grads = jax.value_and_grad(
      lambda p: _loss_fn(MODEL.apply, p, X, Y), has_aux=True)(_params())
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, _params(), grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               state.params, expected)


def test_extra_args_reach_the_optimizer_and_fields_are_replaced():
  seen = {}

  def update(updates, state, params=None, *, intermediates=None, foo=None):
    seen.update(intermediates=intermediates, foo=foo)
    return updates, state

  tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
                                             update)

  class WithMetric(mac_optax.TrainState):
    metric: float = 0.0

  state = WithMetric.create(apply_fn=MODEL.apply, params=_params(), tx=tx)
  grads = jax.tree.map(jnp.zeros_like, state.params)
  state = state.apply_gradients(grads=grads, intermediates={'a': 1},
                                extra_args={'foo': 2}, metric=3.0)
  assert seen == {'intermediates': {'a': 1}, 'foo': 2}
  assert state.metric == 3.0 and state.step == 1
