"""Muon and MAC compositions as benchmark peers (issue 15).

Each name builds a :class:`benchmarks.steps.Trainer` with the same contract
as the others in ``steps.py``: the optimizer is built with learning rate 1 and
the jitted step applies ``params + lr · updates``, so one compilation serves
every learning rate of a grid and every value of the cosine schedule. No
optimizer here clips gradients (none of the others does); weight decay is
``steps.ADAMW_WD`` on every parameter, as AdamW's (no mask).

- ``muon``: ``optax.contrib.muon`` with :func:`muon_dimension_numbers`: every
  2-D weight is a matrix (as in Muon's default), and so are convolution and
  multi-axis (``DenseGeneral``/``Einsum``) kernels, flattened to
  ``(reduction axes) × (output axes)``; biases (also attention's 2-D
  ``[heads, head_dim]`` ones) go to Adam; ``consistent_rms=0.2`` (Liu et al.
  2025) scales each matrix update to AdamW's RMS, so one learning rate serves
  the Muon and the Adam parameters and the grid is AdamW's.
- ``muon-default``: the same with ``muon_weight_dimension_numbers=None``
  (Muon's default: only 2-D parameters are matrices; conv and multi-axis
  kernels go to its Adam branch).
- ``mac-adam``: ``chain(mac(), scale_by_adam(), add_decayed_weights(wd),
  scale_by_learning_rate(1))`` — AdamW on MAC-preconditioned gradients.
- ``mac-muon``: ``chain(mac(), muon(...))`` — ``muon`` above on
  MAC-preconditioned gradients.

MAC keeps the benchmarks' λ = ``steps.MAC_DAMPING``, β = ``steps.MAC_STAT_DECAY``.
"""

from __future__ import annotations

import jax
import optax

import mac_optax
from benchmarks import steps

NAMES = ('muon', 'muon-default', 'mac-adam', 'mac-muon')
LABELS = {'muon': 'Muon', 'muon-default': 'Muon (default dims)',
          'mac-adam': 'MAC→Adam', 'mac-muon': 'MAC→Muon'}
MUON_RMS = 0.2
# Step-time/memory rows (§1/§2 under the newest jax) and convergence rows.
SPEED = ('sgd', 'adamw', 'mac', 'kfac', 'muon', 'muon-default')
CONVERGE = ('sgd', 'adamw', 'mac', 'kfac', 'muon', 'muon-default', 'mac-adam',
            'mac-muon')
_ATTENTION_IN = ('query', 'key', 'value')
# The einsum decoder of examples/gemma_decoder.py: q [d, heads, head_dim] is
# one matrix d × (heads·head_dim); kv [d, 2, kv_heads, head_dim] and the
# gated MLP's [d, 2, hidden] are two matrices each (axis 1 a batch axis).
# Its attention output [heads, head_dim, d] takes the rule below.
_EINSUM = {
    'q_einsum': optax.contrib.MuonDimensionNumbers(0, (1, 2)),
    'kv_einsum': optax.contrib.MuonDimensionNumbers(0, (2, 3)),
    'gating_einsum': optax.contrib.MuonDimensionNumbers(0, 2),
} if hasattr(optax.contrib, 'MuonDimensionNumbers') else {}


def _dims(path, leaf):
  names = [getattr(k, 'key', getattr(k, 'name', str(k))) for k in path]
  if names[-1] == 'bias':   # attention's [heads, head_dim] biases too
    return None
  if leaf.ndim == 2:
    return optax.contrib.MuonDimensionNumbers(0, 1)
  if leaf.ndim < 2 or names[-1] != 'kernel':
    return None
  if len(names) > 1 and names[-2] in _EINSUM:
    return _EINSUM[names[-2]]
  if len(names) > 1 and names[-2] in _ATTENTION_IN:
    # DenseGeneral [d_model, heads, head_dim]: one input axis, two outputs.
    return optax.contrib.MuonDimensionNumbers(0, tuple(range(1, leaf.ndim)))
  # Conv [*window, in, out] and the attention output [heads, head_dim, d]:
  # every axis but the last is contracted with the input.
  return optax.contrib.MuonDimensionNumbers(tuple(range(leaf.ndim - 1)),
                                            leaf.ndim - 1)


def muon_dimension_numbers(params):
  """Every 2-D weight and every multi-axis kernel as a matrix; else None.

  Biases go to Adam, also the 2-D ``[heads, head_dim]`` biases of attention
  that Muon's default would orthogonalize.
  """
  return jax.tree_util.tree_map_with_path(_dims, params)


def muon(learning_rate=1.0, default_dims=False):
  return optax.contrib.muon(
      learning_rate, weight_decay=steps.ADAMW_WD,
      adam_weight_decay=steps.ADAMW_WD, consistent_rms=MUON_RMS,
      muon_weight_dimension_numbers=(None if default_dims
                                     else muon_dimension_numbers))


def _tail(name):
  if name == 'mac-adam':
    return optax.chain(optax.scale_by_adam(),
                       optax.add_decayed_weights(steps.ADAMW_WD),
                       optax.scale_by_learning_rate(1.0))
  return muon()


def _mac_chain(name, **mac_kwargs):
  return optax.chain(
      mac_optax.mac(steps.MAC_DAMPING, steps.MAC_STAT_DECAY, **mac_kwargs),
      _tail(name))


def make_trainer(name: str, model, plan=None) -> steps.Trainer:
  """The jitted train step of `name` (one of :data:`NAMES`) for `model`."""

  if name in ('muon', 'muon-default'):
    return steps.optax_trainer(
        name, muon(default_dims=name == 'muon-default'), model)

  if name in ('mac-adam', 'mac-muon'):
    return steps.mac_trainer(
        name, lambda **kw: _mac_chain(name, **kw), model, plan)

  raise ValueError(f'unknown optimizer {name!r}')
