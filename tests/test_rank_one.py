"""The rank-one preconditioner against explicit inverses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
from mac_optax._src import rank_one
from mac_optax._src.layout import KernelLayout


def _explicit(g, b, a, damping, exact):
  """(a aᵀ + λI)⁻¹ [g; b] (times λ unless exact), one group at a time."""
  if b is not None:
    g = np.concatenate([g, b[None, :]], axis=0)
    a = np.append(a, 1.0)
  inverse = np.linalg.inv(np.outer(a, a) + damping * np.eye(a.size))
  u = (1.0 if exact else damping) * inverse @ g
  return (u[:-1], u[-1]) if b is not None else (u, None)


@pytest.mark.parametrize('with_bias', [False, True])
@pytest.mark.parametrize('exact', [False, True])
def test_precondition_matches_explicit_inverse_per_group_and_stack(
    with_bias, exact, projection):
  del projection
  rng = np.random.default_rng(0)
  stack, d_in, groups, d_out_g, damping = (2,), 5, 3, 4, 0.3
  g = rng.normal(size=stack + (d_in, groups, d_out_g))
  b = rng.normal(size=stack + (groups, d_out_g)) if with_bias else None
  a = rng.normal(size=stack + (groups, d_in))
  layout = KernelLayout.dense(
      stack + (d_in, groups * d_out_g), inputs=1, stack=1,
      column_groups=groups,
      bias_shape=None if b is None else stack + (groups * d_out_g,))
  u, ub = rank_one.precondition(
      layout, jnp.asarray(g.reshape(layout.shape), jnp.float32),
      None if b is None else jnp.asarray(b.reshape(layout.bias_shape),
                                         jnp.float32),
      jnp.asarray(a, jnp.float32), damping, exact_inverse=exact)
  u = np.asarray(u).reshape(g.shape)
  ub = None if ub is None else np.asarray(ub).reshape(b.shape)
  for s in range(stack[0]):
    for k in range(groups):
      ref, ref_b = _explicit(g[s, :, k], None if b is None else b[s, k],
                             a[s, k], damping, exact)
      np.testing.assert_allclose(u[s, :, k], ref, rtol=2e-5, atol=2e-5)
      if with_bias:
        np.testing.assert_allclose(ub[s, k], ref_b, rtol=2e-5, atol=2e-5)


def test_gradient_orthogonal_to_mean_is_untouched_and_mean_direction_shrinks():
  a = jnp.array([[3.0, 4.0]])           # ‖a‖² = 25
  along = a.T                           # (2, 1): gradient along a
  across = jnp.array([[-4.0], [3.0]])
  damping = 5.0
  layout = KernelLayout.dense((2, 1), inputs=1)
  u_across, _ = rank_one.precondition(layout, across, None, a, damping)
  np.testing.assert_allclose(u_across, across, rtol=1e-6)
  u_along, _ = rank_one.precondition(layout, along, None, a, damping)
  shrink = rank_one.shrink_factor(a, damping, has_bias=False)
  np.testing.assert_allclose(shrink, [5.0 / 30.0], rtol=1e-6)
  np.testing.assert_allclose(u_along, shrink[0] * along, rtol=1e-6)


def _sub_jaxprs(values):
  """Jaxprs nested in equation params (pjit, cond branches, ...)."""
  for value in values:
    if isinstance(value, (tuple, list)):
      yield from _sub_jaxprs(value)
    elif hasattr(value, 'eqns'):
      yield value
    elif hasattr(getattr(value, 'jaxpr', None), 'eqns'):
      yield value.jaxpr


def test_update_never_forms_a_d_in_by_d_in_matrix():
  d_in, d_out = 384, 3
  params = {'layer': {'kernel': jnp.zeros((d_in, d_out)),
                      'bias': jnp.zeros((d_out,))}}
  inter = {'layer': {mac_optax.MEAN: (jnp.ones((1, d_in)),)}}
  tx = mac_optax.mac()
  jaxpr = jax.make_jaxpr(
      lambda g, s: tx.update(g, s, params, intermediates=inter))(
          params, tx.init(params))
  shapes = set()

  def collect(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        shapes.add(tuple(getattr(var.aval, 'shape', ())))
      for sub in _sub_jaxprs(eqn.params.values()):
        collect(sub)

  collect(jaxpr.jaxpr)
  assert shapes, 'no equations traced'
  assert max(int(np.prod(s)) for s in shapes) <= d_in * d_out
  assert not any(s.count(d_in) >= 2 for s in shapes)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU kernels')
def test_small_kernels_project_by_a_reduction_large_ones_by_a_dot(
    projection):
  """`āᵀĜ` is a reduction below ``DOT_FROM`` elements, a dot from there on.

  For a vector × matrix dot XLA:CPU emits a GEMV kernel of its own per layer
  (compile time); a reduction copies a gradient that is not row-major first
  (step time): each form where its cost is the smaller one.
  """
  layout = KernelLayout.dense((2, 48, 32), inputs=1, stack=1,
                              bias_shape=(2, 32))
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=layout.shape), jnp.float32)
  b = jnp.asarray(rng.normal(size=layout.bias_shape), jnp.float32)
  a = jnp.asarray(rng.normal(size=layout.stat_shape), jnp.float32)
  fn = jax.jit(lambda g, b, a: rank_one.precondition(layout, g, b, a, 0.5))
  text = fn.lower(g, b, a).compile().as_text()
  entry = text[text.index('ENTRY'):]
  assert ' fusion(' in entry
  assert (' dot(' in entry) == (projection == 'dot'), entry
  u, ub = fn(g, b, a)
  for s in range(2):
    ref, ref_b = _explicit(np.asarray(g[s], np.float64),
                           np.asarray(b[s], np.float64),
                           np.asarray(a[s, 0], np.float64), 0.5, False)
    np.testing.assert_allclose(u[s], ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(ub[s], ref_b, rtol=2e-5, atol=2e-5)
