"""The authors' CIFAR recipe, reproduced on scikit-learn's digits.

The paper's CIFAR optimizer, built in one call with
``mac_optax.presets.cifar``: MAC with the exact first layer (``(Σ + λI)⁻¹`` of
the stem's input second moment over the training set, computed once before
training), coupled L2 ``5e-4`` added after preconditioning, heavy-ball
momentum 0.9, ``lr 0.1`` with cosine decay, ``β = 0.95``, ``λ = 1``,
statistics every 5 steps and preconditioner refreshed every 50 (``Tcov/Tinv``).

Compared with the two first-order baselines, on the same ResNet-ish CNN (a
conv stem, two BatchNorm residual blocks, global pooling), same initial
parameters, same mini-batches, same number of steps:

* SGD-momentum: ``lr 0.1`` cosine, momentum 0.9, the same coupled L2;
* AdamW: ``lr 1e-3`` cosine, ``weight_decay 1e-4`` (decoupled).

The data are the 1797 8×8 digits bundled with scikit-learn, standardized and
split 80/20 (stratified). Three seeds (parameters and batch order), table of
test accuracy (mean ± std over seeds).

Run::

    python examples/reproduce_cifar_recipe.py           # ~2-4 min on 2 cores
    python examples/reproduce_cifar_recipe.py --epochs 2 --seeds 1   # smoke
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import mac_optax
from mac_optax import linen as mac_linen

STEM = 'stem'


class Block(nn.Module):
  """A ResNet basic block: two 3×3 convs with BatchNorm, projection shortcut."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # pylint: disable=g-long-lambda
    y = nn.Conv(self.features, (3, 3), self.stride, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = norm()(y)
    if x.shape[-1] != self.features or self.stride != 1:
      x = nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNetish(nn.Module):
  """Stem conv 3×3 (16) → Block(16) → Block(32, stride 2) → pool → Dense(10)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3), use_bias=False, name=STEM)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = Block(16)(x, train)
    x = Block(32, stride=2)(x, train)
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def load_data(seed: int = 0):
  """Standardized ``[N, 8, 8, 1]`` images and labels, stratified 80/20."""
  digits = load_digits()
  images = digits.images.astype(np.float32)[..., None]
  x_train, x_test, y_train, y_test = train_test_split(
      images, digits.target.astype(np.int32), test_size=0.2,
      random_state=seed, stratify=digits.target)
  mean, std = x_train.mean(), x_train.std()
  return (x_train - mean) / std, (x_test - mean) / std, y_train, y_test


def batch_indices(n: int, batch_size: int, epochs: int, seed: int):
  """``[epochs · ⌊n/B⌋, B]`` shuffled indices, each epoch a permutation."""
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  return np.concatenate([
      rng.permutation(n)[:per_epoch * batch_size].reshape(per_epoch,
                                                           batch_size)
      for _ in range(epochs)])


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(model: nn.Module, tx: optax.GradientTransformation,
              uses_mac: bool) -> Callable:
  """A jitted step; MAC's needs the captured statistics, the others not."""

  def loss_fn(params, batch_stats, x, y):
    variables = {'params': params, 'batch_stats': batch_stats}
    mutable = ['batch_stats', 'intermediates'] if uses_mac else [
        'batch_stats']
    if uses_mac:
      with mac_linen.capture():
        logits, new = model.apply(variables, x, train=True, mutable=mutable)
    else:
      logits, new = model.apply(variables, x, train=True, mutable=mutable)
    return cross_entropy(logits, y), new

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    extra = {'intermediates': new['intermediates']} if uses_mac else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return (optax.apply_updates(params, updates), new['batch_stats'],
            opt_state, loss)

  return step


def accuracy(model, params, batch_stats, x, y) -> float:
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      {'params': params, 'batch_stats': batch_stats}, x)
  return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def optimizers(total_steps: int, exact: dict, plan: Any
               ) -> dict[str, tuple[optax.GradientTransformation, bool]]:
  """name -> (optimizer, needs MAC statistics)."""
  sgd_schedule = optax.cosine_decay_schedule(0.1, total_steps)
  return {
      'MAC (paper CIFAR recipe)': (mac_optax.presets.cifar(
          total_steps, exact_layers=exact, plan=plan),
                                   True),
      'SGD-momentum': (optax.chain(optax.add_decayed_weights(5e-4),
                                   optax.sgd(sgd_schedule, momentum=0.9)),
                       False),
      'AdamW': (optax.adamw(optax.cosine_decay_schedule(1e-3, total_steps),
                            weight_decay=1e-4), False),
  }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', type=int, default=30)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--no-progress', action='store_true')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, list[float]]:
  args = parse_args(argv)
  x_train, x_test, y_train, y_test = load_data()
  model = ResNetish()
  steps_per_epoch = len(x_train) // args.batch_size
  total_steps = args.epochs * steps_per_epoch
  template = model.init(jax.random.PRNGKey(0), x_train[:2])

  # The exact first layer: Σ of the stem's 3×3 patches over the training set
  # (streamed batch by batch), once, before training. Σ depends only on the
  # data, so it serves every seed.
  t0 = time.perf_counter()
  exact = mac_optax.first_layer.exact_first_layer(
      model, template, [x_train[i:i + 256] for i in range(0, len(x_train),
                                                            256)],
      STEM, damping=1.0, progress=not args.no_progress)
  exact_seconds = time.perf_counter() - t0
  plan = mac_linen.plan(model, template, x_train[:1])   # abstract pass
  print(plan)

  results: dict[str, list[float]] = {}
  seconds: dict[str, float] = {}
  runs = [(name, seed) for name in optimizers(1, exact, plan)
          for seed in range(args.seeds)]
  steps = {}
  bar = tqdm(total=len(runs) * total_steps, disable=args.no_progress,
             desc='training')
  for name, seed in runs:
    tx, uses_mac = optimizers(total_steps, exact, plan)[name]
    if name not in steps:
      steps[name] = (tx, make_step(model, tx, uses_mac))
    tx, step = steps[name]
    variables = model.init(jax.random.PRNGKey(seed), x_train[:2])
    params, batch_stats = variables['params'], variables['batch_stats']
    opt_state = tx.init(params)
    start = time.perf_counter()
    for idx in batch_indices(len(x_train), args.batch_size, args.epochs,
                             seed):
      params, batch_stats, opt_state, loss = step(
          params, batch_stats, opt_state, x_train[idx], y_train[idx])
      bar.update(1)
    jax.block_until_ready(params)
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    results.setdefault(name, []).append(
        accuracy(model, params, batch_stats, x_test, y_test))
    bar.set_postfix(run=f'{name} seed {seed}', loss=f'{float(loss):.3f}')
  bar.close()

  print(f'\nsklearn digits, {len(x_train)} train / {len(x_test)} test, '
        f'{args.epochs} epochs × {steps_per_epoch} steps of '
        f'{args.batch_size}, {args.seeds} seeds '
        f'(exact stem Σ: {exact_seconds:.1f} s)')
  print(f"{'optimizer':<28}{'test acc (mean ± std)':>24}  per seed"
        f"{'':>12}{'train s/run':>12}")
  for name, accs in results.items():
    per_seed = ' '.join(f'{a:.4f}' for a in accs)
    print(f'{name:<28}{np.mean(accs):>14.4f} ± {np.std(accs):.4f}  '
          f'{per_seed:<20}{seconds[name] / len(accs):>10.1f}')
  return results


if __name__ == '__main__':
  main()
