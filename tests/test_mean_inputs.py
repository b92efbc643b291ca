"""Mean inputs against materialized patches."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mac_optax._src import mean_inputs
from mac_optax._src.conv_geometry import ConvGeometry
from tests import reference


def _im2col_mean(x, kernel_size, strides, pads, lhs, rhs, groups):
  """Mean of all im2col patches, extracted one by one in float64 numpy.

  The input is dilated by `lhs` (holes are zeros), zero-padded by `pads`;
  output ``o`` reads positions ``o·stride + k·rhs`` of that array.
  """
  x = np.asarray(x, np.float64)
  n = len(kernel_size)
  spatial, channels = x.shape[x.ndim - n - 1:-1], x.shape[-1]
  images = x.reshape(-1, *spatial, channels)
  dilated = np.zeros((images.shape[0],) + tuple(
      (s - 1) * d + 1 for s, d in zip(spatial, lhs)) + (channels,))
  dilated[(slice(None),) + tuple(slice(None, None, d) for d in lhs)] = images
  padded = np.pad(dilated, [(0, 0), *pads, (0, 0)])
  spans = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs)]
  outputs = [(p - span) // s + 1
             for p, span, s in zip(padded.shape[1:-1], spans, strides)]
  patches = [padded[(slice(None),) + tuple(
      slice(o * s, o * s + span, d)
      for o, s, span, d in zip(out, strides, spans, rhs))]
             for out in np.ndindex(*outputs)]           # [B, *kernel, C] each
  mean = np.mean(patches, axis=(0, 1))                  # (*kernel_size, C)
  mean = mean.reshape(*kernel_size, groups, channels // groups)
  return np.moveaxis(mean, n, 0).reshape(groups, -1)


def _flax_input_and_pads(x, geometry):
  """Flax's padding conventions, written out: ``(padded x, zero pads)``."""
  x = np.asarray(x, np.float64)
  n = len(geometry.kernel_size)
  spatial = x.shape[x.ndim - n - 1:-1]
  spans = [(k - 1) * d + 1 for k, d in zip(geometry.kernel_size,
                                           geometry.kernel_dilation)]
  padding = geometry.padding
  if padding in ('CIRCULAR', 'REFLECT'):
    mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding]
    wrap = [(0, 0)] * (x.ndim - n - 1) + [((s - 1) // 2, s // 2)
                                           for s in spans] + [(0, 0)]
    return np.pad(x, wrap, mode=mode), [(0, 0)] * n
  if padding == 'CAUSAL':
    return x, [(spans[0] - 1, 0)]
  if padding == 'VALID':
    return x, [(0, 0)] * n
  if padding == 'SAME':
    pads = []
    for size, span, s, d in zip(spatial, spans, geometry.strides,
                                geometry.input_dilation):
      dilated = (size - 1) * d + 1
      total = max((-(-dilated // s) - 1) * s + span - dilated, 0)
      pads.append((total // 2, total - total // 2))
    return x, pads
  return x, list(padding)


def _reference(x, geometry):
  x, pads = _flax_input_and_pads(x, geometry)
  return _im2col_mean(x, geometry.kernel_size, geometry.strides, pads,
                      geometry.input_dilation, geometry.kernel_dilation,
                      geometry.groups)


# (input shape, nn.Conv keyword arguments): every padding form Flax has,
# strides, input and kernel dilation, feature groups, 1-3 spatial axes, and
# zero, one or two batch axes.
CONVS = {
    '1d_same_stride_dilation': ((3, 11, 2), dict(
        kernel_size=(3,), strides=2, kernel_dilation=2, padding='SAME')),
    '1d_causal_dilation': ((2, 9, 3), dict(
        kernel_size=(3,), kernel_dilation=2, padding='CAUSAL')),
    '2d_valid_stride': ((3, 9, 8, 3), dict(
        kernel_size=(2, 3), strides=(2, 1), padding='VALID')),
    '2d_both_dilations_groups': ((2, 7, 6, 4), dict(
        kernel_size=(3, 2), input_dilation=(2, 1), kernel_dilation=(1, 2),
        padding=((1, 2), (0, 1)), feature_group_count=2)),
    '2d_int_padding_stride_3': ((2, 8, 7, 2), dict(
        kernel_size=(3, 3), strides=3, padding=2)),
    '2d_explicit_pairs_depthwise': ((2, 6, 7, 4), dict(
        kernel_size=(3, 2), padding=((2, 0), (1, 3)), feature_group_count=4)),
    '2d_circular_dilation_groups': ((2, 7, 6, 4), dict(
        kernel_size=(3, 3), kernel_dilation=2, padding='CIRCULAR',
        feature_group_count=2)),
    '2d_reflect_stride': ((2, 8, 7, 3), dict(
        kernel_size=(3, 3), strides=2, padding='REFLECT')),
    '2d_input_dilation_int_padding': ((2, 4, 5, 2), dict(
        kernel_size=(2, 2), input_dilation=2, padding=1)),
    '3d_same_groups': ((2, 4, 5, 4, 4), dict(
        kernel_size=(2, 3, 2), strides=(1, 2, 1), kernel_dilation=(1, 1, 2),
        padding='SAME', feature_group_count=2)),
    '2d_two_batch_axes': ((2, 3, 6, 5, 2), dict(
        kernel_size=(3, 3), strides=(1, 2), padding='SAME')),
    '2d_no_batch_axis': ((6, 5, 2), dict(kernel_size=(2, 3),
                                         padding='VALID')),
}


def _conv(shape_and_kwargs, dtype=jnp.float32):
  shape, kwargs = shape_and_kwargs
  layer = nn.Conv(kwargs.get('feature_group_count', 1) * 2, **kwargs)
  x = np.random.default_rng(len(shape)).normal(size=shape) + 0.3
  return layer, ConvGeometry.of(layer), jnp.asarray(x, dtype)


@pytest.mark.parametrize('name', sorted(CONVS))
def test_conv_statistic_equals_float64_im2col_mean(name):
  _, geometry, x = _conv(CONVS[name])
  got = mean_inputs.conv_statistic(x, geometry)
  expected = _reference(x, geometry)
  assert got.dtype == jnp.float32
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', sorted(CONVS))
def test_conv_statistic_is_exact_in_float64(name):
  """In float64 the one-pass contraction is the mean itself, to 1e-12."""
  with reference.x64():
    _, geometry, x = _conv(CONVS[name], jnp.float64)
    got = mean_inputs.conv_statistic(x, geometry)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, _reference(x, geometry), rtol=1e-12,
                               atol=1e-13)


@pytest.mark.parametrize('name', sorted(CONVS))
def test_conv_statistic_summed_in_blocks_of_images(monkeypatch, name):
  """As on several devices: images summed within blocks, blocks in the last
  contraction (here 2 blocks of 3 images, blocks of 1, or one block)."""
  monkeypatch.setattr(mean_inputs, 'batch_blocks', lambda b: math.gcd(b, 4))
  with reference.x64():
    _, geometry, x = _conv(CONVS[name], jnp.float64)
    np.testing.assert_allclose(mean_inputs.conv_statistic(x, geometry),
                               _reference(x, geometry), rtol=1e-12,
                               atol=1e-13)


@pytest.mark.parametrize('name', ['1d_causal_dilation',
                                  '2d_both_dilations_groups',
                                  '2d_circular_dilation_groups',
                                  '2d_reflect_stride', '3d_same_groups',
                                  '2d_two_batch_axes'])
def test_float64_reference_follows_flax(name):
  """The reference's padding conventions are Flax's: each output column's
  mean patch from differentiating ``nn.Conv`` itself (float64)."""
  with reference.x64():
    layer, geometry, x = _conv(CONVS[name], jnp.float64)
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)['params']
    kernel = jnp.ones(params['kernel'].shape, jnp.float64)
    means = reference.column_means(
        lambda k, b, x: layer.apply({'params': {'kernel': k, 'bias': b}}, x),
        kernel, jnp.zeros(params['bias'].shape, jnp.float64), x)
    means = np.asarray(means)[:, :-1]             # [d_out, d_in per group]
    expected = _reference(x, geometry)
    groups = geometry.groups
    per_group = means.shape[0] // groups
    for g in range(groups):
      np.testing.assert_allclose(
          means[g * per_group:(g + 1) * per_group],
          np.broadcast_to(expected[g], (per_group, expected.shape[1])),
          rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize('widen', [None, True])
def test_conv_statistic_of_bfloat16_input_is_float32_sum(monkeypatch, widen):
  """Summed in float32, whether the image is widened first (as jax < 0.12
  must on XLA:CPU) or not (this release's choice)."""
  if widen:
    monkeypatch.setattr(mean_inputs, '_NARROW_BATCHED_DOTS', False)
  _, geometry, x = _conv(CONVS['2d_both_dilations_groups'], jnp.bfloat16)
  got = mean_inputs.conv_statistic(x, geometry)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(
      got, _reference(np.asarray(x, np.float32), geometry), rtol=1e-5,
      atol=1e-6)


def test_conv_statistic_refuses_token_shaped_inputs():
  _, geometry, x = _conv(CONVS['1d_causal_dilation'])
  mask = jnp.ones(x.shape[:2], jnp.bool_)
  with pytest.raises(ValueError, match="convolution 'blocks/conv'"):
    mean_inputs.conv_statistic(x, geometry, mask, where='blocks/conv')
  # A mask of the model's token rows that this input does not lead with
  # (an image next to a sequence) leaves the statistic unmasked.
  np.testing.assert_allclose(
      mean_inputs.conv_statistic(x, geometry, jnp.zeros((2, 4), jnp.bool_)),
      _reference(x, geometry), rtol=1e-5, atol=1e-6)


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
  expected = _im2col_mean(x, kernel_size, strides, padding, lhs, rhs, groups)
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
      _im2col_mean(x, (2, 3), (1, 2), [(1, 0), (1, 1)], (1, 1), (1, 1),
                   1), rtol=1e-5, atol=1e-6)
