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
import collections
import functools
import json
import re
import time
import traceback
from unittest import mock

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
  features: tuple[int, int, int, int] = (4, 8, 16, 3)

  @nn.compact
  def __call__(self, x):
    conv_0, conv_1, dense_0, dense_1 = self.features
    x = nn.relu(nn.Conv(conv_0, (3, 3))(x))   # [3, 3, 2, 4]: split on c_out
    x = nn.relu(nn.Conv(conv_1, (3, 3))(x))   # [3, 3, 4, 8]: split on c_in
    x = x.mean((1, 2))
    x = nn.relu(nn.Dense(dense_0)(x))         # [8, 16]: split on d_out
    return nn.Dense(dense_1)(x)               # [16, 3]: split on d_in


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


def _params(x, model=Net()):
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.4 * rng.normal(size=s.shape), s.dtype), shapes)


def _optimizer(params, x, axis_name=None, model=Net()):
  like = mac_linen.intermediates_like(model, {'params': params}, x)
  return mac_optax.mac_sgd(0.1, momentum=0.9, damping=0.5, stat_decay=0.9,
                           axis_name=axis_name, intermediates_like=like)


def train_step(tx, axis_name=None, model=Net()):
  """One training step; the same code on one device, a mesh and pmap."""

  def loss_fn(params, x, y):
    with mac_linen.capture():
      logits, v = model.apply({'params': params}, x,
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
def _single_device(model=Net()):
  x, y = _data()
  params = _params(x, model)
  tx = _optimizer(params, x, model=model)
  step = jax.jit(train_step(tx, model=model))
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


# --------------------------------------------------------------------------
# An einsum kernel whose batched axis is not leading, sharded on that axis.


class EinsumNet(nn.Module):
  """Per-head einsum (kernel (hd, heads, k): roles 'ibo') → pooled Dense."""

  @nn.compact
  def __call__(self, x):   # [batch, tokens, heads 4, hd 3]
    y = nn.Einsum((3, 4, 6), 'btnh,hnk->btnk', name='heads')(x)
    return nn.Dense(3, name='head')(nn.relu(y).mean((1, 2)))


EINSUM_SPECS = {'heads': {'kernel': P(None, 'model', None),
                          'bias': P('model', None)},
                'head': {'kernel': P(), 'bias': P()}}


def _einsum_step_hlo():
  """The compiled MAC step of EinsumNet on the (data, model) mesh."""
  model = EinsumNet()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(GLOBAL_BATCH, 5, 4, 3)).astype(np.float32)
  y = (np.arange(GLOBAL_BATCH) % 3).astype(np.int32)
  params = _params(x, model)
  plan = mac_linen.plan(model, {'params': params}, x[:1])
  assert plan['heads'].layout.roles() == 'ibo', plan
  tx = mac_optax.mac_sgd(0.1, momentum=0.9, damping=0.5, stat_decay=0.9,
                         plan=plan)
  mesh = _mesh()
  shardings = jax.tree_util.tree_map(
      lambda s: NamedSharding(mesh, s), EINSUM_SPECS,
      is_leaf=lambda s: isinstance(s, P))
  params = jax.device_put(params, shardings)
  batch = NamedSharding(mesh, P('data'))
  x, y = jax.device_put(x, batch), jax.device_put(y, batch)
  state = jax.jit(tx.init)(params)
  step = jax.jit(train_step(tx, model=model))
  compiled = step.lower(params, state, x, y).compile()
  new_params, _ = compiled(params, state, x, y)
  kernel = new_params['heads']['kernel']
  assert kernel.sharding.is_equivalent_to(
      shardings['heads']['kernel'], kernel.ndim), kernel.sharding
  return compiled.as_text(), plan['heads'].layout


def check_einsum_batched_axis_sharded_no_kernel_all_gather():
  """Batched axis in the middle, sharded there: no kernel is gathered."""
  hlo, layout = _einsum_step_hlo()
  gathered = all_gathered_shapes(hlo)
  stat_size = int(np.prod(layout.stat_shape))   # [heads 4, d_in 3]
  for shape in gathered:
    assert shape != layout.shape, f'kernel all-gather {shape}'
    assert int(np.prod(shape)) <= stat_size, (
        f'all-gather of {shape} is larger than the statistic '
        f'{layout.stat_shape}')
  return (f'all-gathers in the compiled einsum step: {gathered or "none"} '
          f'(kernel {layout.shape} sharded on its batched axis 1)')


def check_einsum_detector_sees_a_kernel_all_gather():
  """Control: merging the sharded batched axis into the rows gathers it."""
  kernel = jax.device_put(
      jnp.ones((3, 4, 6)),
      NamedSharding(_mesh(), EINSUM_SPECS['heads']['kernel']))
  hlo = jax.jit(lambda k: k.reshape(-1, 6) * 2).lower(
      kernel).compile().as_text()
  assert (3, 4, 6) in all_gathered_shapes(hlo), all_gathered_shapes(hlo)
  return f'flattened einsum kernel: all-gathers {all_gathered_shapes(hlo)}'


# --------------------------------------------------------------------------
# shard_map: the step written per device, MAC told the axis to average over.


def _shard_map():
  """``jax.shard_map`` where jax has it, else the experimental original."""
  if hasattr(jax, 'shard_map'):
    return jax.shard_map
  from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top
  return shard_map


def shard_map_step(tx, global_batch):
  """The per-device step: a share of the global loss, MAC's own ``pmean``.

  shard_map's ``jax.grad`` of replicated (``P()``) parameters already sums
  the per-device cotangents (the transpose of their implicit broadcast), so
  each device's loss is its part of the global mean and the gradients need
  no ``pmean``. MAC's statistics are per-device means: ``axis_name`` has
  ``mac`` average them.
  """
  def loss_fn(params, x, y):
    with mac_linen.capture():
      logits, v = Net().apply({'params': params}, x,
                              mutable=['intermediates'])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses.sum() / global_batch, v['intermediates']

  def step(params, state, x, y):
    grads, inter = jax.grad(loss_fn, has_aux=True)(params, x, y)
    updates, state = tx.update(grads, state, params, intermediates=inter)
    return optax.apply_updates(params, updates), state

  return step


def check_shard_map_matches_jit():
  """shard_map over 8 devices with ``mac(axis_name=...)`` == jit on one."""
  x, y = _data()
  params = _params(x)
  n = jax.device_count()
  tx = _optimizer(params, x[:GLOBAL_BATCH // n], axis_name='data')
  mesh = Mesh(np.array(jax.devices()), ('data',))
  traces = []
  # Parameters and state replicated, the batch split; outputs must be
  # replicated too, which shard_map verifies (no per-device drift).
  step = jax.jit(_shard_map()(
      _counting(shard_map_step(tx, GLOBAL_BATCH), traces), mesh=mesh,
      in_specs=(P(), P(), P('data'), P('data')), out_specs=(P(), P())))
  replicated = NamedSharding(mesh, P())
  params, state = jax.device_put((params, tx.init(params)), replicated)
  x, y = jax.device_put((x, y), NamedSharding(mesh, P('data')))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  assert len(traces) == 1, f'shard_map step traced {len(traces)} times'
  _close((params, state), _single_device(), 'shard_map vs jit')
  return 'params and MAC state equal the single-device jit run'


# --------------------------------------------------------------------------
# FSDP (ZeRO-3, as in MaxText): every kernel, its momentum and its MAC state
# split over the data axis, which also splits the batch.

# Every kernel is larger than any layer's d_in + d_out, so a collective of
# vector size can never be a kernel in disguise.
FSDP_NET = Net(features=(16, 8, 32, 8))
#   Conv_0 [3, 3, 2, 16] split on c_out; Conv_1 [3, 3, 16, 8] on c_in;
#   Dense_0 [8, 32] on d_out; Dense_1 [32, 8] on d_in.


def fsdp_spec(shape, n) -> P:
  """The largest axis divisible by `n` over 'data' (first of ties), else none."""
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = 'data'
      return P(*spec)
  return P()


def _fsdp_mesh():
  return Mesh(np.array(jax.devices()), ('data',))


def _plain_step(tx, model):
  """SGD's step: the same loss, no statistics captured."""
  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def dense_input_preconditioner() -> optax.GradientTransformation:
  """A KFAC-style ``A⁻¹ Ĝ`` with a dense ``d_in × d_in`` factor: the control.

  Applying a full input-side matrix mixes every row of the kernel, which a
  row-split kernel cannot do without gathering or reducing kernel-sized data.
  """
  def precondition(g):
    if g.ndim < 2:
      return g
    flat = g.reshape(-1, g.shape[-1])
    d_in = flat.shape[0]
    factor = jnp.eye(d_in, dtype=g.dtype) + 1 / d_in
    return (factor @ flat).reshape(g.shape)

  return optax.stateless(
      lambda updates, _: jax.tree_util.tree_map(precondition, updates))


def _state_sharding(path, leaf, shardings, params, mesh):
  """FSDP placement of one optimizer-state leaf.

  A leaf at a parameter's path with its shape (momentum) is split like the
  parameter. MAC's per-layer vectors (``ā``, ``[G, d_in]``) are split like
  the kernel's rows where the kernel is split on its leading input axis, the
  only split that cuts the flattened ``d_in`` into contiguous pieces; any
  other state is replicated (``d_in`` floats, counters).
  """
  by_path = {jax.tree_util.keystr(p): (s, l.shape) for (p, s), l in zip(
      jax.tree_util.tree_flatten_with_path(shardings)[0],
      jax.tree_util.tree_leaves(params))}
  for i in range(len(path)):
    found = by_path.get(jax.tree_util.keystr(path[i:]))
    if found and found[1] == leaf.shape:
      return found[0]
  keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
  if 'layers' in keys and leaf.ndim >= 2:
    kernel = params[keys[keys.index('layers') + 1]]['kernel'].shape
    if (fsdp_spec(kernel, mesh.devices.size)[0] == 'data'
        and leaf.shape[-1] == int(np.prod(kernel[:-1]))):
      return NamedSharding(mesh, P(*[None] * (leaf.ndim - 1), 'data'))
  return NamedSharding(mesh, P())


@functools.cache
def _fsdp_runs():
  """``{name: (params, state, param shardings, hlo)}`` of MAC, SGD, control."""
  model, mesh = FSDP_NET, _fsdp_mesh()
  n = mesh.devices.size
  x, y = _data()
  host_params = _params(x, model)
  shardings = jax.tree_util.tree_map(
      lambda p: NamedSharding(mesh, fsdp_spec(p.shape, n)), host_params)
  batch = NamedSharding(mesh, P('data'))
  x, y = jax.device_put(x, batch), jax.device_put(y, batch)
  mac_tx = _optimizer(host_params, x, model=model)
  sgd = optax.sgd(0.1, momentum=0.9)
  control = optax.chain(dense_input_preconditioner(), sgd)
  runs = {
      'mac': (mac_tx, train_step(mac_tx, model=model)),
      'sgd': (sgd, _plain_step(sgd, model)),
      'control': (control, _plain_step(control, model)),
  }
  out = {}
  for name, (tx, step) in runs.items():
    params = jax.device_put(host_params, shardings)
    state_shardings = jax.tree_util.tree_map_with_path(
        lambda path, leaf: _state_sharding(path, leaf, shardings,
                                           host_params, mesh),
        jax.eval_shape(tx.init, params))
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    compiled = jax.jit(step, out_shardings=(shardings, state_shardings)).lower(
        params, state, x, y).compile()
    for _ in range(STEPS):
      params, state = compiled(params, state, x, y)
    out[name] = (params, state, shardings, compiled.as_text())
  return out


COLLECTIVE = re.compile(
    r'=(.*?)\b(all-gather|all-reduce|reduce-scatter|all-to-all|'
    r'collective-permute)(-start)?\(')


def collectives(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """``(kind, result shape)`` of every collective buffer in `hlo`.

  A combined (tuple) collective counts once per buffer; an async pair once,
  at its start (whose result tuple also repeats the operand: its largest
  shape is the one kept for all-gathers, all shapes for the others).
  """
  found = []
  for line in hlo.splitlines():
    match = COLLECTIVE.search(line)
    if not match:
      continue
    kind, is_start = match.group(2), bool(match.group(3))
    shapes = [tuple(int(d) for d in dims.split(',') if d)
              for dims in SHAPE.findall(match.group(1))]
    if is_start and kind in ('all-gather', 'collective-permute',
                             'all-to-all', 'reduce-scatter'):
      # (operand, result) pairs: keep the results.
      shapes = shapes[len(shapes) // 2:]
    found += [(kind, shape) for shape in shapes]
  return found


def extra_collectives(hlo, baseline_hlo):
  """The collectives of `hlo` beyond `baseline_hlo`'s (as multisets)."""
  extra = collections.Counter(collectives(hlo))
  extra.subtract(collections.Counter(collectives(baseline_hlo)))
  return sorted((k, s) for k, s in extra.elements())


def _vector_bound(params) -> int:
  """The largest ``d_in + d_out`` of any layer (``d_in`` flattened)."""
  return max(int(np.prod(p['kernel'].shape[:-1])) + p['kernel'].shape[-1]
             for p in params.values())


def _kernel_views(params) -> set[tuple[int, ...]]:
  """Every kernel's shape and its ``(d_in, d_out)`` matrix view."""
  views = set()
  for p in params.values():
    shape = p['kernel'].shape
    views |= {shape, (int(np.prod(shape[:-1])), shape[-1])}
  return views


def violations(extra, params):
  """The collectives that FSDP MAC must not add to SGD-momentum's step.

  Reductions of statistics (a conv's patch mean is reduced as its
  ``kh·kw·c_in`` floats, not as an image) and all-gathers of a split bias:
  up to a layer's ``d_in + d_out``; nothing shaped like a kernel.
  """
  kernels = _kernel_views(params)
  def allowed(kind, shape):
    del kind
    return shape not in kernels and int(np.prod(shape)) <= _vector_bound(params)
  return [(k, s) for k, s in extra if not allowed(k, s)]


def check_fsdp_matches_single_device():
  """Params, momentum and MAC state split over 'data' == one device."""
  params, state, shardings, _ = _fsdp_runs()['mac']
  _close((params, state), _single_device(FSDP_NET), 'FSDP vs single device')
  for (path, leaf), want in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree_util.tree_leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
        f'{jax.tree_util.keystr(path)}: {leaf.sharding.spec}')
  momentum = optax.tree_utils.tree_get(state, 'trace')
  for (path, leaf), want in zip(
      jax.tree_util.tree_flatten_with_path(momentum)[0],
      jax.tree_util.tree_leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
        f'momentum {jax.tree_util.keystr(path)}: {leaf.sharding.spec}')
  specs = {k: fsdp_spec(v['kernel'].shape, 8) for k, v in params.items()}
  means = {k: str(v.mean.sharding.spec) for k, v in state[0].layers.items()}
  # Dense_1 [32, 8] is split on d_in: each device holds its rows' ā.
  mean = state[0].layers['Dense_1'].mean
  assert {s.data.shape for s in mean.addressable_shards} == {(1, 4)}, means
  return f'kernels {specs}; MAC means {means}'


def check_fsdp_mac_adds_only_vector_collectives():
  """MAC's compiled FSDP step = SGD-momentum's collectives + small vectors."""
  runs = _fsdp_runs()
  params = runs['mac'][0]
  extra = extra_collectives(runs['mac'][3], runs['sgd'][3])
  assert not violations(extra, params), (
      f'MAC adds collectives beyond vectors: {violations(extra, params)}; '
      f'all extra: {extra}')
  counts = {name: dict(collections.Counter(k for k, _ in collectives(r[3])))
            for name, r in runs.items()}
  return (f'collectives by kind {counts}; MAC adds to SGD {extra} (bound: '
          f'{_vector_bound(params)} elements; kernels '
          f'{sorted(_kernel_views(params))})')


def check_fsdp_detector_sees_a_dense_preconditioner():
  """Control: a dense d_in × d_in input factor moves kernel-sized data."""
  runs = _fsdp_runs()
  params = runs['mac'][0]
  extra = extra_collectives(runs['control'][3], runs['sgd'][3])
  found = violations(extra, params)
  assert found, extra
  # Among them a whole kernel, gathered.
  assert any(kind == 'all-gather' and shape in _kernel_views(params)
             for kind, shape in found), found
  return f'dense preconditioner adds {found}'


# --------------------------------------------------------------------------
# Explicit-axis meshes (sharding in types): every array's type carries its
# sharding, so MAC's state must keep one sharding type from init on.


class Skip(Exception):
  """A check this jax cannot run (reported as skipped, with the reason)."""


def _explicit_mesh():
  """An 8-device mesh with an explicit axis 'x' and its context manager."""
  axis_type = getattr(jax.sharding, 'AxisType', None)
  use = getattr(jax, 'set_mesh', None) or getattr(jax.sharding, 'use_mesh',
                                                  None)
  missing = [name for name, found in (
      ('jax.sharding.AxisType', axis_type), ('jax.set_mesh', use),
      ('jax.sharding.reshard', getattr(jax.sharding, 'reshard', None)),
      ('jax.typeof', getattr(jax, 'typeof', None))) if found is None]
  if missing:
    raise Skip(f'jax {jax.__version__} has no {", ".join(missing)}')
  mesh = jax.make_mesh((8,), ('x',), axis_types=(axis_type.Explicit,))
  return mesh, use


class TwoDense(nn.Module):
  """Dense(16) → relu → Dense(8); `row_split`: the second layer's contraction
  runs over a split axis and must name its (replicated) result."""
  row_split: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    if self.row_split:
      dot = functools.partial(jax.lax.dot_general, out_sharding=P())
      return nn.Dense(8, dot_general=dot)(x)
    return nn.Dense(8)(x)


def _dense_specs(first, second, bias=None):
  """{layer: {kernel, bias}} specs; a bias is split like its kernel's columns
  unless `bias` is given."""
  return {name: {'kernel': kernel,
                 'bias': bias or P((tuple(kernel) + (None, None))[1])}
          for name, kernel in (('Dense_0', first), ('Dense_1', second))}


# layout: (parameter specs, batch spec, gather parameters in the forward pass)
EXPLICIT_LAYOUTS = {
    # The failing case of the report: both kernels split on d_out.
    'columns': (_dense_specs(P(None, 'x'), P(None, 'x')), P(), False),
    # Megatron MLP: column-split then row-split (statistic split on d_in).
    'tensor_parallel': (_dense_specs(P(None, 'x'), P('x', None)), P(), False),
    'data_parallel': (_dense_specs(P(), P()), P('x'), False),
    # ZeRO-3: every parameter split on its largest axis (kernels on d_in,
    # biases on d_out), gathered for the forward pass (the gradient comes
    # back split: the transpose of the gather).
    'fsdp': (_dense_specs(P('x', None), P('x', None), bias=P('x')), P('x'),
             True),
}


def _explicit_optimizers(plan):
  return {
      'mac_sgd': mac_optax.mac_sgd(0.1, momentum=0.9, damping=0.5,
                                   stat_decay=0.9, plan=plan),
      'mac_adam': optax.chain(mac_optax.mac(0.5, 0.9, plan=plan),
                              optax.scale_by_adam(), optax.scale(-1e-2)),
  }


def _explicit_step(tx, model, gather, capture=True):
  def loss_fn(params, x, y):
    if gather:
      params = jax.tree_util.tree_map(
          lambda p: jax.sharding.reshard(p, P()), params)
    if not capture:
      return jnp.mean((model.apply({'params': params}, x) - y) ** 2), None
    with mac_linen.capture():
      out, v = model.apply({'params': params}, x, mutable=['intermediates'])
    return jnp.mean((out - y) ** 2), v['intermediates']

  def step(params, state, x, y):
    grads, inter = jax.grad(loss_fn, has_aux=True)(params, x, y)
    extra = {'intermediates': inter} if capture else {}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state
  return step


def _types(tree):
  return jax.tree_util.tree_map(jax.typeof, tree)


@functools.cache
def _explicit_data():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(GLOBAL_BATCH, 8)).astype(np.float32) + 0.3
  y = rng.normal(size=(GLOBAL_BATCH, 8)).astype(np.float32)
  model = TwoDense()
  params = _params(x, model)
  plan = mac_linen.plan(model, {'params': params}, x[:2])
  # The reference: the same steps on one device, no mesh.
  reference = {}
  for name, tx in _explicit_optimizers(plan).items():
    step = jax.jit(_explicit_step(tx, model, gather=False))
    p, state = params, tx.init(params)
    for _ in range(STEPS):
      p, state = step(p, state, x, y)
    reference[name] = (p, state)
  return x, y, params, plan, reference


def _explicit_run(layout):
  """Both optimizers on `layout`: types stable, values = one device."""
  mesh, use_mesh = _explicit_mesh()
  specs, batch_spec, gather = EXPLICIT_LAYOUTS[layout]
  host_x, host_y, host_params, plan, reference = _explicit_data()
  model = TwoDense(row_split=layout == 'tensor_parallel')
  found = {}
  with use_mesh(mesh):
    shardings = jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs,
        is_leaf=lambda s: isinstance(s, P))
    batch = NamedSharding(mesh, batch_spec)
    x, y = jax.device_put(host_x, batch), jax.device_put(host_y, batch)
    for name, tx in _explicit_optimizers(plan).items():
      params = jax.device_put(host_params, shardings)
      param_types = _types(params)
      state = tx.init(params)
      init_types = _types(state)
      assert _types(jax.jit(tx.init)(params)) == init_types, (
          f'{name}: jit(init) and init give other sharding types')
      step = _explicit_step(tx, model, gather)
      if layout == 'columns':   # eagerly too, as optax's sharding tests do
        _, eager_state = step(params, state, x, y)
        assert _types(eager_state) == init_types, (
            f'{name}: eager update changed the state types:\n'
            f'{init_types}\n{_types(eager_state)}')
      traces = []
      jitted = jax.jit(_counting(step, traces))
      for _ in range(STEPS):
        params, state = jitted(params, state, x, y)
        assert _types(state) == init_types, (
            f'{name}: the state types changed:\n{init_types}\n'
            f'{_types(state)}')
        assert _types(params) == param_types, (
            f'{name}: the parameters lost their sharding:\n{param_types}\n'
            f'{_types(params)}')
      assert len(traces) == 1, f'{name}: the step traced {len(traces)} times'
      _close((params, state), reference[name], f'{layout} {name} vs 1 device')
      means = {k: str(jax.typeof(v.mean)) for k, v in
               optax.tree_utils.tree_get(state, 'layers').items()}
      found[name] = means
  kernels = {k: str(jax.typeof(v['kernel'])) for k, v in params.items()}
  return (f'kernels {kernels}; MAC means {found["mac_adam"]}; state types '
          'of both optimizers identical after init and every update; '
          'values equal the single-device run')


def check_explicit_mesh_columns():
  """Two Dense layers split P(None, 'x') (the reported failure)."""
  return _explicit_run('columns')


def check_explicit_mesh_tensor_parallel():
  """Column-split → row-split MLP: the row layer's statistic is split."""
  return _explicit_run('tensor_parallel')


def check_explicit_mesh_data_parallel():
  """Replicated parameters, batch split over 'x'."""
  return _explicit_run('data_parallel')


def check_explicit_mesh_fsdp():
  """Kernels split on d_in, batch split; kernel and bias split differently."""
  return _explicit_run('fsdp')


def check_explicit_mesh_projection_as_dot():
  """The FSDP and tensor-parallel layouts with every layer's projection
  ``ãᵀĜ`` a dot (the form of large kernels), contracted over a split axis."""
  from mac_optax._src import rank_one  # pylint: disable=import-outside-toplevel
  with mock.patch.object(rank_one, 'DOT_FROM', 0):
    return _explicit_run('fsdp') + '; ' + _explicit_run('tensor_parallel')


def check_explicit_mesh_multi_steps():
  """mac_optax.multi_steps on the tensor-parallel layout: its running mean
  of the statistics keeps the state's sharding too."""
  mesh, use_mesh = _explicit_mesh()
  specs, batch_spec, gather = EXPLICIT_LAYOUTS['tensor_parallel']
  host_x, host_y, host_params, plan, _ = _explicit_data()
  make = lambda: mac_optax.multi_steps(
      _explicit_optimizers(plan)['mac_sgd'], 2, plan=plan)
  halves = [(host_x[i::2], host_y[i::2]) for i in range(2)]
  tx = make()
  ref_step = jax.jit(_explicit_step(tx, TwoDense(), gather=False))
  ref = (host_params, tx.init(host_params))
  for _ in range(STEPS):
    for xb, yb in halves:
      ref = ref_step(*ref, xb, yb)
  with use_mesh(mesh):
    params = jax.device_put(host_params, jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs,
        is_leaf=lambda s: isinstance(s, P)))
    state = tx.init(params)
    init_types = _types(state)
    step = jax.jit(_explicit_step(tx, TwoDense(row_split=True), gather))
    batch = NamedSharding(mesh, batch_spec)
    for _ in range(STEPS):
      for xb, yb in halves:
        params, state = step(params, state, jax.device_put(xb, batch),
                             jax.device_put(yb, batch))
        assert _types(state) == init_types, (
            f'the state types changed:\n{init_types}\n{_types(state)}')
  _close((params, state), ref, 'multi_steps on the mesh vs 1 device')
  return (f'{STEPS} steps of 2 micro-batches: state types stable, values '
          'equal the single-device run')


def check_explicit_mesh_adds_only_vector_collectives():
  """MAC's compiled step = Adam's collectives + statistic-sized vectors."""
  mesh, use_mesh = _explicit_mesh()
  host_x, host_y, host_params, plan, _ = _explicit_data()
  details = {}
  for layout in ('tensor_parallel', 'fsdp'):
    specs, batch_spec, gather = EXPLICIT_LAYOUTS[layout]
    model = TwoDense(row_split=layout == 'tensor_parallel')
    adam = optax.chain(optax.scale_by_adam(), optax.scale(-1e-2))
    runs = {'mac': (_explicit_optimizers(plan)['mac_adam'], True),
            'adam': (adam, False)}
    hlo = {}
    with use_mesh(mesh):
      params = jax.device_put(host_params, jax.tree_util.tree_map(
          lambda s: NamedSharding(mesh, s), specs,
          is_leaf=lambda s: isinstance(s, P)))
      batch = NamedSharding(mesh, batch_spec)
      x, y = jax.device_put(host_x, batch), jax.device_put(host_y, batch)
      for name, (tx, capture) in runs.items():
        step = jax.jit(_explicit_step(tx, model, gather, capture))
        hlo[name] = step.lower(params, tx.init(params), x, y).compile(
            ).as_text()
    extra = extra_collectives(hlo['mac'], hlo['adam'])
    assert not violations(extra, host_params), (
        f'{layout}: MAC adds collectives beyond vectors: '
        f'{violations(extra, host_params)}; all extra: {extra}')
    details[layout] = extra
  return (f'MAC adds to Adam: {details} (bound '
          f'{_vector_bound(host_params)} elements)')


CHECKS = {name[len('check_'):]: fn for name, fn in globals().items()
          if name.startswith('check_')}


def main(names):
  results = {}
  for name in names or CHECKS:
    start = time.perf_counter()
    try:
      results[name] = {'ok': True, 'detail': str(CHECKS[name]())}
    except Skip as reason:
      results[name] = {'ok': True, 'skip': str(reason), 'detail': ''}
    except Exception:  # pylint: disable=broad-except
      results[name] = {'ok': False, 'detail': traceback.format_exc()}
    results[name]['seconds'] = round(time.perf_counter() - start, 2)
  print('RESULTS ' + json.dumps(results))


if __name__ == '__main__':
  main(sys.argv[1:])
