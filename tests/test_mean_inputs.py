"""Mean inputs against materialized patches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mac_optax._src import mean_inputs


def _explicit_mean_patch(x, kernel_size, strides, padding, lhs, rhs, groups):
  """Mean of all im2col patches, from `lax.conv_general_dilated_patches`."""
  n = len(kernel_size)
  channels = x.shape[-1]
  spec = ('N' + 'HWD'[:n] + 'C', 'HWD'[:n] + 'IO', 'N' + 'HWD'[:n] + 'C')
  patches = jax.lax.conv_general_dilated_patches(
      x, kernel_size, strides, padding, lhs_dilation=lhs, rhs_dilation=rhs,
      dimension_numbers=spec)
  # Patch features come out channel-major: (C, *kernel_size).
  patches = np.asarray(patches).reshape(-1, channels, *kernel_size)
  mean = np.moveaxis(patches.mean(0), 0, -1)       # (*kernel_size, C)
  mean = mean.reshape(*kernel_size, groups, channels // groups)
  return np.moveaxis(mean, n, 0).reshape(groups, -1)


@pytest.mark.parametrize('kernel_size,strides,padding,lhs,rhs,groups', [
    ((3,), (2,), [(1, 1)], (1,), (2,), 1),
    ((3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), (1, 1), 1),
    ((3, 2), (2, 1), [(0, 2), (1, 0)], (1, 1), (1, 2), 2),
    ((2, 2), (1, 2), [(1, 1), (0, 0)], (2, 1), (1, 1), 4),
])
def test_conv_mean_patch_equals_mean_of_materialized_patches(
    kernel_size, strides, padding, lhs, rhs, groups):
  n = len(kernel_size)
  shape = (3,) + (7, 6)[:n] + (4,)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  got = mean_inputs.conv_mean_patch(
      x, kernel_size, strides=strides, padding=padding, input_dilation=lhs,
      kernel_dilation=rhs, feature_group_count=groups)
  expected = _explicit_mean_patch(x, kernel_size, strides, padding, lhs, rhs,
                                  groups)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_dense_mean_over_general_axes_in_kernel_order():
  x = np.random.default_rng(1).normal(size=(2, 3, 4, 5))
  got = mean_inputs.dense_mean(jnp.asarray(x, jnp.float32), axis=(1, -1))
  expected = x.transpose(0, 2, 1, 3).reshape(-1, 15).mean(0)
  np.testing.assert_allclose(got, expected[None, :], rtol=1e-5, atol=1e-6)


def test_statistics_are_float32_for_bfloat16_inputs():
  x = jnp.ones((4, 3), jnp.bfloat16)
  assert mean_inputs.dense_mean(x).dtype == jnp.float32


@pytest.mark.parametrize('as_contraction', [False, True])
def test_both_forms_of_the_batch_sum_are_exact(monkeypatch, as_contraction):
  """The form chosen per jax release (sum or ones-contraction) changes nothing."""
  monkeypatch.setattr(mean_inputs, '_SUM_AS_CONTRACTION', as_contraction)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  np.testing.assert_allclose(mean_inputs.sum_leading(x), x.sum(0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(mean_inputs.sum_leading(x, axes=2),
                             x.sum((0, 1)), rtol=1e-5, atol=1e-6)
  half = mean_inputs.sum_leading(jnp.asarray(x, jnp.bfloat16))
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(
      mean_inputs.dense_mean(x, axis=(-1,))[0], x.reshape(-1, 4).mean(0),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      mean_inputs.conv_mean_patch(
          x[..., :4], (2, 3), strides=(1, 2), padding=[(1, 0), (1, 1)],
          input_dilation=(1, 1), kernel_dilation=(1, 1)),
      _explicit_mean_patch(x, (2, 3), (1, 2), [(1, 0), (1, 1)], (1, 1),
                           (1, 1), 1), rtol=1e-5, atol=1e-6)
