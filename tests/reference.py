"""Independent dense references for the MAC update.

The mean input of a layer is obtained by differentiating the layer itself:
for ``y = f(x; W, b)`` linear in ``W``, ``∂ Σ_rows y[..., c] / ∂W[..., c]`` is
the sum over rows (batch, tokens, output positions) of the input patch seen by
column ``c``, and ``∂/∂b[c]`` counts the rows. No count matrices, no shared code
with the library. The update is then ``λ (ā āᵀ + λI)⁻¹ Ĝ`` with an explicit
inverse (``np.linalg.inv``, in float64).
"""

import jax
import jax.numpy as jnp
import numpy as np


def x64():
  """Context manager enabling float64 across jax versions."""
  enable = getattr(jax, 'enable_x64', None)
  if enable is None:  # older jax
    from jax.experimental import enable_x64 as enable  # pylint: disable=g-import-not-at-top
  return enable(True)


def column_means(apply_fn, kernel, bias, x, n_out=1):
  """``[d_out, d_in(+1)]`` mean augmented input of each output column.

  Args:
    apply_fn: ``(kernel, bias, x) -> y`` with the output columns on the last
      axis (``bias`` may be None).
    kernel: ``(*in_axes, d_out)`` kernel; for a grouped conv the input axes
      are the per-group ones.
    bias: ``(d_out,)`` or None.
    x: the input.
    n_out: number of trailing output axes of the kernel (and of ``y``).

  Returns:
    Row ``c``: the mean of column ``c``'s input patch, with a trailing ``1``
    when there is a bias.
  """
  d_out = int(np.prod(kernel.shape[kernel.ndim - n_out:]))
  y = apply_fn(kernel, bias, x)
  rows = y.size // d_out
  grad_k, grad_b = jax.grad(
      lambda k, b: jnp.sum(apply_fn(k, b, x)), argnums=(0, 1))(kernel, bias)
  means = grad_k.reshape(-1, d_out).T / rows
  if bias is not None:
    means = jnp.concatenate([means, (grad_b.reshape(-1) / rows)[:, None]],
                            axis=1)
  return means


def dense_update(grad_kernel, grad_bias, means, damping, exact=False):
  """``λ (ā āᵀ + λI)⁻¹ Ĝ`` column by column, with explicit inverses.

  Args:
    grad_kernel: ``(*in_axes, d_out)`` kernel gradient.
    grad_bias: ``(*out_axes)`` or None.
    means: ``[d_out, d_in(+1)]`` from :func:`column_means`.
    damping: ``λ``.
    exact: omit the factor ``λ`` (the true inverse).

  Returns:
    ``(kernel update, bias update or None)`` shaped like the gradients.
  """
  means = np.asarray(means, np.float64)
  d_out = means.shape[0]
  g = np.asarray(grad_kernel, np.float64).reshape(-1, d_out)
  if grad_bias is not None:
    g = np.concatenate([g, np.asarray(grad_bias).reshape(1, d_out)], axis=0)
  columns = []
  for c in range(d_out):
    a = means[c]
    inverse = np.linalg.inv(np.outer(a, a) + damping * np.eye(a.shape[0]))
    scale = 1.0 if exact else damping
    columns.append(scale * inverse @ g[:, c])
  u = np.stack(columns, axis=1)
  if grad_bias is None:
    return u.reshape(grad_kernel.shape), None
  return u[:-1].reshape(grad_kernel.shape), u[-1].reshape(grad_bias.shape)


def assert_close(actual, expected, dtype=np.float32):
  tol = 1e-5 if dtype == np.float32 else 1e-11
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                             rtol=tol * 100, atol=tol * 10)

