"""How a layer's kernel axes divide for MAC: the one kernel-layout type.

MAC preconditions a kernel with the mean of the layer's input. Which kernel
axes meet the input is a property of the layer, not of the kernel's shape, so
it is written down once, here, and read by ``init`` (state shapes), ``update``
(the rank-one apply), the exact-layer apply, diagnostics and the coverage
table. Every kernel axis has one role:

* **stack** — leading axes added by ``nn.scan``/``nnx.scan``/``vmap``: each
  index is an independent layer with its own statistic;
* **input** — contracted with the layer input; ``d_in`` is their product;
* **batch** — shared by the input, the kernel and the output (a batched
  einsum axis): one mean input per index;
* **output** — the rest. The first output axis may be split into
  ``column_groups`` equal groups (grouped convolution, fused q/k/v
  projection), each with its own mean input.

The statistic of the layer is ``[*stack, G, d_in]`` with
``G = prod(batch sizes) · column_groups`` (batch indices major), and the bias,
when present, has the size of the kernel's non-input axes (in kernel order,
or in the order ``bias_axes`` gives).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

Shape = tuple[int, ...]


class LayoutError(ValueError):
  """A statistic does not fit its kernel (raised with the layer's path)."""


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """The roles of a kernel's axes (axis indices into ``shape``).

  Example:
    >>> layout = KernelLayout.dense((5, 8), inputs=1)   # a Dense 5 -> 8
    >>> layout.d_in, layout.groups, layout.stat_shape
    (5, 1, (1, 5))
  """
  shape: Shape                   # the kernel (or embedding table) shape
  stack: tuple[int, ...]         # leading axes, one layer per index
  inputs: tuple[int, ...]        # contracted with the layer input
  batch: tuple[int, ...]         # one mean input per index
  outputs: tuple[int, ...]       # the rest, in kernel order
  column_groups: int = 1         # splits of outputs[0], each with its mean
  bias_shape: Optional[Shape] = None
  # The kernel axes the bias's elements run over, in the bias's row-major
  # order; None: the non-input axes in kernel order. An einsum layer's bias
  # follows the output's axis order, which may differ from the kernel's.
  bias_axes: Optional[tuple[int, ...]] = None

  def __post_init__(self):
    roles = self.stack + self.inputs + self.batch + self.outputs
    if sorted(roles) != list(range(len(self.shape))):
      raise LayoutError(f'axis roles {self.roles()} do not cover the kernel '
                        f'axes of {self.shape} exactly once.')
    if self.stack != tuple(range(len(self.stack))):
      raise LayoutError(f'stack axes must lead the kernel, got {self.stack}.')
    if not self.inputs or not self.outputs:
      raise LayoutError(f'a kernel {self.shape} needs input and output axes, '
                        f'got roles {self.roles()}.')
    first_out = self.shape[self.outputs[0]]
    if self.column_groups < 1 or first_out % self.column_groups:
      raise LayoutError(
          f'{self.column_groups} column groups do not split the first output '
          f'axis (size {first_out}) of the kernel {self.shape}.')
    if self.bias_shape is not None and (
        math.prod(self.bias_shape) != math.prod(self.column_shape)):
      raise LayoutError(
          f'a bias of shape {self.bias_shape} does not match the kernel '
          f"{self.shape}'s non-input axes {self.column_shape}.")
    if self.bias_axes is not None and sorted(self.bias_axes) != [
        a for a in range(len(self.shape)) if a not in self.inputs]:
      raise LayoutError(
          f'bias axes {self.bias_axes} are not the non-input axes of the '
          f'kernel {self.shape} with roles {self.roles()}.')

  # ----------------------------------------------------------- constructors

  @classmethod
  def dense(cls, shape: Sequence[int], *, inputs: int, stack: int = 0,
            column_groups: int = 1,
            bias_shape: Optional[Sequence[int]] = None) -> KernelLayout:
    """``(*stack, *inputs, *outputs)``: Dense, DenseGeneral, Conv, lookup."""
    n = len(shape)
    return cls(tuple(shape), tuple(range(stack)),
               tuple(range(stack, stack + inputs)), (),
               tuple(range(stack + inputs, n)), column_groups,
               None if bias_shape is None else tuple(bias_shape))

  @classmethod
  def transposed(cls, shape: Sequence[int], *, stack: int = 0) -> KernelLayout:
    """``(*stack, d_out, d_in)``: an embedding table used by ``attend``."""
    return cls(tuple(shape), tuple(range(stack)), (len(shape) - 1,), (),
               (stack,))

  @classmethod
  def from_statistic(cls, stat_shape: Sequence[int],
                     kernel_shape: Sequence[int],
                     bias_shape: Optional[Sequence[int]] = None, *,
                     transposed: bool = False) -> KernelLayout:
    """The layout of a ``(*stack, *inputs, *outputs)`` kernel for a statistic.

    The contract of custom layers (``sow_mean``) and of the Flax layers the
    captures know: the stack axes are the statistic's leading axes, the input
    axes are the kernel's next axes whose sizes multiply to ``d_in``, and the
    ``G`` column groups split the first output axis.

    Raises:
      LayoutError: the statistic does not fit the kernel.
    """
    stat_shape, kernel_shape = tuple(stat_shape), tuple(kernel_shape)
    if len(stat_shape) < 2:
      raise LayoutError(f'a statistic must be [*stack, groups, d_in], got '
                        f'shape {stat_shape}.')
    stack, groups, d_in = stat_shape[:-2], stat_shape[-2], stat_shape[-1]
    s = len(stack)
    if kernel_shape[:s] != stack:
      raise LayoutError(f'the statistic {stat_shape} has stack axes {stack}, '
                        f'the kernel {kernel_shape} does not lead with them.')
    if transposed:
      if groups != 1 or len(kernel_shape) != s + 2 or kernel_shape[-1] != d_in:
        raise LayoutError(f'expected an embedding (*stack, vocab, {d_in}) and '
                          f'one group for the statistic {stat_shape}, got '
                          f'{kernel_shape}.')
      return cls.transposed(kernel_shape, stack=s)
    size, k = 1, s
    while k < len(kernel_shape) and size < d_in:
      size *= kernel_shape[k]
      k += 1
    # Size-1 axes next to the boundary (a grouped conv's C/G = 1) count as
    # inputs, so the first output axis is one the column groups can split.
    while k < len(kernel_shape) - 1 and kernel_shape[k] == 1:
      k += 1
    if size != d_in or k == len(kernel_shape):
      raise LayoutError(
          f'the statistic of shape {stat_shape} ([*stack, groups, d_in]) '
          f'does not fit the kernel of shape {kernel_shape}: no leading '
          f'kernel axes after {s} stack axes multiply to d_in={d_in} with '
          'output axes left over.')
    return cls.dense(kernel_shape, inputs=k - s, stack=s,
                     column_groups=groups, bias_shape=bias_shape)

  # ------------------------------------------------------------ properties

  def sizes(self, axes: Sequence[int]) -> Shape:
    return tuple(self.shape[a] for a in axes)

  @property
  def d_in(self) -> int:
    return math.prod(self.sizes(self.inputs))

  @property
  def groups(self) -> int:
    return math.prod(self.sizes(self.batch)) * self.column_groups

  @property
  def stat_shape(self) -> Shape:
    """``[*stack, G, d_in]``: the statistic's (and the state's) shape."""
    return self.sizes(self.stack) + (self.groups, self.d_in)

  @property
  def column_shape(self) -> Shape:
    """Sizes of the non-input axes in kernel order (the bias's size)."""
    return tuple(n for a, n in enumerate(self.shape) if a not in self.inputs)

  @property
  def param_count(self) -> int:
    bias = 0 if self.bias_shape is None else math.prod(self.bias_shape)
    return math.prod(self.shape) + bias

  def roles(self) -> str:
    """One letter per kernel axis: ``s`` (stack), ``i`` (input), ``b`` (batch), ``o`` (output)."""
    role = {}
    for letter, axes in zip('sibo', (self.stack, self.inputs, self.batch,
                                     self.outputs)):
      role.update({a: letter for a in axes})
    return ''.join(role.get(a, '?') for a in range(len(self.shape)))

  def check_fits(self, kernel_shape: Sequence[int],
                 bias_shape: Optional[Sequence[int]]) -> None:
    """Raises LayoutError unless the arrays have this layout's shapes."""
    if tuple(kernel_shape) != self.shape:
      raise LayoutError(f'the kernel has shape {tuple(kernel_shape)}, the '
                        f'plan expects {self.shape}.')
    if (bias_shape is None) != (self.bias_shape is None) or (
        bias_shape is not None and tuple(bias_shape) != self.bias_shape):
      raise LayoutError(f'the bias has shape {bias_shape}, the plan expects '
                        f'{self.bias_shape}.')
