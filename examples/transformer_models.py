"""Small unmodified Flax transformers for the examples and benchmarks.

Nothing here knows about MAC: ``mac_optax.linen.capture()`` finds the
attention layers, dense layers and the tied output embedding by itself.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Block(nn.Module):
  """Pre-norm transformer block: self-attention and a GELU MLP."""
  heads: int
  causal: bool = False
  dropout: float = 0.0
  train: bool = False

  @nn.compact
  def __call__(self, x):
    mask = None
    if self.causal:
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2], bool))
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, dropout_rate=self.dropout,
        deterministic=not self.train)(nn.LayerNorm()(x), mask=mask)
    x = x + y
    d = x.shape[-1]
    y = nn.Dense(4 * d)(nn.LayerNorm()(x))
    return x + nn.Dense(d)(nn.gelu(y))


class ViT(nn.Module):
  """Vision transformer for small images: patches → blocks → mean pool."""
  patch: int = 2
  dim: int = 32
  heads: int = 4
  depth: int = 2
  classes: int = 10

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = nn.Conv(self.dim, (self.patch, self.patch),
                strides=(self.patch, self.patch), name='patch_embed')(images)
    x = x.reshape(x.shape[0], -1, self.dim)
    pos = self.param('pos_embed', nn.initializers.normal(0.02),
                     (1, x.shape[1], self.dim))
    x = x + pos
    for i in range(self.depth):
      x = Block(self.heads, train=train, name=f'block_{i}')(x)
    x = nn.LayerNorm()(x).mean(axis=1)
    return nn.Dense(self.classes, name='head')(x)


class GPT(nn.Module):
  """Character-level causal transformer with a tied output embedding."""
  vocab: int
  context: int = 64
  dim: int = 64
  heads: int = 4
  depth: int = 2
  dropout: float = 0.0
  remat: bool = False   # recompute each block in the backward pass

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    embed = nn.Embed(self.vocab, self.dim, name='embed')
    pos = self.param('pos_embed', nn.initializers.normal(0.02),
                     (self.context, self.dim))
    x = embed(tokens) + pos[:tokens.shape[-1]]
    block = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      x = block(self.heads, causal=True, dropout=self.dropout, train=train,
                name=f'block_{i}')(x)
    return embed.attend(nn.LayerNorm()(x))   # tied output layer
