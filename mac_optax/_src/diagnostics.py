"""What the MAC preconditioner does, layer by layer, for logging.

For every layer with MAC statistics, from the gradients and the optimizer
state after ``update`` (which holds the ``â`` that step used)::

    mean_norm = ‖â‖                                  # [*S, G], no bias coordinate
    shrink    = λ / (λ + ‖â‖² (+1 with bias))         # [*S, G], the gradient's
                                                     # component along â is
                                                     # multiplied by this
    cosine    = ⟨Ĝ, U⟩ / (‖Ĝ‖ ‖U‖)                    # [*S], raw vs preconditioned

``â`` and ``λ`` are read from the optimizer state (the values that step
used), and ``U`` is recomputed with the transform's own per-layer function
(the same rank-one apply as ``update``, ``O(d_in·d_out)``), or taken
from ``preconditioned=`` if you have it. Everything is a pure function of
arrays: call it inside your jitted train step and return the figures with
the metrics; nothing is recompiled, no host callback. :func:`counters`
reports the steps and statistics MAC could not use (invalid traced
hyperparameters, non-finite statistics).

Example::

    @jax.jit
    def train_step(params, opt_state, x, y):
      (loss, inter), grads = jax.value_and_grad(loss_fn, has_aux=True)(...)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     intermediates=inter)
      figures = mac_optax.diagnostics.layer_figures(grads, opt_state, plan)
      return optax.apply_updates(params, updates), opt_state, \
          mac_optax.diagnostics.summary(figures)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mac_optax._src import plan as plan_lib
from mac_optax._src import rank_one
from mac_optax._src import statistics
from mac_optax._src import transform
from mac_optax._src.layout import KernelLayout
from mac_optax._src.layout import LayoutError

_LOOKUP_SUFFIX = '@lookup'


class LayerFigures(NamedTuple):
  """Per-layer figures (``S`` stack axes, ``G`` mean vectors)."""
  mean_norm: jax.Array   # [*S, G] ‖â‖
  shrink: jax.Array      # [*S, G] λ / (λ + ‖â‖² (+1))
  cosine: jax.Array      # [*S] cosine of raw and preconditioned gradient


def find_mac_state(opt_state: Any) -> transform.MacState:
  """The (single) :class:`mac_optax.MacState` inside a chained optimizer state.

  Raises:
    ValueError: there is no MacState, or more than one.
  """
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda s: isinstance(s, transform.MacState))
           if isinstance(s, transform.MacState)]
  if len(found) != 1:
    raise ValueError(f'diagnostics: expected one MacState in the optimizer '
                     f'state, found {len(found)}.')
  return found[0]


def _inferred_layer(key: str, used: jax.Array, paths, leaves
                    ) -> plan_lib.PlannedLayer:
  """A layer of a plan-less `mac`, from its state and gradients."""
  lookup = key.endswith(_LOOKUP_SUFFIX)
  name = key[:-len(_LOOKUP_SUFFIX)] if lookup else key
  path = tuple(name.split('/')) if name else ()
  if lookup:
    stat = statistics.LOOKUP_MEAN
  elif path + ('kernel',) in paths:
    stat = statistics.MEAN
  else:
    stat = statistics.ATTEND_MEAN
  kernel_index = paths.get(path + (statistics.PARAM[stat],))
  if kernel_index is None:
    raise ValueError(f"diagnostics: layer '{key}' has no kernel or "
                     'embedding in the gradients.')
  bias_index = (paths.get(path + ('bias',)) if stat == statistics.MEAN
                else None)
  try:
    layout = KernelLayout.from_statistic(
        used.shape, leaves[kernel_index].shape,
        None if bias_index is None else leaves[bias_index].shape,
        transposed=stat == statistics.ATTEND_MEAN)
  except LayoutError as e:
    raise ValueError(
        f"diagnostics: layer '{key}': its layout cannot be inferred from its "
        f'state and kernel ({e}). Einsum-style layers (nn.Einsum, '
        'DenseGeneral/LinearGeneral with batch axes) are known only to the '
        'plan: pass plan= (the plan given to mac).') from None
  return plan_lib.PlannedLayer(name, stat, plan_lib.STATISTIC, layout)


def _flat(kernel, bias, stack: int) -> jax.Array:
  parts = [kernel.reshape(kernel.shape[:stack] + (-1,))]
  if bias is not None:
    parts.append(bias.reshape(bias.shape[:stack] + (-1,)))
  return jnp.concatenate(parts, axis=-1)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
  return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1), 1.0)


def layer_figures(
    grads: Any,
    opt_state: Any,
    plan: Optional[plan_lib.LayerPlan] = None,
    *,
    preconditioned: Optional[Any] = None,
) -> dict[str, LayerFigures]:
  """``‖â‖``, the shrink factor and the raw/preconditioned cosine per layer.

  Args:
    grads: the raw gradients given to ``update`` (same tree as the params).
    opt_state: the state *returned* by ``update`` (a chain's state is
      searched for its :class:`mac_optax.MacState`); its ``â`` and ``λ``
      are those the update used.
    plan: the plan given to ``mac`` (without one, each layer's layout is
      inferred from its state and kernel as a plan-less ``mac`` does).
    preconditioned: optionally, the output of the ``mac`` transform itself
      (same tree as ``grads``); otherwise it is recomputed.

  Returns:
    ``{layer key: LayerFigures}`` for the layers with MAC state (layers
    given to ``exact_layers=`` have none).
  """
  state = find_mac_state(opt_state)
  leaves = jax.tree_util.tree_leaves(grads)
  paths = statistics.leaf_paths(grads)
  done = None if preconditioned is None else jax.tree_util.tree_leaves(
      preconditioned)
  figures = {}
  for key, layer_state in state.layers.items():
    if key == transform.UNPLANNED:
      continue
    used = layer_state.used
    if plan is not None:
      layer = plan[key]
    else:
      layer = _inferred_layer(key, used, paths, leaves)
    kernel_index = paths[layer.kernel_leaf]
    bias_index = paths[layer.bias_leaf] if layer.has_bias else None
    kernel = leaves[kernel_index].astype(used.dtype)
    bias = None if bias_index is None else leaves[bias_index].astype(
        used.dtype)
    if done is None:
      new_kernel, new_bias = rank_one.precondition(
          layer.layout, kernel, bias, used, state.damping)
    else:
      new_kernel = done[kernel_index].astype(used.dtype)
      new_bias = None if bias is None else done[bias_index].astype(
          used.dtype)
    stack = len(layer.layout.stack)
    # The cosine over each stacked layer: stack axes lead kernel and bias.
    figures[key] = LayerFigures(
        mean_norm=jnp.linalg.norm(used, axis=-1),
        shrink=rank_one.shrink_factor(used, state.damping, bias is not None),
        cosine=_cosine(_flat(kernel, bias, stack),
                       _flat(new_kernel, new_bias, stack)))
  return figures


def summary(figures: dict[str, LayerFigures]) -> dict[str, jax.Array]:
  """Flat scalars for a logger: ``'<path>/<figure>'`` → mean over groups/stack.

  ``shrink`` also gets its minimum (the strongest damping of any group).
  """
  out = {}
  for key, fig in figures.items():
    out[f'{key}/mean_norm'] = jnp.mean(fig.mean_norm)
    out[f'{key}/shrink'] = jnp.mean(fig.shrink)
    out[f'{key}/shrink_min'] = jnp.min(fig.shrink)
    out[f'{key}/cosine'] = jnp.mean(fig.cosine)
  return out


def counters(opt_state: Any) -> dict[str, jax.Array]:
  """What MAC left out so far, as flat int32 scalars for a logger.

  ``'invalid_steps'``: updates that were not preconditioned because a traced
  hyperparameter (``damping``, ``stat_decay``, a cadence, e.g. from
  ``optax.inject_hyperparams``) was out of range on that step; and
  ``'<path>/skipped'`` per layer: statistics dropped as non-finite (summed
  over stacked layers). Both should stay 0; read them from the state
  returned by ``update``, inside or outside ``jit``.

  Args:
    opt_state: a state holding one :class:`mac_optax.MacState`.
  """
  state = find_mac_state(opt_state)
  out = {'invalid_steps': state.invalid_steps}
  for key, layer_state in state.layers.items():
    if key != transform.UNPLANNED:
      out[f'{key}/skipped'] = jnp.sum(layer_state.skipped)
  return out
