"""Mixed precision: bf16 parameters, gradients and activations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax import linen as mac_linen
from tests import reference

BF16_EPS = 2.0 ** -8  # unit roundoff of bfloat16 (8 significand bits)


class Mlp(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n: nn.Dense(n, dtype=self.dtype, param_dtype=self.dtype)
    x = nn.relu(dense(32)(x))
    return dense(4)(x)


def _setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 8)).astype(np.float32) + 1.0
  y = (np.arange(16) % 4).astype(np.int32)
  shapes = jax.eval_shape(Mlp().init, jax.random.PRNGKey(0), x)['params']
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.4 * rng.normal(size=s.shape), jnp.bfloat16),
      shapes)
  return params, x, y


def _grads(dtype, params, x, y):
  """Gradients and captured statistics of the model run in `dtype`."""
  params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)

  def loss_fn(params):
    with mac_linen.capture():
      logits, v = Mlp(dtype).apply({'params': params}, x.astype(dtype),
                                   mutable=['intermediates'])
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, v['intermediates']
  return jax.jit(jax.grad(loss_fn, has_aux=True))(params)


@pytest.fixture(scope='module')
def runs():
  params, x, y = _setup()
  out = {}
  for dtype in (jnp.bfloat16, jnp.float32):
    grads, inter = _grads(dtype, params, x, y)
    tx = mac_optax.mac(0.5, 0.9)
    state = tx.init(params)
    updates, state = jax.jit(
        lambda g, s, i, tx=tx: tx.update(g, s, intermediates=i))(
            grads, state, inter)
    out[dtype] = (grads, inter, updates, state)
  return out


def test_statistics_and_state_are_float32_updates_bf16(runs):
  grads, inter, updates, state = runs[jnp.bfloat16]
  for leaf in jax.tree_util.tree_leaves(grads):
    assert leaf.dtype == jnp.bfloat16
  for leaf in jax.tree_util.tree_leaves(inter):
    assert leaf.dtype == jnp.float32   # captured from bf16 activations
  for layer in state.layers.values():
    assert layer.mean.dtype == jnp.float32
  for leaf in jax.tree_util.tree_leaves(updates):
    assert leaf.dtype == jnp.bfloat16


def test_bf16_update_is_the_float32_update_rounded(runs):
  """MAC adds no bf16 error of its own: it computes in float32, rounds once."""
  grads, inter, updates, _ = runs[jnp.bfloat16]
  for name in ('Dense_0', 'Dense_1'):
    mean = np.asarray(inter[name][mac_optax.MEAN][0], np.float64)[0]
    kernel = np.asarray(grads[name]['kernel'], np.float64)
    means = np.tile(np.append(mean, 1.0), (kernel.shape[-1], 1))
    want_k, want_b = reference.dense_update(
        kernel, np.asarray(grads[name]['bias'], np.float64), means, 0.5)
    for got, want in ((updates[name]['kernel'], want_k),
                      (updates[name]['bias'], want_b)):
      got = np.asarray(got, np.float64)
      # One rounding to bf16 of a float32 result: relative error <= eps,
      # plus the float32 cancellation error, tiny against the scale.
      scale = np.abs(want).max()
      np.testing.assert_allclose(got, want, rtol=BF16_EPS,
                                 atol=1e-6 * scale)


def test_bf16_model_update_matches_float32_model(runs):
  """The whole bf16 pipeline against float32, within bf16 tolerance.

  MAC removes the gradient's component along ``â``, and for a layer whose
  gradient is mostly along ``â`` (here the output bias) the update is a small
  difference of large terms; so the error is measured against the
  gradient's scale. ``λ(ââᵀ + λI)⁻¹`` has norm ``≤ 1``: MAC must not amplify
  the error bf16 puts into the gradient.
  """
  def layer(tree, name):
    return np.concatenate([np.asarray(tree[name][k], np.float64).ravel()
                           for k in ('kernel', 'bias')])

  bf16_grads, _, bf16, _ = runs[jnp.bfloat16]
  f32_grads, _, f32, _ = runs[jnp.float32]
  for name in ('Dense_0', 'Dense_1'):
    grad_norm = np.linalg.norm(layer(f32_grads, name))
    grad_error = np.linalg.norm(layer(bf16_grads, name) - layer(f32_grads,
                                                                 name))
    update_error = np.linalg.norm(layer(bf16, name) - layer(f32, name))
    assert update_error < 2 * BF16_EPS * grad_norm, (name, update_error)
    assert update_error <= grad_error + BF16_EPS * grad_norm, name


def test_stat_dtype_is_configurable(runs):
  grads, inter, _, _ = runs[jnp.bfloat16]
  tx = mac_optax.mac(0.5, 0.9, stat_dtype=jnp.bfloat16)
  updates, state = jax.jit(lambda g, i: tx.update(
      g, tx.init(g), intermediates=i))(grads, inter)
  for layer in state.layers.values():
    assert layer.mean.dtype == jnp.bfloat16
  for leaf in jax.tree_util.tree_leaves(updates):
    assert leaf.dtype == jnp.bfloat16
