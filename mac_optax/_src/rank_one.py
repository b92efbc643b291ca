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
Every mean vector of a layer (one per stack index, batched axis index and
column group, see :class:`mac_optax.KernelLayout`) acts on its own columns.

The kernel is never transposed, flattened or gathered: the contractions are
written in the kernel's own axis order, so a kernel sharded along any axis
keeps its sharding. No ``d_in × d_in`` matrix is formed; the cost is one
contraction and one rank-one update, ``O(d_in · d_out)``.

Overflow: ``‖ā‖²`` of activations near float32's range would overflow, so each
mean vector is scaled by ``s = max(‖ā‖_∞, 1)`` first; with ``ã = ā/s``,
``ā (āᵀĜ)/(λ + ‖ā‖²) = ã (ãᵀĜ)/(λ/s² + ‖ã‖²)`` exactly.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mac_optax._src import sharding
from mac_optax._src import vector_norm
from mac_optax._src.layout import KernelLayout

_HIGHEST = jax.lax.Precision.HIGHEST
_LETTERS = 'abcdefhijklmnpqrstuvwxyzABCDEFHIJKLMNPQRSTUVWXYZ'  # no g, o, G, O


class _Specs:
  """Einsum subscripts of a layout, with ``g`` the column-group axis.

  The kernel is viewed with its first output axis split into
  ``(column_groups, rest)``; ``kernel`` names its axes in kernel order,
  ``mean`` the ``[*stack, *batch, g, *inputs]`` statistic, ``columns`` the
  kernel's non-input axes (the bias), ``vectors`` one entry per mean vector.
  """

  def __init__(self, layout: KernelLayout):
    letter = dict(zip(range(len(layout.shape)), _LETTERS))
    kernel, shape = [], []
    for axis, size in enumerate(layout.shape):
      if axis == layout.outputs[0]:
        kernel += ['g', letter[axis]]
        shape += [layout.column_groups, size // layout.column_groups]
      else:
        kernel.append(letter[axis])
        shape.append(size)
    word = lambda axes: ''.join(letter[a] for a in axes)
    self.kernel = ''.join(kernel)
    self.kernel_shape = tuple(shape)
    self.vectors = word(layout.stack) + word(layout.batch) + 'g'
    self.mean = self.vectors + word(layout.inputs)
    self.mean_shape = (layout.sizes(layout.stack) + layout.sizes(layout.batch)
                       + (layout.column_groups,) + layout.sizes(layout.inputs))
    inputs = set(word(layout.inputs))
    self.columns = ''.join(c for c in self.kernel if c not in inputs)
    self.column_shape = tuple(n for c, n in zip(self.kernel, shape)
                              if c not in inputs)
    self.input_ndim = len(layout.inputs)
    # The bias's own subscripts: an einsum layer's bias runs over the column
    # axes in the output's order; einsum reorders, the bias is not copied.
    bias_axes = layout.bias_axes
    if bias_axes is None:
      bias_axes = tuple(a for a in range(len(layout.shape))
                        if a not in layout.inputs)
    bias, bias_shape = [], []
    for axis in bias_axes:
      size = layout.shape[axis]
      if axis == layout.outputs[0]:
        bias += ['g', letter[axis]]
        bias_shape += [layout.column_groups, size // layout.column_groups]
      else:
        bias.append(letter[axis])
        bias_shape.append(size)
    self.bias = ''.join(bias)
    self.bias_shape = tuple(bias_shape)


def _scale_columns(specs: _Specs, per_vector: jax.Array,
                   columns: jax.Array, source: Optional[str] = None,
                   target: Optional[str] = None) -> jax.Array:
  """``columns * per_vector`` broadcast from the vectors to their columns.

  `source`/`target` are the subscripts of `columns` and of the result
  (default: ``specs.columns``, the kernel's order; ``specs.bias`` for a bias).
  """
  source = source or specs.columns
  target = target or specs.columns
  return jnp.einsum(f'{specs.vectors},{source}->{target}', per_vector,
                    columns)


class Factors(NamedTuple):
  """The small vectors of the preconditioner, for ``[*V]`` mean vectors."""
  tilde: jax.Array      # [*V, d_in] ã = ā / s, s = max(‖ā‖_∞, 1)
  inv_scale: jax.Array  # [*V] 1 / s
  inverse: jax.Array    # [*V] 1 / (λ/s² + ‖ã‖² (+ 1/s² with a bias))


def factors(mean: jax.Array, damping: jax.Array | float,
            has_bias: bool) -> Factors:
  """:class:`Factors` of ``[..., d_in]`` mean vectors (any leading axes).

  Everything the preconditioner computes without the gradient, in one
  place for :func:`precondition`, MAC's update and :func:`shrink_factor`.
  """
  norm = vector_norm.norm(mean)
  inv_scale = 1 / norm.scale
  tilde = mean * inv_scale[..., None]
  norm_sq = norm.sum_sq
  if has_bias:
    norm_sq = norm_sq + jnp.square(inv_scale)
  return Factors(tilde, inv_scale,
                 1 / (damping * jnp.square(inv_scale) + norm_sq))


def precondition(
    layout: KernelLayout,
    kernel_grad: jax.Array,
    bias_grad: Optional[jax.Array],
    mean: jax.Array,
    damping: jax.Array | float,
    *,
    exact_inverse: bool = False,
) -> tuple[jax.Array, Optional[jax.Array]]:
  """Applies ``(ā āᵀ + λI)⁻¹`` (times ``λ``) to one layer's gradient.

  Math, for every mean vector ``ā`` and the columns ``Ĝ`` it owns::

      c = āᵀ Ĝ + b̂                       # the `+ b̂`, `+ 1` only with bias
      Ĝ ← Ĝ − ā cᵀ / (λ + āᵀ ā + 1)
      b̂ ← b̂ − c / (λ + āᵀ ā + 1)

  computed overflow-free as described in the module docstring.

  Args:
    layout: the kernel's axis roles.
    kernel_grad: gradient of the kernel, ``layout.shape``.
    bias_grad: gradient of the bias (``layout.bias_shape``), or ``None``.
    mean: ``layout.stat_shape`` = ``[*stack, G, d_in]`` mean inputs, in the
      dtype to compute in.
    damping: ``λ > 0``; a scalar, possibly traced.
    exact_inverse: divide the result by ``λ`` (the true inverse). The default
      keeps the authors' decoupled damping.

  Returns:
    The preconditioned ``(kernel_grad, bias_grad)`` in the arguments' shapes
    and dtypes (``bias_grad`` stays ``None`` when it was ``None``).

  Example:
    >>> layout = KernelLayout.dense((3, 2), inputs=1)
    >>> u, _ = precondition(layout, jnp.ones((3, 2)), None, jnp.ones((1, 3)),
    ...                     1.0)
    >>> u.shape
    (3, 2)
  """
  return apply(layout, kernel_grad, bias_grad,
               factors(mean, damping, bias_grad is not None),
               1 / damping if exact_inverse else None)


# Kernels of at least this many elements (2 MiB of float32, more than a
# core's L2 cache) take the projection as a dot; smaller ones as a reduction.
DOT_FROM = 2**19


def _projection(specs: _Specs, tilde: jax.Array, kernel: jax.Array,
                along) -> jax.Array:
  """``ãᵀĜ``: the gradient contracted with the mean vectors over its inputs.

  Two forms of the same ``O(d_in · d_out)`` pass. XLA:CPU compiles every
  vector × matrix dot into a GEMV kernel of its own (tens of milliseconds
  per layer), while a product summed over the input axes fuses into a
  reduction that layers of one shape share. But the reduction reads its
  operand in row-major order: a gradient that the backward pass leaves in
  another layout (a DenseGeneral's or a tied embedding's) is first copied
  whole, which a dot avoids. Small kernels, whose cost is compilation, take
  the reduction; large ones, whose cost is passes through memory, the dot.
  """
  columns = along(specs.columns)
  if kernel.size >= DOT_FROM:
    return jnp.einsum(f'{specs.mean},{specs.kernel}->{specs.columns}',
                      tilde, kernel, precision=_HIGHEST,
                      **sharding.out_sharding(columns))
  return sharding.reshard(
      jnp.einsum(f'{specs.kernel}->{specs.columns}', jnp.einsum(
          f'{specs.mean},{specs.kernel}->{specs.kernel}', tilde, kernel)),
      columns)


def apply(
    layout: KernelLayout,
    kernel_grad: jax.Array,
    bias_grad: Optional[jax.Array],
    vectors: Factors,
    multiplier: Optional[jax.Array | float] = None,
) -> tuple[jax.Array, Optional[jax.Array]]:
  """:func:`precondition` with its :func:`factors` given (``layout.stat_shape``).

  Only what touches the gradient: one contraction ``ãᵀĜ`` and one rank-one
  update per mean vector, then ``multiplier`` (``1/λ`` for the exact
  inverse) if given.
  """
  specs = _Specs(layout)
  dtype = vectors.tilde.dtype
  # Computed in the statistic's dtype (float32 by default, also for bf16
  # gradients); returned in the gradient's.
  kernel = kernel_grad.astype(dtype).reshape(specs.kernel_shape)
  # Under an explicit-axis mesh the vectors take the kernel's sharding, so
  # each device keeps the rows and columns of its own kernel block.
  along = sharding.along(kernel, specs.kernel)
  tilde = sharding.reshard(vectors.tilde.reshape(specs.mean_shape),
                           along(specs.mean))
  vector_shape = specs.mean_shape[:len(specs.vectors)]
  inv_scale = vectors.inv_scale.reshape(vector_shape)
  projection = _projection(specs, tilde, kernel, along)
  bias = None
  if bias_grad is not None:
    bias = sharding.reshard(
        bias_grad.astype(dtype).reshape(specs.bias_shape), along(specs.bias))
    projection = projection + _scale_columns(specs, inv_scale, bias,
                                             source=specs.bias)
  coeff = _scale_columns(specs, vectors.inverse.reshape(vector_shape),
                         projection)
  new_kernel = kernel - jnp.einsum(
      f'{specs.mean},{specs.columns}->{specs.kernel}', tilde, coeff,
      precision=_HIGHEST)
  new_bias = None
  if bias is not None:
    new_bias = bias - _scale_columns(specs, inv_scale, coeff,
                                     target=specs.bias)
  if multiplier is not None:
    new_kernel = new_kernel * multiplier
    new_bias = None if new_bias is None else new_bias * multiplier
  new_kernel = new_kernel.reshape(kernel_grad.shape).astype(kernel_grad.dtype)
  if new_bias is not None:
    new_bias = sharding.like(
        new_bias.reshape(bias_grad.shape).astype(bias_grad.dtype), bias_grad)
  return new_kernel, new_bias


def shrink_factor(mean: jax.Array, damping: jax.Array | float,
                  has_bias: bool) -> jax.Array:
  """The factor ``λ / (λ + ‖ā‖²)`` by which MAC shrinks the gradient along ``ā``.

  Args:
    mean: ``[..., d_in]`` mean input (without the bias coordinate).
    damping: ``λ``.
    has_bias: add the bias coordinate (``1``) to ``‖ā‖²``.

  Returns:
    ``[...]`` the shrink factor of each mean vector (overflow-free).
  """
  f = factors(mean, damping, has_bias)
  return damping * jnp.square(f.inv_scale) * f.inverse
