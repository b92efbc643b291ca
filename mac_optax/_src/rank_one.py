"""The MAC preconditioner: a closed-form rank-one inverse applied to a gradient.

For one layer, MAC models the input factor of the Fisher block as
``A = ā āᵀ + λ I`` (``ā`` the mean input of the layer) and the gradient factor
as ``I``. By Sherman–Morrison,

    (ā āᵀ + λ I)⁻¹ Ĝ = (1/λ) (Ĝ − ā (āᵀ Ĝ) / (λ + āᵀ ā)),

where ``Ĝ`` is the gradient laid out as ``(d_in, d_out)``. The authors drop the
``1/λ`` ("decoupled damping"); :func:`precondition` does the same unless
``exact_inverse=True``.

A bias is an extra input row of ``Ĝ`` whose mean input is exactly ``1``, so it
adds ``b̂`` to ``āᵀĜ`` and ``1`` to ``āᵀā`` without ever concatenating arrays.

Column groups: a grouped convolution (or a fused query/key/value projection)
splits the output columns into ``G`` equal groups, each preconditioned with
its own mean ``ā_g``. The statistic is then ``(G, d_in)`` and the gradient is
viewed as ``(d_in, G, d_out / G)``. The ungrouped layer is ``G = 1``.

No ``d_in × d_in`` matrix is ever formed: the cost is one contraction and one
rank-one update, ``O(d_in · d_out)``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def precondition(
    kernel_grad: jax.Array,
    bias_grad: Optional[jax.Array],
    mean: jax.Array,
    damping: jax.Array | float,
    *,
    exact_inverse: bool = False,
    input_ndim: int = 1,
) -> tuple[jax.Array, Optional[jax.Array]]:
  """Applies ``(ā āᵀ + λI)⁻¹`` (up to ``1/λ``) to a grouped layer gradient.

  Math, for every group ``g`` (batched over any leading stack axes)::

      c_g = ā_gᵀ Ĝ_g + b̂_g                      # (d_out/G,)
      s_g = λ + ā_gᵀ ā_g + 1                    # the `+ b̂`, `+ 1` only with bias
      Ĝ_g ← Ĝ_g − ā_g c_gᵀ / s_g
      b̂_g ← b̂_g − c_g / s_g

  Args:
    kernel_grad: ``[*stack, d_in, G, d_out_g]`` gradient of the kernel.
    bias_grad: ``[*stack, G, d_out_g]`` gradient of the bias, or ``None``.
    mean: ``[*stack, G, d_in]`` mean input of each column group.
    damping: ``λ > 0``; a scalar, possibly traced.
    exact_inverse: divide the result by ``λ`` (the true inverse). The default
      keeps the authors' decoupled damping.
    input_ndim: number of input axes ``n``: with ``n > 1`` the kernel is
      ``[*stack, *in_axes, G, d_out_g]`` and the mean ``[*stack, G, *in_axes]``
      (the kernel's input axes kept unflattened, so a kernel sharded along a
      minor input axis, e.g. a conv's ``c_in``, is never gathered).

  Returns:
    The preconditioned ``(kernel_grad, bias_grad)``, same shapes and dtypes
    as the arguments (``bias_grad`` stays ``None`` when it was ``None``).

  Example:
    >>> g = jnp.ones((3, 1, 2)); a = jnp.ones((1, 3))
    >>> u, _ = precondition(g, None, a, 1.0)
    >>> u.shape
    (3, 1, 2)
  """
  ins = 'ijklmnpqrstuvwxyz'[:input_ndim]
  projection = jnp.einsum(f'...g{ins},...{ins}go->...go', mean, kernel_grad)
  norm_sq = jnp.sum(jnp.square(mean), axis=tuple(range(-input_ndim, 0)))
  if bias_grad is not None:
    projection = projection + bias_grad
    norm_sq = norm_sq + 1.0
  coeff = projection / (damping + norm_sq)[..., None]
  new_kernel = kernel_grad - jnp.einsum(f'...g{ins},...go->...{ins}go', mean,
                                        coeff)
  new_bias = None if bias_grad is None else bias_grad - coeff
  if exact_inverse:
    new_kernel = new_kernel / damping
    new_bias = None if new_bias is None else new_bias / damping
  return new_kernel, new_bias


def shrink_factor(mean: jax.Array, damping: jax.Array | float,
                  has_bias: bool) -> jax.Array:
  """The factor ``λ / (λ + ‖ā‖²)`` by which MAC shrinks the gradient along ``ā``.

  Args:
    mean: ``[..., d_in]`` mean input (without the bias coordinate).
    damping: ``λ``.
    has_bias: add the bias coordinate (``1``) to ``‖ā‖²``.

  Returns:
    ``[...]`` the shrink factor of each mean vector.
  """
  norm_sq = jnp.sum(jnp.square(mean), axis=-1) + (1.0 if has_bias else 0.0)
  return damping / (damping + norm_sq)
