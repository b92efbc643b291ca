"""What the MAC preconditioner does, layer by layer, for logging.

For every layer with MAC statistics, from the gradients and the optimizer
state after ``update`` (which holds the ``â`` that step used)::

    mean_norm = ‖â‖                                  # [*S, G], no bias coordinate
    shrink    = λ / (λ + ‖â‖² (+1 with bias))         # [*S, G], the gradient's
                                                     # component along â is
                                                     # multiplied by this
    cosine    = ⟨Ĝ, U⟩ / (‖Ĝ‖ ‖U‖)                    # [*S], raw vs preconditioned

``U`` is MAC's preconditioned gradient, recomputed with the same rank-one
formula (a contraction and a rank-one update, ``O(d_in·d_out)``), or taken
from ``preconditioned=`` if you have it. Everything is a pure function of
arrays: call it inside your jitted train step and return the figures with
the metrics; nothing is recompiled, no host callback, no state field.

Example::

    @jax.jit
    def train_step(params, opt_state, x, y):
      (loss, inter), grads = jax.value_and_grad(loss_fn, has_aux=True)(...)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     intermediates=inter)
      figures = mac_optax.diagnostics.layer_figures(
          grads, opt_state, damping=1.0, stat_decay=0.95)
      return optax.apply_updates(params, updates), opt_state, \
          mac_optax.diagnostics.summary(figures)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mac_optax._src import rank_one
from mac_optax._src import statistics
from mac_optax._src import transform


# State key of an Embed lookup statistic (a tied table also has an attend one).
_LOOKUP_SUFFIX = '@lookup'


class LayerFigures(NamedTuple):
  """Per-layer figures (``S`` stack axes, ``G`` column groups)."""
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


def used_mean(layer: transform.LayerState, stat_decay) -> jax.Array:
  """The ``[*S, G, d_in]`` bias-corrected ``â`` the last update used."""
  if layer.precond_mean is not None:
    return layer.precond_mean
  decay = jnp.asarray(stat_decay, layer.mean.dtype)
  count = layer.count[..., None, None]
  correction = jnp.where(count > 0, 1 - decay ** count.astype(decay.dtype), 1)
  return jnp.where(count > 0, layer.mean / correction, 0)


def _cosine(a: jax.Array, b: jax.Array, stack: int) -> jax.Array:
  axes = tuple(range(stack, a.ndim))
  dot = jnp.sum(a * b, axis=axes)
  norms = jnp.sqrt(jnp.sum(a * a, axis=axes) * jnp.sum(b * b, axis=axes))
  return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1), 1.0)


def layer_figures(
    grads: Any,
    opt_state: Any,
    *,
    damping: float | jax.Array = 1.0,
    stat_decay: float | jax.Array = 0.95,
    preconditioned: Optional[Any] = None,
) -> dict[str, LayerFigures]:
  """``‖â‖``, the shrink factor and the raw/preconditioned cosine per layer.

  Args:
    grads: the raw gradients given to ``update`` (same tree as the params).
    opt_state: the state *returned* by ``update`` (a chain's state is
      searched for its :class:`mac_optax.MacState`).
    damping: MAC's ``λ``.
    stat_decay: MAC's ``β`` (to bias-correct the EMA when ``inv_every == 1``).
    preconditioned: optionally, the output of the ``mac`` transform itself
      (same tree as ``grads``); otherwise it is recomputed from ``â``.

  Returns:
    ``{layer path: LayerFigures}`` for the layers with MAC statistics (layers
    given to ``exact_layers=`` have none).
  """
  state = find_mac_state(opt_state)
  leaves = jax.tree_util.tree_leaves(grads)
  paths = statistics.leaf_paths(grads)
  done = None if preconditioned is None else jax.tree_util.tree_leaves(
      preconditioned)
  figures = {}
  lookup = getattr(statistics, 'LOOKUP_MEAN', None)
  for key, layer_state in state.layers.items():
    name = key[:-len(_LOOKUP_SUFFIX)] if key.endswith(_LOOKUP_SUFFIX) else key
    path = tuple(name.split('/')) if name else ()
    mean = used_mean(layer_state, stat_decay)
    if lookup is not None and name != key:  # Embed lookup: (vocab, D) table
      kernel_index, stat_name = paths.get(path + ('embedding',)), lookup
    else:
      kernel_index = paths.get(path + ('kernel',))
      stat_name = statistics.MEAN
      if kernel_index is None:
        kernel_index = paths.get(path + ('embedding',))
        stat_name = statistics.ATTEND_MEAN
    if kernel_index is None:
      raise ValueError(f"diagnostics: layer '{key}' has no kernel or "
                       'embedding in the gradients.')
    bias_index = (paths.get(path + ('bias',))
                  if stat_name == statistics.MEAN else None)
    layer = statistics.Layer(path, stat_name, (mean,), kernel_index,
                             bias_index)
    kernel = leaves[kernel_index].astype(jnp.float32)
    bias = None if bias_index is None else leaves[bias_index].astype(
        jnp.float32)
    stack = mean.ndim - 2
    view = statistics.kernel_view(
        layer, kernel.shape, None if bias is None else bias.shape)
    if layer.transposed:
      kernel = jnp.swapaxes(kernel, -1, -2)
    kernel = kernel.reshape(view)
    if bias is not None:
      bias = bias.reshape(view[:-3] + view[-2:])
    if done is None:
      new_kernel, new_bias = rank_one.precondition(kernel, bias, mean,
                                                   damping)
    else:
      new_kernel = done[kernel_index].astype(jnp.float32)
      if layer.transposed:
        new_kernel = jnp.swapaxes(new_kernel, -1, -2)
      new_kernel = new_kernel.reshape(view)
      new_bias = None if bias is None else done[bias_index].astype(
          jnp.float32).reshape(bias.shape)
    flat = lambda k, b: jnp.concatenate(  # pylint: disable=g-long-lambda
        [k.reshape(k.shape[:stack] + (-1,))]
        + ([] if b is None else [b.reshape(b.shape[:stack] + (-1,))]),
        axis=-1)
    figures[key] = LayerFigures(
        mean_norm=jnp.linalg.norm(mean, axis=-1),
        shrink=rank_one.shrink_factor(mean, damping, bias is not None),
        cosine=_cosine(flat(kernel, bias), flat(new_kernel, new_bias), stack))
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
