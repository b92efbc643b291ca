"""With a plan, `init` builds the whole state: wrappers work from step one.

Each wrapper that runs the inner update under ``lax.cond``/``lax.scan`` or
restores into a template needs ``update`` to return exactly ``init``'s
structure; a trace counter checks one compilation per jitted step.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax import linen as mac_linen
from mac_optax import nnx as mac_nnx
from tests import small_mlp

ocp = pytest.importorskip('orbax.checkpoint')


@pytest.fixture(name='mlp', scope='module')
def _mlp():
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(4, 8, 5)), jnp.float32)
  ys = jnp.asarray(rng.integers(0, 3, size=(4, 8)))
  params = small_mlp.random_params(xs[0])
  plan = mac_linen.plan(small_mlp.Mlp(), {'params': params}, xs[0])
  return params, xs, ys, plan


def _structure(tree):
  return jax.tree_util.tree_structure(tree), [
      (x.shape, x.dtype) for x in jax.tree_util.tree_leaves(tree)]


def _train(tx, params, xs, ys):
  """Steps through the batches with one jitted step; returns the trace count."""
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    grads, inter = small_mlp.grads_and_statistics(params, x, y)
    updates, state = tx.update(grads, state, params, intermediates=inter)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  initial = _structure(state)
  for x, y in zip(xs, ys):
    params, state = step(params, state, x, y)
  assert _structure(state) == initial
  return params, state, len(traces)


@pytest.mark.parametrize('wrap', ['apply_if_finite', 'MultiSteps',
                                  'multi_steps'])
def test_wrappers_run_from_the_first_step_with_one_trace(mlp, wrap):
  params, xs, ys, plan = mlp
  inner = mac_optax.mac_sgd(0.1, momentum=0.9, plan=plan)
  tx = {'apply_if_finite': lambda: optax.apply_if_finite(inner, 2),
        'MultiSteps': lambda: optax.MultiSteps(inner, 2),
        'multi_steps': lambda: mac_optax.multi_steps(inner, 2, plan=plan),
        }[wrap]()
  new, state, traces = _train(tx, params, xs, ys)
  assert traces == 1
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new, params)
  assert min(jax.tree_util.tree_leaves(moved)) > 0
  mac_state = mac_optax.diagnostics.find_mac_state(state)
  expected = 4 if wrap == 'apply_if_finite' else 2
  assert int(mac_state.layers['Dense_0'].count) == expected


def test_lax_scan_training_loop_equals_python_loop(mlp):
  params, xs, ys, plan = mlp
  tx = mac_optax.mac_sgd(0.1, momentum=0.9, plan=plan)

  def body(carry, batch):
    params, state = carry
    grads, inter = small_mlp.grads_and_statistics(params, *batch)
    updates, state = tx.update(grads, state, params, intermediates=inter)
    return (optax.apply_updates(params, updates), state), None

  (scanned, _), _ = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), (xs, ys))
                            )(params, tx.init(params))
  looped, _, traces = _train(tx, params, xs, ys)
  assert traces == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               scanned, looped)


def test_orbax_restores_into_the_init_template_before_any_step(mlp, tmp_path):
  params, xs, ys, plan = mlp
  tx = mac_optax.mac_sgd(0.1, momentum=0.9, plan=plan)
  trained, state, _ = _train(tx, params, xs[:2], ys[:2])
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', {'params': trained, 'opt': state})
    template = {'params': params, 'opt': tx.init(params)}
    restored = checkpointer.restore(tmp_path / 'ckpt', template)
  assert _structure(restored['opt']) == _structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored['opt'], state)


class NnxMlp(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 6, rngs=rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def test_nnx_optimizer_holds_the_complete_state_from_the_start(mlp):
  _, xs, ys, _ = mlp
  model = NnxMlp(nnx.Rngs(0))
  plan = mac_nnx.plan(model, xs[0])
  optimizer = nnx.Optimizer(model, mac_optax.mac_sgd(0.1, plan=plan),
                            wrt=nnx.Param)
  before = _structure(nnx.state(optimizer, nnx.OptState))
  traces = []

  @nnx.jit
  def step(model, optimizer, x, y):
    traces.append(1)

    def loss_fn(model):
      logits, inter = mac_nnx.capture(model)(x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return loss.mean(), inter
    (_, inter), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, intermediates=inter)

  for x, y in zip(xs, ys):
    step(model, optimizer, x, y)
  assert traces == [1]
  assert _structure(nnx.state(optimizer, nnx.OptState)) == before
  mac_state = mac_optax.diagnostics.find_mac_state(
      jax.tree.map(lambda v: v, optimizer.opt_state))
  assert set(mac_state.layers) == {'hidden', 'out'}


def test_a_donating_step_accepts_the_init_state(mlp):
  params, xs, ys, plan = mlp
  tx = mac_optax.mac_sgd(0.1, momentum=0.9, plan=plan, inv_every=2)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, x, y):
    grads, inter = small_mlp.grads_and_statistics(params, x, y)
    updates, state = tx.update(grads, state, params, intermediates=inter)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.copy, params)
  params, state = step(params, tx.init(params), xs[0], ys[0])
  assert int(mac_optax.diagnostics.find_mac_state(state).step) == 1
