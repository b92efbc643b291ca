"""SMAC: MAC with a diagonal gradient-side factor (the authors' later variant).

KFAC's gradient factor ``G = E[g gᵀ]`` over a layer's pre-activation
gradients ``g`` (one per output unit) is replaced by its diagonal. SMAC's
update of a layer is then, with ``Ĝ`` laid out ``(d_in [+1], d_out)``::

    U = A⁻¹ Ĝ Z,    Z = diag(1 / (ẑ + λ)),    ẑ = EMA of E_rows[g²]   # (d_out,)

``A⁻¹`` is MAC's rank-one factor (or the exact first layer). ``Z`` scales
output columns, so it commutes with ``A⁻¹``: :func:`scale_by_grad_sq` is a
separate transform chained with :func:`mac_optax.mac`.

Layers: SMAC follows MAC's layer model, found in the traced program: every
layer of the plan whose kernel is a ``kernel`` parameter (with its sibling
``bias``) gets a probe, whatever class applies it (``nn.Dense``,
``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv``, a module's own
``jnp.einsum``); a batched layer is one layer per batch index, so ``ẑ`` and
``Z`` have one entry per batch index and output unit (the heads of a batched
projection do not share a scale). Layers without a probe keep ``Z = 1`` (MAC
alone): embedding tables (``attend`` and lookups), kernels of other names,
layers sown by hand, layers stacked by a ``scan``, and NNX models (the
probes are linen only); :func:`unscaled_layers` lists them for a plan. An
einsum whose bias runs over its output axes in another order than the
kernel's raises.

Getting ``E_rows[g²]`` in JAX without materializing ``g``: inside
:func:`capture`, the output ``y`` of every supported layer goes through a custom-VJP identity ``y ↦ y + 0·probe`` whose
backward pass returns the cotangent ``g`` unchanged to the layer and
``mean_rows(g²)`` (float32, shape of the output units) as the cotangent of
``probe``. ``probe`` is a zero array in the ``'mac_probes'`` collection, laid out by
:func:`mac_optax.smac.probes_like`; differentiate the loss with
respect to the probes as well as the parameters and the probes' gradients
are the statistics. ``g`` is the cotangent of the differentiated loss, so
with a mean loss the per-example gradients carry the ``1/B`` of the mean, as
in the reference's backward hooks.

Cost: per layer and step, one elementwise square and one reduction of the
output cotangent in the backward pass (as much as a bias gradient), one
``d_out`` vector of probes and its gradient; state: one ``d_out`` EMA per
layer. A layer called several times gets the sum of its calls' statistics.

Differences from the reference kept on purpose: the EMA is bias-corrected
with the number of statistics folded into it (the reference's counter
advances only on ``Tinv`` steps); statistics are folded every ``cov_every``
steps and ``Z`` is refreshed every ``inv_every`` steps.

Example::

    probes = mac_optax.smac.probes_like(model, variables, x)
    def loss_fn(params, probes, x, y):
      with mac_optax.linen.capture(), mac_optax.smac.capture():
        logits, v = model.apply({'params': params, 'mac_probes': probes}, x,
                                mutable=['intermediates'])
      return loss(logits, y), v['intermediates']
    (l, inter), (grads, grad_sq) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, probes, x, y)
    tx = optax.chain(mac_optax.smac.scale_by_grad_sq(), mac_optax.mac_sgd(0.1))
    updates, state = tx.update(grads, state, params, intermediates=inter,
                               grad_sq=grad_sq)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mac_optax._src import ema
from mac_optax._src import hyperparameters
from mac_optax._src import statistics

PROBES = 'mac_probes'   # the collection of probe variables
GRAD_SQ = 'mac_grad_sq'  # the probe's name at each layer's path


class SmacLayerState(NamedTuple):
  """Gradient statistics of one layer."""
  grad_sq: jax.Array   # [*out] EMA of E_rows[g²], not bias-corrected (the
                       # probe's shape: batched layers keep their batch axes)
  count: jax.Array     # [] int32, statistics folded so far
  scale: jax.Array     # [*out] Z = 1/(ẑ+λ) in use (refreshed every
                       # `inv_every` steps)


class SmacState(NamedTuple):
  """State of :func:`scale_by_grad_sq`."""
  step: jax.Array                      # [] int32
  layers: dict[str, SmacLayerState]    # by module path


_MISSING = (
    'smac: update() needs the probe gradients as `grad_sq=`: differentiate '
    "the loss w.r.t. the 'mac_probes' variables (from "
    'mac_optax.smac.probes_like) applied under mac_optax.smac.capture().')


def _probe_leaves(grad_sq: Any) -> dict[str, jax.Array]:
  """``{layer path: statistic}`` from a tree of probe gradients."""
  if isinstance(grad_sq, dict) and set(grad_sq) == {PROBES}:
    grad_sq = grad_sq[PROBES]
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(grad_sq)[0]:
    names = [statistics.key_name(k) for k in path]
    if GRAD_SQ in names:
      found['/'.join(names[:names.index(GRAD_SQ)])] = leaf
  return found


def unscaled_layers(plan: Any, probes: Any) -> tuple[str, ...]:
  """The layers of a MAC plan that SMAC leaves with ``Z = 1`` (no probe).

  Args:
    plan: the :class:`mac_optax.LayerPlan` given to ``mac``.
    probes: the probes (:func:`probes_like`).

  Returns:
    The plan's layer keys without a probe: ``Embed.attend`` tables, lookups,
    hand-sown layers (module docstring). Empty when SMAC covers every layer.
  """
  probed = set(_probe_leaves(probes))
  return tuple(layer.key for layer in plan.layers
               if layer.statistic == statistics.LOOKUP_MEAN
               or layer.statistic == statistics.ATTEND_MEAN
               or layer.path not in probed)


def _empty(shape) -> SmacLayerState:
  # Distinct buffers: a jitted step may donate the state.
  return SmacLayerState(jnp.zeros(shape, jnp.float32), jnp.zeros([], jnp.int32),
                        jnp.zeros(shape, jnp.float32))


def scale_by_grad_sq(
    damping: float | jax.Array = 1.0,
    stat_decay: float | jax.Array = 0.95,
    *,
    cov_every: int = 1,
    inv_every: int = 1,
    probes_like: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """SMAC's gradient factor: scale each layer's output columns by ``1/(ẑ+λ)``.

  For the layer at path ``p`` with probe gradient ``z_t = E_rows[g²]``::

      m_t = β m_{t−1} + (1−β) z_t      (steps t % cov_every == 0)
      ẑ = m_t / (1 − β^n)              (n = statistics folded so far)
      Z = 1 / (ẑ + λ)                  (refreshed on steps t % inv_every == 0)
      kernel[..., c] ← kernel[..., c] · Z_c,   bias[c] ← bias[c] · Z_c

  Chain it with :func:`mac_optax.mac` (either order: ``Z`` scales columns).

  Args:
    damping: ``λ > 0``.
    stat_decay: ``β ∈ [0, 1)``.
    cov_every: fold statistics every ``cov_every`` steps.
    inv_every: refresh ``Z`` every ``inv_every`` steps.
    probes_like: optional probes tree (:func:`probes_like`) to build the
      full state in ``init`` (otherwise it is created at the first update).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    probes' gradients as ``grad_sq=``.

  Example:
    >>> tx = optax.chain(scale_by_grad_sq(1.0, 0.95), mac_optax.mac_sgd(0.1))
  """
  hyperparameters.check('smac', damping=damping, stat_decay=stat_decay,
                        cov_every=cov_every, inv_every=inv_every)
  template = {} if probes_like is None else _probe_leaves(probes_like)

  def init_fn(params):
    del params
    return SmacState(jnp.zeros([], jnp.int32),
                     {k: _empty(v.shape)
                      for k, v in template.items()})

  def update_fn(updates, state, params=None, *, grad_sq=None, **extra):
    del params, extra
    if grad_sq is None:
      raise ValueError(_MISSING)
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    paths = statistics.leaf_paths(updates)
    fold = state.step % cov_every == 0
    refresh = state.step % inv_every == 0
    layers = dict(state.layers)
    for key, z in _probe_leaves(grad_sq).items():
      path = tuple(key.split('/')) if key else ()
      kernel_index = paths.get(path + ('kernel',))
      if kernel_index is None:
        raise ValueError(f"smac: a probe at '{key}' has no parameter "
                         f"'{key}/kernel' in the gradients.")
      kernel = leaves[kernel_index]
      trailing = kernel.shape[kernel.ndim - z.ndim:]
      if z.ndim > kernel.ndim or any(
          n not in (1, k) for n, k in zip(z.shape, trailing)):
        raise ValueError(
            f"smac: layer '{key}': statistic of shape {z.shape} does not "
            f'match the output axes of its kernel {kernel.shape}.')
      layer = layers.get(key) or _empty(z.shape)
      folded = ema.fold(ema.Ema(layer.grad_sq, layer.count), z, stat_decay,
                        fold)
      scale = jnp.where(refresh,
                        1.0 / (ema.debiased(folded, stat_decay) + damping),
                        layer.scale)
      layers[key] = SmacLayerState(folded.mean, folded.count, scale)
      leaves[kernel_index] = (kernel * scale).astype(kernel.dtype)
      bias_index = paths.get(path + ('bias',))
      if bias_index is not None:
        bias = leaves[bias_index]
        if bias.size != scale.size:
          raise ValueError(
              f"smac: layer '{key}': a bias of shape {bias.shape} does not "
              f'match its statistic of shape {z.shape} (one entry per output '
              'unit and batch index).')
        leaves[bias_index] = (bias * scale.reshape(bias.shape)).astype(
            bias.dtype)
    new_state = SmacState(optax.safe_increment(state.step), layers)
    return jax.tree_util.tree_unflatten(treedef, leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
