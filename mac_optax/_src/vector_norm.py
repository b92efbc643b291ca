"""Overflow-safe norms of statistic vectors, each in one pass.

For a vector ``x`` (the mean input of a layer),

    ‖x‖² = s² q,    s = max(‖x‖∞, 1),    q = Σᵢ (xᵢ / s)²,

so ``q`` never overflows however large the activations. ``(s, q)`` is
computed as in LAPACK's ``nrm2``: every entry is a pair
``(max(|xᵢ|, 1), (xᵢ / max(|xᵢ|, 1))²)`` and two pairs combine as

    (s₁, q₁) ⊕ (s₂, q₂) = (s, q₁ (s₁/s)² + q₂ (s₂/s)²),   s = max(s₁, s₂),

an associative operation, so ``(s, q)`` is one reduction over ``x``. Written
as one variadic reduction it stays one kernel with its inputs' elementwise
work fused in, where XLA:CPU splits every single-operand reduction of more
than 32 elements into a chain of reduce-window kernels and fuses nothing into
them: MAC's update has two such reductions per layer, and every kernel of it
is compiled once per layer.

A non-finite entry makes ``q`` non-finite (``x/s`` is NaN for a NaN or an
infinite ``xᵢ``), so the same pass also says whether ``x`` is finite.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp


class Norm(NamedTuple):
  """``‖x‖² = scale² · sum_sq`` of ``[*V, *D]`` vectors, reduced over ``D``."""
  scale: jax.Array   # [*V] max(‖x‖∞, 1)
  sum_sq: jax.Array  # [*V] ‖x / scale‖²


def _combine(a, b):
  # Every scale is at least 1 (the initial value too): the ratios exist.
  (sa, qa), (sb, qb) = a, b
  s = jnp.maximum(sa, sb)
  return s, qa * jnp.square(sa / s) + qb * jnp.square(sb / s)


def norm(x: jax.Array, axes: Sequence[int] = (-1,)) -> Norm:
  """:class:`Norm` of ``x`` over ``axes``, in one pass."""
  axes = tuple(sorted(a % x.ndim for a in axes))
  scale = jnp.maximum(jnp.abs(x), 1)
  one = jnp.ones([], x.dtype)
  return Norm(*jax.lax.reduce((scale, jnp.square(x / scale)),
                              (one, jnp.zeros([], x.dtype)), _combine, axes))


def all_finite(x: jax.Array, axes: Sequence[int] = (-1,)) -> jax.Array:
  """Whether every entry of ``x`` over ``axes`` is finite (one pass)."""
  return jnp.isfinite(norm(x, axes).sum_sq)
