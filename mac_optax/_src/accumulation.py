"""Gradient accumulation that keeps every micro-batch's MAC statistics.

``optax.MultiSteps`` averages the gradients of ``k`` micro-batches and calls
the inner optimizer with that average, but the inner optimizer commits its
state only on the ``k``-th micro-step: the ``intermediates=`` it sees then
are those of the last micro-batch alone, so ``ā`` would come from ``1/k`` of
the batch. :func:`multi_steps` wraps ``optax.MultiSteps`` and averages the
captured statistics the same way as the gradients::

    ā_acc ← ā_acc + (ā_j − ā_acc) / (j + 1)        # micro-step j = 0..k−1

and passes ``ā_acc`` to the inner optimizer, so the committing step sees the
mean of the ``k`` micro-batch means: for equal micro-batches, exactly the mean
input of the whole batch, as if it had been processed at once.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from mac_optax._src import plan as plan_lib
from mac_optax._src import sharding
from mac_optax._src import statistics


class MultiStepsMacState(NamedTuple):
  """State of :func:`multi_steps`."""
  multi_steps: optax.MultiStepsState  # optax's accumulator and inner state
  intermediates: Any                  # running mean of the captured statistics


def _flat(intermediates):
  """Leaf paths and leaves, whatever mapping holds them (dict, FrozenDict,
  the whole ``{'intermediates': ...}`` collection)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      statistics.strip_collection(intermediates))
  paths = [statistics.join(tuple(statistics.key_name(k) for k in p))
           for p, _ in flat]
  return paths, [leaf for _, leaf in flat], treedef


def _zeros(like):
  return jax.tree_util.tree_map(lambda l: jnp.zeros(l.shape, l.dtype), like)


def multi_steps(
    opt: optax.GradientTransformation,
    every_k_schedule: Union[int, Callable[[jax.Array], jax.Array]],
    *,
    plan: Optional[plan_lib.LayerPlan] = None,
    intermediates_like: Any = None,
    **multi_steps_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """``optax.MultiSteps`` whose inner MAC sees the statistics of all micro-batches.

  Every micro-step ``j`` (``0 ≤ j < k``) folds its captured statistics into a
  running mean, like ``MultiSteps`` does with the gradients, and forwards that
  mean as ``intermediates=``; the inner optimizer's state is committed only on
  the last micro-step, when the running mean covers all ``k`` micro-batches.
  Micro-steps rejected by ``should_skip_update_fn`` leave the running mean
  unchanged; it is reset after each committed step.

  The inner optimizer (any chain containing :func:`mac_optax.mac`) must
  build its full state in ``init`` (``MultiSteps`` runs it under
  ``lax.cond``), so give ``mac`` the same plan.

  Args:
    opt: the inner optimizer, e.g. ``mac_optax.mac_sgd(...,
      intermediates_like=like)``.
    every_k_schedule: ``k``, an int or a function of the gradient step
      (``optax.MultiSteps``'s argument).
    plan: the model's layer plan (built with a micro-batch); the running
      mean has the structure of its ``intermediates_like``, which must match
      the ``intermediates=`` given to ``update``.
    intermediates_like: instead of a plan, a pytree shaped like the captured
      intermediates (arrays or ``jax.ShapeDtypeStruct``).
    **multi_steps_kwargs: further arguments of ``optax.MultiSteps``
      (``use_grad_mean``, ``should_skip_update_fn``, ``accumulator_dtype``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes
    ``intermediates=`` every micro-step and emits zero updates except on the
    last micro-step of each group of ``k``.

  Example:
    >>> plan = mac_optax.linen.plan(model, variables, x_micro)
    >>> tx = mac_optax.multi_steps(mac_optax.mac_sgd(0.1, plan=plan), 4,
    ...                            plan=plan)
    >>> # every micro-batch:
    >>> # updates, state = tx.update(grads, state, params, intermediates=inter)
  """
  if (plan is None) == (intermediates_like is None):
    raise ValueError('mac_optax.multi_steps: give exactly one of plan= and '
                     'intermediates_like=.')
  if plan is not None:
    intermediates_like = plan.intermediates_like
  inner = optax.MultiSteps(opt, every_k_schedule, **multi_steps_kwargs)
  like_paths, _, like_treedef = _flat(intermediates_like)
  intermediates_like = statistics.strip_collection(intermediates_like)

  def init_fn(params):
    return MultiStepsMacState(multi_steps=inner.init(params),
                              intermediates=_zeros(intermediates_like))

  def update_fn(updates, state, params=None, *, intermediates=None, **extra):
    if intermediates is None:
      raise ValueError('mac_optax.multi_steps: update() needs the captured '
                       'statistics as `intermediates=`.')
    paths, leaves, _ = _flat(intermediates)
    if paths != like_paths:
      raise ValueError(
          'mac_optax.multi_steps: the intermediates do not have the structure '
          f'of `intermediates_like`: missing '
          f'{sorted(set(like_paths) - set(paths))[:5]}, unexpected '
          f'{sorted(set(paths) - set(like_paths))[:5]}.')
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
      raise ValueError(
          'mac_optax.multi_steps: the intermediates are shapes '
          '(jax.ShapeDtypeStruct), not arrays: give update the statistics '
          "captured in this micro-batch's forward pass.")
    intermediates = jax.tree_util.tree_unflatten(like_treedef, leaves)
    old = state.multi_steps
    count = old.mini_step.astype(jnp.float32) + 1
    # sharding.like: an explicit-axis mesh splits a statistic as its
    # activations; the running mean keeps the state's sharding.
    running = jax.tree_util.tree_map(
        lambda acc, x: (acc + (sharding.like(x.astype(acc.dtype), acc) - acc)
                        / count).astype(acc.dtype),
        state.intermediates, intermediates)
    updates, new = inner.update(updates, old, params,
                                intermediates=running, **extra)
    skipped = jnp.logical_and(new.mini_step == old.mini_step,
                              new.gradient_step == old.gradient_step)
    emitted = new.gradient_step != old.gradient_step
    kept = jax.tree_util.tree_map(
        lambda acc, run: jnp.where(skipped, acc,
                                   jnp.where(emitted, jnp.zeros_like(run),
                                             run)),
        state.intermediates, running)
    return updates, MultiStepsMacState(multi_steps=new, intermediates=kept)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
