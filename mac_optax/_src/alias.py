"""The authors' whole optimizer in one call, in the style of `optax.sgd`."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import optax

from mac_optax._src import transform

MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def mac_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    weight_decay_mask: MaskOrFn = None,
    clip_norm: Optional[float] = None,
    damping: float = 1.0,
    stat_decay: float = 0.95,
    **mac_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """MAC-preconditioned SGD with momentum and weight decay (the paper's recipe).

  The chain, in the authors' order (weight decay is never preconditioned)::

      g̃ = MAC(clip(g))
      coupled:    d = g̃ + wd·p;   buf = μ·buf + d;   p ← p − lr·buf
      decoupled:  buf = μ·buf + g̃;                  p ← p − lr·(buf + wd·p)

  Nesterov replaces ``buf`` by ``d + μ·buf`` in the step, as in PyTorch.

  Args:
    learning_rate: a float or an optax schedule.
    momentum: heavy-ball momentum ``μ`` (0 disables it).
    nesterov: Nesterov momentum.
    weight_decay: ``wd``.
    decoupled_weight_decay: ``True`` for decoupled (AdamW-style, ImageNet and
      nanoGPT recipes), ``False`` for coupled L2 (CIFAR recipe).
    weight_decay_mask: a pytree of bools or a function of the params choosing
      the decayed parameters (``optax.add_decayed_weights``'s ``mask``).
    clip_norm: clip the gradient's global norm before preconditioning.
    damping: MAC's ``λ``.
    stat_decay: MAC's ``β``.
    **mac_kwargs: further keyword options of :func:`mac_optax.mac`
      (``cov_every``, ``inv_every``, ``exact_inverse``, ``axis_name``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; pass ``intermediates=`` to
    its ``update``.

  Example:
    >>> tx = mac_optax.mac_sgd(optax.cosine_decay_schedule(0.1, 1000),
    ...                        momentum=0.9, weight_decay=5e-4)
  """
  decay = optax.add_decayed_weights(weight_decay, mask=weight_decay_mask)
  parts = []
  if clip_norm is not None:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(transform.mac(damping, stat_decay, **mac_kwargs))
  if weight_decay and not decoupled_weight_decay:
    parts.append(decay)
  if momentum:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  if weight_decay and decoupled_weight_decay:
    parts.append(decay)
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
