"""A Gemma/Llama-style decoder of einsum layers trained with MAC, vs SGD and AdamW.

The model is written the way Gemma's and Llama's Flax ports are: every
projection is an ``nn.Einsum`` with a per-head kernel, RMSNorm with a
``1 + scale`` gain, rotary position embeddings, grouped-query attention
(``heads`` query heads share ``kv_heads`` key/value heads, written by hand),
a gated GELU MLP (one ``(d, 2, ff)`` einsum for gate and up) and tied input
and output embeddings. Nothing in it is MAC-specific except one line: the
attention block hands its probabilities to
``mac_optax.linen.sow_attention`` for the fused key/value einsum, so that
the key columns get the plain input mean and the value columns the
attention-mixed mean ``E_{b,h,i}[Σ_j P_bhij x_bj]`` (averaged over all query
heads, which all read the shared value). Every other einsum layer is found
by ``mac_optax.linen.capture()`` itself.

Data, optimizers and the training loop are those of ``char_gpt.py``
(character-level pydoc topics; MAC as ``mac_sgd``, ``SGD`` the same chain
without the preconditioner, AdamW).

Usage: ``python examples/gemma_decoder.py [--steps 600] [--seeds 0,1,2]
[--sweep] [--out DIR]``; the loss curves (mean over seeds, the band spanning
the seeds) go to ``DIR/gemma_decoder_loss.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mac_optax  # pylint: disable=g-import-not-at-top
import char_gpt  # pylint: disable=g-import-not-at-top

NAMES = ('MAC', 'SGD', 'AdamW')


class RMSNorm(nn.Module):
  """``x / rms(x) · (1 + scale)`` (Gemma's parameterization, scale at 0)."""

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.zeros_init(), (x.shape[-1],))
    rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True)
                        + 1e-6)
    return x * rms * (1.0 + scale)


def rotary(x, base: float = 10_000.0):
  """Rotary position embedding of ``[B, T, N, H]`` (halves rotated)."""
  half = x.shape[-1] // 2
  freq = base ** (-np.arange(half) / half)
  angle = np.arange(x.shape[1])[:, None] * freq[None, :]        # [T, half]
  sin = jnp.asarray(np.sin(angle), x.dtype)[None, :, None, :]
  cos = jnp.asarray(np.cos(angle), x.dtype)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Attention(nn.Module):
  """Causal grouped-query attention from einsum projections."""
  heads: int
  kv_heads: int
  head_dim: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h, k, hd = self.heads, self.kv_heads, self.head_dim
    q = nn.Einsum((d, h, hd), 'btd,dnh->btnh', use_bias=False,
                  name='q_einsum')(x)
    # Keys and values in one kernel (d, 2, K, hd): its first output axis is
    # the two column groups sow_attention fills ('kv').
    kv_einsum = nn.Einsum((d, 2, k, hd), 'btd,dckh->cbtkh', use_bias=False,
                          name='kv_einsum')
    key, value = kv_einsum(x)
    q, key = rotary(q) * hd ** -0.5, rotary(key)
    key = jnp.repeat(key, h // k, axis=2)       # query head n reads n // (h/k)
    value = jnp.repeat(value, h // k, axis=2)
    logits = jnp.einsum('btnh,bsnh->bnts', q, key)
    t = x.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    mac_optax.linen.sow_attention(kv_einsum, x, probs=probs, columns='kv')
    y = jnp.einsum('bnts,bsnh->btnh', probs, value)
    return nn.Einsum((h, hd, d), 'btnh,nhd->btd', use_bias=False,
                     name='attn_vec_einsum')(y)


class MLP(nn.Module):
  """Gated GELU MLP: ``gelu(x W_gate) ⊙ (x W_up) W_down``."""
  hidden: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    gate, up = nn.Einsum((d, 2, self.hidden), 'btd,dcf->cbtf', use_bias=False,
                         name='gating_einsum')(x)
    return nn.Einsum((self.hidden, d), 'btf,fd->btd', use_bias=False,
                     name='linear')(nn.gelu(gate) * up)


class Block(nn.Module):
  heads: int
  kv_heads: int
  head_dim: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.heads, self.kv_heads, self.head_dim, name='attn')(
        RMSNorm(name='pre_attention_norm')(x))
    return x + MLP(self.hidden, name='mlp')(RMSNorm(name='pre_ffw_norm')(x))


class Decoder(nn.Module):
  """Token ids ``[B, T]`` → logits ``[B, T, vocab]``, tied embeddings."""
  vocab: int
  dim: int = 64
  depth: int = 2
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 16
  hidden: int = 128

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.dim, name='embedder')
    x = embed(tokens) * jnp.sqrt(float(self.dim))
    for i in range(self.depth):
      x = Block(self.heads, self.kv_heads, self.head_dim, self.hidden,
                name=f'layer_{i}')(x)
    return embed.attend(RMSNorm(name='final_norm')(x))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--context', type=int, default=64)
  parser.add_argument('--dim', type=int, default=64)
  parser.add_argument('--depth', type=int, default=2)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--kv-heads', type=int, default=2)
  parser.add_argument('--head-dim', type=int, default=16)
  parser.add_argument('--hidden', type=int, default=128)
  parser.add_argument('--seeds', default='0',
                      help='comma-separated seeds, one run of each per seed')
  parser.add_argument('--mac-lr', type=float, default=1.0)
  parser.add_argument('--sgd-lr', type=float, default=0.3)
  parser.add_argument('--adam-lr', type=float, default=1e-2)
  parser.add_argument('--sweep', action='store_true',
                      help="first choose each lr from lr × {1/3, 1, 3} on a "
                      "held-out part of the training text (char_gpt's sweep)")
  parser.add_argument('--eval-every', type=int, default=50)
  parser.add_argument('--val-windows', type=int, default=256)
  parser.add_argument('--only', default=None,
                      help='comma-separated subset of MAC,SGD,AdamW')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'out'))
  return parser.parse_args(argv)


def plot(curves, steps, path):
  """Train (10-step mean) and validation loss, mean over seeds and band.

  Args:
    curves: optimizer name -> list over seeds of ``(train curve, val curve)``.
    steps: the number of training steps (x axis).
    path: where the PNG goes.
  """
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name, runs in curves.items():
    window = min(10, steps)
    train = np.stack([np.convolve(c, np.ones(window) / window, mode='valid')
                      for c, _ in runs])
    x = np.arange(window, steps + 1)
    line, = axes[0].plot(x, train.mean(0), label=name)
    axes[0].fill_between(x, train.min(0), train.max(0), alpha=0.25,
                         color=line.get_color())
    at = [t for t, _ in runs[0][1]]
    val = np.array([[v for _, v in vc] for _, vc in runs])
    axes[1].errorbar(at, val.mean(0), yerr=[val.mean(0) - val.min(0),
                                            val.max(0) - val.mean(0)],
                     marker='o', capsize=3, label=name)
  seeds = len(next(iter(curves.values())))
  axes[0].set(title=f'train loss (10-step mean; {seeds} seeds, min–max)',
              xlabel='step')
  axes[1].set(title='validation loss (mean, min–max over seeds)',
              xlabel='step')
  for ax in axes:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv=None):
  """Trains each optimizer for each seed; returns one row per run."""
  args = parse_args(argv)
  ids, chars = char_gpt.load_text()
  split = int(0.9 * len(ids))
  data = (ids[:split], ids[split:])
  model = Decoder(vocab=len(chars), dim=args.dim, depth=args.depth,
                  heads=args.heads, kv_heads=args.kv_heads,
                  head_dim=args.head_dim, hidden=args.hidden)
  names = [n for n in NAMES if not args.only or n in args.only.split(',')]
  lrs = {'MAC': args.mac_lr, 'SGD': args.sgd_lr, 'AdamW': args.adam_lr}
  seeds = [int(s) for s in args.seeds.split(',')]
  print(f'{len(ids)} characters, vocabulary {len(chars)}, {args.steps} '
        f'steps of {args.batch}×{args.context} tokens, seeds {seeds}')
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, args.context), jnp.int32))['params']
  plan = char_gpt.plans_of(model, shapes, args.context)[False]
  print(plan)
  # RMSNorm gains are the only parameters MAC leaves to plain SGD.
  assert plan.fraction >= 0.95, plan.fraction

  if args.sweep:
    args.seed = seeds[0]
    lrs.update(char_gpt.sweep(names, lrs, model, data, args,
                              progress=not args.no_progress))
  rows, curves = [], {name: [] for name in names}
  for seed in seeds:
    args.seed = seed
    for name in names:
      _, curve, val_curve, seconds = char_gpt.train(
          name, lrs[name], model, data, args, progress=not args.no_progress)
      curves[name].append((curve, val_curve))
      rows.append({'optimizer': name, 'seed': seed, 'lr': lrs[name],
                   'train_loss': float(np.mean(curve[-20:])),
                   'val_loss': val_curve[-1][1], 'seconds': seconds})
  print(f"\n{'optimizer':<10}{'seed':>5}{'lr':>8}{'train loss':>11}"
        f"{'val loss':>10}{'time s':>8}")
  for r in rows:
    print(f"{r['optimizer']:<10}{r['seed']:>5}{r['lr']:>8.3g}"
          f"{r['train_loss']:>11.3f}{r['val_loss']:>10.3f}"
          f"{r['seconds']:>8.1f}")
  if len(seeds) > 1:
    # One row per optimizer: the final validation loss over seeds (std, not
    # the standard error: with two seeds it is half their difference).
    print(f"\n{'optimizer':<10}{'lr':>8}{'val loss (mean ± std)':>24}"
          '  per seed')
    for name in names:
      vals = [r['val_loss'] for r in rows if r['optimizer'] == name]
      print(f'{name:<10}{lrs[name]:>8.3g}'
            f'{f"{np.mean(vals):.3f} ± {np.std(vals):.3f}":>24}  '
            + ' '.join(f'{v:.3f}' for v in vals))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'gemma_decoder_loss.png')
  plot(curves, args.steps, path)
  print(f'\nloss curves: {path}')
  return rows


if __name__ == '__main__':
  main()
