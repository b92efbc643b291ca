"""Attention-aware capture for Flax linen.

Inside :func:`mac_optax.linen.capture`, every call of an
``nn.MultiHeadDotProductAttention`` (``nn.SelfAttention``,
``nn.MultiHeadAttention``) runs with a pass-through ``attention_fn``: the
layer's own ``attention_fn`` is called with a recorder as its ``module``
argument. Flax's ``dot_product_attention_weights`` hands ``module.sow`` the
probabilities after the softmax (bias, padding and causal masks applied) and
before dropout; the recorder reduces them at once to per-key weights
``w_bj = mean_{h,i} P_bhij`` (``[B, Nk]``, see :mod:`mac_optax._src.attention`)
and keeps nothing else. If the layer was called with ``sow_weights=True`` the
recorder forwards the probabilities to the layer as usual.

The statistics of the layer's projections are held back until the call
returns. The value projection is the ``DenseGeneral`` whose output is the
``value`` the ``attention_fn`` received (found by identity, not by name); it
sows the attention-mixed mean of its own input instead of its plain mean.
Query, key and output projections sow their plain means. Where no
probabilities reach the recorder (an ``attention_fn`` without a ``module``
argument, e.g. a flash kernel; decoding with a cache, whose values the call
cannot see) every projection keeps its plain mean.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from typing import Any, Callable, Optional

import flax.linen as nn
import jax

from mac_optax._src import attention
from mac_optax._src import mean_inputs
from mac_optax._src import statistics

COLLECTION = 'intermediates'
_WEIGHTS_NAME = 'attention_weights'

_LOCAL = threading.local()


def _active() -> list:
  """The stack of open captures' trackers in this thread."""
  if not hasattr(_LOCAL, 'trackers'):
    _LOCAL.trackers = []
  return _LOCAL.trackers


@dataclasses.dataclass
class _Held:
  """A projection's statistic, held until its attention call returns."""
  module: nn.Module
  name: str
  mean: jax.Array
  inputs: jax.Array
  output: Any


@dataclasses.dataclass
class _Frame:
  """One attention call being captured."""
  path: tuple
  held: list = dataclasses.field(default_factory=list)
  value: Any = None
  weights: list = dataclasses.field(default_factory=list)


class _Recorder:
  """Stands in for ``module`` in ``attention_fn(..., module=)``.

  ``dot_product_attention_weights`` calls ``module.sow(col, name, probs)``;
  the probabilities are reduced here and only ``[B, Nk]`` is kept.
  """

  def __init__(self, frame: _Frame, module: Optional[nn.Module]):
    self._frame = frame
    self._module = module

  def __bool__(self) -> bool:
    return True

  def sow(self, col, name, value, *args, **kwargs):
    if name == _WEIGHTS_NAME:
      self._frame.weights.append(attention.key_weights(value))
    if self._module is not None:
      return self._module.sow(col, name, value, *args, **kwargs)
    return False


def _recording(attention_fn: Callable, frame: _Frame) -> Callable:
  """A pass-through ``attention_fn`` that records ``value`` and ``w_bj``."""
  try:
    accepts_module = 'module' in inspect.signature(attention_fn).parameters
  except (TypeError, ValueError):
    accepts_module = False

  @functools.wraps(attention_fn)  # keeps the signature Flax filters on
  def wrapper(query, key, value, *args, **kwargs):
    if not accepts_module:
      return attention_fn(query, key, value, *args, **kwargs)
    frame.value = value
    kwargs['module'] = _Recorder(frame, kwargs.get('module'))
    return attention_fn(query, key, value, *args, **kwargs)

  return wrapper


class Tracker:
  """Per-:func:`capture` state: the attention calls in progress."""

  def __init__(self, mode: str):
    self.mode = attention.check_mode(mode)
    self.frames: list[_Frame] = []

  def __enter__(self):
    _active().append(self)
    return self

  def __exit__(self, *exc):
    _active().remove(self)

  def handles(self, module: nn.Module, method: str) -> bool:
    if method != '__call__' or self.mode == attention.PLAIN:
      return False
    if not isinstance(module, nn.MultiHeadDotProductAttention):
      return False
    if module.decode:
      return False
    # nn.SelfAttention calls the base __call__ again; lifted copies
    # (nn.remat, nn.scan of the layer itself) share the path.
    return not any(f.path == tuple(module.path) for f in self.frames)

  def call_attention(self, module: nn.Module, next_fun: Callable, args,
                     kwargs) -> Any:
    """Runs an attention layer with the recording ``attention_fn``."""
    frame = _Frame(tuple(module.path))
    original = module.attention_fn
    self.frames.append(frame)
    # Modules are frozen dataclasses; the field is swapped for this call only.
    object.__setattr__(module, 'attention_fn', _recording(original, frame))
    try:
      out = next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, 'attention_fn', original)
      self.frames.pop()
    self._release(frame)
    return out

  def _release(self, frame: _Frame) -> None:
    weights = frame.weights[-1] if len(frame.weights) == 1 else None
    for held in frame.held:
      mean = held.mean
      if weights is not None and held.output is frame.value:
        mean = attention.mixed_mean(weights, held.inputs, self.mode)
      held.module.sow(COLLECTION, held.name, mean)

  def sow(self, module: nn.Module, name: str, mean: jax.Array, inputs,
          next_fun: Callable, args, kwargs) -> Any:
    """Sows a layer statistic, or holds it while its attention call runs."""
    frame = self.frames[-1] if self.frames else None
    if (frame is None or name != statistics.MEAN
        or not isinstance(module, nn.DenseGeneral)
        or tuple(module.path[:-1]) != frame.path):
      module.sow(COLLECTION, name, mean)
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    frame.held.append(_Held(module, name, mean, inputs, out))
    return out


def current_mode() -> Optional[str]:
  """The attention mode of the innermost open capture, or None."""
  trackers = _active()
  return trackers[-1].mode if trackers else None


def sow_attention(projection: nn.Module, inputs: jax.Array, *,
                  probs: Optional[jax.Array] = None,
                  weights: Optional[jax.Array] = None,
                  columns: str = 'qkv',
                  mode: Optional[str] = None) -> None:
  """Sows the attention-aware statistic of a hand-written attention layer.

  For custom attention modules (GPT style: one ``Dense`` to ``3·D`` followed
  by a hand-written softmax, or a flash kernel). `projection` is the module
  that owns the fused kernel (``(D, 3·D)``, columns ``[q | k | v]``); after it
  has been called on `inputs`, this replaces its plain statistic by the
  ``[G, D]`` statistic of :func:`mac_optax._src.attention.grouped_statistic`:
  ``x̄`` for the query and key column groups, the attention-mixed mean for
  the value group. Give either the probabilities `probs` (``[B, H, Nq, Nk]``,
  after softmax and masks, before dropout; reduced at once) or, when they are
  never materialized, the per-key weights `weights` ``= mean_{h,i} P_bhij``
  (``[B, Nk]``), e.g. from
  :func:`mac_optax.attention.key_weights_from_attention`.

  Under :func:`mac_optax.linen.capture` the plain ``[1, D]`` statistic the
  capture sowed for this call of `projection` is replaced; otherwise the
  statistic is sown as a new entry. A no-op when the ``'intermediates'``
  collection is not mutable.

  Args:
    projection: the bound linen module owning the kernel (a ``nn.Dense`` you
      created, or your own module if it holds ``kernel`` itself).
    inputs: ``[B, N, D]`` input of the projection.
    probs: ``[B, H, N, N]`` attention probabilities.
    weights: ``[B, N]`` per-key weights, instead of `probs`.
    columns: order of the column groups (``'qkv'``, ``'kv'``, ``'v'``, ...).
    mode: ``'exact'`` or ``'product_of_means'``; by default the mode of the
      open capture (``'exact'`` outside one).

  Example:
    >>> class CausalSelfAttention(nn.Module):
    ...   heads: int
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     B, N, D = x.shape
    ...     c_attn = nn.Dense(3 * D, name='c_attn')
    ...     q, k, v = jnp.split(c_attn(x), 3, axis=-1)
    ...     split = lambda t: t.reshape(B, N, self.heads, -1)
    ...     q, k, v = split(q), split(k), split(v)
    ...     s = jnp.einsum('bihd,bjhd->bhij', q, k) / jnp.sqrt(q.shape[-1])
    ...     s = jnp.where(jnp.tril(jnp.ones((N, N), bool)), s, -1e9)
    ...     p = jax.nn.softmax(s)
    ...     mac_optax.linen.sow_attention(c_attn, x, probs=p)
    ...     y = jnp.einsum('bhij,bjhd->bihd', p, v).reshape(B, N, D)
    ...     return nn.Dense(D, name='c_proj')(y)
  """
  if not projection.is_mutable_collection(COLLECTION):
    return
  if (probs is None) == (weights is None):
    raise ValueError(
        f"mac: sow_attention at '{'/'.join(projection.path)}': give exactly "
        'one of probs= and weights=.')
  if mode is None:
    mode = current_mode() or attention.EXACT
  if weights is None:
    weights = attention.key_weights(probs)
  stat = attention.grouped_statistic(inputs, weights, columns=columns,
                                     mode=mode)
  stat = stat.astype(mean_inputs.stat_dtype(stat.dtype))
  name = statistics.MEAN
  sown = projection.get_variable(COLLECTION, name)
  if current_mode() is not None and isinstance(sown, tuple) and sown and (
      tuple(sown[-1].shape) == (1, stat.shape[-1])):
    projection.put_variable(COLLECTION, name, sown[:-1] + (stat,))
  else:
    projection.sow(COLLECTION, name, stat)
