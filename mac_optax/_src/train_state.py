"""A Flax `TrainState` whose `apply_gradients` hands MAC its statistics."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from flax.training import train_state
import optax


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` that forwards ``intermediates=``.

  Flax's ``TrainState.apply_gradients(grads=..., **kwargs)`` calls
  ``tx.update(grads, opt_state, params)`` and treats every other keyword as a
  field to replace, so MAC never receives the statistics captured in the
  forward pass. This subclass passes ``intermediates`` (and any
  ``extra_args``, e.g. SMAC's ``grad_sq``) to ``tx.update``; everything else
  (``create``, ``step``, extra fields, checkpointing) is Flax's. The optimizer
  may be any optax transformation: keywords it does not take are dropped
  (``optax.with_extra_args_support``), so the same training step serves MAC
  and its baselines.

  Example:
    >>> state = mac_optax.TrainState.create(
    ...     apply_fn=model.apply, params=params,
    ...     tx=mac_optax.mac_sgd(0.1, momentum=0.9))
    >>> def loss_fn(params, x, y):
    ...   with mac_optax.linen.capture():
    ...     logits, v = state.apply_fn({'params': params}, x,
    ...                                mutable=['intermediates'])
    ...   return loss(logits, y), v['intermediates']
    >>> grads, inter = jax.grad(loss_fn, has_aux=True)(state.params, x, y)
    >>> state = state.apply_gradients(grads=grads, intermediates=inter)
  """

  def apply_gradients(self, *, grads: Any, intermediates: Any = None,
                      extra_args: Optional[Mapping[str, Any]] = None,
                      **kwargs: Any) -> 'TrainState':
    """Applies ``tx`` to ``grads`` with the captured statistics.

    Args:
      grads: gradients with the structure of ``params``.
      intermediates: the ``'intermediates'`` collection of the captured
        forward pass, passed to ``tx.update`` as ``intermediates=`` (left out
        when ``None``).
      extra_args: further keywords for ``tx.update`` (``{'grad_sq': ...}``
        for :func:`mac_optax.smac.scale_by_grad_sq`).
      **kwargs: fields to ``replace``, as in Flax.

    Returns:
      The state with ``step`` incremented and ``params``, ``opt_state`` (and
      ``kwargs``) updated.
    """
    update_args = dict(extra_args or {})
    if intermediates is not None:
      update_args['intermediates'] = intermediates
    updates, opt_state = optax.with_extra_args_support(self.tx).update(
        grads, self.opt_state, self.params, **update_args)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)
