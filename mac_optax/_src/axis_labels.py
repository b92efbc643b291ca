"""Which axes of a traced value come from which axes of a parameter.

Discovery follows a parameter leaf (or a layer's output) through the
layout-only operations of a traced program — reshape, transpose, dtype
casts, squeeze, broadcast — and keeps, for every axis of the value, the
*labels* of the source axes it holds, major to minor. A label is a tuple:

* ``('p', axis)``: axis ``axis`` of the parameter leaf, whole;
* ``('p', axis, sizes, part)``: part ``part`` of that axis after a reshape
  split it into ``sizes`` (a fused projection's heads);
* ``('x', axis)``: an axis of a layer's input (its output keeps the input's
  batch and token axes);
* ``('r', size)``: a new axis a broadcast added (a GQA repeat);
* ``('s', axis)``: what is left of a layer's output axis after slicing out
  one part of a fused projection (the part is the trail's ``part``).

An axis holds several labels when a reshape merged axes. Anything that
mixes values (arithmetic, reductions, gathers) ends the trail.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

Label = tuple
Axes = tuple[tuple[Label, ...], ...]


@dataclasses.dataclass(frozen=True)
class Trail:
  """A value that is a parameter leaf or a layer output, up to layout.

  Attributes:
    source: ``('param', leaf index)`` or ``('out', layer call id)``.
    axes: the labels each axis of the value holds.
    stack: ``(parameter axis, scan)`` that ``scan`` slicing consumed,
      outermost first.
    part: ``(kernel axis, start, stop)``: a layer output sliced to one part
      of a fused projection (k or v of a fused kv), or None.
  """
  source: tuple
  axes: Axes
  stack: tuple = ()
  part: Optional[tuple[int, int, int]] = None

  def with_axes(self, axes: Sequence[tuple[Label, ...]]) -> Trail:
    return dataclasses.replace(self, axes=tuple(tuple(a) for a in axes))


def _split(labels: tuple[Label, ...], sizes: tuple[int, ...]
           ) -> list[tuple[Label, ...]]:
  """The labels of the axes one axis is reshaped into."""
  if len(labels) == 1 and len(labels[0]) == 2 and labels[0][0] in 'px':
    kind, axis = labels[0]
    return [((kind, axis, sizes, i),) for i in range(len(sizes))]
  # A merged or already split axis split again: every part holds every
  # label, marked so that no role can be read from it.
  return [tuple(('?',) + lab for lab in labels) for _ in sizes]


def reshape(trail: Trail, old: Sequence[int], new: Sequence[int]
            ) -> Optional[Trail]:
  """The trail through ``reshape(old → new)``, row-major."""
  old, new = tuple(old), tuple(new)
  out: list[tuple[Label, ...]] = []
  i = j = 0
  while i < len(old) or j < len(new):
    # Size-1 axes carry nothing that matters; emit/skip them one by one.
    if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
      out.append(())
      j += 1
      continue
    if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
      i += 1
      continue
    if i < len(old) and j < len(new) and old[i] == new[j] == 1:
      out.append(trail.axes[i])
      i += 1
      j += 1
      continue
    i0, j0, a, b = i, j, old[i], new[j]
    i, j = i + 1, j + 1
    while a != b:
      if a < b:
        a *= old[i]
        i += 1
      else:
        b *= new[j]
        j += 1
    merged = tuple(lab for k in range(i0, i) for lab in trail.axes[k])
    if j - j0 == 1:
      out.append(merged)
    else:
      out.extend(_split(merged, new[j0:j]))
  if len(out) != len(new):   # pragma: no cover - sizes always match
    return None
  return trail.with_axes(out)


def transpose(trail: Trail, permutation: Sequence[int]) -> Trail:
  return trail.with_axes([trail.axes[p] for p in permutation])


def squeeze(trail: Trail, dimensions: Sequence[int]) -> Trail:
  drop = {d % len(trail.axes) for d in dimensions}
  return trail.with_axes([a for k, a in enumerate(trail.axes)
                          if k not in drop])


def broadcast(trail: Trail, old: Sequence[int], new: Sequence[int],
              dims: Sequence[int]) -> Trail:
  """``broadcast_in_dim``: new axes and stretched size-1 axes hold ``('r', n)``."""
  axes: list[tuple[Label, ...]] = [(('r', n),) for n in new]
  for k, d in enumerate(dims):
    if old[k] == new[d]:
      axes[d] = trail.axes[k]
  return trail.with_axes(axes)


def take_part(trail: Trail, axis: int, start: int, stop: int, size: int
              ) -> Optional[Trail]:
  """A layer output sliced to ``[start, stop)`` of its axis ``axis``."""
  if start == 0 and stop == size:
    return trail
  labels = trail.axes[axis]
  kernel = [lab for lab in labels if lab[0] in 'ps?']
  if not kernel:   # rows or tokens sliced away: they no longer line up
    return trail.with_axes(trail.axes[:axis] + ((),) + trail.axes[axis + 1:])
  if trail.part is not None or len(labels) != 1:
    return None
  lab = labels[0]
  if lab[0] != 'p' or (len(lab) == 4 and lab[3] != 0):
    return None
  minor = 1 if len(lab) == 2 else math.prod(lab[2][1:])
  part = (lab[1], start * minor, stop * minor)
  axes = trail.axes[:axis] + ((('s', lab[1]),),) + trail.axes[axis + 1:]
  return dataclasses.replace(trail, axes=axes, part=part)


def slice_parts(trail: Trail, shape, starts, limits, strides
                ) -> Optional[Trail]:
  """``slice`` of a layer output (fused projections split by index)."""
  if trail.source[0] != 'out':
    return None
  for axis, (a, b, n) in enumerate(zip(starts, limits, shape)):
    if strides and strides[axis] not in (None, 1):
      return None
    trail = take_part(trail, axis, a, b, n)
    if trail is None:
      return None
  return trail


# Primitives whose every output is its operand, relabelled at most: casts,
# copies, sharding annotations, and the varying-axes casts `shard_map`
# inserts before a replicated parameter meets per-device data.
IDENTITY = ('convert_element_type', 'copy', 'copy_p', 'reduce_precision',
            'sharding_constraint', 'mesh_cast', 'reshard',
            'optimization_barrier', 'pvary', 'pbroadcast', 'pcast')


def propagate(name: str, params: dict, trail: Trail, in_shape, out_shape
              ) -> Optional[Trail]:
  """The trail of a layout-only primitive's output, or None if not one."""
  if name in IDENTITY:
    return trail
  if name == 'reshape':
    return reshape(trail, in_shape, out_shape)
  if name == 'transpose':
    return transpose(trail, params['permutation'])
  if name == 'squeeze':
    return squeeze(trail, params['dimensions'])
  if name == 'expand_dims':
    return reshape(trail, in_shape, out_shape)
  if name == 'broadcast_in_dim':
    return broadcast(trail, in_shape, out_shape,
                     params['broadcast_dimensions'])
  if name == 'slice':
    return slice_parts(trail, in_shape, params['start_indices'],
                       params['limit_indices'], params.get('strides'))
  return None


def param_axes(labels: tuple[Label, ...]) -> Optional[tuple[int, ...]]:
  """The whole parameter axes an axis holds (major → minor), or None."""
  axes = []
  for lab in labels:
    if lab[0] != 'p' or len(lab) != 2:
      return None
    axes.append(lab[1])
  return tuple(axes)


def label_axes(labels: tuple[Label, ...]) -> set[int]:
  """Every parameter axis an axis touches, whole, split or merged."""
  found = set()
  for lab in labels:
    lab = lab[1:] if lab[0] == '?' else lab
    if lab[0] == 'p':
      found.add(lab[1])
  return found


def size_of(shape: Sequence[int], axes: Sequence[int]) -> int:
  return math.prod(shape[a] for a in axes)


def describe(value: Any) -> str:
  return f'{getattr(value, "shape", "?")}'
