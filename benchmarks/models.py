"""Benchmark models (plain Flax linen) and offline data sets.

Every model is an unmodified linen module: MAC reaches its layers through
``mac_optax.linen.capture()``, kfac-jax through its graph auto-registration.
The ViT and GPT use ``nn.MultiHeadDotProductAttention`` (GPT with a causal
mask), so the attention-aware capture applies to them without changes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class MLP(nn.Module):
  """``d_in → width × depth → classes``, ReLU."""
  widths: Sequence[int] = (512, 512)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.widths:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.classes)(x)


class ResBlock(nn.Module):
  channels: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.channels, (3, 3), strides=self.strides, use_bias=False)(x)
    y = nn.relu(nn.GroupNorm(num_groups=8)(y))
    y = nn.Conv(self.channels, (3, 3), use_bias=False)(y)
    y = nn.GroupNorm(num_groups=8)(y)
    if x.shape != y.shape:
      x = nn.Conv(self.channels, (1, 1), strides=self.strides,
                  use_bias=False)(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A small pre-activation-free ResNet: stem, one block per stage, GroupNorm."""
  stages: Sequence[int] = (16, 32, 64)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.stages[0], (3, 3))(x))
    for i, channels in enumerate(self.stages):
      x = ResBlock(channels, strides=1 if i == 0 else 2)(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.classes)(x)


class SmallCNN(nn.Module):
  """Two convolutions and a dense head, for 8×8 digits."""
  channels: Sequence[int] = (32, 64)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.classes)(x)


class Conv1DNet(nn.Module):
  """1-D CNN for MNIST-1D (length-40 signals)."""
  channels: Sequence[int] = (32, 32)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x[..., None]
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (5,), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.classes)(x)


class Block(nn.Module):
  """Pre-norm transformer block with ``nn.MultiHeadDotProductAttention``."""
  dim: int
  heads: int
  causal: bool = False

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(x[..., 0]) if self.causal else None
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
    x = x + h
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * self.dim)(h)
    h = nn.Dense(self.dim)(nn.gelu(h))
    return x + h


class ViT(nn.Module):
  """Patch embedding (a strided conv), learned positions, mean pooling."""
  patch: int = 4
  dim: int = 128
  depth: int = 4
  heads: int = 4
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.dim, (self.patch, self.patch),
                strides=(self.patch, self.patch))(x)
    x = x.reshape(x.shape[0], -1, self.dim)
    pos = self.param('pos', nn.initializers.normal(0.02), x.shape[1:])
    x = x + pos
    for _ in range(self.depth):
      x = Block(self.dim, self.heads)(x)
    x = nn.LayerNorm()(x).mean(axis=1)
    return nn.Dense(self.classes)(x)


class GPT(nn.Module):
  """Character GPT: token + position embeddings, causal blocks, dense head."""
  vocab: int = 96
  context: int = 128
  dim: int = 128
  depth: int = 4
  heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.dim)(tokens)
    pos = self.param('pos', nn.initializers.normal(0.02),
                     (self.context, self.dim))
    x = x + pos[:tokens.shape[1]]
    for _ in range(self.depth):
      x = Block(self.dim, self.heads, causal=True)(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.vocab)(x)


# --------------------------------------------------------------------------
# Data (offline).


@dataclasses.dataclass
class Dataset:
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  sequence: bool = False   # labels are next tokens (language model)


def digits(seed: int = 0) -> Dataset:
  """sklearn digits: 1797 8×8 gray images, 80/20 split, scaled to [0, 1]."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  cut = int(0.8 * len(x))
  return Dataset('digits', x[:cut], y[:cut], x[cut:], y[cut:])


def mnist1d(seed: int = 0) -> Dataset:
  """MNIST-1D generated offline by the ``mnist1d`` package (4000/1000)."""
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top
  args = get_dataset_args()
  args.seed = seed
  data = make_dataset(args)
  return Dataset('mnist1d', data['x'].astype(np.float32),
                 data['y'].astype(np.int32),
                 data['x_test'].astype(np.float32),
                 data['y_test'].astype(np.int32))


def pydoc_text(context: int) -> tuple[Dataset, int]:
  """Characters of ``pydoc_data.topics``: 90/10 split into windows.

  Returns windows of ``context + 1`` tokens (inputs and shifted targets are
  cut in the training step) and the vocabulary size. Characters outside
  printable ASCII map to one token.
  """
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  text = ''.join(topics.topics.values())
  codes = np.frombuffer(text.encode('ascii', 'replace'), np.uint8)
  codes = np.clip(codes.astype(np.int32) - 31, 0, 96)  # \n,\t → 0
  codes[codes == 96] = 0
  vocab = 96
  n = (len(codes) - 1) // context
  windows = np.stack([codes[i * context:(i + 1) * context + 1]
                      for i in range(n)])
  cut = int(0.9 * n)
  tr, te = windows[:cut], windows[cut:]
  return Dataset('pydoc', tr[:, :-1], tr[:, 1:], te[:, :-1], te[:, 1:],
                 sequence=True), vocab


def count_params(params) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def synthetic_batch(kind: str, shape, batch: int, classes: int, seed=0):
  """Random inputs/labels of the benchmark shapes (timing/memory only)."""
  rng = np.random.default_rng(seed)
  if kind == 'tokens':
    x = rng.integers(0, classes, (batch,) + tuple(shape)).astype(np.int32)
    y = rng.integers(0, classes, (batch,) + tuple(shape)).astype(np.int32)
  else:
    x = rng.standard_normal((batch,) + tuple(shape)).astype(np.float32)
    y = rng.integers(0, classes, (batch,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)
