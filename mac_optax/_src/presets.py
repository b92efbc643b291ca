"""The authors' published recipes as ready optimizers.

Each function returns the paper's whole optimizer (its published recipes) built on
:func:`mac_optax.mac_sgd`: MAC (exact first layer optional) → weight decay
(never preconditioned) → heavy-ball momentum → ``−lr``.

=========  =====  ==============  ====  ===  =====================  =========  ==========================
recipe     lr     momentum        β     λ    weight decay           Tcov/Tinv  schedule
=========  =====  ==============  ====  ===  =====================  =========  ==========================
cifar      0.1    0.9             0.95  1.0  5e-4 coupled, all      5/50       cosine
imagenet   0.5    0.9             0.95  1.0  2e-5 decoupled, ¬norm  5/50       warmup + cosine
vit        0.5    0.9             0.99  3.0  1e-4 decoupled, ≥2-D   5/5        warmup + cosine
nanogpt    1e-3   0.9 Nesterov    0.95  1.0  0.1 decoupled, ≥2-D    5/5        warmup, cosine to 6e-5
=========  =====  ==============  ====  ===  =====================  =========  ==========================

``nanogpt`` clips the gradient's global norm to 1.0 before preconditioning.
The learning rates refer to the authors' batch sizes (128, 1024, 1024,
32×512 tokens). The reference applies weight decay to every parameter in the
CIFAR recipe (its ``momentum_step``); the masks of the other recipes follow
the table: ``imagenet`` leaves normalization scales and biases alone
(:func:`not_norm_mask`), ``vit``/``nanogpt`` decay only parameters with at
least two dimensions (:func:`matrix_mask`).

Deliberate differences from the reference: the EMA of mean inputs is
bias-corrected with each layer's own number of folded statistics (the
reference's counter advances once per fold step, as ours, so the two agree
unless a non-finite batch is skipped); schedules are per step (the
reference's CIFAR cosine steps per epoch).

Every function lists all of :func:`mac_optax.mac_sgd`'s and
:func:`mac_optax.mac`'s keywords with the recipe's values as defaults, plus
``smac=True`` for the SMAC gradient factor
(:func:`mac_optax.smac.scale_by_grad_sq`; ``update`` then also needs
``grad_sq=``). ``exact_layers=`` takes the exact first layer (see
:func:`mac_optax.first_layer.exact_first_layer`).

Each preset can be wrapped by ``optax.inject_hyperparams`` with
``static_args=STATIC_ARGS`` (the schedule lengths, the cadences, the mask
function and the dtype are not hyperparameters to trace); ``learning_rate``
is then the schedule's peak, an array in the state that can be changed
between steps::

    tx = optax.inject_hyperparams(mac_optax.presets.vit,
                                  static_args=mac_optax.presets.STATIC_ARGS)(
        total_steps=1000, warmup_steps=50, weight_decay=1e-4)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from mac_optax._src import alias
from mac_optax._src import smac as smac_lib

# The table above, by recipe (values used by the functions below).
RECIPES: dict[str, dict[str, Any]] = {
    'cifar': dict(learning_rate=0.1, momentum=0.9, nesterov=False,
                  stat_decay=0.95, damping=1.0, weight_decay=5e-4,
                  decoupled_weight_decay=False, cov_every=5, inv_every=50,
                  clip_norm=None, batch_size=128),
    'imagenet': dict(learning_rate=0.5, momentum=0.9, nesterov=False,
                     stat_decay=0.95, damping=1.0, weight_decay=2e-5,
                     decoupled_weight_decay=True, cov_every=5, inv_every=50,
                     clip_norm=None, batch_size=1024),
    'vit': dict(learning_rate=0.5, momentum=0.9, nesterov=False,
                stat_decay=0.99, damping=3.0, weight_decay=1e-4,
                decoupled_weight_decay=True, cov_every=5, inv_every=5,
                clip_norm=None, batch_size=1024),
    'nanogpt': dict(learning_rate=1e-3, momentum=0.9, nesterov=True,
                    stat_decay=0.95, damping=1.0, weight_decay=0.1,
                    decoupled_weight_decay=True, cov_every=5, inv_every=5,
                    clip_norm=1.0, batch_size=32 * 512),
}


def not_norm_mask(params: Any) -> Any:
  """``True`` for every parameter except normalization layers' scale and bias.

  A normalization layer is a module whose parameters include ``scale`` and no
  ``kernel``/``embedding`` (Flax ``BatchNorm``, ``LayerNorm``, ``GroupNorm``,
  ``RMSNorm``); a Dense/Conv ``bias`` stays decayed.
  """
  def walk(tree):
    if not isinstance(tree, Mapping):
      return True
    is_norm = ('scale' in tree and 'kernel' not in tree
               and 'embedding' not in tree)
    return type(tree)({k: (jax.tree.map(lambda _: False, v) if is_norm
                           and not isinstance(v, Mapping) else walk(v))
                       for k, v in tree.items()})
  return walk(params)


def matrix_mask(params: Any) -> Any:
  """``True`` for parameters with at least two dimensions (no 1-D, no bias)."""
  return jax.tree.map(lambda p: getattr(p, 'ndim', 0) >= 2, params)


# Arguments to keep static under `optax.inject_hyperparams`: schedule lengths
# (Python ints in the schedules' arithmetic), the cadences (they shape the
# state), and the callables that `inject_hyperparams` would otherwise call as
# schedules (the weight decay mask, a dtype).
STATIC_ARGS = ('total_steps', 'warmup_steps', 'cov_every', 'inv_every',
               'weight_decay_mask', 'stat_dtype')

# Parameters of the preset functions that are not `mac_sgd` keywords.
_OWN = ('total_steps', 'warmup_steps', 'learning_rate', 'end_learning_rate',
        'smac')


def _build(schedule: optax.Schedule, options: dict[str, Any]
           ) -> optax.GradientTransformationExtraArgs:
  """`mac_sgd` with the preset's keywords, SMAC in front when asked for."""
  use_smac = options['smac']
  kwargs = {k: v for k, v in options.items() if k not in _OWN}
  tx = alias.mac_sgd(schedule, **kwargs)
  if not use_smac:
    return tx
  return optax.chain(
      smac_lib.scale_by_grad_sq(kwargs['damping'], kwargs['stat_decay'],
                                cov_every=kwargs['cov_every'],
                                inv_every=kwargs['inv_every']),
      tx)


def _warmup_cosine(learning_rate, total_steps, warmup_steps, end_value=0.0):
  """Linear warmup from 0, then cosine to ``end_value`` at ``total_steps``.

  ``optax.warmup_cosine_decay_schedule`` tests ``peak_value == 0`` in Python,
  which a peak learning rate traced by ``optax.inject_hyperparams`` cannot
  answer; the same schedule is written here without the test.
  """
  warmup_steps = max(int(warmup_steps), 0)
  decay_steps = max(int(total_steps), warmup_steps + 1) - warmup_steps

  def cosine(count):
    t = jnp.minimum(count, decay_steps) / decay_steps
    return end_value + (learning_rate - end_value) * 0.5 * (
        1 + jnp.cos(jnp.pi * t))

  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps), cosine],
      [warmup_steps])


def cifar(
    total_steps: int,
    *,
    warmup_steps: int = 0,
    learning_rate: float = 0.1,
    momentum: Optional[float] = 0.9,
    nesterov: bool = False,
    weight_decay: float = 5e-4,
    decoupled_weight_decay: bool = False,
    weight_decay_mask: Any = None,
    clip_norm: Optional[float] = None,
    damping: float = 1.0,
    stat_decay: float = 0.95,
    cov_every: int = 5,
    inv_every: int = 50,
    smac: bool = False,
    plan: Any = None,
    exact_inverse: bool = False,
    axis_name: Optional[str] = None,
    stat_dtype: Any = None,
    intermediates_like: Any = None,
    exact_layers: Optional[Mapping[str, Any]] = None,
    optional_layers: Any = (),
) -> optax.GradientTransformationExtraArgs:
  """The CIFAR ResNet/DenseNet/WRN recipe (batch 128, 200 epochs).

  ``lr 0.1`` with per-step cosine decay to 0 over ``total_steps``, momentum
  0.9, coupled L2 ``5e-4`` on every parameter (added after preconditioning),
  ``β = 0.95``, ``λ = 1``, statistics every 5 steps, preconditioner refreshed
  every 50.

  Args:
    total_steps: length of the cosine schedule.
    warmup_steps: linear warmup before the cosine (0 in the recipe).
    learning_rate: peak learning rate.
    momentum: see :func:`mac_optax.mac_sgd`, as are the other keywords.
    nesterov: Nesterov momentum.
    weight_decay: coupled L2 coefficient.
    decoupled_weight_decay: decoupled instead of coupled weight decay.
    weight_decay_mask: decayed parameters (``None``: all).
    clip_norm: gradient clipping before preconditioning (``None``: none).
    damping: ``λ``.
    stat_decay: ``β``.
    cov_every: ``Tcov``.
    inv_every: ``Tinv``.
    smac: put :func:`mac_optax.smac.scale_by_grad_sq` in front.
    plan: see :func:`mac_optax.mac`.
    exact_inverse: see :func:`mac_optax.mac`.
    axis_name: see :func:`mac_optax.mac`.
    stat_dtype: see :func:`mac_optax.mac`.
    intermediates_like: see :func:`mac_optax.mac`.
    exact_layers: ``{path: P}`` for the exact first layer
      (:func:`mac_optax.first_layer.exact_first_layer`), as in the paper.
    optional_layers: see :func:`mac_optax.mac`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes
    ``intermediates=`` (and ``grad_sq=`` with ``smac=True``).

  Example:
    >>> exact = mac_optax.first_layer.exact_first_layer(
    ...     model, variables, train_batches, 'Conv_0')
    >>> tx = mac_optax.presets.cifar(200 * 391, exact_layers=exact)
  """
  options = dict(locals())
  if warmup_steps:
    schedule = _warmup_cosine(learning_rate, total_steps, warmup_steps)
  else:
    schedule = optax.cosine_decay_schedule(learning_rate, total_steps)
  return _build(schedule, options)


def imagenet(
    total_steps: int,
    warmup_steps: int,
    *,
    learning_rate: float = 0.5,
    momentum: Optional[float] = 0.9,
    nesterov: bool = False,
    weight_decay: float = 2e-5,
    decoupled_weight_decay: bool = True,
    weight_decay_mask: Any = not_norm_mask,
    clip_norm: Optional[float] = None,
    damping: float = 1.0,
    stat_decay: float = 0.95,
    cov_every: int = 5,
    inv_every: int = 50,
    smac: bool = False,
    plan: Any = None,
    exact_inverse: bool = False,
    axis_name: Optional[str] = None,
    stat_dtype: Any = None,
    intermediates_like: Any = None,
    exact_layers: Optional[Mapping[str, Any]] = None,
    optional_layers: Any = (),
) -> optax.GradientTransformationExtraArgs:
  """The ImageNet ResNet-50/101 recipe (batch 1024, 100 epochs, 5 warmup).

  ``lr 0.5``, linear warmup over ``warmup_steps`` then cosine to 0 at
  ``total_steps``, momentum 0.9, decoupled weight decay ``2e-5`` except on
  normalization layers, ``β = 0.95``, ``λ = 1``, cadences 5/50. The keywords
  are those of :func:`cifar` with this recipe's defaults.

  Example:
    >>> tx = mac_optax.presets.imagenet(100 * 1251, 5 * 1251)
  """
  options = dict(locals())
  schedule = _warmup_cosine(learning_rate, total_steps, warmup_steps)
  return _build(schedule, options)


def vit(
    total_steps: int,
    warmup_steps: int,
    *,
    learning_rate: float = 0.5,
    momentum: Optional[float] = 0.9,
    nesterov: bool = False,
    weight_decay: float = 1e-4,
    decoupled_weight_decay: bool = True,
    weight_decay_mask: Any = matrix_mask,
    clip_norm: Optional[float] = None,
    damping: float = 3.0,
    stat_decay: float = 0.99,
    cov_every: int = 5,
    inv_every: int = 5,
    smac: bool = False,
    plan: Any = None,
    exact_inverse: bool = False,
    axis_name: Optional[str] = None,
    stat_dtype: Any = None,
    intermediates_like: Any = None,
    exact_layers: Optional[Mapping[str, Any]] = None,
    optional_layers: Any = (),
) -> optax.GradientTransformationExtraArgs:
  """The DeiT-S / Swin-T recipe (batch 1024, 100 epochs, 5 warmup).

  ``lr 0.5``, warmup then cosine, momentum 0.9, decoupled weight decay
  ``1e-4`` on parameters with at least two dimensions, ``β = 0.99``,
  ``λ = 3``, cadences 5/5. The paper preconditions the patch embedding
  exactly: pass ``exact_layers=`` for it. The keywords are those of
  :func:`cifar` with this recipe's defaults.

  Example:
    >>> tx = mac_optax.presets.vit(100 * 1251, 5 * 1251)
  """
  options = dict(locals())
  schedule = _warmup_cosine(learning_rate, total_steps, warmup_steps)
  return _build(schedule, options)


def nanogpt(
    total_steps: int,
    warmup_steps: int = 2000,
    *,
    learning_rate: float = 1e-3,
    end_learning_rate: float = 6e-5,
    momentum: Optional[float] = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.1,
    decoupled_weight_decay: bool = True,
    weight_decay_mask: Any = matrix_mask,
    clip_norm: Optional[float] = 1.0,
    damping: float = 1.0,
    stat_decay: float = 0.95,
    cov_every: int = 5,
    inv_every: int = 5,
    smac: bool = False,
    plan: Any = None,
    exact_inverse: bool = False,
    axis_name: Optional[str] = None,
    stat_dtype: Any = None,
    intermediates_like: Any = None,
    exact_layers: Optional[Mapping[str, Any]] = None,
    optional_layers: Any = (),
) -> optax.GradientTransformationExtraArgs:
  """The nanoGPT recipe (batch 32 × 512 tokens).

  ``lr 1e-3``, linear warmup over ``warmup_steps`` then cosine to ``6e-5`` at
  ``total_steps``, Nesterov momentum 0.9, decoupled weight decay ``0.1`` on
  2-D parameters, gradient clipping to global norm 1.0 before
  preconditioning, ``β = 0.95``, ``λ = 1``, cadences 5/5. The keywords are
  those of :func:`cifar` with this recipe's defaults.

  With ``smac=True`` the SMAC column scaling comes before the clipping.

  Example:
    >>> tx = mac_optax.presets.nanogpt(5000, warmup_steps=200)
  """
  options = dict(locals())
  schedule = _warmup_cosine(learning_rate, total_steps, warmup_steps,
                            end_learning_rate)
  return _build(schedule, options)
