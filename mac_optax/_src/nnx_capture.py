"""Capture of MAC statistics from unmodified Flax NNX models.

NNX has no method interceptor. Inside :func:`capture`, the ``__call__`` of
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv`` and
``nnx.MultiHeadAttention``, and ``nnx.Embed.attend``, are temporarily replaced
on their classes by wrappers that sow the mean input of the call with
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
``E_{b,h,i}[Σ_j P_bhij x_bj]``, from probabilities computed from the layer's
own query and key projections with its mask, ``is_causal`` and, during
decoding, cache mask (before dropout); see :func:`_mixed_value_mean`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

from flax import nnx
from flax.nnx.nn import attention as nnx_attention
import jax
import jax.numpy as jnp

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


# --------------------------------------------------------------------------
# Temporary patching of the layer classes.

_LOCK = threading.RLock()
_LOCAL = threading.local()
_INSTALLED = {'count': 0, 'originals': {}}


def _depth() -> int:
  return getattr(_LOCAL, 'depth', 0)


def _suppressed() -> set:
  """Ids of modules whose plain statistic is replaced by their owner's."""
  if not hasattr(_LOCAL, 'suppressed'):
    _LOCAL.suppressed = set()
  return _LOCAL.suppressed


def _recorded() -> dict:
  """``id(module) -> [outputs]`` of projections an attention wrapper reads."""
  if not hasattr(_LOCAL, 'recorded'):
    _LOCAL.recorded = {}
  return _LOCAL.recorded


def _stat_wrapper(original: Callable, name: str,
                  statistic: Callable) -> Callable:
  """A method that sows `statistic(module, args, kwargs)`, then runs."""

  @functools.wraps(original)
  def wrapper(self, *args, **kwargs):
    if not (_depth() and _collecting(self)):
      return original(self, *args, **kwargs)
    if id(self) not in _suppressed():
      self.sow(nnx.Intermediate, name, statistic(self, args, kwargs))
    out = original(self, *args, **kwargs)
    recorded = _recorded().get(id(self))
    if recorded is not None:
      recorded.append(out)
    return out

  wrapper.__mac_capture__ = True
  return wrapper


def _patches() -> list[tuple[type, str, Callable[[Callable], Callable]]]:
  """``(class, method name, wrapper factory)`` of every supported layer."""
  mean, attend = statistics.MEAN, statistics.ATTEND_MEAN
  return [
      (nnx.Linear, '__call__',
       lambda f: _stat_wrapper(f, mean, _linear_statistic)),
      (nnx.LinearGeneral, '__call__',
       lambda f: _stat_wrapper(f, mean, _linear_general_statistic)),
      (nnx.Conv, '__call__',
       lambda f: _stat_wrapper(f, mean, _conv_statistic)),
      (nnx.Embed, 'attend',
       lambda f: _stat_wrapper(f, attend, _attend_statistic)),
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
def capture() -> Iterator[None]:
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
  Re-entrant: nested contexts share one installation.

  Example:
    >>> def loss_fn(model):
    ...   with mac_optax.nnx.capture():
    ...     logits, inter = nnx.capture(model, nnx.Intermediate)(x)
    ...   return loss(logits, y), inter
    >>> (l, inter), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    >>> optimizer.update(model, grads, intermediates=inter)
  """
  with _LOCK:
    if _INSTALLED['count'] == 0:
      _install()
    _INSTALLED['count'] += 1
  _LOCAL.depth = _depth() + 1
  try:
    yield
  finally:
    _LOCAL.depth = _depth() - 1
    with _LOCK:
      _INSTALLED['count'] -= 1
      if _INSTALLED['count'] == 0:
        _uninstall()


def intermediates_like(model: nnx.Module, *args, **kwargs) -> Any:
  """Shapes of the intermediates a captured forward pass of `model` returns.

  Pass the result to ``mac(intermediates_like=...)`` to build the complete
  optimizer state in ``init`` (needed by ``nnx.Optimizer`` under
  ``nnx.jit``, whose state structure must not change after ``init``). Costs
  one abstract trace, no FLOPs; `model` is not modified.

  Args:
    model: the NNX module.
    *args: example inputs of ``model(...)`` (arrays or
      ``jax.ShapeDtypeStruct``).
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
    with capture():
      _, inter = nnx.capture(copy, nnx.Intermediate)(*args, **kwargs)
    return inter

  return jax.eval_shape(forward, state, *args)


# --------------------------------------------------------------------------
# nnx.MultiHeadAttention.


def _attention_inputs(args, kwargs):
  """``(inputs_q, inputs_k, inputs_v)`` as ``MultiHeadAttention`` resolves them."""
  names = ('inputs_q', 'inputs_k', 'inputs_v')
  values = list(args[:3]) + [None] * (3 - len(args[:3]))
  for i, name in enumerate(names):
    if values[i] is None:
      values[i] = kwargs.get(name)
  q, k, v = values
  if k is None:
    k = q
  if v is None:
    v = k
  return q, k, v


def _attention_wrapper(original: Callable) -> Callable:
  """``MultiHeadAttention.__call__`` that sows the value factor."""

  @functools.wraps(original)
  def wrapper(self, *args, **kwargs):
    if not (_depth() and _collecting(self)):
      return original(self, *args, **kwargs)
    if getattr(self, 'decode', None) or kwargs.get('decode'):
      # Decoding mixes cached values the call cannot see; keep plain means.
      return original(self, *args, **kwargs)
    inputs_q, inputs_k, inputs_v = _attention_inputs(args, kwargs)
    suppressed, recorded = _suppressed(), _recorded()
    ids = (id(self.query), id(self.key), id(self.value))
    if any(i in recorded for i in ids[:2]) or ids[2] in suppressed:
      raise ValueError('mac: an nnx.MultiHeadAttention shares its projections '
                       'with another attention layer in the same call.')
    recorded[ids[0]], recorded[ids[1]] = [], []
    suppressed.add(ids[2])
    try:
      out = original(self, *args, **kwargs)
      queries, keys = recorded[ids[0]], recorded[ids[1]]
    finally:
      del recorded[ids[0]], recorded[ids[1]]
      suppressed.discard(ids[2])
    if len(queries) != 1 or len(keys) != 1:
      raise ValueError(
          'mac: nnx.MultiHeadAttention called its query/key projections '
          f'{len(queries)}/{len(keys)} times in one call; expected once.')
    if _collecting(self.value):
      mean = _mixed_value_mean(self, queries[0], keys[0], inputs_v,
                               kwargs.get('mask'),
                               kwargs.get('is_causal', False))
      self.value.sow(nnx.Intermediate, statistics.MEAN, mean)
    return out

  wrapper.__mac_capture__ = True
  return wrapper


def _mixed_value_mean(module: nnx.MultiHeadAttention, query: jax.Array,
                      key: jax.Array, inputs_v: jax.Array,
                      mask: Optional[jax.Array], is_causal: bool) -> jax.Array:
  """``[1, D]`` mean of the attention-mixed value input.

  ``E_{b,h,i}[Σ_j P_bhij x_bj]`` with ``P`` the layer's attention
  probabilities (recomputed from its own query and key projections, with its
  mask and causal mask, before dropout) and ``x`` the value projection's
  input. ``P`` is reduced to per-key weights at once (:func:`mixed_mean`), so
  nothing of size ``B·H·N·N`` leaves this function.
  """
  # TODO(mac_optax): dedupe with mac_optax/_src/attention.py (linen helper).
  query = jax.lax.stop_gradient(query)
  key = jax.lax.stop_gradient(key)
  if module.normalize_qk:
    query = module.query_ln(query)
    key = module.key_ln(key)
  probs = nnx_attention.dot_product_attention_weights(
      query, key, mask=mask, deterministic=True, dtype=module.dtype,
      precision=module.precision, is_causal=is_causal)
  return mixed_mean(probs, inputs_v)


def mixed_mean(probs: jax.Array, inputs_v: jax.Array) -> jax.Array:
  """``[1, D]`` mean attention-mixed input ``E_{b,h,i}[Σ_j P_bhij x_bj]``.

  Args:
    probs: ``[*B, H, Nq, Nk]`` attention probabilities.
    inputs_v: ``[*B, Nk, D]`` input of the value projection.

  Returns:
    ``mean_b Σ_j w_bj x_bj`` with ``w_bj = mean_{h,i} P_bhij``, float32.
  """
  dtype = mean_inputs.stat_dtype(inputs_v.dtype)
  weights = jnp.mean(jax.lax.stop_gradient(probs).astype(dtype),
                     axis=(-3, -2))                       # [*B, Nk]
  x = jax.lax.stop_gradient(inputs_v).astype(dtype)
  mixed = jnp.einsum('...j,...jd->...d', weights, x)      # [*B, D]
  return mean_inputs.dense_mean(mixed)
