"""CI's wheel stage: the wheel, installed alone into a fresh environment, works.

Run by .ci/run with that environment's Python from outside the checkout, so
`mac_optax` is the installed wheel's. Only the package's own dependencies are
there (no test or examples extra); tqdm is blocked in case some dependency
brings it, because `exact_first_layer` must not need it.
"""

import importlib.resources
import sys

sys.modules['tqdm'] = None  # any tqdm import now fails

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mac_optax  # noqa: E402
from mac_optax import linen as mac_linen  # noqa: E402

assert 'site-packages' in mac_optax.__file__, mac_optax.__file__
assert importlib.resources.files('mac_optax').joinpath('py.typed').is_file()


class Stem(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name='Conv_0')(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


model = Stem()
batches = [np.random.default_rng(i).normal(size=(4, 6, 6, 2)).astype(np.float32)
           for i in range(3)]
variables = model.init(jax.random.key(0), batches[0])
exact = mac_optax.first_layer.exact_first_layer(
    model, variables, batches, 'Conv_0', damping=1.0)
assert exact['Conv_0'].shape == (1, 19, 19), exact['Conv_0'].shape

plan = mac_linen.plan(model, variables, batches[0][:1])
tx = mac_optax.mac_sgd(0.1, momentum=0.9, plan=plan, exact_layers=exact)
params = variables['params']
state = tx.init(params)
y = jnp.arange(4) % 3


def loss_fn(params):
  with mac_linen.capture():
    logits, v = model.apply({'params': params}, batches[0],
                            mutable=['intermediates'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, v['intermediates']


(loss, inter), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
updates, state = tx.update(grads, state, params, intermediates=inter)
assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
assert callable(mac_optax.nnx.plan)
print('mac_optax', mac_optax.__version__, 'from the wheel: exact first layer',
      exact['Conv_0'].shape, 'and one mac_sgd step, loss', f'{float(loss):.4f}')
