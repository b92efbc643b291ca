"""A convolution's geometry in Flax's conventions, resolved once.

linen ``nn.Conv`` and ``nnx.Conv`` share their attribute names
(``kernel_size``, ``strides``, ``padding``, ``input_dilation``,
``kernel_dilation``, ``feature_group_count``), so one resolver serves both
captures and the exact first layer. Flax's padding forms: 'CIRCULAR' and
'REFLECT' pad the input themselves and then run 'VALID'; 'CAUSAL' (1-D) pads
left by ``dilation·(k−1)``; 'SAME'/'VALID' go through ``lax.padtype_to_pads``
on the dilated input; ints and pairs are explicit zero paddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp

Padding = Union[str, Sequence[tuple[int, int]]]


def _tuple(value, n: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(value)


def _canonical_padding(padding, n: int) -> Padding:
  if isinstance(padding, str):
    return padding
  if isinstance(padding, int):
    return [(padding, padding)] * n
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """A channels-last convolution with ``n`` spatial axes."""
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: Padding
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  groups: int = 1

  @classmethod
  def of(cls, module: Any) -> ConvGeometry:
    """From a linen ``nn.Conv`` or an ``nnx.Conv`` (same attribute names)."""
    kernel_size = _tuple(module.kernel_size, 1)
    n = len(kernel_size)
    return cls(kernel_size, _tuple(module.strides, n),
               _canonical_padding(module.padding, n),
               _tuple(module.input_dilation, n),
               _tuple(module.kernel_dilation, n), module.feature_group_count)

  def resolve(self, x: jax.Array) -> tuple[jax.Array, list[tuple[int, int]]]:
    """``(input as the convolution reads it, explicit zero paddings)``.

    Args:
      x: ``[*batch, *spatial, C]``.
    """
    n = len(self.kernel_size)
    spatial_axes = tuple(range(x.ndim - n - 1, x.ndim - 1))
    padding = self.padding
    if isinstance(padding, str) and padding in ('CIRCULAR', 'REFLECT'):
      spans = [(k - 1) * d + 1 for k, d in zip(self.kernel_size,
                                                self.kernel_dilation)]
      pads = [(0, 0)] * x.ndim
      for axis, k in zip(spatial_axes, spans):
        pads[axis] = ((k - 1) // 2, k // 2)
      mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding]
      x = jnp.pad(jax.lax.stop_gradient(x), pads, mode=mode)
      padding = 'VALID'
    elif isinstance(padding, str) and padding == 'CAUSAL':
      pads = [(0, 0)] * x.ndim
      pads[spatial_axes[0]] = (
          self.kernel_dilation[0] * (self.kernel_size[0] - 1), 0)
      x = jnp.pad(jax.lax.stop_gradient(x), pads)
      padding = 'VALID'
    if isinstance(padding, str):
      spatial = [x.shape[a] for a in spatial_axes]
      dilated_in = [(s - 1) * d + 1 for s, d in zip(spatial,
                                                    self.input_dilation)]
      dilated_k = [(k - 1) * d + 1 for k, d in zip(self.kernel_size,
                                                   self.kernel_dilation)]
      padding = jax.lax.padtype_to_pads(dilated_in, dilated_k, self.strides,
                                        padding)
    return x, [tuple(int(v) for v in p) for p in padding]
