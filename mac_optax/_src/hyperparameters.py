"""Validation of hyperparameters shared by `mac` and `smac`.

Checked at construction when concrete; traced values (``inject_hyperparams``,
schedules) are accepted as they are, since they cannot be inspected.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import numpy as np


def _concrete(value: Any) -> Optional[float]:
  """A Python float for a concrete hyperparameter, None for a traced one."""
  try:
    return float(value)
  except TypeError:  # tracers (jax.errors.ConcretizationTypeError, ...)
    return None


def check(who: str, *, damping, stat_decay, cov_every, inv_every) -> None:
  """Raises ValueError naming `who` for an invalid concrete hyperparameter."""
  value = _concrete(damping)
  if value is not None and not value > 0:
    raise ValueError(f'{who}: damping must be > 0, got {damping}.')
  value = _concrete(stat_decay)
  if value is not None and not 0 <= value < 1:
    raise ValueError(f'{who}: stat_decay must be in [0, 1), got {stat_decay}.')
  for name, cadence in (('cov_every', cov_every), ('inv_every', inv_every)):
    value = _concrete(cadence)
    if value is not None and (value < 1 or value != int(value)):
      raise ValueError(f'{who}: {name} must be a positive integer, got '
                       f'{cadence}.')


def stat_dtype(who: str, dtype: Any) -> np.dtype:
  """The dtype of statistics: a real floating dtype (default float32)."""
  dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'{who}: stat_dtype must be a real floating dtype '
                     f'(float32, float64, bfloat16), got {dtype}.')
  return dtype
