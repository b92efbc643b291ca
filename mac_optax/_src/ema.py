"""The bias-corrected exponential moving average of MAC and SMAC statistics.

One statistic ``z_t`` per fold step::

    m_t = β m_{t−1} + (1 − β) z_t          (only finite z_t, only on fold steps)
    ẑ   = m_t / (1 − β^n)                  (n = statistics folded so far)

``m`` starts at zero, so the correction makes ``ẑ`` an unbiased weighted mean
from the first fold on (``ẑ = z_1`` after one fold). A statistic with a
non-finite entry (a NaN batch) is skipped: the count does not advance, so one
bad batch never poisons the preconditioner; :func:`fold_counting` also says
which statistics were dropped, so that callers can count them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mac_optax._src import vector_norm


class Ema(NamedTuple):
  """An EMA and its number of folds; ``V`` = the vector axes of one value."""
  mean: jax.Array    # [*S, *V] not bias-corrected
  count: jax.Array   # [*S] int32


def zeros(shape: tuple[int, ...], value_ndim: int, dtype) -> Ema:
  """An empty EMA of values ``shape[-value_ndim:]`` for each stack index."""
  return Ema(jnp.zeros(shape, dtype),
             jnp.zeros(shape[:len(shape) - value_ndim], jnp.int32))


def fold(ema: Ema, value: jax.Array, decay, take) -> Ema:
  """Folds ``value`` (``ema.mean``'s shape) where ``take`` and it is finite.

  Args:
    ema: the running average.
    value: ``[*S, *V]`` this step's statistic.
    decay: ``β``, possibly traced.
    take: a boolean scalar (or ``[*S]``): fold on this step.
  """
  return fold_counting(ema, value, decay, take)[0]


def fold_counting(ema: Ema, value: jax.Array, decay, take
                  ) -> tuple[Ema, jax.Array]:
  """:func:`fold`, and the ``[*S]`` int32 statistics it dropped as non-finite.

  A dropped statistic is one that ``take`` asked for but had a non-finite
  entry (overflow, a NaN batch); its count lets a caller report it.
  """
  value = value.astype(ema.mean.dtype)
  value_axes = tuple(range(ema.count.ndim, value.ndim))
  finite = vector_norm.all_finite(value, value_axes)
  dropped = jnp.logical_and(take, jnp.logical_not(finite))
  take = jnp.logical_and(take, finite)
  decay = jnp.asarray(decay, ema.mean.dtype)
  # A non-finite value's entries are computed but never selected.
  folded = decay * ema.mean + (1 - decay) * value
  mean = jnp.where(_expand(take, value.ndim), folded, ema.mean)
  return (Ema(mean, ema.count + take.astype(jnp.int32)),
          dropped.astype(jnp.int32))


def debiased(ema: Ema, decay) -> jax.Array:
  """``m / (1 − β^n)``, zero where nothing was folded yet."""
  decay = jnp.asarray(decay, ema.mean.dtype)
  seen = _expand(ema.count > 0, ema.mean.ndim)
  correction = 1 - decay ** _expand(ema.count, ema.mean.ndim).astype(
      ema.mean.dtype)
  return jnp.where(seen, ema.mean / jnp.where(seen, correction, 1), 0)


def _expand(x: jax.Array, ndim: int) -> jax.Array:
  x = jnp.asarray(x)
  return x.reshape(x.shape + (1,) * (ndim - x.ndim))
