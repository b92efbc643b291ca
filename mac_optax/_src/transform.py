"""The `mac` gradient transformation."""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from mac_optax._src import ema
from mac_optax._src import exact as exact_lib
from mac_optax._src import hyperparameters
from mac_optax._src import plan as plan_lib
from mac_optax._src import rank_one
from mac_optax._src import sharding
from mac_optax._src import statistics

_MISSING_INTERMEDIATES = (
    'mac: update() needs the layer statistics as the keyword '
    '`intermediates=`. Capture them in the forward pass:\n'
    '    with mac_optax.linen.capture():\n'
    "        out, v = model.apply({'params': params}, x, "
    "mutable=['intermediates'])\n"
    "    ... tx.update(grads, opt_state, params, "
    "intermediates=v['intermediates'])\n"
    '(NNX: `out, inter = mac_optax.nnx.capture(model)(x)`.)'
    '\nIf you train with `flax.training.train_state.TrainState`: its '
    '`apply_gradients` does not forward keywords to `tx.update` (it calls '
    '`tx.update(grads, opt_state, params)`), so the statistics never arrive '
    'even when you pass them; use `mac_optax.TrainState`, whose '
    "`state.apply_gradients(grads=grads, intermediates=v['intermediates'])` "
    'forwards them.')


class LayerState(NamedTuple):
  """Statistics of one layer. ``S`` = stack axes (``nn.scan``), ``G`` groups."""
  mean: jax.Array    # [*S, G, d_in] EMA of the mean input, not bias-corrected
  count: jax.Array   # [*S] int32, statistics folded in so far
  used: jax.Array    # [*S, G, d_in] the ā the latest update preconditioned
                     # with (refreshed every `inv_every` steps)
  skipped: jax.Array  # [*S] int32, statistics dropped as non-finite


class MacState(NamedTuple):
  """State of :func:`mac`."""
  step: jax.Array                  # [] int32, number of `update` calls
  damping: jax.Array               # [] the λ of the latest update
  layers: dict[str, LayerState]    # by layer key, 'Block_0/Dense_1'
  invalid_steps: jax.Array         # [] int32, updates not preconditioned
                                   # for an invalid traced hyperparameter


def _empty_layer_state(shape, dtype) -> LayerState:
  # Distinct buffers: a jitted step may donate the state.
  return LayerState(mean=jnp.zeros(shape, dtype),
                    count=jnp.zeros(shape[:-2], jnp.int32),
                    used=jnp.zeros(shape, dtype),
                    skipped=jnp.zeros(shape[:-2], jnp.int32))


# The quick start's `init` state holds this key instead of layers: the first
# update replaces it with the layers it finds. A wrapper that needs `init`'s
# structure (a cond, a scan, a checkpoint template) then fails on a key set
# that differs by this key, and its error prints it.
UNPLANNED = ('mac has no plan=, its first update adds the layers: for '
             'apply_if_finite, lax.cond/scan, checkpoint templates and '
             'mac_optax.multi_steps pass plan=')


def _as_layer_state(key: str, value: Any, shape) -> LayerState:
  """A `LayerState` of `shape`, also from the mapping `nnx.Optimizer` stores."""
  if isinstance(value, Mapping):
    value = LayerState(mean=value['mean'], count=value['count'],
                       used=value['used'], skipped=value['skipped'])
  if not isinstance(value, LayerState):
    raise ValueError(f"mac: the optimizer state has no entry for layer "
                     f"'{key}': was `init` called with the same plan?")
  if tuple(value.mean.shape) != tuple(shape):
    raise ValueError(
        f"mac: layer '{key}': the optimizer state holds statistics of shape "
        f"{tuple(value.mean.shape)}, the layer's are {tuple(shape)}: the "
        'state belongs to a model of other widths. Build the state of this '
        'model with tx.init(params) (or restore a checkpoint of this model).')
  return value


def _batch_mean(calls: Sequence[jax.Array], dtype, axis_name) -> jax.Array:
  """The mean input of this step: the mean over calls (and devices)."""
  calls = [c.astype(dtype) for c in calls]
  mean = calls[0] if len(calls) == 1 else sum(calls[1:], calls[0]) / len(calls)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  return mean


def _plan_from_step(grads: Any, intermediates: Any, exact,
                    layers: Mapping[str, Any]) -> plan_lib.LayerPlan:
  """Without a plan (the quick start): the layers of this step's statistics.

  The first update adds them to the state; from then on the state's layers
  are the plan, as strictly as a given plan's.

  Raises:
    ValueError: no statistic at all (unless every layer is exact), none
      pairs with a gradient leaf (unless their parameters are all masked
      out: ``optax.MaskedNode`` at their paths), or, after the first update,
      a layer of the state without its statistic or a statistic of a layer
      not in the state.
  """
  found = statistics.sown_statistics(intermediates)
  if not found and statistics.is_program_statistics(intermediates):
    raise ValueError(
        'mac: these statistics come from mac_optax.with_statistics (keyed '
        'by layer); pass the plan they were built with: '
        'mac(plan=mac_optax.plan(fn, params, ...)).')
  index = statistics.leaf_paths(grads)
  if not found:
    kernels = {statistics.join(p[:-1]) for p in index
               if p[-1:] in (('kernel',), ('embedding',))}
    if exact and kernels <= set(exact):
      return plan_lib.LayerPlan(())
    raise ValueError(plan_lib.NO_STATISTICS)
  known = plan_lib.from_statistics(grads, intermediates,
                                   skip_missing_params=True)
  if not known.layers:
    wanted = [statistics.kernel_of(p, n) for p, n in found]
    masked = statistics.masked_paths(grads)
    if not index or all(w in masked for w in wanted):
      return known   # every layer masked out: nothing to precondition
    plan_lib.check_not_nested(wanted, index)
    looked = ', '.join(f"'{statistics.join(statistics.kernel_of(p, n))}'"
                       for p, n in sorted(found)[:5])
    raise ValueError(
        f'mac: none of the {len(found)} captured statistics has a parameter '
        f'in the gradients (looked for {looked}). Statistics must be sown at '
        'the path of the module that owns the parameter, and come from the '
        'same model as the gradients.')
  fixed = set(layers) - {UNPLANNED}
  if not fixed:   # the first update
    return known
  new = sorted(set(known.keys) - fixed - set(exact))
  if new:
    raise ValueError(
        f'mac: statistics of the layers {new}, which are not in the state '
        f'({sorted(fixed)}): without plan=, the first update fixes the '
        'layers, and a model changed since (a layer added or renamed; '
        "auto-named layers shift) would go on with other layers' averages. "
        'Build the state of this model with tx.init(params), and pass plan= '
        '(mac_optax.linen.plan / mac_optax.nnx.plan) to have it checked.')
  lost = sorted(k for k in fixed - set(known.keys) if any(
      statistics.split(k.split('@')[0]) + (param,) in index
      for param in ('kernel', 'embedding')))
  if lost:
    raise ValueError(
        f'mac: the layers {lost} have optimizer state but no statistic '
        'this step (without plan=, the first update fixes the layers). If '
        'the model legitimately skips them on some steps, pass plan= '
        '(mac_optax.linen.plan / mac_optax.nnx.plan) with optional_layers=; '
        'otherwise check that the forward pass calls them under the capture.')
  return known


def _step_layer(layer_state: LayerState, batch_mean: jax.Array, fold, refresh,
                stat_decay) -> LayerState:
  """Folds this step's mean input into the EMA where `fold`.

  ``used`` becomes the bias-corrected ``â`` on refresh steps and keeps its
  value otherwise.
  """
  folded, dropped = ema.fold_counting(
      ema.Ema(layer_state.mean, layer_state.count), batch_mean, stat_decay,
      fold)
  used = jnp.where(refresh, ema.debiased(folded, stat_decay),
                   layer_state.used)
  return LayerState(folded.mean, folded.count, used,
                    layer_state.skipped + dropped)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _layer_update(layout, exact_inverse: bool, guarded: bool, axis_name,
                  kernel, bias, layer_state: LayerState, calls, fold, refresh,
                  ok, stat_decay, damping):
  """One layer's step: its statistic folded, its gradient preconditioned.

  Jitted so that layers of one layout (the blocks of a deep model) are
  traced and lowered once; inside the caller's ``jit`` it is inlined.
  """
  if calls is None:   # an optional layer not called on this step
    batch_mean, fold = jnp.zeros_like(layer_state.mean), False
  else:
    # Under an explicit-axis mesh the statistic is sharded as its
    # activations; the state keeps its own sharding from step to step.
    batch_mean = sharding.like(
        _batch_mean(calls, layer_state.mean.dtype, axis_name),
        layer_state.mean)
  layer_state = _step_layer(layer_state, batch_mean, fold, refresh,
                            stat_decay)
  new_kernel, new_bias = rank_one.apply(
      layout, kernel, bias,
      rank_one.factors(layer_state.used, damping, bias is not None),
      1 / damping if exact_inverse else None)
  if guarded:
    new_kernel = jnp.where(ok, new_kernel, kernel)
    new_bias = None if bias is None else jnp.where(ok, new_bias, bias)
  return layer_state, new_kernel, new_bias


def mac(    damping: float | jax.Array = 1.0,
    stat_decay: float | jax.Array = 0.95,
    *,
    plan: Optional[plan_lib.LayerPlan] = None,
    cov_every: int | jax.Array = 1,
    inv_every: int | jax.Array = 1,
    exact_inverse: bool = False,
    axis_name: Optional[str] = None,
    stat_dtype: Any = None,
    intermediates_like: Any = None,
    exact_layers: Optional[dict[str, Any]] = None,
    optional_layers: Sequence[str] = (),
) -> optax.GradientTransformationExtraArgs:
  """MAC: precondition every planned layer with its mean input.

  MAC (Mean Activation approximated Curvature; Seung, Lee and Ko, ICDM 2025,
  `arXiv:2506.08464 <https://arxiv.org/abs/2506.08464>`_) approximates a
  layer's KFAC input factor by the outer product of its mean input. For a
  layer with gradient ``Ĝ`` (``(d_in, d_out)``, bias as the last input row)
  and bias-corrected mean input ``â`` (bias coordinate ``1``)::

      U = Ĝ − â (âᵀ Ĝ) / (λ + âᵀ â)          # (ââᵀ + λI)⁻¹ Ĝ, times λ

  ``â = m_t / (1 − β^t)`` with ``m_t = β m_{t−1} + (1 − β) ā_t`` the EMA of the
  layer's per-batch mean input ``ā_t``. Parameters without a layer in the
  plan pass through unchanged. State per layer: two ``[G, d_in]`` vectors and
  a counter, never a matrix.

  The plan (``mac_optax.linen.plan`` / ``mac_optax.nnx.plan``) lists every
  preconditioned layer; ``init`` builds the complete state from it and
  ``update`` never changes the state's structure, so ``optax.apply_if_finite``,
  ``lax.scan`` loops, checkpoint templates and ``nnx.Optimizer`` work from
  the first step with one compilation. ``update`` is strict: a planned layer
  without its statistic, an unknown or misshapen statistic, or no statistic
  at all raise at trace time. ``optax.MultiSteps`` commits the state on its
  last micro-step with the last micro-batch's statistic only: use
  :func:`mac_optax.multi_steps`, which averages all micro-batches'.

  Without a plan (the quick start), the layers are found in the statistics
  of the first ``update``, which then adds them to the state (the first
  jitted step traces twice; wrappers that need ``init``'s structure, such as
  ``apply_if_finite``, fail with an error saying to pass ``plan=``). Later
  updates hold to these layers as strictly as to a plan.
  ``intermediates_like`` (the shapes of the captured statistics) builds the
  complete state in ``init`` without a plan.

  Hyperparameters are single numbers, checked at construction. Traced ones
  (``optax.inject_hyperparams`` under ``jit``, schedules) are checked by the
  compiled step instead: on a step where ``damping`` is not a finite
  ``λ > 0``, ``stat_decay`` not in ``[0, 1)`` or a cadence not a positive
  integer, the MAC layers' gradients pass through unpreconditioned, no
  statistic is folded and ``â`` is not refreshed (``exact_layers`` are
  preconditioned as usual), and ``MacState.invalid_steps`` counts the step.
  A statistic with a non-finite entry is never folded; ``LayerState.skipped``
  counts them. :func:`mac_optax.diagnostics.counters` reads both.

  Args:
    damping: ``λ > 0``, a float or a scalar array.
    stat_decay: ``β ∈ [0, 1)``, decay of the EMA of mean inputs.
    plan: the model's :class:`mac_optax.LayerPlan` (recommended).
    cov_every: fold the batch statistics into the EMA only on steps
      ``t % cov_every == 0`` (the authors' ``Tcov``; 5 in the paper).
    inv_every: refresh the vector used for preconditioning only on steps
      ``t % inv_every == 0`` (the authors' ``Tinv``; 50 for CNNs).
    exact_inverse: return ``(ââᵀ + λI)⁻¹ Ĝ`` (the update above divided by
      ``λ``) instead of the authors' decoupled damping.
    axis_name: a ``pmap``/``shard_map`` axis over which mean inputs are
      averaged, so all replicas use the global-batch statistic.
    stat_dtype: real floating dtype of statistics and of the rank-one
      correction (default float32); updates are returned in each gradient's
      dtype. Under ``optax.inject_hyperparams`` list it in ``static_args``.
    intermediates_like: instead of a plan, a pytree shaped like the
      captured intermediates (arrays or ``jax.ShapeDtypeStruct``).
    exact_layers: ``{layer path: P}`` layers preconditioned with a fixed
      matrix instead, ``Ĝ_aug ← P Ĝ_aug`` (``P`` ``[d, d]`` or ``[G, d, d]``,
      ``d = d_in (+1 with bias)``): the paper's exact first layer, see
      :func:`mac_optax.first_layer.exact_first_layer`.
    optional_layers: keys of planned layers the model may legitimately not
      call on some steps; such a step folds nothing for them and
      preconditions with their last ``â``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    captured statistics as ``intermediates=``.

  Example:
    >>> import optax, mac_optax
    >>> plan = mac_optax.linen.plan(model, variables, x)
    >>> tx = optax.chain(mac_optax.mac(1.0, 0.95, plan=plan),
    ...                  optax.trace(0.9), optax.scale(-0.1))
    >>> # updates, state = tx.update(grads, state, params,
    >>> #                            intermediates=captured)
  """
  hyperparameters.check('mac', damping=damping, stat_decay=stat_decay,
                        cov_every=cov_every, inv_every=inv_every)
  stat_dtype = hyperparameters.stat_dtype('mac', stat_dtype)
  exact = exact_lib.check_exact_layers(exact_layers)
  if plan is not None and intermediates_like is not None:
    raise ValueError('mac: give plan= or intermediates_like=, not both.')
  if plan is not None and not isinstance(plan, plan_lib.LayerPlan):
    raise TypeError(f'mac: plan must be a mac_optax.LayerPlan (from '
                    f'mac_optax.linen.plan / mac_optax.nnx.plan), got '
                    f'{type(plan).__name__}.')
  optional_layers = tuple(optional_layers)
  if optional_layers and plan is None:
    raise ValueError('mac: optional_layers= needs a plan=.')
  unknown = sorted(set(optional_layers) - set(plan.keys if plan else ()))
  if unknown:
    raise ValueError(f'mac: optional_layers {unknown} are not in the plan.')

  def plan_for(tree) -> Optional[plan_lib.LayerPlan]:
    if plan is not None:
      return plan
    if intermediates_like is not None:
      return plan_lib.from_statistics(tree, intermediates_like,
                                      skip_missing_params=True)
    return None

  def init_fn(params):
    exact_lib.check_fits(exact, params)
    known = plan_for(params)
    layers = {} if known is not None else {UNPLANNED: None}
    for layer in (known.layers if known else ()):
      if layer.path not in exact:
        layers[layer.key] = _empty_layer_state(layer.layout.stat_shape,
                                               stat_dtype)
    return MacState(step=jnp.zeros([], jnp.int32),
                    damping=jnp.asarray(damping, stat_dtype),
                    layers=layers, invalid_steps=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, intermediates=None, **extra):
    del params, extra
    if intermediates is None:
      raise ValueError(_MISSING_INTERMEDIATES)
    known = plan_for(updates)
    # The quick start's first update (`nnx.Optimizer` keeps UNPLANNED after).
    first = known is None and not set(state.layers) - {UNPLANNED}
    if known is None:
      known = _plan_from_step(updates, intermediates, exact, state.layers)
    # Exact layers are preconditioned without a statistic.
    pairings = plan_lib.pair(known, updates, intermediates,
                             optional_layers + tuple(exact))
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    # Traced hyperparameters are checked here (concrete ones were at
    # construction): a step with an invalid one folds nothing, refreshes
    # nothing and passes the gradients of MAC layers through.
    ok = hyperparameters.valid(damping=damping, stat_decay=stat_decay,
                               cov_every=cov_every, inv_every=inv_every)
    fold = jnp.logical_and(state.step % cov_every == 0, ok)
    refresh = jnp.logical_and(state.step % inv_every == 0, ok)
    new_layers = dict(state.layers)
    if first:
      new_layers.pop(UNPLANNED, None)
    for p in pairings:
      key, shape = p.layer.key, p.layer.layout.stat_shape
      if p.layer.path in exact:
        continue
      if first:
        layer_state = _empty_layer_state(shape, stat_dtype)
      else:
        layer_state = _as_layer_state(key, state.layers.get(key), shape)
      bias_index = p.bias_index
      new_layers[key], leaves[p.kernel_index], bias = _layer_update(
          p.layer.layout, exact_inverse, ok is not True, axis_name,
          leaves[p.kernel_index],
          None if bias_index is None else leaves[bias_index], layer_state,
          None if p.calls is None else list(p.calls), fold, refresh, ok,
          stat_decay, damping)
      if bias is not None:
        leaves[bias_index] = bias
    exact_lib.precondition_exact(exact, updates, leaves)
    new_state = MacState(step=optax.safe_increment(state.step),
                         damping=jnp.asarray(damping, stat_dtype),
                         layers=new_layers,
                         invalid_steps=state.invalid_steps + jnp.logical_not(
                             ok).astype(jnp.int32))
    return jax.tree_util.tree_unflatten(treedef, leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
