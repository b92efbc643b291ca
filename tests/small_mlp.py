"""A two-layer MLP classifier shared by the training-loop tests.

Shapes only are traced at init (no eager Flax init), parameters are numpy
random numbers, and the gradient function captures MAC's statistics.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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
