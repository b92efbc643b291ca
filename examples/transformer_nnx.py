"""MAC against AdamW and SGD-momentum: a small Flax NNX vision transformer on digits.

An unmodified NNX transformer: 2×2 patches of scikit-learn's 8×8 digits
(16 tokens), a learned position embedding, ``--depth`` pre-norm blocks of
``nnx.MultiHeadAttention`` + MLP created with ``nnx.vmap`` and run with
``nnx.scan`` (parameters and MAC statistics stacked on a leading axis), mean
pooling and a linear head. Through ``mac_optax.nnx.capture(model)`` the query, key and
output projections and the MLP layers are preconditioned with their mean
inputs, the value projections with the attention-mixed mean
``E_{b,h,i}[Σ_j P_bhij x_bj]``; norms, biases' own statistics and the position
embedding pass through.

All optimizers start from the same weights and see the same mini-batches.

Run::

    python examples/transformer_nnx.py               # ~1-2 minutes on 2 CPU cores
    python examples/transformer_nnx.py --steps 5     # smoke run
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


class Block(nnx.Module):
  """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class ViT(nnx.Module):
  """Patches → Linear embedding → scanned blocks → mean pool → Linear head."""

  def __init__(self, *, patch: int = 2, dim: int = 32, depth: int = 2,
               heads: int = 4, classes: int = 10, rngs: nnx.Rngs):
    self.patch = patch
    tokens = (8 // patch) ** 2
    self.embed = nnx.Linear(patch * patch, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                  (tokens, dim)))

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(dim, heads, rngs)

    self.blocks = make_blocks(rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    b, p = images.shape[0], self.patch
    x = images.reshape(b, 8 // p, p, 8 // p, p).transpose(0, 1, 3, 2, 4)
    x = self.embed(x.reshape(b, -1, p * p)) + self.pos[...]

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run_blocks(x, block):
      return block(x)

    x = self.norm(run_blocks(x, self.blocks))
    return self.head(x.mean(axis=1))


@nnx.jit
def mac_step(model: ViT, optimizer: nnx.Optimizer, x, y):
  def loss_fn(model):
    logits, inter = mac_nnx.capture(model)(x)
    return cross_entropy(logits, y), inter

  (loss, inter), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads, intermediates=inter)
  return loss


@nnx.jit
def plain_step(model: ViT, optimizer: nnx.Optimizer, x, y):
  loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def evaluate(model: ViT, x, y):
  logits = model(x)
  return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)


def train(name: str, model: ViT, tx: optax.GradientTransformation, step_fn,
          data, batches: np.ndarray, progress: bool = True) -> dict[str, Any]:
  """Trains `model` in place; returns final losses, test accuracy, time."""
  x_train, x_test, y_train, y_test = data
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  losses = []
  start = time.perf_counter()
  bar = tqdm(batches, desc=f'{name:>5}', disable=not progress,
             dynamic_ncols=True)
  for step, idx in enumerate(bar):
    loss = step_fn(model, optimizer, x_train[idx], y_train[idx])
    losses.append(loss)
    if step % 25 == 0 or step == len(batches) - 1:
      bar.set_postfix(loss=f'{float(loss):.4f}')
  losses = np.asarray(jax.device_get(losses))
  seconds = time.perf_counter() - start
  tail = max(1, len(losses) // 10)
  test_loss, test_acc = evaluate(model, x_test, y_test)
  return {
      'optimizer': name,
      'train_loss': float(losses[-tail:].mean()),
      'test_loss': float(test_loss),
      'test_acc': float(test_acc),
      'seconds': seconds,
  }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--depth', type=int, default=2)
  parser.add_argument('--mac-lr', type=float, default=0.1)
  parser.add_argument('--sgd-lr', type=float, default=0.1)
  parser.add_argument('--adamw-lr', type=float, default=3e-3)
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--damping', type=float, default=1.0, help='MAC λ')
  parser.add_argument('--stat-decay', type=float, default=0.95, help='MAC β')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no-progress', action='store_true')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  data = load_data(args.seed, channel_axis=False)
  x_train = data[0]
  per_epoch = len(x_train) // args.batch_size
  batches = batch_indices(len(x_train), args.batch_size, args.steps,
                          args.seed)
  graphdef, state = nnx.split(ViT(depth=args.depth, rngs=nnx.Rngs(args.seed)))
  plan = mac_nnx.plan(nnx.merge(graphdef, state), x_train[:1])
  runs = [
      ('MAC', mac_optax.mac_sgd(args.mac_lr, momentum=args.momentum,
                                damping=args.damping,
                                stat_decay=args.stat_decay,
                                plan=plan),
       mac_step, args.mac_lr),
      ('SGD', optax.sgd(args.sgd_lr, momentum=args.momentum), plain_step,
       args.sgd_lr),
      ('AdamW', optax.adamw(args.adamw_lr, weight_decay=1e-4), plain_step,
       args.adamw_lr),
  ]
  print(f'ViT on digits (Flax NNX): {len(x_train)} train / {len(data[1])} '
        f'test images, 16 tokens of 2×2 pixels, depth {args.depth}, '
        f'{args.steps} steps of {args.batch_size} '
        f'({args.steps / per_epoch:.1f} epochs), seed {args.seed}')
  print(plan)
  results = []
  for name, tx, step_fn, lr in runs:
    model = nnx.merge(graphdef, jax.tree_util.tree_map(jnp.copy, state))
    result = train(name, model, tx, step_fn, data, batches,
                   progress=not args.no_progress)
    result['lr'] = lr
    results.append(result)

  print()
  print(f"{'optimizer':<10}{'lr':>8}{'train loss':>12}{'test loss':>11}"
        f"{'test acc':>10}{'time (s)':>10}")
  for r in results:
    print(f"{r['optimizer']:<10}{r['lr']:>8g}{r['train_loss']:>12.4f}"
          f"{r['test_loss']:>11.4f}{r['test_acc']:>10.4f}"
          f"{r['seconds']:>10.1f}")
  return results


if __name__ == '__main__':
  main()
