"""The authors' whole optimizer in one call, in the style of `optax.sgd`."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Union

import jax
import optax

from mac_optax._src import transform

MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]

def _is_off(value: Any) -> bool:
  """True for ``None`` or a Python/NumPy scalar equal to 0.

  Arrays (what ``optax.inject_hyperparams`` passes, traced or not) always
  count as on.
  """
  if value is None:
    return True
  return isinstance(value, numbers.Number) and value == 0


def _unchanged(updates, state, params=None):
  del params
  return updates, state


def _mac_kwargs(**kwargs: Any) -> dict[str, Any]:
  """`mac`'s keywords, leaving out the newer ones at their defaults.

  ``plan`` and ``optional_layers`` are only passed when set, so `mac_sgd` also
  works with a `mac` that predates them.
  """
  if kwargs.get('plan') is None:
    kwargs.pop('plan', None)
  if not kwargs.get('optional_layers'):
    kwargs.pop('optional_layers', None)
  return kwargs


def mac_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: Optional[float] = 0.9,
    *,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    weight_decay_mask: MaskOrFn = None,
    clip_norm: Optional[float] = None,
    damping: float = 1.0,
    stat_decay: float = 0.95,
    plan: Any = None,
    cov_every: int = 1,
    inv_every: int = 1,
    exact_inverse: bool = False,
    axis_name: Optional[str] = None,
    stat_dtype: Any = None,
    intermediates_like: Any = None,
    exact_layers: Optional[dict[str, Any]] = None,
    optional_layers: Any = (),
) -> optax.GradientTransformationExtraArgs:
  r"""MAC-preconditioned SGD with momentum and weight decay (the paper's recipe).

  The chain, in the authors' order (weight decay is never preconditioned)::

      g̃ = MAC(clip(g))
      coupled:    d = g̃ + wd·p;   buf = μ·buf + d;   p ← p − lr·buf
      decoupled:  buf = μ·buf + g̃;                  p ← p − lr·(buf + wd·p)

  Nesterov replaces ``buf`` by ``d + μ·buf`` in the step, as in PyTorch.

  ``optax.inject_hyperparams(mac_sgd)`` works: the learning rate, momentum,
  weight decay, clipping norm, damping and ``stat_decay`` become arrays in
  the optimizer state (schedules allowed). List ``cov_every`` and
  ``inv_every`` in ``static_args`` to keep them Python ints (traced cadences
  work, but keep a frozen preconditioning vector per layer even when they
  are 1), and so must be a callable ``weight_decay_mask`` or a
  ``stat_dtype``: ``inject_hyperparams`` takes any callable for a schedule.

  Args:
    learning_rate: a float or an optax schedule.
    momentum: heavy-ball momentum ``μ``; ``None`` disables it (``0``, as in
      ``optax.sgd``, keeps a trace that does not decay: the state is then
      the same as under ``inject_hyperparams``, which passes an array).
    nesterov: Nesterov momentum.
    weight_decay: ``wd`` (``0`` or ``None`` adds nothing; the chain keeps
      the step's empty state, so wrapped in ``inject_hyperparams``, where
      ``0`` becomes an array, it has the same state).
    decoupled_weight_decay: ``True`` for decoupled (AdamW-style, ImageNet and
      nanoGPT recipes), ``False`` for coupled L2 (CIFAR recipe).
    weight_decay_mask: a pytree of bools or a function of the params choosing
      the decayed parameters (``optax.add_decayed_weights``'s ``mask``).
    clip_norm: clip the gradient's global norm before preconditioning.
    damping: MAC's ``λ``.
    stat_decay: MAC's ``β``.
    plan: passed to :func:`mac_optax.mac` (only when set).
    cov_every: see :func:`mac_optax.mac`.
    inv_every: see :func:`mac_optax.mac`.
    exact_inverse: see :func:`mac_optax.mac`.
    axis_name: see :func:`mac_optax.mac`.
    stat_dtype: see :func:`mac_optax.mac`.
    intermediates_like: see :func:`mac_optax.mac`.
    exact_layers: see :func:`mac_optax.mac`.
    optional_layers: passed to :func:`mac_optax.mac` (only when set).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; pass ``intermediates=`` to
    its ``update``.

  Example:
    >>> import optax, mac_optax
    >>> tx = mac_optax.mac_sgd(optax.cosine_decay_schedule(0.1, 1000),
    ...                        momentum=0.9, weight_decay=5e-4)
    >>> tx = optax.inject_hyperparams(
    ...     mac_optax.mac_sgd, static_args=('cov_every', 'inv_every'))(
    ...     learning_rate=optax.cosine_decay_schedule(0.1, 1000),
    ...     weight_decay=5e-4, clip_norm=1.0, cov_every=5, inv_every=50)
  """
  # A callable not listed in inject_hyperparams's static_args is called as a
  # schedule: a mask function then returns a bool, a dtype an array.
  for name, value in (('weight_decay_mask', weight_decay_mask),
                      ('stat_dtype', stat_dtype)):
    if isinstance(value, (bool, jax.Array)):
      raise TypeError(
          f'mac_sgd: {name} is {value!r}. Under '
          f"optax.inject_hyperparams, list '{name}' in static_args: it "
          'takes any callable for a schedule.')
  mac = transform.mac(damping, stat_decay, **_mac_kwargs(
      plan=plan, cov_every=cov_every, inv_every=inv_every,
      exact_inverse=exact_inverse, axis_name=axis_name, stat_dtype=stat_dtype,
      intermediates_like=intermediates_like, exact_layers=exact_layers,
      optional_layers=optional_layers))
  # The chain's structure depends on no value: `inject_hyperparams` turns the
  # default weight decay 0.0 into an array, whose step stays in the chain, and
  # the wrapped and the plain optimizer must have the same state.
  decay = optax.add_decayed_weights(weight_decay, mask=weight_decay_mask)
  if _is_off(weight_decay):
    decay = optax.GradientTransformation(decay.init, _unchanged)
  parts = []
  if clip_norm is not None:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(mac)
  if not decoupled_weight_decay:
    parts.append(decay)
  if momentum is not None:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  if decoupled_weight_decay:
    parts.append(decay)
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
