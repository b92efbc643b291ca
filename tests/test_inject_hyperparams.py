"""`optax.inject_hyperparams` wraps `mac_sgd` and every preset, under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from tests import small_mlp
from tests.test_alias import _problem
from tests.test_presets import _tiny_problem


def _grads(step):
  return {'layer': {'kernel': jnp.array([[0.3, -0.1], [0.2, 0.5]]) * (step + 1),
                    'bias': jnp.array([0.2, -0.4])},
          'scale': jnp.array([0.5 - step])}


def _run(tx, steps=4, params=None, inter=None, grads=None):
  """Updates of `steps` jitted steps (parameters held fixed)."""
  if params is None:
    params, inter = _problem()
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for step in range(steps):
    g = _grads(step) if grads is None else grads
    updates, state = update(g, state, params, intermediates=inter)
    out.append(updates)
  return out, state


def _assert_same(got, expected):
  for a, b in zip(got, expected):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=1e-5, atol=1e-7), a, b)


def test_issue_call_without_static_args_equals_plain_mac_sgd():
  kwargs = dict(learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
                clip_norm=1.0)
  injected, state = _run(optax.inject_hyperparams(mac_optax.mac_sgd)(**kwargs))
  plain, _ = _run(mac_optax.mac_sgd(**kwargs))
  _assert_same(injected, plain)
  assert set(state.hyperparams) >= {'learning_rate', 'momentum',
                                    'weight_decay', 'clip_norm', 'damping'}


def test_learning_rate_and_weight_decay_schedules_are_followed():
  lr = optax.linear_schedule(0.2, 0.05, 3)
  wd = optax.linear_schedule(1e-2, 1e-1, 3)
  tx = optax.inject_hyperparams(mac_optax.mac_sgd,
                                static_args=('cov_every', 'inv_every',
                                             'clip_norm'))(
      learning_rate=lr, momentum=0.9, weight_decay=wd, clip_norm=1.0,
      decoupled_weight_decay=True, cov_every=2, inv_every=3)
  injected, state = _run(tx)
  # Reference: a plain mac_sgd rebuilt each step with that step's constants
  # (the chain's state does not depend on the values), carrying the state.
  params, inter = _problem()
  make = lambda t: mac_optax.mac_sgd(
      float(lr(t)), 0.9, weight_decay=float(wd(t)), clip_norm=1.0,
      decoupled_weight_decay=True, cov_every=2, inv_every=3)
  ref_state = make(0).init(params)
  for t in range(4):
    updates, ref_state = make(t).update(_grads(t), ref_state, params,
                                        intermediates=inter)
    _assert_same([injected[t]], [updates])
  np.testing.assert_allclose(state.hyperparams['learning_rate'], lr(3))
  np.testing.assert_allclose(state.hyperparams['weight_decay'], wd(3))
  assert 'clip_norm' not in state.hyperparams  # static: not traced


def test_traced_cadences_give_the_updates_of_static_ones():
  kwargs = dict(learning_rate=0.1, cov_every=2, inv_every=3)
  traced, _ = _run(optax.inject_hyperparams(mac_optax.mac_sgd)(**kwargs),
                   steps=7)
  static_tx = optax.inject_hyperparams(
      mac_optax.mac_sgd, static_args=('cov_every', 'inv_every'))(**kwargs)
  static, state = _run(static_tx, steps=7)
  plain, plain_state = _run(mac_optax.mac_sgd(**kwargs), steps=7)
  _assert_same(traced, plain)
  _assert_same(static, plain)
  # With static cadences MAC's state is exactly the plain one.
  find = mac_optax.diagnostics.find_mac_state
  assert jax.tree.structure(find(state)) == jax.tree.structure(
      find(plain_state))


def test_hyperparameters_can_be_changed_between_steps():
  tx = optax.inject_hyperparams(mac_optax.mac_sgd)(learning_rate=0.1,
                                                   momentum=0.0)
  params, inter = _problem()
  state = tx.init(params)
  update = jax.jit(tx.update)
  u1, _ = update(_grads(0), state, params, intermediates=inter)
  state.hyperparams['learning_rate'] = jnp.asarray(0.3)
  u3, _ = update(_grads(0), state, params, intermediates=inter)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(3 * a, b, rtol=1e-5),
               u1, u3)


def test_callable_mask_must_be_static():
  params, _ = _problem()
  mask = mac_optax.presets.matrix_mask
  with pytest.raises(TypeError, match='static_args'):
    optax.inject_hyperparams(mac_optax.mac_sgd)(
        learning_rate=0.1, weight_decay=1e-2, weight_decay_mask=mask
    ).init(params)
  tx = optax.inject_hyperparams(mac_optax.mac_sgd,
                                static_args=('weight_decay_mask',))(
      learning_rate=0.1, weight_decay=1e-2, weight_decay_mask=mask)
  injected, _ = _run(tx)
  plain, _ = _run(mac_optax.mac_sgd(0.1, weight_decay=1e-2,
                                    weight_decay_mask=mask))
  _assert_same(injected, plain)


PRESETS = {
    'cifar': dict(total_steps=50),
    'imagenet': dict(total_steps=50, warmup_steps=3),
    'vit': dict(total_steps=50, warmup_steps=3),
    'nanogpt': dict(total_steps=50, warmup_steps=3),
}


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_each_preset_wrapped_by_inject_hyperparams_equals_the_preset(name):
  preset = getattr(mac_optax.presets, name)
  params, grads, inter = _tiny_problem()
  kwargs = dict(PRESETS[name], intermediates_like=inter, cov_every=2,
                inv_every=3)
  tx = optax.inject_hyperparams(
      preset, static_args=mac_optax.presets.STATIC_ARGS)(**kwargs)
  injected, state = _run(tx, 5, params, inter, grads)
  plain, _ = _run(preset(**kwargs), 5, params, inter, grads)
  _assert_same(injected, plain)
  assert any(np.abs(u).max() > 0 for u in jax.tree.leaves(injected[-1]))
  assert {'learning_rate', 'weight_decay', 'damping'} <= set(state.hyperparams)


@pytest.fixture(scope='module')
def mlp_batches():
  """A linen MLP, its plan and three batches of gradients and statistics."""
  return small_mlp.planned_batches(seed=1)


@pytest.mark.parametrize('kwargs', [
    {}, dict(momentum=0.0), dict(momentum=0.0, nesterov=True),
    dict(weight_decay=0.0, decoupled_weight_decay=True),
    dict(weight_decay=0.0, weight_decay_mask=mac_optax.presets.matrix_mask),
    dict(weight_decay=1e-2, momentum=0.5),
], ids=['defaults', 'no_momentum', 'nesterov_no_momentum',
        'decoupled_no_decay', 'masked_no_decay', 'decay_and_momentum'])
def test_injected_mac_sgd_has_the_updates_and_the_inner_state_of_mac_sgd(
    mlp_batches, kwargs):
  """optax's conformance check: same updates and same inner state."""
  params, plan, batches = mlp_batches
  kwargs = dict(kwargs, plan=plan)
  injected = optax.inject_hyperparams(
      mac_optax.mac_sgd, static_args=('weight_decay_mask',))(
          learning_rate=0.1, **kwargs)
  plain = mac_optax.mac_sgd(0.1, **kwargs)
  states = [injected.init(params), plain.init(params)]
  assert (jax.tree.structure(states[0].inner_state)
          == jax.tree.structure(states[1]))
  steps = [jax.jit(injected.update), jax.jit(plain.update)]
  p = [params, params]
  for grads, inter in batches:
    out = [step(grads, state, q, intermediates=inter)
           for step, state, q in zip(steps, states, p)]
    (u_inj, s_inj), (u_plain, s_plain) = out
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                         atol=1e-7),
                 u_inj, u_plain)
    assert (jax.tree.structure(s_inj.inner_state)
            == jax.tree.structure(s_plain))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                         atol=1e-7),
                 s_inj.inner_state, s_plain)
    states = [s_inj, s_plain]
    p = [optax.apply_updates(q, u) for q, u in zip(p, (u_inj, u_plain))]
  assert any(np.abs(u).max() > 0 for u in jax.tree.leaves(u_plain))
