"""The `mac` gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mac_optax._src import first_layer
from mac_optax._src import rank_one
from mac_optax._src import statistics

_MISSING_INTERMEDIATES = (
    'mac: update() needs the layer statistics as the keyword '
    '`intermediates=`. Capture them in the forward pass:\n'
    '    with mac_optax.linen.capture():\n'
    "        out, v = model.apply({'params': params}, x, "
    "mutable=['intermediates'])\n"
    "    ... tx.update(grads, opt_state, params, "
    "intermediates=v['intermediates'])\n"
    '(NNX: `with mac_optax.nnx.capture(): out, inter = '
    'nnx.capture(model, nnx.Intermediate)(x)`.)')


class LayerState(NamedTuple):
  """Statistics of one layer. ``S`` = stack axes (``nn.scan``), ``G`` groups."""
  mean: jax.Array         # [*S, G, d_in] EMA of the mean input, not bias-corrected
  count: jax.Array        # [*S] int32, statistic updates folded in so far
  precond_mean: Optional[jax.Array]  # [*S, G, d_in] ā used to precondition
                                     # (refreshed every `inv_every` steps;
                                     # None when inv_every == 1)


class MacState(NamedTuple):
  """State of :func:`mac`."""
  step: jax.Array                  # [] int32, number of `update` calls
  layers: dict[str, LayerState]    # keyed by module path 'Block_0/Dense_1'


def _concrete(value: Any) -> Optional[float]:
  """A Python float for a concrete hyperparameter, None for a traced one."""
  try:
    return float(value)
  except TypeError:  # tracers (jax.errors.ConcretizationTypeError, ...)
    return None


def _check_hyperparameters(damping, stat_decay, cov_every, inv_every):
  value = _concrete(damping)
  if value is not None and not value > 0:
    raise ValueError(f'mac: damping must be > 0, got {damping}.')
  value = _concrete(stat_decay)
  if value is not None and not 0 <= value < 1:
    raise ValueError(f'mac: stat_decay must be in [0, 1), got {stat_decay}.')
  for name, cadence in (('cov_every', cov_every), ('inv_every', inv_every)):
    value = _concrete(cadence)
    if value is not None and (value < 1 or value != int(value)):
      raise ValueError(f'mac: {name} must be a positive integer, got '
                       f'{cadence}.')


def _empty_layer_state(shape, dtype, inv_every) -> LayerState:
  stack = shape[:-2]
  zeros = jnp.zeros(shape, dtype)
  return LayerState(
      mean=zeros,
      count=jnp.zeros(stack, jnp.int32),
      precond_mean=None if _is_every_step(inv_every) else zeros)


def _as_layer_state(value) -> Optional[LayerState]:
  """A `LayerState`, also from the mapping `nnx.Optimizer` stores it as.

  A layer state created lazily in `update` is written back by
  ``nnx.Optimizer.update`` as an ``nnx.State`` of its fields.
  """
  if value is None or isinstance(value, LayerState):
    return value
  return LayerState(mean=value['mean'], count=value['count'],
                    precond_mean=value.get('precond_mean'))


def _is_every_step(cadence) -> bool:
  return isinstance(cadence, int) and cadence == 1


def _batch_mean(layer: statistics.Layer, dtype, axis_name) -> jax.Array:
  """The mean input of this step: the mean over calls (and devices)."""
  calls = [c.astype(dtype) for c in layer.calls]
  mean = sum(calls[1:], calls[0]) / len(calls)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  return mean


def _update_statistics(state: LayerState, batch_mean, fold, stat_decay,
                       refresh) -> tuple[LayerState, jax.Array]:
  """Folds a finite batch mean into the EMA; returns the ā to precondition.

  ``m_t = β m_{t−1} + (1 − β) ā_t`` and ``â = m_t / (1 − β^t)``, with ``t`` the
  number of statistics folded so far; a non-finite ``ā_t`` is skipped.
  """
  finite = jnp.all(jnp.isfinite(batch_mean), axis=(-2, -1))
  take = jnp.logical_and(fold, finite)
  decay = jnp.asarray(stat_decay, batch_mean.dtype)
  folded = decay * state.mean + (1 - decay) * jnp.where(
      jnp.isfinite(batch_mean), batch_mean, 0)
  mean = jnp.where(take[..., None, None], folded, state.mean)
  count = state.count + take.astype(jnp.int32)
  correction = 1 - decay ** count.astype(batch_mean.dtype)
  safe = jnp.where(count > 0, correction, 1)
  corrected = jnp.where((count > 0)[..., None, None],
                        mean / safe[..., None, None], 0)
  if state.precond_mean is None:
    return LayerState(mean, count, None), corrected
  used = jnp.where(refresh, corrected, state.precond_mean)
  return LayerState(mean, count, used), used


def _input_axes(view, kernel_shape) -> tuple[int, ...]:
  """The kernel's own input axes (sizes multiplying to ``d_in`` of `view`)."""
  stack, d_in = len(view) - 3, view[-3]
  size, k = 1, stack
  while size < d_in:
    size *= kernel_shape[k]
    k += 1
  return tuple(kernel_shape[stack:k])


def _precondition_layer(layer, view, kernel_grad, bias_grad, mean, damping,
                        exact_inverse, dtype):
  """Preconditions one layer's gradient leaves in `dtype`, returns originals'.

  The kernel's input axes are not flattened (the small mean is reshaped to
  them instead), so a kernel sharded along any input axis keeps its sharding.
  """
  kernel = kernel_grad.astype(dtype)
  if layer.transposed:
    kernel = jnp.swapaxes(kernel, -1, -2)
  in_axes = _input_axes(view, kernel.shape)
  kernel = kernel.reshape(view[:-3] + in_axes + view[-2:])
  mean = mean.reshape(mean.shape[:-1] + in_axes)
  bias = None
  if bias_grad is not None:
    bias = bias_grad.astype(dtype).reshape(view[:-3] + view[-2:])
  new_kernel, new_bias = rank_one.precondition(
      kernel, bias, mean, damping, exact_inverse=exact_inverse,
      input_ndim=len(in_axes))
  if layer.transposed:
    new_kernel = jnp.swapaxes(
        new_kernel.reshape(view[:-3] + (view[-3], -1)), -1, -2)
  new_kernel = new_kernel.reshape(kernel_grad.shape).astype(kernel_grad.dtype)
  if new_bias is not None:
    new_bias = new_bias.reshape(bias_grad.shape).astype(bias_grad.dtype)
  return new_kernel, new_bias


def _layer_shapes(intermediates_like) -> dict[str, tuple[int, ...]]:
  """Statistic shapes by layer key, from an example of the intermediates."""
  shapes = {}
  for (path, name), calls in statistics.sown_statistics(
      intermediates_like).items():
    layer = statistics.Layer(path, name, tuple(calls), -1, None)
    shapes[layer.key] = statistics.stat_shape(layer)
  return shapes


def mac(
    damping: float | jax.Array = 1.0,
    stat_decay: float | jax.Array = 0.95,
    *,
    cov_every: int = 1,
    inv_every: int = 1,
    exact_inverse: bool = False,
    axis_name: Optional[str] = None,
    stat_dtype: Any = None,
    intermediates_like: Any = None,
    exact_layers: Optional[dict[str, Any]] = None,
) -> optax.GradientTransformationExtraArgs:
  """MAC: precondition every captured layer with its mean input.

  For a layer with gradient ``Ĝ`` (``(d_in, d_out)``, bias as the last input
  row) and bias-corrected mean input ``â`` (bias coordinate ``1``)::

      U = Ĝ − â (âᵀ Ĝ) / (λ + âᵀ â)          # (ââᵀ + λI)⁻¹ Ĝ, times λ

  ``â = m_t / (1 − β^t)`` with ``m_t = β m_{t−1} + (1 − β) ā_t`` the EMA of the
  layer's per-batch mean input ``ā_t``. Parameters without a captured
  statistic pass through unchanged. State per layer: one ``[G, d_in]`` vector
  and a counter (two vectors when ``inv_every > 1``), never a matrix.

  How the state learns each layer's input shape: ``init`` only sees
  parameters, and a kernel's shape does not say which of its axes are inputs.
  By default the per-layer state is created on the first ``update`` from the
  statistics it receives (``init`` returns an empty ``layers`` dict); under
  ``jit``/``pmap`` the first step therefore traces once more, and the state
  structure is fixed from then on. Pass ``intermediates_like`` (for example
  ``jax.eval_shape`` of the captured forward pass, see
  :func:`mac_optax.linen.intermediates_like`) to build the complete state in
  ``init``; that is required inside ``optax.MultiSteps``,
  ``optax.apply_if_finite``, ``lax.scan`` training loops, and whenever the
  state's structure must be known before the first step (checkpoint
  templates, sharding specs).

  Args:
    damping: ``λ > 0``.
    stat_decay: ``β ∈ [0, 1)``, decay of the EMA of mean inputs.
    cov_every: fold the batch statistics into the EMA only on steps
      ``t % cov_every == 0`` (the authors' ``Tcov``; 5 in the paper).
    inv_every: refresh the vector used for preconditioning only on steps
      ``t % inv_every == 0`` (the authors' ``Tinv``; 50 for CNNs).
    exact_inverse: return ``(ââᵀ + λI)⁻¹ Ĝ`` (the update above divided by
      ``λ``) instead of the authors' decoupled damping.
    axis_name: a ``pmap``/``shard_map`` axis over which mean inputs are
      averaged, so all replicas use the global-batch statistic.
    stat_dtype: dtype of statistics and of the rank-one correction (default
      float32); updates are returned in each gradient's dtype. Under
      ``optax.inject_hyperparams`` list it in ``static_args``.
    intermediates_like: optional pytree shaped like the captured
      intermediates (arrays or ``jax.ShapeDtypeStruct``), to create the
      full state in ``init``.
    exact_layers: ``{layer path: P}`` layers preconditioned with a fixed
      matrix instead, ``Ĝ_aug ← P Ĝ_aug`` (``P`` ``[d, d]`` or ``[G, d, d]``,
      ``d = d_in (+1 with bias)``): the paper's exact first layer, see
      :func:`mac_optax.first_layer.exact_first_layer`. ``P`` must be
      symmetric positive definite or upper triangular (``L⁻ᵀ``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    captured statistics as ``intermediates=``.

  Example:
    >>> import optax, mac_optax
    >>> tx = optax.chain(mac_optax.mac(damping=1.0, stat_decay=0.95),
    ...                  optax.trace(0.9), optax.scale(-0.1))
    >>> # updates, state = tx.update(grads, state, params,
    >>> #                            intermediates=captured)
  """
  _check_hyperparameters(damping, stat_decay, cov_every, inv_every)
  stat_dtype = jnp.dtype(stat_dtype or jnp.float32)
  exact = first_layer.check_exact_layers(exact_layers)
  layer_shapes = (None if intermediates_like is None
                  else _layer_shapes(intermediates_like))

  def init_fn(params):
    first_layer.check_fits(exact, params)
    layers = {}
    for key, shape in (layer_shapes or {}).items():
      if key in exact:
        continue
      layers[key] = _empty_layer_state(shape, stat_dtype, inv_every)
    return MacState(step=jnp.zeros([], jnp.int32), layers=layers)

  def update_fn(updates, state, params=None, *, intermediates=None, **extra):
    del params, extra
    if intermediates is None:
      raise ValueError(_MISSING_INTERMEDIATES)
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    layers = statistics.find_layers(updates, intermediates)
    fold = state.step % cov_every == 0
    refresh = state.step % inv_every == 0
    new_layers = dict(state.layers)
    for layer in layers:
      if layer.key in exact:
        continue
      kernel_grad = leaves[layer.kernel_index]
      bias_grad = (None if layer.bias_index is None
                   else leaves[layer.bias_index])
      view = statistics.kernel_view(
          layer, kernel_grad.shape,
          None if bias_grad is None else bias_grad.shape)
      shape = statistics.stat_shape(layer)
      layer_state = _as_layer_state(state.layers.get(layer.key))
      if layer_state is None:
        layer_state = _empty_layer_state(shape, stat_dtype, inv_every)
      elif layer_state.mean.shape != shape:
        raise ValueError(
            f"mac: layer '{layer.key}': statistic of shape {shape} does not "
            f'match the optimizer state {layer_state.mean.shape}.')
      batch_mean = _batch_mean(layer, stat_dtype, axis_name)
      layer_state, mean = _update_statistics(layer_state, batch_mean, fold,
                                             stat_decay, refresh)
      new_layers[layer.key] = layer_state
      kernel, bias = _precondition_layer(layer, view, kernel_grad, bias_grad,
                                         mean, damping, exact_inverse,
                                         stat_dtype)
      leaves[layer.kernel_index] = kernel
      if bias is not None:
        leaves[layer.bias_index] = bias
    first_layer.precondition_exact(exact, updates, leaves)
    new_state = MacState(step=optax.safe_increment(state.step),
                         layers=new_layers)
    return jax.tree_util.tree_unflatten(treedef, leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
