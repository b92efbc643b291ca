"""Multi-device checks, run by tests/test_distributed.py in a subprocess.

XLA's host platform gets its device count once, when jax is first imported,
from ``--xla_force_host_platform_device_count``; pytest has imported jax long
before a test module runs. So this script sets the flag, imports jax, runs
every check and prints one JSON line ``{name: {"ok": bool, "detail": str}}``.

Run by hand: ``python tests/distributed_checks.py [check names]``.
"""

import os
import sys

if __name__ == '__main__':
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import json
import re
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mac_optax
from mac_optax import linen as mac_linen

GLOBAL_BATCH = 16
STEPS = 2


class Net(nn.Module):
  """Conv → Conv → mean-pool → Dense → Dense: every kind of split below."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))   # [3, 3, 2, 4]: split on c_out
    x = nn.relu(nn.Conv(8, (3, 3))(x))   # [3, 3, 4, 8]: split on c_in
    x = x.mean((1, 2))
    x = nn.relu(nn.Dense(16)(x))         # [8, 16]: split on d_out
    return nn.Dense(3)(x)                # [16, 3]: split on d_in


# Tensor-parallel layout over the 'model' mesh axis.
MODEL_SPECS = {
    'Conv_0': {'kernel': P(None, None, None, 'model'), 'bias': P('model')},
    'Conv_1': {'kernel': P(None, None, 'model', None), 'bias': P()},
    'Dense_0': {'kernel': P(None, 'model'), 'bias': P('model')},
    'Dense_1': {'kernel': P('model', None), 'bias': P()},
}


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(GLOBAL_BATCH, 5, 5, 2)).astype(np.float32) + 0.5
  y = (np.arange(GLOBAL_BATCH) % 3).astype(np.int32)
  return x, y


def _params(x):
  shapes = jax.eval_shape(Net().init, jax.random.PRNGKey(0), x)['params']
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.4 * rng.normal(size=s.shape), s.dtype), shapes)


def _optimizer(params, x, axis_name=None):
  like = mac_linen.intermediates_like(Net(), {'params': params}, x)
  return mac_optax.mac_sgd(0.1, momentum=0.9, damping=0.5, stat_decay=0.9,
                           axis_name=axis_name, intermediates_like=like)


def train_step(tx, axis_name=None):
  """One training step; the same code on one device, a mesh and pmap."""

  def loss_fn(params, x, y):
    with mac_linen.capture():
      logits, v = Net().apply({'params': params}, x,
                              mutable=['intermediates'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, v['intermediates']

  def step(params, state, x, y):
    grads, inter = jax.grad(loss_fn, has_aux=True)(params, x, y)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    updates, state = tx.update(grads, state, params, intermediates=inter)
    return optax.apply_updates(params, updates), state

  return step


def _counting(fn, traces):
  def counted(*args):
    traces.append(1)
    return fn(*args)
  return counted


@functools.cache
def _single_device():
  x, y = _data()
  params = _params(x)
  tx = _optimizer(params, x)
  step = jax.jit(train_step(tx))
  state = tx.init(params)
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return params, state


def _close(a, b, what):
  for path, (u, v) in zip(
      jax.tree_util.tree_flatten_with_path(a)[0],
      zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))):
    np.testing.assert_allclose(
        np.asarray(u), np.asarray(v), rtol=2e-5, atol=2e-6,
        err_msg=f'{what}: {jax.tree_util.keystr(path[0])}')


def check_eight_devices():
  assert jax.device_count() == 8, jax.devices()
  return f'{jax.device_count()} {jax.devices()[0].platform} devices'


def _per_device(tree):
  """Puts leading-axis-per-device arrays where ``pmap`` puts its outputs.

  ``jax.pmap`` (jax 0.10) returns arrays sharded over a mesh named after its
  ``axis_name``; inputs placed otherwise (host arrays) compile the step a
  second time on step 2.
  """
  mesh = Mesh(np.array(jax.local_devices()), ('batch',))
  return jax.device_put(tree, NamedSharding(mesh, P('batch')))


def _replicate(tree, n):
  return _per_device(jax.tree_util.tree_map(
      lambda l: np.broadcast_to(np.asarray(l), (n,) + l.shape), tree))


def check_pmap_matches_single_device():
  """pmap over 8 devices, 2 examples each == one device on all 16."""
  x, y = _data()
  params = _params(x)
  tx = _optimizer(params, x[:2], axis_name='batch')
  n = jax.local_device_count()
  replicated = _replicate(params, n)
  state = _replicate(tx.init(params), n)
  xs = _per_device(x.reshape(n, -1, *x.shape[1:]))
  ys = _per_device(y.reshape(n, -1))
  traces = []
  step = jax.pmap(_counting(train_step(tx, 'batch'), traces),
                  axis_name='batch')
  for _ in range(STEPS):
    replicated, state = step(replicated, state, xs, ys)
  assert len(traces) == 1, f'pmap step traced {len(traces)} times'
  # Replicas never drift: every device holds bitwise the same parameters
  # and statistics.
  for leaf in jax.tree_util.tree_leaves((replicated, state)):
    leaf = np.asarray(leaf)
    assert (leaf == leaf[:1]).all(), 'replicas differ'
  ref_params, ref_state = _single_device()
  first = jax.tree_util.tree_map(lambda l: l[0], (replicated, state))
  _close(first, (ref_params, ref_state), 'pmap vs single device')
  return 'params and MAC state equal the single-device run; replicas identical'


def _mesh():
  return Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))


@functools.cache
def _sharded_run():
  x, y = _data()
  params = _params(x)
  tx = _optimizer(params, x)
  mesh = _mesh()
  shardings = jax.tree_util.tree_map(
      lambda s: NamedSharding(mesh, s), MODEL_SPECS,
      is_leaf=lambda s: isinstance(s, P))
  params = jax.device_put(params, shardings)
  batch = NamedSharding(mesh, P('data'))
  x, y = jax.device_put(x, batch), jax.device_put(y, batch)
  state = jax.jit(tx.init)(params)
  step = jax.jit(train_step(tx))
  compiled = step.lower(params, state, x, y).compile()
  states = []
  for _ in range(STEPS):
    params, state = compiled(params, state, x, y)
    states.append(state)
  return params, states, shardings, compiled.as_text()


def check_mesh_matches_single_device():
  """jit on a (data=4, model=2) mesh, unchanged step == one device."""
  params, states, _, _ = _sharded_run()
  ref_params, ref_state = _single_device()
  _close((params, states[-1]), (ref_params, ref_state),
         'mesh vs single device')
  return 'params and MAC state equal the single-device run'


def check_mesh_shardings():
  """Parameters keep their sharding; the d_in-split kernel's ā is split."""
  params, states, shardings, _ = _sharded_run()
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path)
    found[name] = str(leaf.sharding.spec)
  for (path, leaf), (_, want) in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree_util.tree_flatten_with_path(shardings)[0]):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
        f'{jax.tree_util.keystr(path)}: {leaf.sharding.spec} != {want.spec}')
  mac_state = states[-1][0]
  layer_specs = {k: str(v.mean.sharding.spec)
                 for k, v in mac_state.layers.items()}
  mean = mac_state.layers['Dense_1'].mean   # [1, 16], kernel [16, 3] on d_in
  assert mean.sharding.is_equivalent_to(
      NamedSharding(_mesh(), P(None, 'model')), mean.ndim), layer_specs
  # Each device holds half of ā, like half of the kernel's rows.
  assert {s.data.shape for s in mean.addressable_shards} == {(1, 8)}
  # The sharding is stable from step to step.
  for state in states:
    assert state[0].layers['Dense_1'].mean.sharding.is_equivalent_to(
        mean.sharding, mean.ndim)
  return f'params {found}; MAC state means {layer_specs}'


SHAPE = re.compile(r'\b[a-z]+\d*\[([\d,]*)\]')


def all_gathered_shapes(hlo: str) -> list[tuple[int, ...]]:
  """Result shapes of every all-gather (sync, async start, tuple) in `hlo`."""
  shapes = []
  for line in hlo.splitlines():
    match = re.search(r'=(.*?)\ball-gather(-start)?\(', line)
    if match:
      shapes += [tuple(int(d) for d in dims.split(',') if d)
                 for dims in SHAPE.findall(match.group(1))]
  return shapes


def check_detector_sees_a_kernel_all_gather():
  """Control: flattening a c_in-sharded conv kernel does gather it."""
  kernel = jax.device_put(
      jnp.ones((3, 3, 4, 8)),
      NamedSharding(_mesh(), MODEL_SPECS['Conv_1']['kernel']))
  hlo = jax.jit(lambda k: k.reshape(-1, 8) * 2).lower(
      kernel).compile().as_text()
  assert (3, 3, 4, 8) in all_gathered_shapes(hlo), all_gathered_shapes(hlo)
  return f'flattened kernel: all-gathers {all_gathered_shapes(hlo)}'


def check_no_kernel_all_gather():
  """The compiled step gathers no kernel, only ā-sized statistic vectors."""
  params, _, _, hlo = _sharded_run()
  gathered = all_gathered_shapes(hlo)
  kernels = {k: v['kernel'].shape for k, v in params.items()}
  largest_stat = max(int(np.prod(s[:-1])) for s in kernels.values())
  for shape in gathered:
    assert shape not in kernels.values(), f'kernel all-gather {shape}'
    assert int(np.prod(shape)) <= largest_stat, (
        f'all-gather of {shape} is larger than any statistic vector')
  return (f'all-gathers in the compiled step: {gathered or "none"} '
          f'(kernels {kernels})')


CHECKS = {name[len('check_'):]: fn for name, fn in globals().items()
          if name.startswith('check_')}


def main(names):
  results = {}
  for name in names or CHECKS:
    start = time.perf_counter()
    try:
      results[name] = {'ok': True, 'detail': str(CHECKS[name]())}
    except Exception:  # pylint: disable=broad-except
      results[name] = {'ok': False, 'detail': traceback.format_exc()}
    results[name]['seconds'] = round(time.perf_counter() - start, 2)
  print('RESULTS ' + json.dumps(results))


if __name__ == '__main__':
  main(sys.argv[1:])
