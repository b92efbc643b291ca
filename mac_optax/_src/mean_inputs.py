"""Mean layer inputs ``ā``, computed in the forward pass.

Every statistic returned here has the layout the transform expects:
``[G, d_in]``, the mean input of each of ``G`` column groups of the layer
(``G = 1`` except for grouped convolutions and fused projections), flattened
in the row-major order of the kernel's input axes, in float32.

The mean convolution patch is never computed from materialized im2col
patches. The patch is linear in the input: each spatial axis contributes a
small matrix ``M[k, p]``, the number of output positions at which kernel tap
``k`` reads input position ``p``, and
``mean_patch[k_1..k_n, c] = Σ_b Σ_p Π_d M_d[k_d, p_d] x[b, p, c] / (B · #outputs)``.
The images are summed first, within blocks of the batch that a device holds
whole; the spatial axes are then contracted block by block, and the blocks are
summed only together with the last spatial axis, so a batch sharded over
devices is reduced across them as ``d_in`` floats, not as an image.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mac_optax._src import token_mask
from mac_optax._src.conv_geometry import ConvGeometry

STAT_DTYPE = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


def stat_dtype(dtype) -> jnp.dtype:
  """Statistics are accumulated in float32, or wider when the input is."""
  return jnp.promote_types(dtype, STAT_DTYPE)


# XLA:CPU lowers a sum over the leading axis very differently across jax
# releases (benchmarks/RESULTS.md). From jax 0.10 on, ``jnp.sum(x, 0)`` of a
# [128, 32, 32, 64] array takes 92 ms and a contraction with a ones vector
# 1.2 ms; with jax 0.9.1 the sum takes 3 ms and the contraction 40 ms, which
# made capture cost up to 2x a forward pass. Each release gets the form it
# runs fast; both are exact sums. The contraction asks for HIGHEST precision:
# at the default, GPUs run it in TF32 and TPUs in bf16 passes.
_SUM_AS_CONTRACTION = jax.__version_info__ >= (0, 10)

# XLA:CPU before jax 0.12 cannot run a dot with batch axes whose operands are
# narrower than its result ("Unsupported element type for DotThunk::Execute:
# BF16 x BF16 = F32" under jax 0.10.2; 0.12.1 runs it), the form of the conv
# statistic's contractions; there, a bfloat16 or float16 image is widened to
# float32 first (one more pass over it).
_NARROW_BATCHED_DOTS = jax.__version_info__ >= (0, 12)


def sum_leading(x: jax.Array, axes: int = 1) -> jax.Array:
  """``Σ`` over the first `axes` axes of `x`, accumulated in ``stat_dtype``."""
  dtype = stat_dtype(x.dtype)
  if not _SUM_AS_CONTRACTION:
    return jnp.sum(x, axis=tuple(range(axes)), dtype=dtype)
  lead = x.shape[:axes]
  ones = jnp.ones(lead, x.dtype)
  letters = 'abcdefgh'[:axes]
  return jnp.einsum(f'{letters},{letters}...->...', ones, x,
                    preferred_element_type=dtype, precision=_HIGHEST)


def _mean_rows(x: jax.Array) -> jax.Array:
  """Mean over axis 0 of a 2-D ``[rows, d_in]`` array.

  A reduction, not `sum_leading`'s ones contraction: XLA:CPU compiles every
  vector × matrix dot into a GEMV kernel of its own (about 40 ms each, half
  a second of GPT-2-small's step), while reductions of one shape share a
  kernel; over rows of at most a few thousand features a reduction runs as
  fast on every jax release (benchmarks/notes.md).
  """
  return jnp.sum(x, axis=0, dtype=stat_dtype(x.dtype)) / max(x.shape[0], 1)


def dense_mean(x: jax.Array, axis: Sequence[int] = (-1,),
               mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean of ``x`` over every axis but the contracted ``axis``.

  With a token `mask` whose shape leads ``x`` on row axes (the rule of the
  token-mask module), the mean runs over real tokens only:
  ``ā = Σ_{t,r} m_t x[t, r, :] / (Σ_t m_t · #r)``.

  Args:
    x: the layer input, any shape.
    axis: the contracted (input feature) axes, in kernel order.
    mask: the capture's token mask, or None.

  Returns:
    ``[1, d_in]`` float32, ``d_in`` the product of the contracted sizes.
  """
  axis = tuple(sorted(a % x.ndim for a in axis))
  x = jax.lax.stop_gradient(x)
  rows = [a for a in range(x.ndim) if a not in axis]
  weights = token_mask.row_weights(mask, x.shape, rows, stat_dtype(x.dtype))
  # The row axes keep their order, so the mask's axes stay in front.
  x = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
  d_in = math.prod(x.shape[x.ndim - len(axis):])
  if weights is None:
    return _mean_rows(x.reshape(-1, d_in))[None, :]
  tokens = weights.size
  x = x.reshape(tokens, -1, d_in)
  # The weighted rows summed as a reduction, as in `_mean_rows`.
  summed = jnp.sum(weights.reshape(tokens, 1, 1) * x.astype(weights.dtype),
                   axis=(0, 1))
  return (summed / token_mask.count(weights, x.shape[1]))[None, :]


def _tap_matrix(size: int, kernel: int, stride: int, pad: tuple[int, int],
                input_dilation: int, kernel_dilation: int) -> np.ndarray:
  """``M[k, p] = #`` output positions at which tap ``k`` reads input ``p``.

  Coordinates follow ``lax.conv_general_dilated``: the input is dilated by
  ``input_dilation`` (holes read as zero), padded by ``pad``, and output ``o``
  reads dilated-padded position ``o·stride + k·kernel_dilation``.
  """
  dilated_size = (size - 1) * input_dilation + 1 if size else 0
  padded = dilated_size + pad[0] + pad[1]
  span = (kernel - 1) * kernel_dilation + 1
  outputs = max(0, (padded - span) // stride + 1)
  taps = np.zeros((kernel, size), dtype=np.float32)
  for k in range(kernel):
    for o in range(outputs):
      q = o * stride + k * kernel_dilation - pad[0]
      if 0 <= q < dilated_size and q % input_dilation == 0:
        taps[k, q // input_dilation] += 1.0
  return taps


def batch_blocks(batch: int) -> int:
  """How many blocks of consecutive images the conv statistic sums apart.

  ``gcd(batch, device count)``: a batch split evenly over a mesh of all
  devices, or of a sub-mesh whose size divides their number, gives each
  device whole blocks, so summing a block never crosses devices. Any number
  gives the same statistic; it only decides what is summed where.
  """
  return math.gcd(batch, jax.device_count())


def _sum_blocks(x: jax.Array, blocks: int) -> jax.Array:
  """``Σ`` over each of `blocks` consecutive blocks of the leading axis."""
  if blocks == 1:
    return sum_leading(x)[None]
  if blocks == x.shape[0]:
    return x
  x = x.reshape(blocks, -1, *x.shape[1:])
  ones = jnp.ones(x.shape[:2], x.dtype)
  return jax.lax.dot_general(ones, x, (((1,), (1,)), ((0,), (0,))),
                             precision=_HIGHEST,
                             preferred_element_type=stat_dtype(x.dtype))


def conv_output_count(spatial: Sequence[int], kernel_size: Sequence[int],
                      strides: Sequence[int], pads: Sequence[tuple[int, int]],
                      input_dilation: Sequence[int],
                      kernel_dilation: Sequence[int]) -> int:
  """Number of output positions of one image."""
  count = 1
  for n, k, s, p, di, dk in zip(spatial, kernel_size, strides, pads,
                                input_dilation, kernel_dilation):
    padded = (n - 1) * di + 1 + p[0] + p[1]
    count *= max(0, (padded - ((k - 1) * dk + 1)) // s + 1)
  return count


def conv_mean_patch(
    x: jax.Array,
    kernel_size: Sequence[int],
    *,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    input_dilation: Sequence[int],
    kernel_dilation: Sequence[int],
    feature_group_count: int = 1,
) -> jax.Array:
  """Mean im2col patch of a channels-last convolution, without the patches.

  Args:
    x: ``[*batch, *spatial, C]`` input, already padded by any non-zero
      (circular, reflect) padding the layer applies itself.
    kernel_size: the ``n`` spatial kernel sizes.
    strides: ``n`` window strides.
    padding: ``n`` explicit ``(low, high)`` zero paddings (as for
      ``lax.conv_general_dilated``, after resolving 'SAME'/'VALID').
    input_dilation: ``n`` input (lhs) dilations.
    kernel_dilation: ``n`` kernel (rhs) dilations.
    feature_group_count: ``G``; group ``g`` reads channels
      ``[g·C/G, (g+1)·C/G)``.

  Returns:
    ``[G, prod(kernel_size) · C/G]`` float32 mean patch of each group, in
    the ``(*kernel_size, C/G)`` order of a Flax conv kernel.
  """
  n = len(kernel_size)
  x = jax.lax.stop_gradient(x)
  spatial, channels = x.shape[x.ndim - n - 1:-1], x.shape[-1]
  # Only the batch axes are merged: flattening (spatial, C) would make a
  # channel-sharded input (tensor parallelism) all-gather.
  patch = x.reshape(-1, *spatial, channels)
  batch = patch.shape[0]
  outputs = conv_output_count(spatial, kernel_size, strides, padding,
                              input_dilation, kernel_dilation)
  dtype = stat_dtype(x.dtype)
  if not _NARROW_BATCHED_DOTS:
    patch = patch.astype(dtype)
  # One pass over the images sums them within blocks a device holds whole
  # (on one device, the whole batch). Then each spatial axis in turn is
  # contracted with its tap matrix and becomes a tap axis in place
  # ([blocks, taps so far, p_d, ..., c] → [blocks, taps, k_d, ...]), in one
  # dot whose batch axes are the axes before it (the tap matrix is broadcast
  # over those: blocks·p_d·k_d numbers per tap so far). The last spatial axis
  # is contracted together with the blocks: no op sums the blocks of a
  # [*spatial, C] map, so with the batch sharded over devices the
  # cross-device sum is over [*kernel_size, C] (d_in floats), not an image.
  patch = _sum_blocks(patch, batch_blocks(batch))
  blocks = patch.shape[0]
  for d in range(n):
    taps = _tap_matrix(spatial[d], kernel_size[d], strides[d], padding[d],
                       input_dilation[d], kernel_dilation[d]).T  # [p_d, k_d]
    seen = tuple(kernel_size[:d])
    if d < n - 1:
      lead = tuple(range(d + 1))              # the blocks and the taps so far
      weights = jnp.broadcast_to(jnp.asarray(taps, patch.dtype),
                                 (blocks, *seen, *taps.shape))
      dims = (((d + 1,), (d + 1,)), (lead, lead))
    else:
      weights = jnp.broadcast_to(jnp.asarray(taps, patch.dtype),
                                 (*seen, blocks, *taps.shape))
      dims = (((d, d + 1), (0, d + 1)),
              (tuple(range(d)), tuple(range(1, d + 1))))
    patch = jax.lax.dot_general(weights, patch, dims, precision=_HIGHEST,
                                preferred_element_type=dtype)
  patch = patch / max(batch * outputs, 1)                # [*kernel_size, C]
  groups = feature_group_count
  patch = patch.reshape(*kernel_size, groups, channels // groups)
  patch = jnp.moveaxis(patch, n, 0)
  return patch.reshape(groups, -1)


def conv_statistic(x: jax.Array, geometry: ConvGeometry,
                   mask: Optional[jax.Array] = None,
                   where: str = 'Conv') -> jax.Array:
  """The ``[G, d_in]`` mean patch of a convolution in Flax's conventions.

  Raises:
    ValueError: the input leads with the shape of the capture's token
      `mask` (no row mask makes a convolution's patches padding-free).
  """
  token_mask.check_not_conv(mask, x.shape, where)
  x, padding = geometry.resolve(x)
  return conv_mean_patch(
      x, geometry.kernel_size, strides=geometry.strides, padding=padding,
      input_dilation=geometry.input_dilation,
      kernel_dilation=geometry.kernel_dilation,
      feature_group_count=geometry.groups)
