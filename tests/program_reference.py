"""A float64 reference for layers found in a program, from recorded inputs.

Each test records a layer's inputs itself (its own model code, or Flax's
``nn.intercept_methods``), arranges them as ``[rows, d_in]`` rows in the
kernel's input-axis order, and states the kernel's layout by hand (which
axes are inputs, the column groups). Nothing here calls the library.
"""

import numpy as np


def rows_mean(rows) -> np.ndarray:
  """``ā`` of ``[rows, d_in]`` inputs, in float64."""
  rows = np.asarray(rows, np.float64)
  return rows.reshape(-1, rows.shape[-1]).mean(0)


def conv_rows(x, kernel_size, stride=1, padding=0):
  """``[rows, kh·kw·C]`` im2col patches of an NHWC input, (kh, kw, C) order."""
  x = np.asarray(x, np.float64)
  if padding:
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  b, h, w, c = x.shape
  kh, kw = kernel_size
  patches = []
  for i in range(0, h - kh + 1, stride):
    for j in range(0, w - kw + 1, stride):
      patches.append(x[:, i:i + kh, j:j + kw, :].reshape(b, -1))
  return np.stack(patches, 1).reshape(-1, kh * kw * c)


def update(grad, bias_grad, means, damping, in_axes, group_axis=None):
  """``λ (ā āᵀ + λI)⁻¹ Ĝ`` with explicit inverses, column by column.

  Args:
    grad: the kernel gradient, any layout.
    bias_grad: the bias gradient over the kernel's non-input axes in kernel
      order, or None.
    means: ``[d_in]``, or ``[G, d_in]`` with ``group_axis``.
    damping: ``λ``.
    in_axes: the kernel's input axes (row-major order of ``d_in``).
    group_axis: the output axis whose ``G`` equal slices each have their
      own mean, or None.

  Returns:
    ``(kernel update, bias update or None)`` in the gradients' layouts.
  """
  grad = np.asarray(grad, np.float64)
  out_axes = [a for a in range(grad.ndim) if a not in in_axes]
  moved = np.transpose(grad, tuple(in_axes) + tuple(out_axes))
  d_in = int(np.prod([grad.shape[a] for a in in_axes]))
  g = moved.reshape(d_in, -1)
  d_out = g.shape[1]
  if bias_grad is not None:
    g = np.concatenate([g, np.asarray(bias_grad, np.float64).reshape(1, -1)])
  means = np.asarray(means, np.float64).reshape(-1, d_in)
  # Column c's group: its index along `group_axis` scaled into G slices.
  column_shape = [grad.shape[a] for a in out_axes]
  if group_axis is None:
    group_of = np.zeros(d_out, int)
  else:
    pos = out_axes.index(group_axis)
    index = np.indices(column_shape)[pos].reshape(-1)
    group_of = index * means.shape[0] // column_shape[pos]
  out = np.zeros_like(g)
  for c in range(d_out):
    a = means[group_of[c]]
    if bias_grad is not None:
      a = np.append(a, 1.0)
    inverse = np.linalg.inv(np.outer(a, a) + damping * np.eye(a.size))
    out[:, c] = damping * inverse @ g[:, c]
  kernel = out[:d_in].reshape(moved.shape)
  kernel = np.transpose(kernel, np.argsort(tuple(in_axes) + tuple(out_axes)))
  bias = None if bias_grad is None else out[d_in].reshape(
      np.shape(bias_grad))
  return kernel, bias


def assert_close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=2e-4, atol=2e-5)
