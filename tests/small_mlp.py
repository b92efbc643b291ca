"""A two-layer MLP classifier shared by the training-loop tests.

Shapes only are traced at init (no eager Flax init), parameters are numpy
random numbers, and the gradient function captures MAC's statistics.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mac_optax
from mac_optax import linen as mac_linen


class Mlp(nn.Module):
  """Dense(6) → tanh → Dense(3)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(6)(x)))


def random_params(x, seed=0, scale=0.5):
  """Parameters of ``Mlp`` for inputs shaped like ``x``, ``N(0, scale²)``."""
  shapes = jax.eval_shape(Mlp().init, jax.random.PRNGKey(0), x)['params']
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def intermediates_like(params, x):
  return mac_linen.intermediates_like(Mlp(), {'params': params}, x)


def grads_and_statistics(params, x, y):
  """Cross-entropy gradients and the captured intermediates."""
  def loss_fn(params):
    with mac_linen.capture():
      logits, v = Mlp().apply({'params': params}, x,
                              mutable=['intermediates'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, v['intermediates']
  return jax.grad(loss_fn, has_aux=True)(params)


def planned_batches(seed: int, batches: int = 3):
  """``(params, plan, [(grads, statistics)] * batches)`` of random data."""
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(batches, 8, 5)).astype(np.float32) + 0.5
  ys = rng.integers(0, 3, size=(batches, 8)).astype(np.int32)
  params = random_params(xs[0])
  plan = mac_linen.plan(Mlp(), {'params': params}, xs[0])
  return params, plan, [grads_and_statistics(params, x, y)
                        for x, y in zip(xs, ys)]


def checkpoint_run(steps, batch):
  """``(tx, params, xs, ys)`` of the checkpoint/resume tests (plan path).

  ``inv_every=3``: the refreshed ā and the step counter must both resume.
  """
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(steps, batch, 5)).astype(np.float32) + 0.5
  ys = rng.integers(0, 3, size=(steps, batch)).astype(np.int32)
  params = random_params(xs[0])
  plan = mac_linen.plan(Mlp(), {'params': params}, xs[0])
  tx = mac_optax.mac_sgd(0.1, momentum=0.9, damping=0.5, stat_decay=0.9,
                         inv_every=3, plan=plan)
  return tx, params, xs, ys


def train_step(tx):
  """A jitted MAC training step of the MLP."""
  @jax.jit
  def step(params, state, x, y):
    grads, inter = grads_and_statistics(params, x, y)
    updates, state = tx.update(grads, state, params, intermediates=inter)
    return optax.apply_updates(params, updates), state
  return step
