"""MAC's small vectors under an explicit-axis mesh (sharding in types).

Under ``jax.sharding.AxisType.Explicit`` every array's type carries its
sharding and operands of one operation must agree. A statistic arrives sharded
as its activations (a row-split layer's input is split on ``d_in``), the state
keeps the sharding ``init`` gave it, and a kernel and its bias may be split on
different axes. Only the ``O(d_in)``/``O(d_out)`` vectors are moved to agree
with the array they meet, never a kernel. Everywhere else (no mesh, automatic
axes, ``pmap``, ``shard_map``, a jax without sharding in types) these
functions return their input unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

# Feature detection: sharding in types needs all three (jax >= 0.6).
_TYPEOF = getattr(jax, 'typeof', None)
_RESHARD = getattr(jax.sharding, 'reshard', None)
_EXPLICIT = getattr(getattr(jax.sharding, 'AxisType', None), 'Explicit', None)

Spec = tuple[Any, ...]


def _sharding(x: Any) -> Optional[NamedSharding]:
  """`x`'s type-level sharding where its mesh has an explicit axis."""
  if _TYPEOF is None or _RESHARD is None or _EXPLICIT is None:
    return None
  sharding = getattr(_TYPEOF(x), 'sharding', None)
  axis_types = tuple(getattr(getattr(sharding, 'mesh', None), 'axis_types',
                             ()) or ())
  return sharding if _EXPLICIT in axis_types else None


def spec(x: Any) -> Optional[Spec]:
  """The mesh axes of each of `x`'s axes under an explicit mesh, else None."""
  sharding = _sharding(x)
  if sharding is None:
    return None
  entries = tuple(sharding.spec)
  return entries + (None,) * (x.ndim - len(entries))


def reshard(x: jax.Array, target: Optional[Sequence[Any]]) -> jax.Array:
  """`x` with the per-axis mesh axes `target` (None: leave `x` as it is)."""
  sharding = _sharding(x)
  if sharding is None or target is None or spec(x) == tuple(target):
    return x
  return _RESHARD(x, NamedSharding(sharding.mesh, PartitionSpec(*target)))


def like(x: jax.Array, other: jax.Array) -> jax.Array:
  """`x` sharded as `other` (same rank) where either has explicit axes."""
  target = spec(other)
  if target is None and spec(x) is not None:
    target = (None,) * x.ndim   # `other` has no mesh: replicated
  return reshard(x, target)


def along(x: jax.Array, letters: str) -> Callable[[str], Optional[Spec]]:
  """Mesh axes of einsum subscripts, `letters` naming `x`'s axes.

  Returns a function of a word of those letters giving each letter's mesh
  axes in `x`, or None for every word where `x` has no explicit sharding.
  """
  found = spec(x)
  if found is None:
    return lambda word: None
  by_letter = dict(zip(letters, found))
  return lambda word: tuple(by_letter[c] for c in word)


def out_sharding(target: Optional[Sequence[Any]]) -> dict[str, Any]:
  """``einsum`` keywords naming its result's sharding (empty for None).

  A contraction over an axis split in both operands is ambiguous under an
  explicit mesh unless told how its (reduced) result is sharded.
  """
  return {} if target is None else {'out_sharding': PartitionSpec(*target)}
