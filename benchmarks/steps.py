"""Jitted train steps for SGD-momentum, AdamW, MAC and kfac-jax, one API.

``make_trainer(name, model, hyper)`` returns a :class:`Trainer` whose
``init(params, batch)`` builds the state and whose ``step(state, batch, lr)``
is the whole jitted train step (forward — with ``capture()`` for MAC —,
backward, optimizer update, parameter update). Every optimizer is built with
learning rate 1 and the step applies ``params + lr · updates``, so one
compilation serves every learning rate of a grid and every schedule value;
for these optimizers that is exactly ``optax``'s ``lr`` scaling.

kfac-jax is used through its optax interface (spec §6)::

    precond = kfac_jax.OptaxPreconditioner(loss, damping=...,
        distributed_inverses=False, distributed_precon_apply=False)
    tx = optax.chain(precond.as_gradient_transform(), optax.sgd(1, 0.9))

with ``precond.maybe_update`` (its own forward/backward for the curvature)
and ``precond.increment_count`` inside the same jitted step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import mac_optax

OPTIMIZERS = ('sgd', 'adamw', 'mac', 'kfac')
LABELS = {'sgd': 'SGD-momentum', 'adamw': 'AdamW', 'mac': 'MAC',
          'kfac': 'kfac-jax'}

# Defaults shared by speed, memory and convergence benchmarks.
MOMENTUM = 0.9
ADAMW_WD = 1e-4
MAC_DAMPING = 1.0
MAC_STAT_DECAY = 0.95
KFAC_DAMPING = 1e-2   # pilot on MNIST-1D: 1e-3 diverged at every lr of the grid
KFAC_INVERSE_EVERY = 5   # kfac-jax's default `inverse_update_period`


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


@dataclasses.dataclass
class Trainer:
  name: str
  init: Callable[..., Any]
  step: Callable[..., Any]            # jitted (state, batch, lr) -> (state, loss)
  opt_state_of: Callable[[Any], Any]  # the optimizer part of the state


def _apply_updates(params, updates, lr):
  return jax.tree_util.tree_map(
      lambda p, u: (p + lr * u.astype(jnp.float32)).astype(p.dtype),
      params, updates)


def optax_trainer(name: str, tx: optax.GradientTransformation,
                  model) -> Trainer:
  """The train step of a plain optax optimizer (``tx`` at lr 1, scaled by lr)."""

  def loss_fn(params, batch):
    x, y = batch
    return cross_entropy(model.apply({'params': params}, x), y)

  def init(params, batch):
    del batch
    return params, tx.init(params)

  def step(state, batch, lr):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (_apply_updates(params, updates, lr), opt_state), loss

  return Trainer(name, init, jax.jit(step, donate_argnums=0), lambda s: s[1])


def mac_trainer(name: str, make_tx, model, plan=None) -> Trainer:
  """The train step of a chain with MAC inside, statistics captured.

  Args:
    name: the optimizer's name.
    make_tx: ``(**mac keywords) -> the chain`` (``plan=`` or
      ``intermediates_like=`` go to its ``mac``).
    model: the linen model.
    plan: MAC's layer plan; None builds the state from the capture's shapes
      (the full per-layer state up front: no lazy extra trace).
  """
  tx = make_tx(**({} if plan is None else {'plan': plan}))

  def mac_loss(params, batch):
    x, y = batch
    with mac_optax.linen.capture():
      logits, captured = model.apply({'params': params}, x,
                                     mutable=['intermediates'])
    return cross_entropy(logits, y), captured['intermediates']

  def init(params, batch):
    if plan is not None:   # the plan already holds every layer's shapes
      return params, tx.init(params)
    like = jax.eval_shape(lambda p: mac_loss(p, batch)[1], params)
    return params, make_tx(intermediates_like=like).init(params)

  def step(state, batch, lr):
    params, opt_state = state
    (loss, inter), grads = jax.value_and_grad(mac_loss, has_aux=True)(
        params, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   intermediates=inter)
    return (_apply_updates(params, updates, lr), opt_state), loss

  return Trainer(name, init, jax.jit(step, donate_argnums=0), lambda s: s[1])


def make_trainer(name: str, model, *, kfac_inverse_every=KFAC_INVERSE_EVERY,
                 kfac_damping=KFAC_DAMPING, plan=None) -> Trainer:
  """The train step of optimizer `name` for linen `model` (softmax CE).

  Args:
    name: one of :data:`OPTIMIZERS`.
    model: the linen model.
    kfac_inverse_every: kfac-jax's inverse update period.
    kfac_damping: kfac-jax's damping.
    plan: MAC's layer plan (``mac_optax.linen.plan``). Needed by models with
      einsum layers, whose statistics only the plan can pair with their
      kernels; None builds MAC from the capture's shapes instead.
  """

  if name in ('sgd', 'adamw'):
    return optax_trainer(name, optax.sgd(1.0, momentum=MOMENTUM)
                         if name == 'sgd'
                         else optax.adamw(1.0, weight_decay=ADAMW_WD), model)

  if name == 'mac':
    return mac_trainer(
        name, lambda **kw: mac_optax.mac_sgd(
            1.0, MOMENTUM, damping=MAC_DAMPING, stat_decay=MAC_STAT_DECAY,
            **kw), model, plan)

  if name == 'kfac':
    import kfac_jax  # pylint: disable=g-import-not-at-top

    def kfac_loss(params, batch):
      x, y = batch
      logits = model.apply({'params': params}, x).astype(jnp.float32)
      kfac_jax.register_softmax_cross_entropy_loss(
          logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
      return cross_entropy(logits, y)

    precond = kfac_jax.OptaxPreconditioner(
        kfac_loss, damping=kfac_damping,
        inverse_update_period=kfac_inverse_every,
        distributed_inverses=False, distributed_precon_apply=False)
    tx = optax.chain(precond.as_gradient_transform(),
                     optax.sgd(1.0, momentum=MOMENTUM))

    def init(params, batch):
      pstate = precond.init((params, batch), jax.random.PRNGKey(0))
      return params, tx.init(params), pstate, jax.random.PRNGKey(1)

    def step(state, batch, lr):
      params, opt_state, pstate, rng = state
      rng, key = jax.random.split(rng)
      loss, grads = jax.value_and_grad(kfac_loss)(params, batch)
      pstate = precond.maybe_update(pstate, (params, batch), key)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     precond_state=pstate)
      pstate = precond.increment_count(pstate)
      return (_apply_updates(params, updates, lr), opt_state, pstate,
              rng), loss

    return Trainer(name, init, jax.jit(step, donate_argnums=0),
                   lambda s: (s[1], s[2]))

  raise ValueError(f'unknown optimizer {name!r}')


def tree_bytes(tree) -> int:
  return sum(int(x.size) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(tree) if hasattr(x, 'dtype'))


def short_error(err: BaseException, limit: int = 300) -> str:
  text = f'{type(err).__name__}: {err}'.replace('\n', ' ').replace('|', '/')
  return text if len(text) <= limit else text[:limit] + ' …'
