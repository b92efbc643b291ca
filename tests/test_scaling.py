"""Injected hyperparameters, no recompilation across steps, vectorized stacks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mac_optax
from mac_optax import linen as mac_linen
from tests import small_mlp

STEPS = 5


def _setup():
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(STEPS, 8, 5)).astype(np.float32) + 0.5
  ys = rng.integers(0, 3, size=(STEPS, 8)).astype(np.int32)
  params = small_mlp.random_params(xs[0])
  like = small_mlp.intermediates_like(params, xs[0])
  return params, xs, ys, like


DAMPING = optax.linear_schedule(2.0, 0.25, STEPS - 1)


def _injected(like):
  return optax.inject_hyperparams(
      mac_optax.mac, static_args=('cov_every', 'inv_every'))(
          damping=DAMPING, stat_decay=0.8, cov_every=2, inv_every=3,
          intermediates_like=like)


def _train(tx, params, xs, ys):
  """Jitted steps; returns per-step updates, the state and the trace count."""
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)  # runs only while tracing
    grads, inter = small_mlp.grads_and_statistics(params, x, y)
    updates, state = tx.update(grads, state, params, intermediates=inter)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  history = []
  for x, y in zip(xs, ys):
    params, state, updates = step(params, state, x, y)
    history.append((params, updates))
  return history, state, len(traces)


def test_damping_schedule_and_traced_stat_decay_match_fixed_values():
  params, xs, ys, like = _setup()
  history, state, _ = _train(_injected(like), params, xs, ys)
  assert float(state.hyperparams['damping']) == DAMPING(STEPS - 1)
  # Reference: a fresh `mac` with this step's damping as a Python float,
  # carrying the same MacState.
  grads_fn = jax.jit(small_mlp.grads_and_statistics)
  p, ref_state = params, None
  for t, (x, y) in enumerate(zip(xs, ys)):
    tx = mac_optax.mac(float(DAMPING(t)), 0.8, cov_every=2, inv_every=3)
    grads, inter = grads_fn(p, x, y)
    if t == 0:
      ref_state = tx.init(params)
    updates, ref_state = tx.update(grads, ref_state, intermediates=inter)
    got_params, got_updates = history[t]
    for a, b in zip(jax.tree_util.tree_leaves(got_updates),
                    jax.tree_util.tree_leaves(updates)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    p = optax.apply_updates(p, updates)
    for a, b in zip(jax.tree_util.tree_leaves(got_params),
                    jax.tree_util.tree_leaves(p)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The damping schedule changed the updates: λ went from 2.0 to 0.25.
  assert DAMPING(0) != DAMPING(STEPS - 1)


def test_no_recompilation_with_full_state_in_init():
  params, xs, ys, like = _setup()
  tx = optax.chain(_injected(like), optax.trace(0.9), optax.scale(-0.1))
  _, _, traces = _train(tx, params, xs, ys)
  assert traces == 1


def test_lazy_state_traces_once_more_then_never():
  params, xs, ys, _ = _setup()
  tx = optax.chain(mac_optax.mac(0.5, 0.8), optax.scale(-0.1))
  _, state, traces = _train(tx, params, xs, ys)
  assert set(state[0].layers) == {'Dense_0', 'Dense_1'}
  assert traces == 2  # step 1 creates the layer states, then stable


class Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(4)(x)), None


class Stack(nn.Module):
  layers: int

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(Block, variable_axes={'params': 0, 'intermediates': 0},
                   split_rngs={'params': True}, length=self.layers)
    x, _ = scan()(x, None)
    return x


def _stack_update_jaxpr(layers):
  model = Stack(layers)
  x = jnp.ones((3, 4))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']
  like = mac_linen.intermediates_like(model, {'params': params}, x)
  tx = mac_optax.mac(intermediates_like=like)
  state = jax.eval_shape(tx.init, params)
  return state, jax.make_jaxpr(
      lambda g, s, i: tx.update(g, s, intermediates=i))(params, state, like)


def test_scan_stack_update_is_vectorized_over_layers():
  state2, jaxpr2 = _stack_update_jaxpr(2)
  state7, jaxpr7 = _stack_update_jaxpr(7)
  assert state7.layers['ScanBlock_0/Dense_0'].mean.shape == (7, 1, 4)
  assert state7.layers['ScanBlock_0/Dense_0'].count.shape == (7,)
  assert state2.layers['ScanBlock_0/Dense_0'].mean.shape == (2, 1, 4)
  # The same program for 2 and 7 stacked layers, with no loop in it.
  primitives = lambda j: [e.primitive.name for e in j.jaxpr.eqns]
  assert primitives(jaxpr2) == primitives(jaxpr7)
  assert not {'scan', 'while'} & set(primitives(jaxpr7))
