"""The scikit-learn digits as the examples use them: split, batches, loss.

The 1797 8×8 handwritten digits ship with scikit-learn
(``sklearn.datasets.load_digits``), so every example runs offline.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def load_data(seed: int, channel_axis: bool = True):
  """Digits in [0, 1] and int labels, stratified 75/25 train/test split.

  Args:
    seed: seed of the split.
    channel_axis: images ``[N, 8, 8, 1]`` (for convs) if true, else ``[N, 8, 8]``.

  Returns:
    ``(x_train, x_test, y_train, y_test)`` as numpy arrays.
  """
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  if channel_axis:
    images = images[..., None]
  return train_test_split(images, digits.target.astype(np.int32),
                          test_size=0.25, random_state=seed,
                          stratify=digits.target)


def batch_indices(n_train: int, batch_size: int, steps: int,
                  seed: int) -> np.ndarray:
  """``[steps, batch_size]`` indices: shuffled epochs, the last batch dropped.

  Row ``t`` is the batch of step ``t``; every optimizer gets the same rows.
  """
  rng = np.random.default_rng(seed)
  per_epoch = n_train // batch_size
  epochs = -(-steps // per_epoch)
  order = np.concatenate([
      rng.permutation(n_train)[:per_epoch * batch_size] for _ in range(epochs)])
  return order.reshape(-1, batch_size)[:steps]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
