"""Einsum layers as SMAC's probes see them: axis roles from the equation.

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
input or output letters cannot be modelled and raises. (MAC's statistics
find the same roles in the traced program's ``dot_general``.)
"""

from __future__ import annotations

import dataclasses
import string
from typing import Optional, Sequence

import jax

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
