"""Capture of MAC statistics from unmodified Flax linen models.

Inside :func:`capture`, every ``__call__`` of ``nn.Dense``, ``nn.DenseGeneral``
and ``nn.Conv`` (and every ``nn.Embed.attend``) sows the mean of its input into
the ``'intermediates'`` collection at the layer's own path, so that
``params[p]['kernel']`` pairs with ``intermediates[p]['mac_mean']``. The model
must be applied with ``mutable=['intermediates']`` for the values to come back;
otherwise ``sow`` is a no-op and the model runs exactly as without capture.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mac_optax._src import attention as attention_lib
from mac_optax._src import linen_attention
from mac_optax._src import mean_inputs
from mac_optax._src import statistics

COLLECTION = 'intermediates'


def sow_mean(module: nn.Module, mean: jax.Array, *,
             name: str = statistics.MEAN) -> None:
  """Sows a layer statistic from inside a custom linen module.

  Use this when a layer computes ``y = x @ kernel (+ bias)`` with its own
  parameters (named ``kernel``/``bias``) instead of a Flax ``Dense``/``Conv``.
  The statistic is the mean of ``x`` over everything but the contracted
  features, ``[G, d_in]`` (``G`` column groups of the kernel with their own
  means, usually ``G = 1``); :func:`mac_optax.linen.input_mean` computes it.

  Args:
    module: the module that owns the ``kernel`` parameter (call from inside
      its ``__call__``/``@nn.compact`` method).
    mean: ``[G, d_in]`` float32 statistic.
    name: the statistic's name (``mac_optax.MEAN`` for ``kernel``).

  Example:
    >>> class MyDense(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     kernel = self.param('kernel', nn.initializers.lecun_normal(),
    ...                         (x.shape[-1], 8))
    ...     mac_optax.linen.sow_mean(self, mac_optax.linen.input_mean(x))
    ...     return x @ kernel
  """
  mean = jnp.asarray(mean)
  module.sow(COLLECTION, name, mean.astype(mean_inputs.stat_dtype(mean.dtype)))


def input_mean(x: jax.Array, axis: Sequence[int] = (-1,)) -> jax.Array:
  """``[1, d_in]`` mean of ``x`` over all axes but the contracted ``axis``."""
  return mean_inputs.dense_mean(x, axis)


def _first_input(args, kwargs, name='inputs'):
  if args:
    return args[0]
  return kwargs[name]


def _tuple(value, n):
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(value)


def _canonical_padding(padding, n):
  """Flax's padding forms: a string, an int, or ``n`` ints or pairs."""
  if isinstance(padding, str):
    return padding
  if isinstance(padding, int):
    return [(padding, padding)] * n
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def conv_statistic(module: nn.Conv, inputs: jax.Array) -> jax.Array:
  """The ``[G, d_in]`` mean patch of a linen ``nn.Conv`` for `inputs`."""
  kernel_size = _tuple(module.kernel_size, 1)
  n = len(kernel_size)
  return padded_conv_statistic(
      inputs, kernel_size, _tuple(module.strides, n),
      _canonical_padding(module.padding, n),
      _tuple(module.input_dilation, n), _tuple(module.kernel_dilation, n),
      module.feature_group_count)


def padded_conv_statistic(inputs, kernel_size, strides, padding,
                          input_dilation, kernel_dilation,
                          feature_group_count) -> jax.Array:
  """Resolves Flax's conv padding conventions, then the mean patch.

  Mirrors Flax: 'CIRCULAR'/'REFLECT' pad the input themselves and then run
  'VALID'; 'CAUSAL' (1-D) pads left by ``dilation·(k−1)``; strings go through
  ``lax.padtype_to_pads`` on the dilated input; ints and pairs are explicit.
  """
  n = len(kernel_size)
  spatial_axes = tuple(range(inputs.ndim - n - 1, inputs.ndim - 1))
  if isinstance(padding, str) and padding in ('CIRCULAR', 'REFLECT'):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = [(0, 0)] * inputs.ndim
    for axis, k in zip(spatial_axes, dilated):
      pads[axis] = ((k - 1) // 2, k // 2)
    mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding]
    inputs = jnp.pad(jax.lax.stop_gradient(inputs), pads, mode=mode)
    padding = 'VALID'
  elif isinstance(padding, str) and padding == 'CAUSAL':
    pads = [(0, 0)] * inputs.ndim
    pads[spatial_axes[0]] = (kernel_dilation[0] * (kernel_size[0] - 1), 0)
    inputs = jnp.pad(jax.lax.stop_gradient(inputs), pads)
    padding = 'VALID'
  spatial = [inputs.shape[a] for a in spatial_axes]
  if isinstance(padding, str):
    dilated_in = [(s - 1) * d + 1 for s, d in zip(spatial, input_dilation)]
    dilated_k = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    padding = jax.lax.padtype_to_pads(dilated_in, dilated_k, strides, padding)
  padding = [tuple(int(v) for v in p) for p in padding]
  return mean_inputs.conv_mean_patch(
      inputs, kernel_size, strides=strides, padding=padding,
      input_dilation=input_dilation, kernel_dilation=kernel_dilation,
      feature_group_count=feature_group_count)


def _statistic(module: nn.Module, method: str, args, kwargs
               ) -> Optional[tuple[str, jax.Array]]:
  """The statistic a supported layer call contributes, or None."""
  if method == '__call__':
    if isinstance(module, nn.DenseGeneral):
      batch_dims = module.batch_dims
      if isinstance(batch_dims, int) or tuple(batch_dims):
        raise ValueError(
            f"mac: layer '{'/'.join(module.path)}': DenseGeneral with "
            f'batch_dims={module.batch_dims} is not supported (its kernel '
            'has one slice per batch index).')
      axis = module.axis if not isinstance(module.axis, int) else (
          module.axis,)
      return statistics.MEAN, mean_inputs.dense_mean(
          _first_input(args, kwargs), axis)
    if isinstance(module, nn.Dense):
      return statistics.MEAN, mean_inputs.dense_mean(
          _first_input(args, kwargs))
    if isinstance(module, nn.Conv):
      return statistics.MEAN, conv_statistic(module,
                                             _first_input(args, kwargs))
  if method == 'attend' and isinstance(module, nn.Embed):
    return statistics.ATTEND_MEAN, mean_inputs.dense_mean(
        _first_input(args, kwargs, 'query'))
  return None


def _lookup_statistic(module: nn.Module, method: str, args, kwargs
                      ) -> Optional[tuple[str, jax.Array]]:
  """Token frequencies of an ``nn.Embed`` lookup (``embed_lookup=True``)."""
  if method == '__call__' and isinstance(module, nn.Embed):
    return statistics.LOOKUP_MEAN, attention_lib.token_frequencies(
        _first_input(args, kwargs), module.num_embeddings)
  return None


def _interceptor(next_fun: Callable, args, kwargs, context, *,
                 tracker: Optional[linen_attention.Tracker] = None,
                 embed_lookup: bool = False) -> Any:
  module = context.module
  if module.is_initializing() or not module.is_mutable_collection(COLLECTION):
    return next_fun(*args, **kwargs)
  if tracker is not None and tracker.handles(module, context.method_name):
    return tracker.call_attention(module, next_fun, args, kwargs)
  found = _statistic(module, context.method_name, args, kwargs)
  if found is None and embed_lookup:
    found = _lookup_statistic(module, context.method_name, args, kwargs)
  if found is None:
    return next_fun(*args, **kwargs)
  name, mean = found
  if tracker is not None:
    inputs = args[0] if args else kwargs.get('inputs')
    return tracker.sow(module, name, mean, inputs, next_fun, args, kwargs)
  module.sow(COLLECTION, name, mean)
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def capture(*, attention: str = 'exact',
            embed_lookup: bool = False) -> Iterator[None]:
  """Sows MAC statistics from every supported layer of an unmodified model.

  Supported: ``nn.Dense`` (any leading axes), ``nn.DenseGeneral`` (any
  contracted axes and output shape, no ``batch_dims``), ``nn.Conv`` (any
  rank, strides, padding modes, input/kernel dilation,
  ``feature_group_count``), ``nn.Embed.attend``; inside ``nn.scan``
  (statistics stacked like the parameters) and ``nn.remat``. A layer called
  several times contributes the mean of its calls' means.

  Attention (``nn.MultiHeadDotProductAttention`` and its subclasses, self
  and cross): query, key and output projections get their plain input
  means; the value projection gets the attention-mixed mean
  ``E_{b,h,i}[Σ_j P_bhij x_bj]`` from the probabilities the layer computed
  (after softmax and masks, before dropout), reduced inside the forward pass
  (see :mod:`mac_optax._src.linen_attention`). Hand-written attention:
  :func:`mac_optax.linen.sow_attention`.

  Args:
    attention: the value statistic: ``'exact'`` (above), ``'product_of_means'``
      (the authors' ``Σ_j w_j x̄_j``) or ``'plain'`` (the value projection's
      plain input mean, like any ``DenseGeneral``).
    embed_lookup: also precondition ``nn.Embed`` lookup tables ``(V, D)``
      along the vocabulary axis with the token frequencies of the batch
      (the mean of the one-hot input), sown as ``mac_optax.LOOKUP_MEAN``.

  Example:
    >>> with mac_optax.linen.capture():
    ...   logits, v = model.apply({'params': params}, x,
    ...                           mutable=['intermediates'])
    >>> updates, state = tx.update(grads, state, params,
    ...                            intermediates=v['intermediates'])
  """
  tracker = linen_attention.Tracker(attention)
  interceptor = functools.partial(_interceptor, tracker=tracker,
                                  embed_lookup=embed_lookup)
  with tracker, nn.intercept_methods(interceptor):
    yield


def intermediates_like(model: nn.Module, variables: Any, *args,
                       **kwargs) -> Any:
  """Shapes of the intermediates a captured ``model.apply`` returns.

  Pass the result to ``mac(intermediates_like=...)`` to build the complete
  optimizer state in ``init``. Costs one abstract trace, no FLOPs.

  Args:
    model: the linen module.
    variables: its variables (``{'params': ...}``), arrays or shapes.
    *args: example inputs of ``model.apply`` (arrays or shapes).
    **kwargs: keyword arguments of ``model.apply`` (e.g. ``train=True``).

  Returns:
    A pytree of ``jax.ShapeDtypeStruct`` like ``v['intermediates']``.
  """
  def forward(variables, *args):
    with capture():
      _, state = model.apply(variables, *args, mutable=[COLLECTION], **kwargs)
    return state.get(COLLECTION, {})

  return jax.eval_shape(forward, variables, *args)
