"""A small ViT on sklearn's 8×8 digits: MAC vs AdamW vs SGD-momentum.

An unmodified Flax ViT (2×2 patches → 16 tokens, two pre-norm blocks with
``nn.MultiHeadDotProductAttention``, mean pooling) trained on the 1797
digits bundled with scikit-learn (offline), 80/20 train/test split. MAC runs
through ``mac_optax.linen.capture()``: the patch-embedding conv, query/key/
output projections and MLPs get their plain mean inputs, the value
projections the attention-mixed mean.

Prints a table of final test accuracy and loss, and writes the curves to
``<out>/vit_digits_loss.png``.

Usage: ``python examples/vit_digits.py [--epochs 30] [--seeds 3] [--sweep]
[--out examples/out]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mac_optax  # pylint: disable=g-import-not-at-top
from digits_data import cross_entropy  # pylint: disable=g-import-not-at-top
from transformer_models import ViT  # pylint: disable=g-import-not-at-top


def load_data():
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  images = (images - images.mean()) / images.std()
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))
  split = int(0.8 * len(labels))
  train, test = order[:split], order[split:]
  return (images[train], labels[train]), (images[test], labels[test])


def holdout(data):
  """The last 20 % of the training set as a validation set (for ``--sweep``)."""
  (x, y), _ = data
  split = int(0.8 * len(y))
  return (x[:split], y[:split]), (x[split:], y[split:])


NAMES = ('MAC', 'AdamW', 'SGD')


def optimizer(name, lr, steps, plan):
  """The optimizer `name` at peak learning rate `lr`, and whether it captures."""
  warmup = max(1, steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps,
                                                lr * 0.01)

  def mask(params):   # no weight decay on norms, biases, positions
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

  if name == 'MAC':
    return mac_optax.mac_sgd(
        schedule, momentum=0.9, weight_decay=1e-4,
        decoupled_weight_decay=True, weight_decay_mask=mask, clip_norm=1.0,
        damping=1.0, stat_decay=0.95, plan=plan), True
  if name == 'AdamW':
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        schedule, weight_decay=1e-4, mask=mask)), False
  return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(
      schedule, momentum=0.9)), False


def train(name, lr, seed, model, data, args, progress=True):
  """Trains from the seed's initial parameters; curves and wall seconds."""
  (x_train, y_train), (x_test, y_test) = data
  params = jax.jit(model.init)(jax.random.PRNGKey(seed),
                               x_train[:1])['params']
  steps = args.epochs * (len(y_train) // args.batch)
  # The layer plan, so that MAC's state is complete from init (one
  # compilation of the step) and update checks the statistics against it.
  plan = mac_optax.linen.plan(model, {'params': params}, x_train[:1])
  tx, captured = optimizer(name, lr, steps, plan)

  def loss_and_stats(params, x, y):
    if not captured:
      return cross_entropy(model.apply({'params': params}, x), y), {}
    with mac_optax.linen.capture():
      logits, v = model.apply({'params': params}, x,
                              mutable=['intermediates'])
    return cross_entropy(logits, y), v['intermediates']

  @jax.jit
  def step(params, opt_state, x, y):
    (loss, inter), grads = jax.value_and_grad(
        loss_and_stats, has_aux=True)(params, x, y)
    kwargs = {'intermediates': inter} if captured else {}
    updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params):
    logits = model.apply({'params': params}, x_test)
    return (cross_entropy(logits, y_test),
            jnp.mean(jnp.argmax(logits, -1) == y_test))

  rng = np.random.default_rng(seed)
  opt_state = tx.init(params)
  curve, test_curve = [], []
  per_epoch = len(y_train) // args.batch
  start = time.perf_counter()
  bar = tqdm(range(args.epochs), desc=f'{name:>6} lr {lr:g} seed {seed}',
             leave=False, disable=not progress)
  for _ in bar:
    order = rng.permutation(len(y_train))
    for i in range(per_epoch):
      idx = order[i * args.batch:(i + 1) * args.batch]
      params, opt_state, loss = step(params, opt_state, x_train[idx],
                                     y_train[idx])
      curve.append(float(loss))
    test_loss, acc = (float(v) for v in evaluate(params))
    test_curve.append((len(curve), test_loss, acc))
    bar.set_postfix(loss=f'{np.mean(curve[-per_epoch:]):.3f}',
                    test_acc=f'{acc:.3f}')
  return curve, test_curve, time.perf_counter() - start


def sweep(names, lrs, model, data, args, progress):
  """Each optimizer's peak lr from ``lr × {1/3, 1, 3}``, by held-out accuracy.

  Trains on 80 % of the training set and scores the other 20 % (the test
  set is not looked at); same grid size and steps for every optimizer.
  """
  split = holdout(data)
  print('lr sweep (train on 80 % of train, score the other 20 %):')
  print(f"{'optimizer':<10}{'lr':>9}{'val loss':>10}{'val acc':>9}")
  chosen = {}
  for name in names:
    scores = []
    for lr in (lrs[name] / 3, lrs[name], lrs[name] * 3):
      _, test_curve, _ = train(name, lr, 0, model, split, args, progress)
      _, loss, acc = test_curve[-1]
      print(f'{name:<10}{lr:>9.3g}{loss:>10.4f}{acc:>9.4f}')
      scores.append((-acc, loss, lr))
    chosen[name] = min(scores)[2]
  print('chosen: ' + ', '.join(f'{k} {v:g}' for k, v in chosen.items()))
  return chosen


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=30)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--seeds', type=int, default=3,
                      help='initializations / batch orders per optimizer')
  parser.add_argument('--mac-lr', type=float, default=0.3)
  parser.add_argument('--adam-lr', type=float, default=1e-2)
  parser.add_argument('--sgd-lr', type=float, default=0.1)
  parser.add_argument('--sweep', action='store_true',
                      help='first choose each lr from lr × {1/3, 1, 3} on a '
                      'held-out part of the training set')
  parser.add_argument('--only', default=None,
                      help='comma-separated subset of the optimizers')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'out'))
  args = parser.parse_args(argv)
  progress = not args.no_progress

  data = load_data()
  model = ViT()
  names = [n for n in NAMES if not args.only or n in args.only.split(',')]
  lrs = {'MAC': args.mac_lr, 'AdamW': args.adam_lr, 'SGD': args.sgd_lr}
  print(f'{len(data[0][1])} train / {len(data[1][1])} test digits, '
        f'{args.epochs * (len(data[0][1]) // args.batch)} steps of '
        f'{args.batch}, {args.seeds} seed(s)')
  if 'MAC' in names:
    x = data[0][0][:1]
    print(mac_optax.linen.plan(
        model, jax.eval_shape(model.init, jax.random.PRNGKey(0), x), x))
  if args.sweep:
    lrs.update(sweep(names, lrs, model, data, args, progress))
  results = {name: [train(name, lrs[name], seed, model, data, args, progress)
                    for seed in range(args.seeds)] for name in names}

  def mean_std(values):
    return f'{np.mean(values):.4f} ± {np.std(values):.4f}'

  print(f"\n{'optimizer':<10}{'lr':>8}{'train loss':>12}{'test loss':>18}"
        f"{'test acc':>18}{'time s':>8}")
  rows = []
  for name, runs in results.items():
    train_loss = [np.mean(curve[-20:]) for curve, _, _ in runs]
    test_loss = [tc[-1][1] for _, tc, _ in runs]
    test_acc = [tc[-1][2] for _, tc, _ in runs]
    seconds = np.mean([s for *_, s in runs])
    print(f'{name:<10}{lrs[name]:>8.3g}{np.mean(train_loss):>12.4f}'
          f'{mean_std(test_loss):>18}{mean_std(test_acc):>18}'
          f'{seconds:>8.1f}')
    rows.append({'optimizer': name, 'lr': lrs[name],
                 'train_loss': float(np.mean(train_loss)),
                 'test_loss': float(np.mean(test_loss)),
                 'test_acc': float(np.mean(test_acc)),
                 'test_acc_per_seed': [float(a) for a in test_acc]})

  os.makedirs(args.out, exist_ok=True)
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for name, runs in results.items():
    curve, test_curve, _ = runs[0]
    window = min(10, len(curve))
    smooth = np.convolve(curve, np.ones(window) / window, mode='valid')
    axes[0].plot(smooth, label=name)
    steps_at, losses, accs = zip(*test_curve)
    axes[1].plot(steps_at, losses, label=name)
    axes[2].plot(steps_at, accs, label=name)
  axes[0].set(title='train loss (10-step mean, seed 0)', xlabel='step',
              yscale='log')
  axes[1].set(title='test loss (seed 0)', xlabel='step', yscale='log')
  axes[2].set(title='test accuracy (seed 0)', xlabel='step', ylim=(0.5, 1.0))
  for ax in axes:
    ax.legend()
  fig.tight_layout()
  path = os.path.join(args.out, 'vit_digits_loss.png')
  fig.savefig(path, dpi=80)
  plt.close(fig)
  print(f'\ncurves: {path}')
  return rows


if __name__ == '__main__':
  main()
