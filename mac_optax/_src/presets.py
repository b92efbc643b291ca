"""The authors' published recipes as ready optimizers.

Each function returns the paper's whole optimizer (spec §5) built on
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

Deliberate differences from the reference (spec §2): the EMA of mean inputs
is bias-corrected with each layer's own number of folded statistics (the
reference advances one global counter once per hooked layer and fold, or
only on ``Tinv`` steps in other versions); schedules are per step (the
reference's CIFAR cosine steps per epoch).

Every function takes ``exact_layers=`` (see
:func:`mac_optax.first_layer.exact_first_layer`), ``smac=True`` for the SMAC
gradient factor (:func:`mac_optax.smac.scale_by_grad_sq`, then ``update``
also needs ``grad_sq=``), and any further keyword of :func:`mac_optax.mac_sgd`
/ :func:`mac_optax.mac` to override a value.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import optax

from mac_optax._src import alias
from mac_optax._src import smac as smac_lib

# The spec §5 table, by recipe (values used by the functions below).
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


def _build(recipe: str, schedule: optax.Schedule, mask, overrides) -> Any:
  values = {k: v for k, v in RECIPES[recipe].items()
            if k not in ('learning_rate', 'batch_size')}
  use_smac = overrides.pop('smac', False)
  values['weight_decay_mask'] = mask
  values.update(overrides)
  tx = alias.mac_sgd(schedule, **values)
  if not use_smac:
    return tx
  return optax.chain(
      smac_lib.scale_by_grad_sq(values['damping'], values['stat_decay'],
                                cov_every=values['cov_every'],
                                inv_every=values['inv_every']),
      tx)


def cifar(total_steps: int, *, learning_rate: float = 0.1,
          exact_layers: Optional[Mapping[str, Any]] = None,
          **overrides: Any) -> optax.GradientTransformationExtraArgs:
  """The CIFAR ResNet/DenseNet/WRN recipe (batch 128, 200 epochs).

  ``lr 0.1`` with per-step cosine decay to 0 over ``total_steps``, momentum
  0.9, coupled L2 ``5e-4`` on every parameter (added after preconditioning),
  ``β = 0.95``, ``λ = 1``, statistics every 5 steps, preconditioner refreshed
  every 50.

  Args:
    total_steps: length of the cosine schedule.
    learning_rate: peak learning rate.
    exact_layers: ``{path: P}`` for the exact first layer
      (:func:`mac_optax.first_layer.exact_first_layer`), as in the paper.
    **overrides: any keyword of :func:`mac_optax.mac_sgd`/:func:`mac_optax.mac`
      (``momentum``, ``weight_decay``, ``cov_every``, ...), or ``smac=True``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes
    ``intermediates=`` (and ``grad_sq=`` with ``smac=True``).

  Example:
    >>> exact = mac_optax.first_layer.exact_first_layer(
    ...     model, variables, train_batches, 'Conv_0')
    >>> tx = mac_optax.presets.cifar(200 * 391, exact_layers=exact)
  """
  schedule = optax.cosine_decay_schedule(learning_rate, total_steps)
  overrides.setdefault('exact_layers', exact_layers)
  return _build('cifar', schedule, None, overrides)


def _warmup_cosine(learning_rate, total_steps, warmup_steps, end_value=0.0):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate,
      warmup_steps=max(int(warmup_steps), 0),
      decay_steps=max(int(total_steps), int(warmup_steps) + 1),
      end_value=end_value)


def imagenet(total_steps: int, warmup_steps: int, *,
             learning_rate: float = 0.5,
             exact_layers: Optional[Mapping[str, Any]] = None,
             **overrides: Any) -> optax.GradientTransformationExtraArgs:
  """The ImageNet ResNet-50/101 recipe (batch 1024, 100 epochs, 5 warmup).

  ``lr 0.5``, linear warmup over ``warmup_steps`` then cosine to 0 at
  ``total_steps``, momentum 0.9, decoupled weight decay ``2e-5`` except on
  normalization layers, ``β = 0.95``, ``λ = 1``, cadences 5/50.

  Example:
    >>> tx = mac_optax.presets.imagenet(100 * 1251, 5 * 1251)
  """
  schedule = _warmup_cosine(learning_rate, total_steps, warmup_steps)
  overrides.setdefault('exact_layers', exact_layers)
  return _build('imagenet', schedule, not_norm_mask, overrides)


def vit(total_steps: int, warmup_steps: int, *, learning_rate: float = 0.5,
        exact_layers: Optional[Mapping[str, Any]] = None,
        **overrides: Any) -> optax.GradientTransformationExtraArgs:
  """The DeiT-S / Swin-T recipe (batch 1024, 100 epochs, 5 warmup).

  ``lr 0.5``, warmup then cosine, momentum 0.9, decoupled weight decay
  ``1e-4`` on parameters with at least two dimensions, ``β = 0.99``,
  ``λ = 3``, cadences 5/5. The paper preconditions the patch embedding
  exactly: pass ``exact_layers=`` for it.

  Example:
    >>> tx = mac_optax.presets.vit(100 * 1251, 5 * 1251)
  """
  schedule = _warmup_cosine(learning_rate, total_steps, warmup_steps)
  overrides.setdefault('exact_layers', exact_layers)
  return _build('vit', schedule, matrix_mask, overrides)


def nanogpt(total_steps: int, warmup_steps: int = 2000, *,
            learning_rate: float = 1e-3, end_learning_rate: float = 6e-5,
            **overrides: Any) -> optax.GradientTransformationExtraArgs:
  """The nanoGPT recipe (batch 32 × 512 tokens).

  ``lr 1e-3``, linear warmup over ``warmup_steps`` then cosine to ``6e-5`` at
  ``total_steps``, Nesterov momentum 0.9, decoupled weight decay ``0.1`` on
  2-D parameters, gradient clipping to global norm 1.0 before
  preconditioning, ``β = 0.95``, ``λ = 1``, cadences 5/5.

  With ``smac=True`` the SMAC column scaling comes before the clipping.

  Example:
    >>> tx = mac_optax.presets.nanogpt(5000, warmup_steps=200)
  """
  schedule = _warmup_cosine(learning_rate, total_steps, warmup_steps,
                            end_learning_rate)
  return _build('nanogpt', schedule, matrix_mask, overrides)
