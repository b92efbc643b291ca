"""MAC against SGD-momentum: a small Flax NNX CNN on scikit-learn's digits.

The NNX twin of ``examples/digits_cnn.py``. Both optimizers train copies of the
same model (same initial weights) on the same sequence of mini-batches for the
same number of steps; only the update rule differs:

* MAC:  ``nnx.Optimizer(model, mac_optax.mac_sgd(lr, momentum))``, with the
  layer statistics captured from the unmodified model by
  ``mac_optax.nnx.capture(model)`` and passed as ``intermediates=``;
* SGD:  ``nnx.Optimizer(model, optax.sgd(lr, momentum))``.

The data are the 1797 8×8 handwritten digits bundled with scikit-learn,
split 75/25 into train and test sets.

Run::

    python examples/digits_cnn_nnx.py                # ~15 s on 2 busy CPU cores
    python examples/digits_cnn_nnx.py --steps 5      # smoke run
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import mac_optax
from mac_optax import nnx as mac_nnx
from digits_data import batch_indices
from digits_data import cross_entropy
from digits_data import load_data


class CNN(nnx.Module):
  """Conv(16) → Conv(32, stride 2) → Linear(64) → Linear(10), ReLU."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)                 # 8×8×16
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)     # 4×4×32
    self.fc1 = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
    return self.fc2(x)


@nnx.jit
def mac_step(model: CNN, optimizer: nnx.Optimizer, x, y):
  def loss_fn(model):
    logits, inter = mac_nnx.capture(model)(x)
    return cross_entropy(logits, y), inter

  (loss, inter), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads, intermediates=inter)
  return loss


@nnx.jit
def sgd_step(model: CNN, optimizer: nnx.Optimizer, x, y):
  loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def predict(model: CNN, x):
  return jnp.argmax(model(x), -1)


def accuracy(model: CNN, x: np.ndarray, y: np.ndarray) -> float:
  return float(np.mean(np.asarray(predict(model, x)) == y))


def train(name: str, model: CNN, tx: optax.GradientTransformation, step_fn,
          data, batches: np.ndarray, progress: bool = True) -> dict[str, Any]:
  """Trains `model` in place; returns final train loss, accuracies, time."""
  x_train, x_test, y_train, y_test = data
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  losses = []
  start = time.perf_counter()
  bar = tqdm(batches, desc=f'{name:>4}', disable=not progress,
             dynamic_ncols=True)
  for step, idx in enumerate(bar):
    loss = step_fn(model, optimizer, x_train[idx], y_train[idx])
    losses.append(loss)
    if step % 25 == 0 or step == len(batches) - 1:
      bar.set_postfix(loss=f'{float(loss):.4f}')
  losses = np.asarray(jax.device_get(losses))
  seconds = time.perf_counter() - start
  tail = max(1, len(losses) // 10)
  return {
      'optimizer': name,
      'train_loss': float(losses[-tail:].mean()),
      'train_acc': accuracy(model, x_train, y_train),
      'test_acc': accuracy(model, x_test, y_test),
      'seconds': seconds,
  }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=400,
                      help='training steps per optimizer')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--mac-lr', type=float, default=0.1)
  parser.add_argument('--sgd-lr', type=float, default=0.1)
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--damping', type=float, default=1.0, help='MAC λ')
  parser.add_argument('--stat-decay', type=float, default=0.95, help='MAC β')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the split, the init and the batch order')
  parser.add_argument('--no-progress', action='store_true')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  data = load_data(args.seed)
  x_train = data[0]
  per_epoch = len(x_train) // args.batch_size
  batches = batch_indices(len(x_train), args.batch_size, args.steps,
                          args.seed)
  # One set of initial weights, copied into each run.
  graphdef, state = nnx.split(CNN(nnx.Rngs(args.seed)))
  # The layer plan: which layers MAC preconditions, and how. `init` builds
  # the whole MAC state from it, so the jitted step's state structure is
  # fixed (one trace) and `update` checks the statistics against it.
  plan = mac_nnx.plan(nnx.merge(graphdef, state), x_train[:1])
  runs = [
      ('MAC', mac_optax.mac_sgd(args.mac_lr, momentum=args.momentum,
                                damping=args.damping,
                                stat_decay=args.stat_decay,
                                plan=plan),
       mac_step, args.mac_lr),
      ('SGD', optax.sgd(args.sgd_lr, momentum=args.momentum), sgd_step,
       args.sgd_lr),
  ]
  print(f'digits (Flax NNX): {len(x_train)} train / {len(data[1])} test '
        f'images, {args.steps} steps of {args.batch_size} '
        f'({args.steps / per_epoch:.1f} epochs), momentum {args.momentum}, '
        f'seed {args.seed}')
  print(plan)
  results = []
  for name, tx, step_fn, lr in runs:
    model = nnx.merge(graphdef, jax.tree_util.tree_map(jnp.copy, state))
    result = train(name, model, tx, step_fn, data, batches,
                   progress=not args.no_progress)
    result['lr'] = lr
    results.append(result)

  print()
  print(f"{'optimizer':<10}{'lr':>8}{'train loss':>12}{'train acc':>11}"
        f"{'test acc':>10}{'time (s)':>10}")
  for r in results:
    print(f"{r['optimizer']:<10}{r['lr']:>8g}{r['train_loss']:>12.4f}"
          f"{r['train_acc']:>11.4f}{r['test_acc']:>10.4f}{r['seconds']:>10.1f}")
  return results


if __name__ == '__main__':
  main()
