"""Character-level GPT on the standard library's pydoc topics: MAC vs SGD, AdamW.

An unmodified Flax GPT (``nn.MultiHeadDotProductAttention`` with a causal
mask, tied output embedding ``Embed.attend``) trained on ~465k characters of
Python documentation that ship with CPython (offline). MAC runs through
``mac_optax.linen.capture()``: query/key/output projections and MLPs get
their plain mean inputs, value projections the attention-mixed mean, the tied
table its feature-axis mean. ``MAC + lookup`` also preconditions the
embedding table along the vocabulary axis with the batch's token frequencies
(``capture(embed_lookup=True)``). ``SGD`` is the same chain as MAC's
(clipping, Nesterov momentum, decoupled weight decay, schedule) without the
preconditioner.

Prints a table of final validation losses, writes the loss curves to
``<out>/char_gpt_loss.png`` and prints a short sample of each model.

Usage: ``python examples/char_gpt.py [--steps 600] [--sweep] [--out examples/out]``.
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
from pydoc_data import topics
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mac_optax  # pylint: disable=g-import-not-at-top
from transformer_models import GPT  # pylint: disable=g-import-not-at-top


def load_text():
  """Character ids of the pydoc topics, and the vocabulary."""
  text = '\n\n'.join(topics.topics[k] for k in sorted(topics.topics))
  chars = sorted(set(text))
  index = {c: i for i, c in enumerate(chars)}
  ids = np.array([index[c] for c in text], np.int32)
  return ids, chars


def batches(ids, batch, context, rng):
  starts = rng.integers(0, len(ids) - context - 1, size=batch)
  return np.stack([ids[s:s + context + 1] for s in starts])


def loss_of(logits, window):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, window[:, 1:]).mean()


NAMES = ('MAC', 'MAC + lookup', 'SGD', 'AdamW')


def optimizer(name, lr, steps, plans):
  """The optimizer `name` at peak lr `lr`; capture() kwargs (None: no capture).

  Decoupled weight decay ``p ← p − lr·wd·p`` on matrices: AdamW's usual
  ``wd = 0.1``, and ``wd = 1e-3`` for MAC and SGD, so that MAC and AdamW at
  their default learning rates (1.0 and 1e-2, chosen by ``--sweep``) decay
  by the same 1e-3 per step.
  """
  warmup = max(1, steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps,
                                                lr * 0.05)

  def mask(params):   # decay matrices only (the nanoGPT recipe)
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

  if name.startswith('MAC'):
    lookup = name == 'MAC + lookup'
    return mac_optax.mac_sgd(
        schedule, momentum=0.9, nesterov=True, weight_decay=1e-3,
        decoupled_weight_decay=True, weight_decay_mask=mask, clip_norm=1.0,
        damping=1.0, stat_decay=0.95,
        plan=plans[lookup]), {'embed_lookup': lookup}
  if name == 'SGD':
    return optax.chain(   # mac_sgd's chain without MAC
        optax.clip_by_global_norm(1.0),
        optax.trace(0.9, nesterov=True),
        optax.add_decayed_weights(1e-3, mask=mask),
        optax.scale_by_learning_rate(schedule)), None
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      schedule, weight_decay=0.1, mask=mask)), None


def plans_of(model, params, context):
  """The layer plans without / with ``embed_lookup`` (for ``mac_sgd``)."""
  example = jnp.zeros((1, context), jnp.int32)
  return {lookup: mac_optax.linen.plan(model, {'params': params}, example,
                                       embed_lookup=lookup)
          for lookup in (False, True)}


def train(name, lr, model, data, args, progress=True):
  """Trains from seed ``args.seed``; params, curves and wall seconds."""
  train_ids, val_ids = data
  params = jax.jit(model.init)(jax.random.PRNGKey(args.seed), jnp.zeros(
      (1, args.context), jnp.int32))['params']
  tx, capture_kwargs = optimizer(name, lr, args.steps,
                                 plans_of(model, params, args.context))
  rng = np.random.default_rng(args.seed)
  val = jnp.asarray(batches(val_ids, args.val_windows, args.context,
                            np.random.default_rng(12345)))

  def loss_and_stats(params, window):
    x = window[:, :-1]
    if capture_kwargs is None:
      return loss_of(model.apply({'params': params}, x), window), {}
    with mac_optax.linen.capture(**capture_kwargs):
      logits, v = model.apply({'params': params}, x,
                              mutable=['intermediates'])
    return loss_of(logits, window), v['intermediates']

  @jax.jit
  def step(params, opt_state, window):
    (loss, inter), grads = jax.value_and_grad(
        loss_and_stats, has_aux=True)(params, window)
    if capture_kwargs is None:
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      updates, opt_state = tx.update(grads, opt_state, params,
                                     intermediates=inter)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def val_loss(params):
    return loss_of(model.apply({'params': params}, val[:, :-1]), val)

  opt_state = tx.init(params)
  curve, val_curve = [], []
  start = time.perf_counter()
  bar = tqdm(range(args.steps), desc=f'{name:>12} lr {lr:g}', leave=False,
             disable=not progress)
  for t in bar:
    window = jnp.asarray(batches(train_ids, args.batch, args.context, rng))
    params, opt_state, loss = step(params, opt_state, window)
    curve.append(float(loss))
    if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
      val_curve.append((t + 1, float(val_loss(params))))
      bar.set_postfix(loss=f'{curve[-1]:.3f}', val=f'{val_curve[-1][1]:.3f}')
  return params, curve, val_curve, time.perf_counter() - start


def sample(model, params, chars, prompt, length, context):
  index = {c: i for i, c in enumerate(chars)}
  ids = [index[c] for c in prompt]
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
  key = jax.random.PRNGKey(0)
  for _ in range(length):
    window = jnp.asarray(ids[-context:], jnp.int32)[None]
    pad = context - window.shape[1]
    logits = forward(params, jnp.pad(window, ((0, 0), (0, pad))))
    key, sub = jax.random.split(key)
    nxt = jax.random.categorical(sub, logits[0, window.shape[1] - 1] / 0.8)
    ids.append(int(nxt))
  return ''.join(chars[i] for i in ids)


def sweep(names, lrs, model, data, args, progress):
  """Each optimizer's peak lr from ``lr × {1/3, 1, 3}``, by held-out loss.

  Trains on the first 90 % of the training text and scores windows of the
  last 10 % (the validation text is not looked at); same grid size and
  steps for every optimizer.
  """
  train_ids, _ = data
  split = int(0.9 * len(train_ids))
  inner = (train_ids[:split], train_ids[split:])
  print('lr sweep (train on 90 % of the training text, score the rest):')
  print(f"{'optimizer':<14}{'lr':>9}{'held-out loss':>15}")
  chosen = {}
  for name in names:
    scores = []
    for lr in (lrs[name] / 3, lrs[name], lrs[name] * 3):
      _, _, val_curve, _ = train(name, lr, model, inner, args, progress)
      print(f'{name:<14}{lr:>9.3g}{val_curve[-1][1]:>15.4f}')
      scores.append((val_curve[-1][1], lr))
    chosen[name] = min(scores)[1]
  print('chosen: ' + ', '.join(f'{k} {v:g}' for k, v in chosen.items()))
  return chosen


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--context', type=int, default=64)
  parser.add_argument('--dim', type=int, default=64)
  parser.add_argument('--depth', type=int, default=2)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--mac-lr', type=float, default=1.0,
                      help="peak lr of 'MAC' and 'MAC + lookup'")
  parser.add_argument('--sgd-lr', type=float, default=0.3)
  parser.add_argument('--adam-lr', type=float, default=1e-2)
  parser.add_argument('--sweep', action='store_true',
                      help='first choose each lr from lr × {1/3, 1, 3} on a '
                      'held-out part of the training text')
  parser.add_argument('--eval-every', type=int, default=50)
  parser.add_argument('--val-windows', type=int, default=256)
  parser.add_argument('--sample-length', type=int, default=160)
  parser.add_argument('--only', default=None,
                      help='comma-separated subset of the optimizers')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'out'))
  args = parser.parse_args(argv)
  progress = not args.no_progress

  ids, chars = load_text()
  split = int(0.9 * len(ids))
  data = (ids[:split], ids[split:])
  model = GPT(vocab=len(chars), context=args.context, dim=args.dim,
              heads=4, depth=args.depth)
  names = [n for n in NAMES if not args.only or n in args.only.split(',')]
  lrs = {'MAC': args.mac_lr, 'MAC + lookup': args.mac_lr,
         'SGD': args.sgd_lr, 'AdamW': args.adam_lr}
  print(f'{len(ids)} characters, vocabulary {len(chars)}, {args.steps} '
        f'steps of {args.batch}×{args.context} tokens, seed {args.seed}')
  if any(name.startswith('MAC') for name in names):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(args.seed),
                            jnp.zeros((1, args.context), jnp.int32))['params']
    print(plans_of(model, shapes, args.context)['MAC + lookup' in names])
  if args.sweep:
    lrs.update(sweep(names, lrs, model, data, args, progress))
  results = {name: train(name, lrs[name], model, data, args, progress)
             for name in names}

  print(f"\n{'optimizer':<14}{'lr':>8}{'train loss':>11}{'val loss':>10}"
        f"{'best val':>10}{'time s':>8}")
  rows = []
  for name, (_, curve, val_curve, seconds) in results.items():
    print(f'{name:<14}{lrs[name]:>8.3g}{np.mean(curve[-20:]):>11.3f}'
          f'{val_curve[-1][1]:>10.3f}{min(v for _, v in val_curve):>10.3f}'
          f'{seconds:>8.1f}')
    rows.append({'optimizer': name, 'lr': lrs[name],
                 'train_loss': float(np.mean(curve[-20:])),
                 'val_loss': val_curve[-1][1]})
  if args.sample_length:
    for name, (trained, *_rest) in results.items():
      text = sample(model, trained, chars, 'The ', args.sample_length,
                    args.context)
      print(f'\n--- sample ({name}) ---\n{text}')

  os.makedirs(args.out, exist_ok=True)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name, (_, curve, val_curve, _) in results.items():
    window = min(10, len(curve))
    smooth = np.convolve(curve, np.ones(window) / window, mode='valid')
    axes[0].plot(smooth, label=name)
    axes[1].plot(*zip(*val_curve), marker='o', label=name)
  axes[0].set(title='train loss (10-step mean)', xlabel='step')
  axes[1].set(title='validation loss', xlabel='step')
  for ax in axes:
    ax.legend()
  fig.tight_layout()
  path = os.path.join(args.out, 'char_gpt_loss.png')
  fig.savefig(path, dpi=80)
  plt.close(fig)
  print(f'\nloss curves: {path}')
  return rows


if __name__ == '__main__':
  main()
