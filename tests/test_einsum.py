"""Einsum layers and batched kernels against float64 dense references.

The references share no code with the library: the mean input of each batch
index comes from differentiating the layer's own einsum restricted to that
index (``∂Σy/∂w[n]`` over the rows ``∂Σy/∂b``), the update from explicit
inverses ``λ (ā āᵀ + λI)⁻¹ Ĝ_n`` per batch index, in float64.
"""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
from mac_optax._src import rank_one
from mac_optax._src.layout import KernelLayout
from tests import reference


def _explicit(g, b, a, damping):
  """``λ (a aᵀ + λI)⁻¹ [g; b]`` for one mean vector, float64."""
  if b is not None:
    g = np.concatenate([g, b[None, :]], axis=0)
    a = np.append(a, 1.0)
  inverse = np.linalg.inv(np.outer(a, a) + damping * np.eye(a.size))
  u = damping * inverse @ g
  return (u[:-1], u[-1]) if b is not None else (u, None)


def _reference_update(layout, g, b, mean, damping):
  """Per stack and batch index: move (inputs, outputs) to a matrix, invert.

  Args:
    layout: a layout with ``column_groups == 1``.
    g: kernel gradient (``layout.shape``), float64.
    b: bias gradient in the order of ``layout.bias_axes`` or None.
    mean: ``layout.stat_shape``.
    damping: λ.
  """
  shape = layout.shape
  order = layout.stack + layout.batch + layout.inputs + layout.outputs
  gm = np.transpose(g, order).reshape(
      layout.sizes(layout.stack) + (layout.groups, layout.d_in, -1))
  columns = layout.stack + layout.batch + layout.outputs
  if b is not None:
    bias_axes = layout.bias_axes or tuple(
        a for a in range(len(shape)) if a not in layout.inputs)
    b_full = b.reshape(layout.sizes(bias_axes))
    b_full = np.transpose(b_full, [bias_axes.index(a) for a in columns])
    bm = b_full.reshape(gm.shape[:-2] + (-1,))
  u = np.zeros_like(gm)
  ub = None if b is None else np.zeros_like(bm)
  for index in np.ndindex(*gm.shape[:-2]):
    u[index], ref_b = _explicit(gm[index], None if b is None else bm[index],
                                mean[index], damping)
    if b is not None:
      ub[index] = ref_b
  u_kernel = np.transpose(
      u.reshape(layout.sizes(order)), np.argsort(order))
  if b is None:
    return u_kernel, None
  ub = ub.reshape(layout.sizes(columns))
  ub = np.transpose(ub, [columns.index(a) for a in bias_axes])
  return u_kernel, ub.reshape(b.shape)


@pytest.mark.parametrize('with_bias', [False, True])
def test_rank_one_batch_axes_anywhere_match_explicit_inverses(
    with_bias, projection):
  del projection   # both forms of the projection, each against the reference
  # Kernel (stack 2, in 2, batch 3, in 2, out 4, batch 2): roles 'sibiob';
  # the bias runs over (out, batch 3, batch 2) in a third order.
  rng = np.random.default_rng(0)
  shape = (2, 2, 3, 2, 4, 2)
  bias_axes = (0, 4, 2, 5) if with_bias else None
  bias_shape = (2, 4 * 3 * 2) if with_bias else None
  layout = KernelLayout(shape, (0,), (1, 3), (2, 5), (4,), 1, bias_shape,
                        bias_axes)
  assert layout.roles() == 'sibiob'
  assert layout.stat_shape == (2, 6, 4)
  g = rng.normal(size=shape)
  b = rng.normal(size=bias_shape) if with_bias else None
  mean = rng.normal(size=layout.stat_shape)
  damping = 0.7
  u, ub = rank_one.precondition(
      layout, jnp.asarray(g, jnp.float32),
      None if b is None else jnp.asarray(b, jnp.float32),
      jnp.asarray(mean, jnp.float32), damping)
  ref, ref_b = _reference_update(layout, g, b, mean, damping)
  np.testing.assert_allclose(u, ref, rtol=2e-5, atol=2e-5)
  if with_bias:
    np.testing.assert_allclose(ub, ref_b, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------- layers
#
# (equation, input shape, kernel shape, roles of the kernel). Per-head
# projection; batched per-head (batch leading and not leading); multi-axis
# contraction; output order unlike the kernel's (bias order); a summed input
# axis; an ellipsis.
CASES = [
    ('btd,dnh->btnh', (2, 3, 4), (4, 2, 3), 'ioo'),
    ('bnth,nhk->bntk', (2, 2, 3, 4), (2, 4, 3), 'bio'),
    ('btnh,hnk->btnk', (2, 3, 2, 4), (4, 2, 3), 'ibo'),
    ('btnh,nhd->btd', (2, 3, 2, 4), (2, 4, 5), 'iio'),
    ('btd,dkn->btnk', (2, 3, 4), (4, 3, 2), 'ioo'),
    ('btd,df->bf', (2, 3, 4), (4, 5), 'io'),
    ('...d,df->...f', (2, 3, 4), (4, 5), 'io'),
]


def _reference_mean(equation, x, kernel_shape, roles):
  """``[G, d_in]`` by differentiating Σ einsum(x, w) w.r.t. w (float64)."""
  with reference.x64():
    x = jnp.asarray(x, jnp.float64)
    w = jnp.zeros(kernel_shape, jnp.float64)
    y = jnp.einsum(equation, x, w)
    grad = np.asarray(
        jax.grad(lambda w: jnp.sum(jnp.einsum(equation, x, w)))(w))
  columns = int(np.prod([n for n, r in zip(kernel_shape, roles) if r != 'i']))
  rows = y.size // columns
  order = ([a for a, r in enumerate(roles) if r == 'b']
           + [a for a, r in enumerate(roles) if r == 'i']
           + [a for a, r in enumerate(roles) if r == 'o'])
  g = np.transpose(grad, order)
  groups = int(np.prod([kernel_shape[a] for a in order if roles[a] == 'b']))
  g = g.reshape(groups, -1, int(np.prod(
      [kernel_shape[a] for a in order if roles[a] == 'o'])))
  # Every output column of a batch index sees the same input.
  np.testing.assert_allclose(g, np.repeat(g[..., :1], g.shape[-1], -1))
  return g[..., 0] / rows


class _LinenWrap(nn.Module):
  equation: str
  shape: tuple
  use_bias: bool

  @nn.compact
  def __call__(self, x):
    return nn.Einsum(self.shape, self.equation, use_bias=self.use_bias,
                     name='layer')(x)


class _NnxWrap(nnx.Module):

  def __init__(self, equation, shape, bias_shape, rngs):
    self.layer = nnx.Einsum(equation, shape, bias_shape, rngs=rngs)

  def __call__(self, x):
    return self.layer(x)


def _bias_shape(equation, kernel_shape):
  w, y = equation.split(',')[1].split('->')
  return tuple(kernel_shape[w.index(c)] for c in y if c in w)


def _check_update(plan, stat, params, damping=0.5):
  """mac(plan) with β = 0 against the explicit-inverse reference."""
  layer = plan['layer']
  layout = layer.layout
  rng = np.random.default_rng(1)
  grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  tx = mac_optax.mac(damping, 0.0, plan=plan)
  state = tx.init(params)
  inter = {'layer': {layer.statistic: (stat,)}}
  updates, _ = tx.update(grads, state, params, intermediates=inter)
  g = np.asarray(grads['layer']['kernel'], np.float64)
  b = grads['layer'].get('bias')
  ref, ref_b = _reference_update(
      layout, g, None if b is None else np.asarray(b, np.float64),
      np.asarray(stat, np.float64), damping)
  np.testing.assert_allclose(updates['layer']['kernel'], ref, rtol=1e-4,
                             atol=1e-5)
  if b is not None:
    np.testing.assert_allclose(updates['layer']['bias'], ref_b, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize('use_bias', [True, False])
@pytest.mark.parametrize('equation,x_shape,kernel_shape,roles', CASES)
def test_einsum_linen_and_nnx_statistics_and_updates(
    equation, x_shape, kernel_shape, roles, use_bias):
  x = jax.random.normal(jax.random.key(0), x_shape)
  expected = _reference_mean(equation, np.asarray(x), kernel_shape, roles)

  model = _LinenWrap(equation, kernel_shape, use_bias)
  variables = model.init(jax.random.key(1), x)
  plan = mac_optax.linen.plan(model, variables, x)
  # A kernel laid out (*inputs, *outputs) is sown like a Dense's; others
  # under EINSUM_MEAN, their layout in the plan.
  prefix = roles == 'i' * roles.count('i') + 'o' * roles.count('o')
  assert (plan['layer'].kind, plan['layer'].statistic) in (
      ('dense', mac_optax.MEAN), ('einsum', mac_optax.EINSUM_MEAN))
  if not prefix:
    assert plan['layer'].statistic == mac_optax.EINSUM_MEAN
  assert plan['layer'].layout.roles() == roles
  assert plan.fraction == 1.0
  with mac_optax.linen.capture():
    y, v = model.apply(variables, x, mutable=['intermediates'])
  np.testing.assert_allclose(y, model.apply(variables, x), rtol=1e-6)
  (stat,) = v['intermediates']['layer'][plan['layer'].statistic]
  np.testing.assert_allclose(stat, expected, rtol=1e-5, atol=1e-6)
  _check_update(plan, stat, variables['params'])

  bias_shape = _bias_shape(equation.replace('...', ''), kernel_shape) if (
      use_bias) else None
  net = _NnxWrap(equation, kernel_shape, bias_shape, nnx.Rngs(0))
  net.layer.kernel[...] = variables['params']['layer']['kernel']
  if use_bias:
    net.layer.bias[...] = variables['params']['layer']['bias']
  nnx_plan = mac_optax.nnx.plan(net, x)
  assert nnx_plan['layer'].layout == plan['layer'].layout
  _, inter = mac_optax.nnx.capture(net)(x)
  (nnx_stat,) = inter['layer'][plan['layer'].statistic]
  np.testing.assert_array_equal(nnx_stat, stat)


class _Batched(nn.Module):

  @nn.compact
  def __call__(self, x):   # x: [heads 3, batch 2, tokens 4, d 5]
    return nn.DenseGeneral((2, 3), axis=-1, batch_dims=(0,), name='layer')(x)


def test_batched_dense_general_and_linear_general():
  x = jax.random.normal(jax.random.key(0), (3, 2, 4, 5))
  # One mean input per head: the mean over batch and tokens.
  expected = np.asarray(x, np.float64).mean(axis=(1, 2))
  model = _Batched()
  variables = model.init(jax.random.key(1), x)
  plan = mac_optax.linen.plan(model, variables, x)
  assert plan['layer'].layout.roles() == 'bioo'
  with mac_optax.linen.capture():
    _, v = model.apply(variables, x, mutable=['intermediates'])
  (stat,) = v['intermediates']['layer'][mac_optax._src.statistics.EINSUM_MEAN]
  np.testing.assert_allclose(stat, expected, rtol=1e-5, atol=1e-6)
  _check_update(plan, stat, variables['params'])

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.layer = nnx.LinearGeneral(5, (2, 3), axis=-1, batch_axis={0: 3},
                                     rngs=rngs)

    def __call__(self, x):
      return self.layer(x)

  net = Net(nnx.Rngs(0))
  nnx_plan = mac_optax.nnx.plan(net, x)
  assert nnx_plan['layer'].layout == plan['layer'].layout
  _, inter = mac_optax.nnx.capture(net)(x)
  (nnx_stat,) = inter['layer'][mac_optax.EINSUM_MEAN]
  np.testing.assert_array_equal(nnx_stat, stat)


@pytest.mark.parametrize('equation,kernel_shape', [
    ('btd,dk->bt', (4, 5)),          # k: kernel only, summed away
    ('btd,ddk->btk', (4, 4, 5)),     # a repeated letter: the diagonal
])
def test_einsums_mac_cannot_model_pass_through_with_their_reason(
    equation, kernel_shape):
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  params = {'w': jnp.ones(kernel_shape), 'head': jnp.ones((4, 2))}
  fn = lambda p, x: jnp.einsum(equation, x, p['w']).sum() + x @ p['head']
  plan = mac_optax.plan(fn, params, x)
  assert plan.keys == ('head',)
  (passed,) = plan.passed
  assert passed.path == 'w' and passed.reason


def test_plan_less_use_of_an_einsum_statistic_raises_and_says_plan():
  x = jnp.ones((2, 2, 3, 4))
  model = _LinenWrap('bnth,nhk->bntk', (2, 4, 3), True)   # batched: 'bio'
  variables = model.init(jax.random.key(1), x)
  with mac_optax.linen.capture():
    _, v = model.apply(variables, x, mutable=['intermediates'])
  tx = mac_optax.mac(0.5, 0.0)
  state = tx.init(variables['params'])
  with pytest.raises(ValueError, match=r"'layer'.*plan="):
    tx.update(variables['params'], state, variables['params'],
              intermediates=v['intermediates'])
  with pytest.raises(ValueError, match=r"'layer'.*plan="):
    mac_optax.mac(0.5, 0.0, intermediates_like=v['intermediates']).init(
        variables['params'])


class _Scanned(nn.Module):

  @nn.compact
  def __call__(self, x):
    body = nn.scan(
        lambda mdl, c, _: (mdl(c), None), variable_axes={
            'params': 0, 'intermediates': 0},
        split_rngs={'params': True}, length=2)
    y, _ = body(_ScanBody(name='layer'), x, None)
    return y


class _ScanBody(nn.Module):

  @nn.compact
  def __call__(self, x):   # per-head batched, heads not leading
    return nn.Einsum((4, 2, 4), 'btnh,hnk->btnk', name='e')(x)


def test_einsum_inside_nn_scan_gets_stack_axes():
  x = jax.random.normal(jax.random.key(0), (2, 3, 2, 4))
  model = _Scanned()
  variables = model.init(jax.random.key(1), x)
  plan = mac_optax.linen.plan(model, variables, x)
  layout = plan['layer/e'].layout
  assert layout.roles() == 'sibo' and layout.stat_shape == (2, 2, 4)
  assert layout.bias_axes in (None, (0, 2, 3))   # the kernel's order
  with mac_optax.linen.capture():
    _, v = model.apply(variables, x, mutable=['intermediates'])
  (stat,) = v['intermediates']['layer']['e'][
      mac_optax._src.statistics.EINSUM_MEAN]
  # Layer 0 sees x: one mean per head n over (b, t).
  np.testing.assert_allclose(stat[0], np.asarray(x).mean(axis=(0, 1)),
                             rtol=1e-5, atol=1e-6)
  tx = mac_optax.mac(0.5, 0.0, plan=plan)
  params = variables['params']
  updates, _ = tx.update(params, tx.init(params), params,
                         intermediates=v['intermediates'])
  for s in range(2):
    ref, ref_b = _reference_update(
        KernelLayout((4, 2, 4), (), (0,), (1,), (2,), 1, (2, 4), (1, 2)),
        np.asarray(params['layer']['e']['kernel'][s], np.float64),
        np.asarray(params['layer']['e']['bias'][s], np.float64),
        np.asarray(stat[s], np.float64), 0.5)
    np.testing.assert_allclose(updates['layer']['e']['kernel'][s], ref,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(updates['layer']['e']['bias'][s], ref_b,
                               rtol=1e-4, atol=1e-5)


# nnx.scan over layers created with nnx.vmap: a per-head batched einsum
# (heads not leading, bias), a multi-axis contraction (no bias) and a
# projection back (bias), so that each stacked layer has its own input.
_NNX_SCAN_LAYERS = (
    ('e', 'btnh,hnk->btnk', (4, 2, 4), (2, 4), 'ibo'),
    ('f', 'btnh,nhd->btd', (2, 4, 5), None, 'iio'),
    ('g', 'btd,dnh->btnh', (5, 2, 4), (2, 4), 'ioo'),
)


class _NnxScanBody(nnx.Module):

  def __init__(self, rngs):
    for name, equation, shape, bias_shape, _ in _NNX_SCAN_LAYERS:
      setattr(self, name, nnx.Einsum(equation, shape, bias_shape,
                                     bias_init=nnx.initializers.normal(1.0),
                                     rngs=rngs))

  def __call__(self, x):
    return x + self.g(self.f(self.e(x)))


class _NnxScanned(nnx.Module):

  def __init__(self, rngs, depth):
    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NnxScanBody(rngs)

    self.layer = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(x, self.layer)


def _unstacked_layout(equation, shape, bias_shape, roles):
  """One stacked layer's layout, from its roles (bias in output order)."""
  axes = lambda r: tuple(a for a, c in enumerate(roles) if c == r)
  kernel, out = equation.split(',')[1].split('->')
  bias_axes = tuple(kernel.index(c) for c in out if c in kernel)
  return KernelLayout(shape, (), axes('i'), axes('b'), axes('o'), 1,
                      bias_shape, bias_axes if bias_shape else None)


def test_einsum_inside_nnx_scan_matches_each_stacked_layer():
  depth, damping = 3, 0.5
  x = jax.random.normal(jax.random.key(0), (2, 3, 2, 4))
  net = _NnxScanned(nnx.Rngs(0), depth)
  plan = mac_optax.nnx.plan(net, x)
  assert plan.fraction == 1.0
  for name, _, shape, bias_shape, roles in _NNX_SCAN_LAYERS:
    layout = plan[f'layer/{name}'].layout
    assert layout.roles() == 's' + roles
    assert layout.shape == (depth,) + shape
  _, inter = nnx.jit(lambda m, x: mac_optax.nnx.capture(m)(x))(net, x)
  inter = nnx.to_pure_dict(inter)
  params = nnx.to_pure_dict(nnx.state(net, nnx.Param))
  rng = np.random.default_rng(1)
  grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  tx = mac_optax.mac(damping, 0.0, plan=plan)
  updates, _ = jax.jit(lambda g, i: tx.update(
      g, tx.init(g), intermediates=i))(grads, inter)

  # Unrolled float64 forward: layer s of each einsum sees the output of
  # layer s - 1 of the block, computed here without the library.
  h = np.asarray(x, np.float64)
  for s in range(depth):
    block_in = h
    for name, equation, shape, bias_shape, roles in _NNX_SCAN_LAYERS:
      p = {k: np.asarray(v[s], np.float64)
           for k, v in params['layer'][name].items()}
      expected = _reference_mean(equation, h, shape, roles)
      (stat,) = inter['layer'][name][plan[f'layer/{name}'].statistic]
      np.testing.assert_allclose(stat[s], expected.reshape(stat[s].shape),
                                 rtol=1e-4, atol=1e-5)
      unstacked = _unstacked_layout(equation, shape, bias_shape, roles)
      g = grads['layer'][name]
      ref, ref_b = _reference_update(
          unstacked, np.asarray(g['kernel'][s], np.float64),
          None if bias_shape is None else np.asarray(g['bias'][s],
                                                     np.float64),
          np.asarray(stat[s], np.float64), damping)
      u = updates['layer'][name]
      np.testing.assert_allclose(u['kernel'][s], ref, rtol=1e-4, atol=1e-5)
      if bias_shape is not None:
        np.testing.assert_allclose(u['bias'][s], ref_b, rtol=1e-4,
                                   atol=1e-5)
      h = np.einsum(equation, h, p['kernel'])
      if bias_shape is not None:
        h = h + p['bias']
    h = block_in + h
