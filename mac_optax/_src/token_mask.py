"""Padding masks: which layer inputs have token rows, and their masked sums.

A capture opened with ``token_mask=m`` (``m``: ``[*batch, tokens]``, True,
or a non-zero integer, for a real token) makes every statistic whose rows are
tokens a mean over the real tokens only. Whether a layer's input has token
rows is decided by one rule, from shapes alone:

    An input ``x`` has **token rows** when its leading ``k = m.ndim`` axes
    have exactly the mask's shape and every one of them is a *row axis* of
    the layer: an axis the layer neither contracts with its kernel, nor
    batches with it (einsum batch axes), nor sums away itself.

Then, for a layer with row axes ``(*mask axes, *other rows)`` the mean input
is ``ā = Σ_{t, r} m_t x[t, r] / (Σ_t m_t · #r)`` (``t`` runs over the mask's
positions, ``r`` over the other row axes). An all-padding batch gives
``ā = 0``. Inputs whose leading axes do not have the mask's shape (a head on
pooled ``[batch, features]``, images, a time-major ``[tokens, batch, d]``
input when ``batch != tokens``) keep their plain mean; neither does a layer
whose leading axes match but are not all rows (``'btd,df->bf'`` sums the
tokens itself, so its input mean rightly includes the padding it reads). A
token axis that does not lead (heads first, ``[heads, batch, tokens, d]``)
or that was flattened into the batch (``[batch·tokens, d]``) is not
recognized. A convolution whose input's leading axes have the mask's shape
raises: its windows read padding into the patches of real positions, which
no row mask removes.

A mask that no input of the whole forward pass leads with (``[B, T+1]``,
``[T, B]``, ``[B, T, 1]``) raises when its capture closes, naming its shape
and the input shapes it met: one non-matching input is a pooled head or an
encoder sequence, none at all is a wrong mask (:class:`MaskCheck`).

Attention (value projections): with probabilities ``P_bhij`` and query mask
``m_bi`` (the queries are token rows when ``P``'s batch axes and query axis
have the mask's shape), the per-key weights average over heads and *real*
queries, ``w_bj = Σ_{h,i} m_bi P_bhij / (H·n_b)``, ``n_b = Σ_i m_bi``, and
the mixed mean weights each example by its number of real queries,
``ā_v = Σ_b n_b Σ_j w_bj x_bj / Σ_b n_b = E_{b,h, real i}[Σ_j P_bhij x_bj]``.
Keys keep the weights the probabilities give them (padding keys get none
when the attention mask excludes them).
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def checked(mask) -> Optional[jax.Array]:
  """Validates a capture's ``token_mask``; None passes through.

  Raises:
    ValueError: not an array of at least one axis of booleans or integers
      (a float mask would be a weighting, which MAC does not define).
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask) if not isinstance(mask, jax.Array) else mask
  if mask.ndim < 1 or not (jnp.issubdtype(mask.dtype, jnp.bool_)
                           or jnp.issubdtype(mask.dtype, jnp.integer)):
    raise ValueError(
        'mac: token_mask must be [*batch, tokens] booleans (or integers, '
        f'non-zero for a real token), got {mask.dtype} of shape '
        f'{mask.shape}.')
  return mask


def leads(mask: Optional[jax.Array], shape: Sequence[int]) -> bool:
  """Whether an array of `shape` leads with the mask's shape."""
  return mask is not None and tuple(shape[:mask.ndim]) == tuple(mask.shape)


# ------------------------------------------------------------ mask checks
#
# A mask that gives no input token rows is a wrong mask ([B, T+1], [T, B],
# [B, T, 1]), not a model without tokens: the capture would average the
# padding in while the user believes it is excluded. Every decision of the
# rule is noted for the capture that owns the mask (found by identity), and
# the capture raises on exit if it decided something and never matched.


class MaskCheck:
  """What one capture's token mask met: input shapes, and any token rows."""

  def __init__(self, mask: jax.Array, where: str):
    self.mask = mask     # held, so its id is not reused while registered
    self.where = where
    self.matched = False
    self.shapes: list[tuple[int, ...]] = []

  def note(self, shape: Sequence[int], matched: bool) -> None:
    self.matched = self.matched or matched
    shape = tuple(shape)
    if shape not in self.shapes:
      self.shapes.append(shape)

  def verify(self) -> None:
    """Raises if the mask was checked against inputs and matched none.

    Raises:
      ValueError: naming the mask's shape and the input shapes it met.
    """
    if self.matched or not self.shapes:
      return
    shown = ', '.join(str(s) for s in self.shapes[:8]) + (
        ', ...' if len(self.shapes) > 8 else '')
    raise ValueError(
        f'mac: {self.where}(token_mask=...) of shape {tuple(self.mask.shape)} '
        'matched no layer input, so padding would be averaged into every '
        f'statistic. The inputs it was checked against have shapes {shown}. '
        'A mask must have the leading axes of the token inputs, '
        '[*batch, tokens] (for an input [B, T, D] a mask [B, T]); check its '
        'length and axis order, or open the capture without token_mask for a '
        'model without token inputs.')


_LOCK = threading.Lock()
_CHECKS: dict[int, list[MaskCheck]] = {}


def watch(mask: Optional[jax.Array], where: str) -> Optional[MaskCheck]:
  """Starts noting the rule's decisions for `mask`; None for no mask."""
  if mask is None:
    return None
  check = MaskCheck(mask, where)
  with _LOCK:
    _CHECKS.setdefault(id(mask), []).append(check)
  return check


def unwatch(check: Optional[MaskCheck]) -> None:
  """Stops noting for `check` (from any thread)."""
  if check is None:
    return
  with _LOCK:
    checks = _CHECKS.get(id(check.mask), [])
    checks[:] = [c for c in checks if c is not check]
    if not checks:
      _CHECKS.pop(id(check.mask), None)


def _note(mask: Optional[jax.Array], shape: Sequence[int],
          matched: bool) -> None:
  if mask is None:
    return
  with _LOCK:
    checks = list(_CHECKS.get(id(mask), ()))
  for check in checks:
    if check.mask is mask:
      check.note(shape, matched)


def row_weights(mask: Optional[jax.Array], shape: Sequence[int],
                row_axes: Sequence[int], dtype) -> Optional[jax.Array]:
  """The mask as 0/1 weights if an input has token rows (the rule), or None.

  Args:
    mask: the capture's token mask or None.
    shape: the layer input's shape.
    row_axes: the input's row axes (neither contracted, batched nor summed).
    dtype: the weights' dtype (the statistic's).
  """
  if mask is None:
    return None
  if not leads(mask, shape):
    _note(mask, shape, False)
    return None
  _note(mask, shape, True)
  rows = {a % len(shape) for a in row_axes}
  if not all(a in rows for a in range(mask.ndim)):
    return None   # the layer reads the tokens itself: a match, not a miss
  return jax.lax.stop_gradient(mask != 0).astype(dtype)


def count(weights: jax.Array, other_rows: int) -> jax.Array:
  """``Σ m · #other rows``, at least 1 (an all-padding batch gives ā = 0)."""
  return jnp.maximum(jnp.sum(weights) * other_rows, 1.0)


def check_not_conv(mask: Optional[jax.Array], shape: Sequence[int],
                   where: str) -> None:
  """Raises if a convolution's input leads with the mask's shape (see top)."""
  _note(mask, shape, False)
  if leads(mask, shape):
    raise ValueError(
        f"mac: convolution '{where}': its input {tuple(shape)} leads with "
        f'the token mask\'s shape {tuple(mask.shape)}. A convolution over '
        'masked tokens reads padding into the patches of real positions, '
        'which a row mask cannot remove, and an image input that merely has '
        'this shape cannot be told apart; MAC refuses both. Open the capture '
        'without token_mask for this model, or mask the sequence yourself '
        'and sow the statistic with sow_mean.')


def query_weights(mask: Optional[jax.Array], probs_shape: Sequence[int]
                  ) -> Optional[jax.Array]:
  """``[*B, Nq]`` 0/1 query weights if ``P``'s queries are token rows.

  ``P`` is ``[*B, H, Nq, Nk]``: its queries are token rows when
  ``(*B, Nq)`` is the mask's shape.
  """
  if mask is None:
    return None
  shape = tuple(probs_shape)
  queries = shape[:-3] + (shape[-2],)
  if queries != tuple(mask.shape):
    _note(mask, queries, False)
    return None
  _note(mask, queries, True)
  return jax.lax.stop_gradient(mask != 0).astype(np.float32)
