"""Capture of MAC statistics from unmodified Flax NNX models.

NNX has no method interceptor. Inside :func:`capture`, the ``__call__`` of
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.MultiHeadAttention``
and ``nnx.Embed`` (lookups only with ``embed_lookup=True``), and
``nnx.Embed.attend``, are temporarily replaced on their classes by wrappers
that sow the mean input of the call with
``module.sow(nnx.Intermediate, name, mean)`` and then run the original method
unchanged. The sown value lands at the layer's own path of the
``nnx.capture(model, nnx.Intermediate)`` result, so ``grads[p]['kernel']``
pairs with ``intermediates[p]['mac_mean']`` exactly as on the linen path.

Properties of the patching:

* the original methods are restored when the last open :func:`capture`
  exits (also on exceptions); nested and concurrent captures share one
  installation, counted under a lock;
* a wrapper only does work in a thread that is inside :func:`capture` and
  for a module that ``nnx.capture`` is collecting from; anywhere else it
  calls the original method directly, so the model computes exactly what it
  computes without capture and ``Module.sow`` is never reached outside
  ``nnx.capture`` (where it is deprecated and would add attributes);
* subclasses that do not override the patched method are captured too.

``nnx.MultiHeadAttention``: query, key and output projections get the plain
mean of their inputs (through the ``LinearGeneral`` wrapper). The value
projection gets the mean of the attention-mixed input
``E_{b,h,i}[Σ_j P_bhij x_bj]`` (or the authors' product of means), from the
probabilities the layer itself computes: for the duration of the call the
layer's ``attention_fn`` is swapped for a pass-through that hands the original
a recorder as its ``module`` argument. Flax's attention gives
``module.sow`` the probabilities after softmax and masks (padding, causal),
before dropout; the recorder reduces them at once to per-key weights
``w_bj = mean_{h,i} P_bhij`` (``[B, Nk]``, :mod:`mac_optax._src.attention`),
so no ``[B, H, Nq, Nk]`` array is kept. With ``sow_weights=True`` the
probabilities are still sown as usual. Given a ``module``, Flax computes the
attention through its explicit-probabilities path instead of
``jax.nn.dot_product_attention``: inside the capture the layer's output agrees
with the uncaptured one to float rounding, not bit for bit. Where no probabilities reach the
recorder (an ``attention_fn`` without a ``module`` argument, decoding with a
cache) the value projection keeps its plain mean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from mac_optax._src import attention as attention_lib
from mac_optax._src import linen_capture
from mac_optax._src import mean_inputs
from mac_optax._src import statistics


def sow_mean(module: nnx.Module, mean: jax.Array, *,
             name: str = statistics.MEAN) -> None:
  """Sows a layer statistic from inside a custom NNX module.

  Use this when a layer computes ``y = x @ kernel (+ bias)`` with its own
  ``nnx.Param`` attributes named ``kernel``/``bias`` instead of an
  ``nnx.Linear``/``nnx.Conv``. The statistic is the mean of ``x`` over
  everything but the contracted features, ``[G, d_in]``;
  :func:`mac_optax.nnx.input_mean` computes it. Outside
  ``nnx.capture(model, nnx.Intermediate)`` this is a no-op (it never calls the
  deprecated out-of-capture ``Module.sow``).

  Args:
    module: the module that owns the ``kernel`` parameter.
    mean: ``[G, d_in]`` statistic.
    name: the statistic's name (``mac_optax.MEAN`` for ``kernel``,
      ``mac_optax.ATTEND_MEAN`` for a transposed ``embedding``).

  Example:
    >>> class MyLinear(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 8)))
    ...   def __call__(self, x):
    ...     mac_optax.nnx.sow_mean(self, mac_optax.nnx.input_mean(x))
    ...     return x @ self.kernel
  """
  if not _collecting(module):
    return
  mean = jnp.asarray(mean)
  module.sow(nnx.Intermediate, name,
             mean.astype(mean_inputs.stat_dtype(mean.dtype)))


def input_mean(x: jax.Array, axis: Sequence[int] = (-1,)) -> jax.Array:
  """``[1, d_in]`` mean of ``x`` over all axes but the contracted ``axis``."""
  return mean_inputs.dense_mean(x, axis)


def _collecting(module: nnx.Module) -> bool:
  """Whether ``nnx.capture`` is collecting sown values from `module`.

  ``nnx.capture`` gives every module it collects from a ``__captures__``
  attribute for the duration of the call; ``Module.sow`` stores into it when
  present and otherwise falls back to its deprecated attribute-creating path,
  which the capture must never take.
  """
  return getattr(module, '__captures__', None) is not None


# --------------------------------------------------------------------------
# Statistics of each supported layer.


def _first_input(args, kwargs, name):
  return args[0] if args else kwargs[name]


def _linear_statistic(module: nnx.Linear, args, kwargs) -> jax.Array:
  return mean_inputs.dense_mean(_first_input(args, kwargs, 'inputs'))


def _linear_general_statistic(module: nnx.LinearGeneral, args,
                              kwargs) -> jax.Array:
  if module.batch_axis:
    raise ValueError(
        'mac: nnx.LinearGeneral with batch_axis='
        f'{dict(module.batch_axis)} (in_features={module.in_features}, '
        f'out_features={module.out_features}) is not supported: its kernel '
        'has one slice per batch index.')
  return mean_inputs.dense_mean(_first_input(args, kwargs, 'inputs'),
                                module.axis)


def _conv_statistic(module: nnx.Conv, args, kwargs) -> jax.Array:
  kernel_size = tuple(module.kernel_size)
  n = len(kernel_size)
  tuple_ = functools.partial(linen_capture._tuple, n=n)  # pylint: disable=protected-access
  return linen_capture.padded_conv_statistic(
      _first_input(args, kwargs, 'inputs'), kernel_size,
      tuple_(module.strides),
      linen_capture._canonical_padding(module.padding, n),  # pylint: disable=protected-access
      tuple_(module.input_dilation), tuple_(module.kernel_dilation),
      module.feature_group_count)


def _attend_statistic(module: nnx.Embed, args, kwargs) -> jax.Array:
  return mean_inputs.dense_mean(_first_input(args, kwargs, 'query'))


def _lookup_statistic(module: nnx.Embed, args,
                      kwargs) -> Optional[jax.Array]:
  """Token frequencies of an embedding lookup (``capture(embed_lookup=True)``)."""
  if not _options().embed_lookup:
    return None
  ids = _first_input(args, kwargs, 'inputs')
  return attention_lib.token_frequencies(ids, module.num_embeddings)


# --------------------------------------------------------------------------
# Temporary patching of the layer classes.

_LOCK = threading.RLock()
_LOCAL = threading.local()
_INSTALLED = {'count': 0, 'originals': {}}


@dataclasses.dataclass(frozen=True)
class _Options:
  attention: str
  embed_lookup: bool


def _stack() -> list:
  """The options of the open captures of this thread, innermost last."""
  if not hasattr(_LOCAL, 'stack'):
    _LOCAL.stack = []
  return _LOCAL.stack


def _options() -> Optional[_Options]:
  stack = _stack()
  return stack[-1] if stack else None


def _suppressed() -> set:
  """Ids of modules whose plain statistic is replaced by their owner's."""
  if not hasattr(_LOCAL, 'suppressed'):
    _LOCAL.suppressed = set()
  return _LOCAL.suppressed


def _recorded() -> dict:
  """``id(module) -> [inputs]`` of projections an attention wrapper reads."""
  if not hasattr(_LOCAL, 'recorded'):
    _LOCAL.recorded = {}
  return _LOCAL.recorded


def _stat_wrapper(original: Callable, name: str,
                  statistic: Callable) -> Callable:
  """A method that sows `statistic(module, args, kwargs)`, then runs."""

  @functools.wraps(original)
  def wrapper(self, *args, **kwargs):
    if _options() is None or not _collecting(self):
      return original(self, *args, **kwargs)
    recorded = _recorded().get(id(self))
    if recorded is not None:
      recorded.append(_first_input(args, kwargs, 'inputs'))
    if id(self) not in _suppressed():
      mean = statistic(self, args, kwargs)
      if mean is not None:
        self.sow(nnx.Intermediate, name, mean)
    return original(self, *args, **kwargs)

  wrapper.__mac_capture__ = True
  return wrapper


def _patches() -> list[tuple[type, str, Callable[[Callable], Callable]]]:
  """``(class, method name, wrapper factory)`` of every supported layer."""
  mean, attend = statistics.MEAN, statistics.ATTEND_MEAN
  lookup = statistics.LOOKUP_MEAN
  return [
      (nnx.Linear, '__call__',
       lambda f: _stat_wrapper(f, mean, _linear_statistic)),
      (nnx.LinearGeneral, '__call__',
       lambda f: _stat_wrapper(f, mean, _linear_general_statistic)),
      (nnx.Conv, '__call__',
       lambda f: _stat_wrapper(f, mean, _conv_statistic)),
      (nnx.Embed, 'attend',
       lambda f: _stat_wrapper(f, attend, _attend_statistic)),
      (nnx.Embed, '__call__',
       lambda f: _stat_wrapper(f, lookup, _lookup_statistic)),
      (nnx.MultiHeadAttention, '__call__', _attention_wrapper),
  ]


def _install() -> None:
  originals = _INSTALLED['originals']
  for cls, name, make in _patches():
    original = cls.__dict__[name]
    originals[(cls, name)] = original
    setattr(cls, name, make(original))


def _uninstall() -> None:
  originals = _INSTALLED['originals']
  for (cls, name), original in originals.items():
    current = cls.__dict__.get(name)
    if getattr(current, '__mac_capture__', False):
      setattr(cls, name, original)
  originals.clear()


@contextlib.contextmanager
def capture(*, attention: str = 'exact',
            embed_lookup: bool = False) -> Iterator[None]:
  """Sows MAC statistics from every supported layer of an unmodified model.

  Run the model through ``nnx.capture(model, nnx.Intermediate)`` inside this
  context; the returned ``nnx.State`` holds, at the path of each layer, the
  statistic the transform pairs with the layer's ``kernel`` (or tied
  ``embedding``). Supported: ``nnx.Linear``, ``nnx.LinearGeneral`` (any
  contracted axes and output shape, no ``batch_axis``), ``nnx.Conv`` (any
  rank, strides, padding modes including ``'CIRCULAR'``/``'REFLECT'``/
  ``'CAUSAL'``, input and kernel dilation, ``feature_group_count``),
  ``nnx.Embed.attend`` (tied output layer) and ``nnx.MultiHeadAttention``
  (value projection with the attention-mixed mean); inside ``nnx.scan`` /
  ``nnx.vmap`` (statistics stacked like the parameters) and ``nnx.remat``.
  A layer called several times contributes the mean of its calls' means.

  Outside this context, or in another thread, or when the model is called
  without ``nnx.capture``, the layers run exactly as without it.
  Re-entrant: nested contexts share one installation; the innermost one's
  options apply.

  Args:
    attention: the value statistic of ``nnx.MultiHeadAttention``:
      ``'exact'`` (``E_{b,h,i}[Σ_j P_bhij x_bj]``), ``'product_of_means'``
      (the authors' ``Σ_j w_j x̄_j``) or ``'plain'`` (the value projection's
      plain input mean, like any ``LinearGeneral``).
    embed_lookup: also precondition ``nnx.Embed`` lookup tables ``(V, D)``
      along the vocabulary axis with the token frequencies of the batch,
      sown as ``mac_optax.LOOKUP_MEAN``.

  Example:
    >>> def loss_fn(model):
    ...   with mac_optax.nnx.capture():
    ...     logits, inter = nnx.capture(model, nnx.Intermediate)(x)
    ...   return loss(logits, y), inter
    >>> (l, inter), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    >>> optimizer.update(model, grads, intermediates=inter)
  """
  options = _Options(attention_lib.check_mode(attention),
                     bool(embed_lookup))
  with _LOCK:
    if _INSTALLED['count'] == 0:
      _install()
    _INSTALLED['count'] += 1
  _stack().append(options)
  try:
    yield
  finally:
    _stack().pop()
    with _LOCK:
      _INSTALLED['count'] -= 1
      if _INSTALLED['count'] == 0:
        _uninstall()


def intermediates_like(model: nnx.Module, *args, embed_lookup: bool = False,
                       **kwargs) -> Any:
  """Shapes of the intermediates a captured forward pass of `model` returns.

  Pass the result to ``mac(intermediates_like=...)`` to build the complete
  optimizer state in ``init``. Without it ``nnx.Optimizer`` still works (the
  first update creates the per-layer state and the jitted step traces
  twice), but checkpoint templates and ``lax.scan`` loops need the fixed
  structure. Costs one abstract trace, no FLOPs; `model` is not modified.

  Args:
    model: the NNX module.
    *args: example inputs of ``model(...)`` (arrays or
      ``jax.ShapeDtypeStruct``).
    embed_lookup: as in :func:`capture` (adds lookup statistics).
    **kwargs: keyword arguments of ``model(...)``.

  Returns:
    An ``nnx.State`` of ``jax.ShapeDtypeStruct`` like the one
    ``nnx.capture(model, nnx.Intermediate)(*args)`` returns under
    :func:`capture`.

  Example:
    >>> tx = mac_optax.mac_sgd(0.1, momentum=0.9, intermediates_like=
    ...     mac_optax.nnx.intermediates_like(model, x[:1]))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  """
  graphdef, state = nnx.split(model)

  def forward(state, *args):
    copy = nnx.merge(graphdef, state)
    with capture(embed_lookup=embed_lookup):
      _, inter = nnx.capture(copy, nnx.Intermediate)(*args, **kwargs)
    return inter

  return jax.eval_shape(forward, state, *args)


# --------------------------------------------------------------------------
# nnx.MultiHeadAttention.


class _Recorder:
  """Stands in for ``module`` in ``attention_fn(..., module=)``.

  Flax's ``dot_product_attention_weights`` calls
  ``module.sow(nnx.Intermediate, 'attention_weights', probs)``; the
  probabilities are reduced here and only ``[B, Nk]`` weights are kept.
  """

  def __init__(self, weights: list, module: Optional[nnx.Module]):
    self._weights = weights
    self._module = module

  def __bool__(self) -> bool:
    return True

  def sow(self, variable_type, name, value, *args, **kwargs):
    if name == 'attention_weights':
      self._weights.append(attention_lib.key_weights(value))
    if self._module is not None:
      return self._module.sow(variable_type, name, value, *args, **kwargs)
    return False


def _accepts_module(fn: Callable) -> bool:
  try:
    return 'module' in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _recording(attention_fn: Callable, weights: list) -> Callable:
  """A pass-through ``attention_fn`` that records the key weights."""

  @functools.wraps(attention_fn)
  def wrapper(*args, **kwargs):
    kwargs['module'] = _Recorder(weights, kwargs.get('module'))
    return attention_fn(*args, **kwargs)

  return wrapper


def _attention_wrapper(original: Callable) -> Callable:
  """``MultiHeadAttention.__call__`` that sows the value factor."""

  @functools.wraps(original)
  def wrapper(self, *args, **kwargs):
    options = _options()
    if options is None or not _collecting(self):
      return original(self, *args, **kwargs)
    decode = kwargs.get('decode')
    decode = self.decode if decode is None else decode
    value_id = id(self.value)
    if (options.attention == attention_lib.PLAIN or decode
        or not _accepts_module(self.attention_fn)
        or value_id in _suppressed()):
      return original(self, *args, **kwargs)
    attention_fn, weights, inputs = self.attention_fn, [], []
    suppressed, recorded = _suppressed(), _recorded()
    suppressed.add(value_id)
    recorded[value_id] = inputs
    # The static attribute is swapped for this call only (like the linen
    # capture does on its frozen dataclasses), bypassing NNX's attribute
    # bookkeeping: the graph structure does not change.
    object.__setattr__(self, 'attention_fn',
                       _recording(attention_fn, weights))
    try:
      out = original(self, *args, **kwargs)
    finally:
      object.__setattr__(self, 'attention_fn', attention_fn)
      suppressed.discard(value_id)
      del recorded[value_id]
    for x in inputs:
      if len(weights) == 1 and len(inputs) == 1:
        mean = attention_lib.mixed_mean(weights[0], x, options.attention)
      else:
        mean = mean_inputs.dense_mean(x)
      self.value.sow(nnx.Intermediate, statistics.MEAN, mean)
    return out

  wrapper.__mac_capture__ = True
  return wrapper


def sow_attention(projection: nnx.Module, inputs: jax.Array, *,
                  probs: Optional[jax.Array] = None,
                  weights: Optional[jax.Array] = None,
                  columns: str = 'qkv',
                  mode: Optional[str] = None) -> None:
  """Sows the attention-aware statistic of a hand-written NNX attention layer.

  The NNX twin of :func:`mac_optax.linen.sow_attention`. `projection` owns a
  fused kernel (``(D, G·D)``, column groups in the order `columns`, e.g.
  ``[q | k | v]``); after it has been called on `inputs`, this sows the
  ``[G, D]`` statistic of :func:`mac_optax.attention_lib.grouped_statistic`:
  ``x̄`` for the query and key groups, the attention-mixed mean for the
  value group. Under :func:`capture` it replaces the plain ``[1, D]``
  statistic the capture sowed for that call; otherwise it is a new entry.
  A no-op outside ``nnx.capture(..., nnx.Intermediate)``.

  Args:
    projection: the module owning the fused ``kernel`` (an ``nnx.Linear``).
    inputs: ``[B, N, D]`` input of the projection.
    probs: ``[B, H, Nq, Nk]`` probabilities (after softmax and masks, before
      dropout), reduced at once.
    weights: ``[B, Nk]`` per-key weights ``mean_{h,i} P_bhij`` instead of
      `probs` (e.g. from ``mac_optax.attention_lib.key_weights_from_attention``).
    columns: order of the column groups (``'qkv'``, ``'kv'``, ``'v'``).
    mode: ``'exact'`` or ``'product_of_means'``; by default the open
      capture's (``'exact'`` outside one).

  Raises:
    ValueError: not exactly one of `probs` and `weights`.

  Example:
    >>> class CausalSelfAttention(nnx.Module):
    ...   def __init__(self, d, heads, rngs):
    ...     self.heads = heads
    ...     self.c_attn = nnx.Linear(d, 3 * d, rngs=rngs)
    ...     self.c_proj = nnx.Linear(d, d, rngs=rngs)
    ...   def __call__(self, x):
    ...     B, N, D = x.shape
    ...     q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    ...     split = lambda t: t.reshape(B, N, self.heads, -1)
    ...     q, k, v = split(q), split(k), split(v)
    ...     s = jnp.einsum('bihd,bjhd->bhij', q, k) / jnp.sqrt(q.shape[-1])
    ...     p = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((N, N), bool)),
    ...                                  s, -1e9))
    ...     mac_optax.nnx.sow_attention(self.c_attn, x, probs=p)
    ...     y = jnp.einsum('bhij,bjhd->bihd', p, v).reshape(B, N, D)
    ...     return self.c_proj(y)
  """
  if (probs is None) == (weights is None):
    raise ValueError(
        f'mac: sow_attention on {type(projection).__name__}: give exactly one '
        'of probs= and weights=.')
  if not _collecting(projection):
    return
  options = _options()
  if mode is None:
    mode = options.attention if options is not None else attention_lib.EXACT
  if weights is None:
    weights = attention_lib.key_weights(probs)
  stat = attention_lib.grouped_statistic(inputs, weights, columns=columns,
                                     mode=mode)
  stat = stat.astype(mean_inputs.stat_dtype(stat.dtype))
  replace = options is not None

  def reduce_fn(sown, new):
    if replace and sown and tuple(sown[-1].shape) == (1, new.shape[-1]):
      return sown[:-1] + (new,)
    return sown + (new,)

  projection.sow(nnx.Intermediate, statistics.MEAN, stat, reduce_fn=reduce_fn)
