"""optax's conformance battery for contributed optimizers, adapted to MAC.

optax checks every optimizer in ``optax.contrib`` for: extra keyword
arguments and no recompilation, ``optax.tree.map_params``, convergence,
dtype preservation, ``optax.MultiSteps``, state type stability under
``lax.cond``, learning-rate schedules and ``inject_hyperparams``. Its
problems are parabolas on bare arrays; MAC needs layers and their captured
statistics, so each check here runs a small Flax MLP and passes the real
statistics of its forward pass as ``intermediates=``. The explicit-axis mesh
checks (``jax.typeof`` of every state leaf stable) need 8 devices and run in
tests/distributed_checks.py.

Both MAC front doors are checked: ``mac_sgd`` and MAC before Adam.
"""

import contextlib
import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax import linen as mac_linen
from tests import reference

BATCH = 32


class Mlp(nn.Module):
  """Dense(16) → tanh → Dense(4), computed and stored in `dtype`."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n: nn.Dense(n, dtype=self.dtype, param_dtype=self.dtype)
    return dense(4)(jnp.tanh(dense(16)(x)))


def _mac_sgd(plan, learning_rate=0.1):
  return mac_optax.mac_sgd(learning_rate, momentum=0.9, plan=plan)


def _mac_adam(plan, learning_rate=1e-2):
  # scale_by_learning_rate(lr) is optax.scale(-lr) for a float lr.
  return optax.chain(mac_optax.mac(plan=plan), optax.scale_by_adam(),
                     optax.scale_by_learning_rate(learning_rate))


OPTIMIZERS = {'mac_sgd': _mac_sgd, 'mac_adam': _mac_adam}


@functools.cache
def _problem(dtype=jnp.float32):
  """(model, params, plan, x, y): a teacher-student regression in `dtype`.

  The inputs have a non-zero mean, so MAC's preconditioner is far from the
  identity.
  """
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, 6)) + 0.8
  y = np.sin(x @ rng.normal(size=(6, 4)) / 2)
  model = Mlp(dtype)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 6), dtype))['params']
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), dtype), shapes)
  plan = mac_linen.plan(model, {'params': params}, jnp.zeros((2, 6), dtype))
  return model, params, plan, jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def _loss_and_statistics(model, params, x, y):
  """The float32 mean squared error, and the captured statistics."""
  with mac_linen.capture():
    out, v = model.apply({'params': params}, x, mutable=['intermediates'])
  error = out.astype(jnp.float32) - y.astype(jnp.float32)
  return jnp.mean(jnp.square(error)), v['intermediates']


def _gradients(model, params, x, y):
  """((loss, statistics), gradients) of one batch."""
  return jax.value_and_grad(
      functools.partial(_loss_and_statistics, model), has_aux=True)(
          params, x, y)


def _train_step(tx, model, **extra):
  def step(params, state, x, y):
    (loss, inter), grads = _gradients(model, params, x, y)
    updates, state = tx.update(grads, state, params, intermediates=inter,
                               **extra)
    return optax.apply_updates(params, updates), state, loss
  return step


def _map_params():
  """``optax.tree.map_params``, or its older name."""
  tree = getattr(optax, 'tree', None)
  found = getattr(tree, 'map_params', None)
  return found or optax.tree_utils.tree_map_params


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert (jax.tree_util.tree_structure(a)
          == jax.tree_util.tree_structure(b)), (a, b)
  for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                          jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(u, np.float64),
                               np.asarray(v, np.float64), rtol=rtol,
                               atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_extra_arguments_accepted_and_no_recompilation(name):
  model, params, plan, x, y = _problem()
  tx = OPTIMIZERS[name](plan)
  traces = []

  def counted(*args):
    traces.append(1)
    # Keywords no MAC transform expects, as optax's battery passes them.
    return _train_step(
        tx, model, value=jnp.zeros([]),
        unexpected_extra_args_your_optimizer_doesnt_expect=1)(*args)

  step = jax.jit(counted)
  state = tx.init(params)
  losses = []
  for _ in range(3):
    params, state, loss = step(params, state, x, y)
    losses.append(float(loss))
  assert len(traces) == 1, f'the step traced {len(traces)} times'
  assert losses[-1] < losses[0], losses


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_tree_map_params_maps_only_parameter_shaped_state(name):
  model, params, plan, x, y = _problem()
  tx = OPTIMIZERS[name](plan)
  step = jax.jit(_train_step(tx, model))
  _, state, _ = step(params, tx.init(params), x, y)
  map_params = _map_params()
  same = map_params(tx, lambda v: v, state)
  _assert_trees_close(same, state, rtol=0, atol=0)
  doubled = map_params(tx, lambda v: 2 * v, state)
  # Momentum (or Adam's moments) is shaped like the parameters and doubles;
  # MAC's statistics are per-layer vectors and must stay as they are.
  moment = 'trace' if name == 'mac_sgd' else 'mu'
  _assert_trees_close(optax.tree_utils.tree_get(doubled, moment),
                      jax.tree_util.tree_map(
                          lambda v: 2 * v,
                          optax.tree_utils.tree_get(state, moment)))
  mac_before = optax.tree_utils.tree_get(state, 'layers')
  _assert_trees_close(optax.tree_utils.tree_get(doubled, 'layers'),
                      mac_before, rtol=0, atol=0)
  assert any(np.any(np.asarray(l) != 0) for l in
             jax.tree_util.tree_leaves(mac_before))
  # The mapped state still trains with the same compiled step.
  step(params, doubled, x, y)


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_converges_on_a_small_problem(name):
  model, params, plan, x, y = _problem()
  tx = OPTIMIZERS[name](plan)
  step = _train_step(tx, model)

  @jax.jit
  def train(params):
    def body(carry, _):
      params, state, loss = step(*carry, x, y)
      return (params, state), loss
    _, losses = jax.lax.scan(body, (params, tx.init(params)), length=300)
    return losses

  losses = np.asarray(train(params))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_updates_keep_the_parameters_dtype(name, dtype):
  model, params, plan, x, y = _problem(jnp.dtype(dtype))
  tx = OPTIMIZERS[name](plan)
  (_, inter), grads = jax.jit(functools.partial(_gradients, model))(
      params, x, y)
  assert all(g.dtype == jnp.dtype(dtype)
             for g in jax.tree_util.tree_leaves(grads))
  state = jax.jit(tx.init)(params)
  updates, _ = jax.jit(tx.update)(grads, state, params, intermediates=inter)
  for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                          jax.tree_util.tree_leaves(params)):
    assert u.dtype == p.dtype, (jax.tree_util.keystr(path), u.dtype)
    assert np.all(np.isfinite(np.asarray(u, np.float32)))


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_multisteps_accumulates_and_updates_every_k(name):
  model, params, plan, x, y = _problem()
  k = 4
  tx = OPTIMIZERS[name](plan)
  multi = optax.MultiSteps(tx, every_k_schedule=k)
  traces = []

  def micro_step(params, state, x, y):
    traces.append(1)
    return _train_step(multi, model)(params, state, x, y)

  step = jax.jit(micro_step)
  state = multi.init(params)
  micro = [(x[i::k], y[i::k]) for i in range(k)]
  start = params
  for i, (xb, yb) in enumerate(micro):
    params, state, _ = step(params, state, xb, yb)
    if i < k - 1:   # no update before the k-th micro-batch
      _assert_trees_close(params, start, rtol=0, atol=0)
  assert len(traces) == 1, f'the MultiSteps step traced {len(traces)} times'
  # optax.MultiSteps hands the inner update the mean gradient and the
  # keywords of the last call only: MAC sees the k-th micro-batch's
  # statistics (mac_optax.multi_steps accumulates them too).
  gradients = jax.jit(functools.partial(_gradients, model))
  grads = [gradients(start, xb, yb)[1] for xb, yb in micro]
  mean = jax.tree_util.tree_map(lambda *g: sum(g) / k, *grads)
  last = gradients(start, *micro[-1])[0][1]
  updates, _ = jax.jit(tx.update)(mean, tx.init(start), start,
                                  intermediates=last)
  _assert_trees_close(params, optax.apply_updates(start, updates))


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float32',
                                   'float64'])
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_state_type_is_stable_under_lax_cond(name, dtype):
  """`lax.cond(pred, update, identity)` needs one state type in both arms."""
  with reference.x64() if dtype == 'float64' else contextlib.nullcontext():
    dtype = jnp.dtype(dtype)
    model, params, plan, x, y = _problem(dtype)
    tx = OPTIMIZERS[name](plan)
    init_types = jax.tree_util.tree_map(jax.typeof, tx.init(params))

    @jax.jit
    def step(params, state):
      (_, inter), grads = _gradients(model, params, x, y)
      # A predicate the compiler cannot fold, as in optax's battery.
      pred = jax.random.randint(jax.random.PRNGKey(0), (), 0, 2) == 0
      updates, state = jax.lax.cond(
          pred,
          lambda: tx.update(grads, state, params, intermediates=inter),
          lambda: (jax.tree_util.tree_map(jnp.zeros_like, params), state))
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(2):
      params, new_state = step(params, state)
      assert jax.tree_util.tree_leaves(params)[0].dtype == dtype
      assert jax.tree_util.tree_map(jax.typeof, new_state) == init_types
      pred = jax.random.randint(jax.random.PRNGKey(0), (), 0, 2) == 0
      state = jax.lax.cond(pred, lambda s=state: s, lambda s=new_state: s)


def test_mac_sgd_learning_rate_is_annotated_as_a_schedule():
  annotation = inspect.signature(mac_optax.mac_sgd).parameters[
      'learning_rate'].annotation
  assert annotation in (optax.ScalarOrSchedule, 'optax.ScalarOrSchedule')


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_constant_schedule_equals_a_constant_learning_rate(name):
  model, params, plan, x, y = _problem()
  runs = []
  for learning_rate in (1e-2, optax.constant_schedule(1e-2)):
    tx = OPTIMIZERS[name](plan, learning_rate)
    step = jax.jit(_train_step(tx, model))
    p, state = params, tx.init(params)
    for _ in range(5):
      p, state, _ = step(p, state, x, y)
    runs.append(p)
  _assert_trees_close(runs[0], runs[1])
  assert not np.allclose(runs[0]['Dense_0']['kernel'],
                         params['Dense_0']['kernel'])


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_a_schedule_is_followed(name):
  """A learning rate of 0 after step 2 freezes the parameters from then on."""
  model, params, plan, x, y = _problem()
  schedule = optax.piecewise_constant_schedule(0.05, {2: 0.0})
  tx = OPTIMIZERS[name](plan, schedule)
  step = jax.jit(_train_step(tx, model))
  p, state = params, tx.init(params)
  seen = []
  for _ in range(4):
    p, state, _ = step(p, state, x, y)
    seen.append(p)
  assert not np.allclose(seen[1]['Dense_1']['kernel'],
                         seen[0]['Dense_1']['kernel'])
  _assert_trees_close(seen[3], seen[1], rtol=0, atol=0)


def _mac_adam_factory(learning_rate, damping, stat_decay, plan):
  return optax.chain(mac_optax.mac(damping, stat_decay, plan=plan),
                     optax.scale_by_adam(), optax.scale(-learning_rate))


INJECTED = {
    # As in optax's battery: the optimizer's keywords, the rest at their
    # defaults (weight_decay=0.0: off; momentum 0.0 too in the second).
    'mac_sgd': (mac_optax.mac_sgd, dict(learning_rate=0.1)),
    'mac_sgd_no_momentum': (mac_optax.mac_sgd,
                            dict(learning_rate=0.1, momentum=0.0)),
    'mac_adam': (_mac_adam_factory,
                 dict(learning_rate=1e-2, damping=0.5, stat_decay=0.9)),
}


@pytest.mark.parametrize('name', INJECTED)
def test_inject_hyperparams_equals_the_plain_optimizer(name):
  """Updates and the inner state, as optax's battery compares them."""
  model, params, plan, x, y = _problem()
  factory, kwargs = INJECTED[name]
  plain = factory(plan=plan, **kwargs)
  injected = optax.inject_hyperparams(factory, static_args=('plan',))(
      plan=plan, **kwargs)
  (_, inter), grads = jax.jit(functools.partial(_gradients, model))(
      params, x, y)
  updates, state = jax.jit(plain.update)(
      grads, jax.jit(plain.init)(params), params, intermediates=inter)
  injected_updates, injected_state = jax.jit(injected.update)(
      grads, jax.jit(injected.init)(params), params, intermediates=inter)
  _assert_trees_close(injected_updates, updates)
  _assert_trees_close(injected_state.inner_state, state)


def _explicit_mesh():
  """A mesh over every device with one explicit axis 'x', and its setter."""
  axis_type = getattr(jax.sharding, 'AxisType', None)
  use_mesh = getattr(jax, 'set_mesh', None) or getattr(
      jax.sharding, 'use_mesh', None)
  if axis_type is None or use_mesh is None or not hasattr(jax, 'typeof'):
    pytest.skip(f'jax {jax.__version__} has no explicit-axis meshes')
  mesh = jax.make_mesh((len(jax.devices()),), ('x',),
                       axis_types=(axis_type.Explicit,))
  return mesh, use_mesh


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_state_sharding_type_is_stable_under_an_explicit_mesh(name):
  """optax's sharding-in-types check, on this process's devices.

  tests/distributed_checks.py runs it on 8 devices for tensor-parallel,
  data-parallel and FSDP layouts; here the kernels are split on d_out over
  however many devices there are (one suffices: the split is in the type).
  """
  mesh, use_mesh = _explicit_mesh()
  model, params, plan, x, y = _problem()
  tx = OPTIMIZERS[name](plan)
  with use_mesh(mesh):
    params = jax.tree_util.tree_map(
        lambda p: jax.device_put(p, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(*[None] * (p.ndim - 1), 'x'))),
        params)
    state = tx.init(params)
    types = lambda tree: jax.tree_util.tree_map(jax.typeof, tree)
    step = jax.jit(_train_step(tx, model))
    new_params, new_state, _ = step(params, state, x, y)
    assert types(new_state) == types(state)
    assert types(new_params) == types(params)
