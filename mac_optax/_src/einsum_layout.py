"""Einsum layers for MAC: axis roles from the equation, and their statistic.

A layer ``y = einsum('<x>,<w>-><y>', x, w) (+ b)`` (``nn.Einsum``,
``nnx.Einsum``; ``DenseGeneral``/``LinearGeneral`` with batch axes are
written as one) is linear in ``w``. Each kernel letter has one role:

* in ``x`` and not in ``y``: **input**, contracted with the input
  (``d_in`` is the product of their sizes, in kernel order);
* in ``x`` and in ``y``: **batch**, shared by input, kernel and output; each
  index ``n`` is an independent layer with its own mean input (``G`` is the
  product of their sizes, row-major in kernel order);
* in ``y`` only: **output**.

A kernel letter in neither ``x`` nor ``y`` (summed away without touching the
input), a repeated letter, an ellipsis in the kernel, or a kernel without
input or output letters cannot be modelled and raises.

The statistic. Differentiating ``Σ y`` with respect to ``w`` gives, for batch
index ``n``, ``Σ_{x letters not in w} x[..]`` (letters of ``x`` in ``y`` but
not in ``w`` are the *rows*; letters of ``x`` in neither are summed by the
layer itself), and ``∂Σy/∂b`` counts the rows. The mean input of index ``n``
is therefore

    ā[n, d] = Σ_{rows, summed} x[rows, summed, n, d] / #rows,

one einsum of the input, never a materialized copy. The bias (Flax's shape:
the kernel letters that reach ``y``, in ``y``'s order) is the input ``1`` of
every row.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from mac_optax._src import mean_inputs
from mac_optax._src import token_mask
from mac_optax._src.layout import KernelLayout

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AxisRoles:
  """The roles of an unstacked kernel's axes, as a capture records them.

  ``nn.scan``/``nnx.scan`` add leading stack axes to the stored kernel;
  :meth:`layout` prepends them.
  """
  kernel_shape: tuple[int, ...]
  inputs: tuple[int, ...]
  batch: tuple[int, ...]
  outputs: tuple[int, ...]
  bias_axes: tuple[int, ...]   # kernel axes in the bias's row-major order

  def layout(self, kernel_shape: Sequence[int],
             bias_shape: Optional[Sequence[int]]) -> KernelLayout:
    """The :class:`KernelLayout` of the stored (possibly stacked) kernel.

    Raises:
      ValueError: the stored kernel does not end with :attr:`kernel_shape`.
    """
    kernel_shape = tuple(kernel_shape)
    s = len(kernel_shape) - len(self.kernel_shape)
    if s < 0 or kernel_shape[s:] != self.kernel_shape:
      raise ValueError(f'the kernel has shape {kernel_shape}, the layer was '
                       f'called with a kernel {self.kernel_shape}.')
    shift = lambda axes: tuple(a + s for a in axes)
    return KernelLayout(
        kernel_shape, tuple(range(s)), shift(self.inputs), shift(self.batch),
        shift(self.outputs), 1,
        None if bias_shape is None else tuple(bias_shape),
        None if bias_shape is None else tuple(range(s)) + shift(
            self.bias_axes))


@dataclasses.dataclass(frozen=True)
class EinsumLayer:
  """One parsed einsum layer call: the kernel roles and the input's letters."""
  x: str        # the input's letters (ellipsis expanded)
  w: str        # the kernel's letters
  y: str        # the output's letters (ellipsis expanded)
  roles: AxisRoles

  @property
  def stat_letters(self) -> str:
    """Batch letters then input letters, each in kernel order."""
    return (''.join(self.w[a] for a in self.roles.batch)
            + ''.join(self.w[a] for a in self.roles.inputs))


def _expand(term: str, ndim: int, fill: str, where: str) -> str:
  if '...' not in term:
    return term
  named = len(term) - 3
  if ndim < named:
    raise ValueError(f"mac: einsum layer '{where}': the operand '{term}' "
                     f'has more letters than its {ndim} axes.')
  return term.replace('...', fill[:ndim - named])


def parse(equation: str, input_ndim: Optional[int],
          kernel_shape: Sequence[int], where: str,
          exclude: Optional[str] = None) -> EinsumLayer:
  """Classifies the kernel axes of ``einsum(equation, x, kernel)``.

  Args:
    equation: explicit two-operand equation, input first (``'btd,dnh->btnh'``).
    input_ndim: the number of axes of the input; None: the roles only (the
      input's letters keep their ellipsis, never a kernel letter).
    kernel_shape: the (unstacked) kernel shape.
    where: the layer's path, for error messages.
    exclude: how to exclude the layer, for the error message (default:
      ``exclude=['<where>']`` to the capture and the plan).

  Raises:
    ValueError: the equation is one MAC cannot model (see the module
      docstring), naming the layer and how to exclude it.
  """
  eq = equation.replace(' ', '')
  if exclude is None:
    exclude = f'exclude=[{where!r}] to the capture and to the plan'
  fail = lambda why: ValueError(
      f"mac: einsum layer '{where}' ({equation!r}): {why} MAC cannot "
      f'precondition it: pass {exclude}, and the layer is passed through '
      'unchanged (optax.masked cannot help: the capture itself refuses '
      'the layer).')
  if '->' not in eq or eq.count(',') != 1:
    raise fail('the equation must be explicit ("->") with two operands.')
  operands, y = eq.split('->')
  x, w = operands.split(',')
  if '...' in w:
    raise fail('an ellipsis in the kernel operand is not supported.')
  if ('...' in y) != ('...' in x):
    raise fail('an ellipsis must appear in both the input and the output.')
  used = set((x + w + y).replace('.', ''))
  fill = ''.join(c for c in string.ascii_letters if c not in used)
  # The ellipsis stands for the same input axes in the input and the output.
  if input_ndim is not None:
    y = _expand(y, input_ndim - len(x) + len(y), fill, where)
    x = _expand(x, input_ndim, fill, where)
  for term in (x, w, y):
    letters = term.replace('...', '')
    if len(set(letters)) != len(letters):
      raise fail(f"the operand '{term}' repeats a letter (a diagonal).")
  if input_ndim is not None and len(x) != input_ndim:
    raise fail(f"the input has {input_ndim} axes, the equation names "
               f'{len(x)}.')
  if len(w) != len(kernel_shape):
    raise fail(f'the kernel has shape {tuple(kernel_shape)}, the equation '
               f'names {len(w)} axes.')
  inputs, batch, outputs = [], [], []
  for a, c in enumerate(w):
    if c in x and c not in y:
      inputs.append(a)
    elif c in x:
      batch.append(a)
    elif c in y:
      outputs.append(a)
    else:
      raise fail(f"the kernel axis '{c}' is summed away without touching "
                 'the input.')
  if not inputs or not outputs:
    raise fail('the kernel needs at least one axis contracted with the input '
               'and one that only the output has.')
  bias_axes = tuple(w.index(c) for c in y if c in w)
  roles = AxisRoles(tuple(kernel_shape), tuple(inputs), tuple(batch),
                    tuple(outputs), bias_axes)
  return EinsumLayer(x, w, y, roles)


def roles_of(equation: str, kernel_shape: Sequence[int],
             where: str, exclude: Optional[str] = None) -> AxisRoles:
  """The kernel roles of an equation, without an input (see :func:`parse`)."""
  return parse(equation, None, kernel_shape, where, exclude).roles


def dense_general_roles(batch_shape: Sequence[int],
                        in_features: Sequence[int],
                        out_features: Sequence[int]) -> AxisRoles:
  """Roles of a ``(*batch, *in_features, *out_features)`` batched kernel."""
  nb, ni = len(batch_shape), len(in_features)
  shape = tuple(batch_shape) + tuple(in_features) + tuple(out_features)
  batch, outputs = tuple(range(nb)), tuple(range(nb + ni, len(shape)))
  return AxisRoles(shape, tuple(range(nb, nb + ni)), batch, outputs,
                   batch + outputs)


def statistic(layer: EinsumLayer, x: jax.Array,
              mask: Optional[jax.Array] = None) -> jax.Array:
  """``[G, d_in]`` mean input of each batch index (module docstring).

  With a token `mask` leading ``x`` on row letters (the rule of the
  token-mask module), the rows are weighted by it:
  ``ā[n, d] = Σ_{t,r,s} m_t x[t, r, s, n, d] / (Σ_t m_t · #r)``.

  Args:
    layer: from :func:`parse`.
    x: the layer input.
    mask: the capture's token mask, or None.

  Returns:
    float32 (or wider) ``[prod(batch sizes), d_in]``.
  """
  x = jax.lax.stop_gradient(x)
  dtype = mean_inputs.stat_dtype(x.dtype)
  row_axes = [a for a, c in enumerate(layer.x)
              if c in layer.y and c not in layer.w]
  rows = math.prod(x.shape[a] for a in row_axes)
  weights = token_mask.row_weights(mask, x.shape, row_axes, dtype)
  if weights is None:
    summed = jnp.einsum(f'{layer.x}->{layer.stat_letters}', x,
                        preferred_element_type=dtype, precision=_HIGHEST)
    denominator = max(rows, 1)
  else:
    summed = jnp.einsum(
        f'{layer.x},{layer.x[:weights.ndim]}->{layer.stat_letters}', x,
        weights, preferred_element_type=dtype, precision=_HIGHEST)
    denominator = token_mask.count(weights, rows // max(weights.size, 1))
  r = layer.roles
  groups = math.prod(r.kernel_shape[a] for a in r.batch)
  d_in = math.prod(r.kernel_shape[a] for a in r.inputs)
  return summed.reshape(groups, d_in) / denominator


def dense_general_equation(input_ndim: int, batch_dims: Sequence[int],
                           axis: Sequence[int], n_features: int) -> str:
  """The einsum equation of ``DenseGeneral``/``LinearGeneral`` with batch axes.

  Flax computes ``dot_general(x, w, ((axis, contract), (batch_dims, batch)))``
  with the kernel ``(*batch, *contracted in `axis` order, *features)``; the
  output is ``(*batch, *free input axes, *features)``.
  """
  letters = string.ascii_letters
  batch_dims = tuple(a % input_ndim for a in batch_dims)
  axis = tuple(a % input_ndim for a in axis)
  x = letters[:input_ndim]
  features = letters[input_ndim:input_ndim + n_features]
  w = (''.join(x[a] for a in batch_dims) + ''.join(x[a] for a in axis)
       + features)
  free = ''.join(x[a] for a in range(input_ndim)
                 if a not in batch_dims and a not in axis)
  y = ''.join(x[a] for a in batch_dims) + free + features
  return f'{x},{w}->{y}'


def call_statistic(equation: str, x: jax.Array, kernel_shape: Sequence[int],
                   where: str, mask: Optional[jax.Array] = None,
                   exclude: Optional[str] = None
                   ) -> tuple[jax.Array, AxisRoles]:
  """The ``[G, d_in]`` statistic and kernel roles of one einsum-layer call.

  Raises:
    ValueError: an equation MAC cannot model (naming `where`).
  """
  layer = parse(equation, x.ndim, kernel_shape, where, exclude)
  return statistic(layer, x, mask), layer.roles


def dense_general_call(x: jax.Array, batch_dims: Sequence[int],
                       axis: Sequence[int], features: Sequence[int],
                       where: str, mask: Optional[jax.Array] = None
                       ) -> tuple[jax.Array, AxisRoles]:
  """:func:`call_statistic` of a ``DenseGeneral``/``LinearGeneral`` call."""
  batch_dims = tuple(a % x.ndim for a in batch_dims)
  axis = tuple(a % x.ndim for a in axis)
  kernel_shape = (tuple(x.shape[a] for a in batch_dims)
                  + tuple(x.shape[a] for a in axis) + tuple(features))
  equation = dense_general_equation(x.ndim, batch_dims, axis, len(features))
  return call_statistic(equation, x, kernel_shape, where, mask)
