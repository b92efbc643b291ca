"""Validation of hyperparameters shared by `mac` and `smac`.

Every hyperparameter must be one real number: a Python/NumPy scalar or a 0-d
array. Concrete values are checked at construction (:func:`check`); traced
ones (``inject_hyperparams`` under ``jit``, schedules) cannot be inspected
there, so the compiled step tests them itself (:func:`valid`).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

_SCALAR = ('a Python number or a 0-d array, as optax.inject_hyperparams '
           'passes')
_SCHEDULE = ('one value applies to every layer; to change it during '
             'training, wrap the optimizer in optax.inject_hyperparams and '
             'give a schedule')


def _concrete(value: Any) -> Optional[float]:
  """A Python float for a concrete hyperparameter, None for a traced one."""
  try:
    return float(value)
  except TypeError:  # tracers (jax.errors.ConcretizationTypeError, ...)
    return None


def _scalar(who: str, name: str, value: Any, kind: str) -> None:
  """Raises unless `value` is one real number."""
  dtype = getattr(value, 'dtype', None)
  if dtype is None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise TypeError(f'{who}: {name} must be {kind}: {_SCALAR}; got '
                      f'{type(value).__name__} {value!r}.')
    return
  dtype = np.dtype(dtype)
  if not (jnp.issubdtype(dtype, jnp.integer)
          or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f'{who}: {name} must be {kind}: {_SCALAR}; got an array '
                    f'of dtype {dtype}.')
  shape = tuple(getattr(value, 'shape', ()))
  if shape:
    raise ValueError(f'{who}: {name} must be a scalar ({_SCALAR}), got an '
                     f'array of shape {shape}: {_SCHEDULE}.')


def check(who: str, *, damping, stat_decay, cov_every, inv_every) -> None:
  """Raises naming `who` for a hyperparameter that is not valid.

  Raises:
    TypeError: not a number (a string, None, a bool, a complex array).
    ValueError: an array of more than one value, or a concrete value out of
      range (``damping > 0``, ``0 <= stat_decay < 1``, cadences ``>= 1``).
  """
  _scalar(who, 'damping', damping, 'a real number')
  _scalar(who, 'stat_decay', stat_decay, 'a real number')
  value = _concrete(damping)
  if value is not None and not 0 < value < float('inf'):
    raise ValueError(f'{who}: damping must be > 0 and finite, got {damping}.')
  value = _concrete(stat_decay)
  if value is not None and not 0 <= value < 1:
    raise ValueError(f'{who}: stat_decay must be in [0, 1), got {stat_decay}.')
  for name, cadence in (('cov_every', cov_every), ('inv_every', inv_every)):
    _scalar(who, name, cadence, 'an integer')
    value = _concrete(cadence)
    if value is not None and (value < 1 or value != int(value)):
      raise ValueError(f'{who}: {name} must be a positive integer, got '
                       f'{cadence}.')


def valid(*, damping, stat_decay, cov_every, inv_every):
  """Whether this step's traced hyperparameters are valid, for the step.

  Returns:
    ``True`` when every value is concrete (:func:`check` has validated them
    at construction), else a boolean scalar array: the ranges of
    :func:`check` hold for the traced values.
  """
  cadence = lambda c: jnp.logical_and(c >= 1, c % 1 == 0)
  tests = ((damping, lambda d: jnp.logical_and(d > 0, jnp.isfinite(d))),
           (stat_decay, lambda b: jnp.logical_and(b >= 0, b < 1)),
           (cov_every, cadence), (inv_every, cadence))
  found = [test(jnp.asarray(value)) for value, test in tests
           if _concrete(value) is None]
  return functools.reduce(jnp.logical_and, found) if found else True


def stat_dtype(who: str, dtype: Any) -> np.dtype:
  """The dtype of statistics: a real floating dtype (default float32)."""
  dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'{who}: stat_dtype must be a real floating dtype '
                     f'(float32, float64, bfloat16), got {dtype}.')
  return dtype
