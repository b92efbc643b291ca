"""MAC against SGD-momentum: a small linen CNN on scikit-learn's digits.

Both optimizers train the same model from the same initial parameters on the
same sequence of mini-batches for the same number of steps; only the update
rule differs:

* MAC:  ``mac_optax.mac_sgd(lr, momentum)`` — gradients preconditioned with
  each layer's mean input (captured by ``mac_optax.linen.capture()``), then
  heavy-ball momentum and ``−lr``;
* SGD:  ``optax.sgd(lr, momentum)``.

The data are the 1797 8×8 handwritten digits bundled with scikit-learn
(``sklearn.datasets.load_digits``), split 75/25 into train and test sets.

Run::

    python examples/digits_cnn.py                 # ~15 s on 2 busy CPU cores
    python examples/digits_cnn.py --steps 5       # smoke run
    python examples/digits_cnn.py --epochs 10 --mac-lr 0.05 --seed 1
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import mac_optax
from mac_optax import linen as mac_linen
from digits_data import batch_indices
from digits_data import cross_entropy
from digits_data import load_data


class CNN(nn.Module):
  """Conv(16) → Conv(32, stride 2) → Dense(64) → Dense(10), ReLU."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(16, (3, 3))(x))                     # 8×8×16
    x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))     # 4×4×32
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    uses_mac: bool) -> Callable:
  """A jitted ``(params, opt_state, x, y) -> (params, opt_state, loss)``."""

  def loss_fn(params, x, y):
    if not uses_mac:
      return cross_entropy(model.apply({'params': params}, x), y), {}
    with mac_linen.capture():  # the model itself is unchanged
      logits, v = model.apply({'params': params}, x, mutable=['intermediates'])
    return cross_entropy(logits, y), v['intermediates']

  @jax.jit
  def train_step(params, opt_state, x, y):
    (loss, inter), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, x, y)
    extra = {'intermediates': inter} if uses_mac else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


@functools.partial(jax.jit, static_argnums=0)
def predict(model: nn.Module, params: Any, x: jax.Array) -> jax.Array:
  return jnp.argmax(model.apply({'params': params}, x), -1)


def train(name: str, model: nn.Module, params: Any,
          tx: optax.GradientTransformation, uses_mac: bool, data,
          batches: np.ndarray, progress: bool = True) -> dict[str, Any]:
  """Trains from `params`; returns final train loss, test accuracy, time."""
  x_train, x_test, y_train, y_test = data
  train_step = make_train_step(model, tx, uses_mac)
  opt_state = tx.init(params)
  losses = []
  start = time.perf_counter()
  compile_seconds = 0.0
  bar = tqdm(batches, desc=f'{name:>4}', disable=not progress,
             dynamic_ncols=True)
  for step, idx in enumerate(bar):
    params, opt_state, loss = train_step(params, opt_state, x_train[idx],
                                         y_train[idx])
    losses.append(loss)
    if step == 0:  # the first step traces and compiles
      compile_seconds = time.perf_counter() - start
    if step % 25 == 0 or step == len(batches) - 1:
      bar.set_postfix(loss=f'{float(loss):.4f}')
  losses = np.asarray(jax.device_get(losses))
  seconds = time.perf_counter() - start
  tail = max(1, len(losses) // 10)
  # One compiled prediction over train and test images together.
  correct = predict(model, params, np.concatenate([x_train, x_test])) == (
      np.concatenate([y_train, y_test]))
  return {
      'optimizer': name,
      'train_loss': float(losses[-tail:].mean()),
      'train_acc': float(correct[:len(x_train)].mean()),
      'test_acc': float(correct[len(x_train):].mean()),
      'seconds': seconds,
      'compile_seconds': compile_seconds,
  }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  length = parser.add_mutually_exclusive_group()
  length.add_argument('--steps', type=int, default=None,
                      help='training steps per optimizer (default 200)')
  length.add_argument('--epochs', type=float, default=None,
                      help='training length in epochs instead of --steps')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--mac-lr', type=float, default=0.1,
                      help='MAC learning rate (the paper uses 0.1 on CIFAR)')
  parser.add_argument('--sgd-lr', type=float, default=0.1,
                      help='SGD-momentum learning rate')
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--damping', type=float, default=1.0, help='MAC λ')
  parser.add_argument('--stat-decay', type=float, default=0.95, help='MAC β')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the split, the init and the batch order')
  parser.add_argument('--no-progress', action='store_true',
                      help='hide the progress bars')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  data = load_data(args.seed)
  x_train = data[0]
  per_epoch = len(x_train) // args.batch_size
  if args.epochs is not None:
    steps = max(1, round(args.epochs * per_epoch))
  else:
    steps = 200 if args.steps is None else args.steps
  batches = batch_indices(len(x_train), args.batch_size, steps, args.seed)

  model = CNN()
  params = model.init(jax.random.key(args.seed), x_train[:1])['params']
  # The layer plan: which layers MAC preconditions, and how (one abstract
  # forward pass). `init` builds the whole MAC state from it, so the jitted
  # step compiles once, and `update` checks the captured statistics against it.
  plan = mac_linen.plan(model, {'params': params}, x_train[:1])
  runs = [
      ('MAC', mac_optax.mac_sgd(args.mac_lr, momentum=args.momentum,
                                damping=args.damping,
                                stat_decay=args.stat_decay,
                                plan=plan),
       True, args.mac_lr),
      ('SGD', optax.sgd(args.sgd_lr, momentum=args.momentum), False,
       args.sgd_lr),
  ]
  print(f'digits: {len(x_train)} train / {len(data[1])} test images, '
        f'{steps} steps of {args.batch_size} ({steps / per_epoch:.1f} epochs)'
        f', momentum {args.momentum}, seed {args.seed}')
  print(plan)
  results = []
  for name, tx, uses_mac, lr in runs:
    result = train(name, model, params, tx, uses_mac, data, batches,
                   progress=not args.no_progress)
    result['lr'] = lr
    results.append(result)

  print()
  print(f"{'optimizer':<10}{'lr':>6}{'train loss':>12}{'train acc':>11}"
        f"{'test acc':>10}{'compile s':>11}{'total s':>9}")
  for r in results:
    print(f"{r['optimizer']:<10}{r['lr']:>6g}{r['train_loss']:>12.4f}"
          f"{r['train_acc']:>11.4f}{r['test_acc']:>10.4f}"
          f"{r['compile_seconds']:>11.1f}{r['seconds']:>9.1f}")
  print('(train loss: mean over the last 10% of steps; compile s: the first, '
        'compiling step, included in total s)')
  return results


if __name__ == '__main__':
  main()
