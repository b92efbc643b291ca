"""Capture of MAC statistics from unmodified Flax linen models.

Inside :func:`capture`, every ``__call__`` of ``nn.Dense``, ``nn.DenseGeneral``
and ``nn.Conv`` (and every ``nn.Embed.attend``; ``nn.Embed`` lookups with
``embed_lookup=True``) sows the mean of its input into the
``'intermediates'`` collection at the layer's own path, so that
``params[p]['kernel']`` pairs with ``intermediates[p]['mac_mean']``. The model
must be applied with ``mutable=['intermediates']`` for the values to come
back. ``nn.MultiHeadDotProductAttention`` (and its subclasses) runs through
the shared attention-call recorder: its value projection sows
the attention-mixed mean. This module only reaches the calls (through
``nn.intercept_methods``) and sows; the statistics are computed in
the framework-neutral statistics core shared with the
other capture.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mac_optax._src import attention
from mac_optax._src import capture_core
from mac_optax._src import einsum_layout
from mac_optax._src import mean_inputs
from mac_optax._src import plan as plan_lib
from mac_optax._src import program_plan
from mac_optax._src import statistics
from mac_optax._src.conv_geometry import ConvGeometry

COLLECTION = 'intermediates'
_OPEN = capture_core.OpenCaptures()
input_mean = capture_core.input_mean


def _path(module: nn.Module) -> str:
  return '/'.join(module.path)


def sow_mean(module: nn.Module, mean: jax.Array, *,
             name: str = statistics.MEAN) -> None:
  """Sows a layer statistic from inside a custom linen module.

  Use this when a layer computes ``y = x @ kernel (+ bias)`` with its own
  parameters (named ``kernel``/``bias``, the kernel laid out
  ``(*input axes, *output axes)``) instead of a Flax ``Dense``/``Conv``.
  The statistic is the mean of ``x`` over everything but the contracted
  features, ``[G, d_in]`` (``G`` column groups of the kernel with their own
  means, usually ``G = 1``); :func:`mac_optax.linen.input_mean` computes it.

  Args:
    module: the module that owns the ``kernel`` parameter (call from inside
      its ``__call__``/``@nn.compact`` method).
    mean: ``[G, d_in]`` statistic.
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
  survey = capture_core.current_survey()
  if survey is not None:
    survey.kinds.setdefault(_path(module), plan_lib.CUSTOM)
  module.sow(COLLECTION, name, mean.astype(mean_inputs.stat_dtype(mean.dtype)))


def _first_input(args, kwargs, name='inputs'):
  return args[0] if args else kwargs[name]


def _tuple(value) -> tuple:
  return (value,) if isinstance(value, int) else tuple(value)


def _einsum(module: nn.Module, args, kwargs, mask
            ) -> tuple[str, jax.Array, str, einsum_layout.AxisRoles]:
  """``nn.Einsum``: the equation given to the call wins, as in Flax."""
  equation = args[1] if len(args) > 1 else kwargs.get('einsum_str')
  equation = module.einsum_str if equation is None else equation
  stat, roles = einsum_layout.call_statistic(
      equation, _first_input(args, kwargs), module.shape, _path(module), mask)
  return statistics.EINSUM_MEAN, stat, plan_lib.EINSUM, roles


def _statistic(module: nn.Module, method: str, args, kwargs,
               options: capture_core.Options) -> Optional[tuple]:
  """``(name, statistic, kind, roles or None)`` of a supported call, or None.

  ``roles`` (einsum-style layers) is the kernel layout the plan records.
  """
  mask = options.token_mask
  if method == '__call__':
    if isinstance(module, nn.Einsum):
      return _einsum(module, args, kwargs, mask)
    if isinstance(module, nn.DenseGeneral):
      axis = _tuple(module.axis)
      if _tuple(module.batch_dims):
        stat, roles = einsum_layout.dense_general_call(
            _first_input(args, kwargs), _tuple(module.batch_dims), axis,
            _tuple(module.features), _path(module), mask)
        return statistics.EINSUM_MEAN, stat, plan_lib.EINSUM, roles
      return statistics.MEAN, mean_inputs.dense_mean(
          _first_input(args, kwargs), axis, mask), plan_lib.DENSE, None
    if isinstance(module, nn.Dense):
      return statistics.MEAN, mean_inputs.dense_mean(
          _first_input(args, kwargs), mask=mask), plan_lib.DENSE, None
    if isinstance(module, nn.Conv):
      return statistics.MEAN, mean_inputs.conv_statistic(
          _first_input(args, kwargs), ConvGeometry.of(module), mask,
          _path(module)), (
              plan_lib.CONV), None
    if isinstance(module, nn.Embed) and options.embed_lookup:
      return statistics.LOOKUP_MEAN, attention.token_frequencies(
          _first_input(args, kwargs), module.num_embeddings, mask), (
              plan_lib.EMBED_LOOKUP), None
  if method == 'attend' and isinstance(module, nn.Embed):
    return statistics.ATTEND_MEAN, mean_inputs.dense_mean(
        _first_input(args, kwargs, 'query'), mask=mask), (
            plan_lib.EMBED_ATTEND), None
  return None


def _is_attention(module: nn.Module, method: str,
                  options: capture_core.Options, calls: list) -> bool:
  return (method == '__call__' and options.attention != attention.PLAIN
          and isinstance(module, nn.MultiHeadDotProductAttention)
          and not module.decode
          # nn.SelfAttention calls the base __call__ again.
          and not any(path == tuple(module.path) for path, _ in calls))


def _call_attention(module: nn.Module, next_fun: Callable, args, kwargs,
                    options: capture_core.Options, calls: list) -> Any:
  call = capture_core.AttentionCall(_path(module), options)
  original = module.attention_fn
  # Modules are frozen dataclasses; the field is swapped for this call only.
  object.__setattr__(module, 'attention_fn', call.recording(original))
  calls.append((tuple(module.path), call))
  try:
    out = next_fun(*args, **kwargs)
  finally:
    object.__setattr__(module, 'attention_fn', original)
    calls.pop()
  call.release()
  return out


def _interceptor(next_fun: Callable, args, kwargs, context, *,
                 options: capture_core.Options, calls: list) -> Any:
  module, method = context.module, context.method_name
  survey = capture_core.current_survey()
  if survey is not None:
    survey.module_types[_path(module)] = type(module).__name__
  if module.is_initializing():
    return next_fun(*args, **kwargs)
  owner = calls[-1][1] if calls and calls[-1][0] == tuple(
      module.path[:-1]) else None
  if options.exclude(_path(module)):
    out = next_fun(*args, **kwargs)
    if owner is not None:
      owner.skip(out)
    return out
  if _is_attention(module, method, options, calls):
    return _call_attention(module, next_fun, args, kwargs, options, calls)
  found = _statistic(module, method, args, kwargs, options)
  if found is None:
    return next_fun(*args, **kwargs)
  name, mean, kind, roles = found
  path = _path(module)
  if survey is not None:
    survey.called.add(path)
    survey.kinds.setdefault(path, kind)
    if roles is not None:
      survey.record_layout(path, roles, path)
  if not module.is_mutable_collection(COLLECTION):
    return next_fun(*args, **kwargs)
  sow = lambda m: module.sow(COLLECTION, name, m)
  if owner is None or name != statistics.MEAN:
    sow(mean)
    return next_fun(*args, **kwargs)
  out = next_fun(*args, **kwargs)

  def on_value():
    if survey is not None:
      survey.kinds[path] = plan_lib.ATTENTION_VALUE

  owner.hold(sow, mean, _first_input(args, kwargs), out, on_value)
  return out


@contextlib.contextmanager
def capture(*, attention: str = 'exact',  # pylint: disable=redefined-outer-name
            embed_lookup: bool = False,
            token_mask: Optional[jax.Array] = None,
            exclude: Any = None) -> Iterator[None]:
  """Sows MAC statistics from every supported layer of an unmodified model.

  Supported: ``nn.Dense`` (any leading axes), ``nn.DenseGeneral`` (any
  contracted axes and output shape; with ``batch_dims`` one mean input per
  batch index), ``nn.Einsum`` (any explicit two-operand equation: kernel
  axes contracted with the input, batched (shared by input, kernel and
  output: one mean input per index) or output-only; sown as
  ``mac_optax.EINSUM_MEAN``, whose layout only the plan knows, so
  ``mac(plan=mac_optax.linen.plan(...))`` is required; an equation MAC
  cannot model raises naming the layer), ``nn.Conv`` (any
  rank, strides, padding modes, input/kernel dilation,
  ``feature_group_count``), ``nn.Embed.attend``; inside ``nn.scan``
  (statistics stacked like the parameters; ``'intermediates'`` must be in
  its ``variable_axes``) and ``nn.remat``. A layer called several times
  contributes the mean of its calls' means.

  Attention (``nn.MultiHeadDotProductAttention`` and its subclasses, self
  and cross, not decoding): query, key and output projections get their
  plain input means; the value projection gets the attention-mixed mean
  ``E_{b,h,i}[Σ_j P_bhij x_bj]`` from the probabilities the layer computed
  (after softmax and masks, before dropout). An ``attention_fn`` without a
  ``module`` argument raises (use ``attention='plain'``). Hand-written
  attention: :func:`mac_optax.linen.sow_attention`.

  Args:
    attention: the value statistic: ``'exact'`` (above), ``'product_of_means'``
      (the authors' ``Σ_j w_j x̄_j``) or ``'plain'`` (the value projection's
      plain input mean, like any ``DenseGeneral``).
    embed_lookup: also precondition ``nn.Embed`` lookup tables ``(V, D)``
      along the vocabulary axis with the token frequencies of the batch
      (the mean of the one-hot input), sown as ``mac_optax.LOOKUP_MEAN``.
    token_mask: ``[batch, tokens]`` booleans (or integers, non-zero = real
      token), e.g. the padding mask of the batch; may be traced (open the
      capture inside the jitted function). Every statistic whose rows are
      tokens becomes the mean over real tokens: inputs of ``Dense``,
      ``DenseGeneral``, ``Einsum`` and ``Embed.attend`` whose leading axes
      have the mask's shape and are row axes of the layer (neither
      contracted, batched nor summed by it), lookup frequencies of ids of
      the mask's shape, and the value projection's mixed mean over real
      queries. Other inputs (pooled features, images) keep their plain
      mean; a ``Conv`` whose input leads with the mask's shape raises. The
      rule and its limits: ``docs/supported_layers.md``. A mask that
      leads no layer input of the forward pass (a wrong length or axis
      order) raises when the capture closes.
    exclude: layers not to capture, passed through unchanged: a module
      path (``'Block_0/mix'``; a path excludes everything below it too), a
      list of paths, or a predicate ``path -> bool``. Give the plan the
      same ``exclude``. For layers MAC cannot model (an einsum whose kernel
      axis is summed away) or should not touch.

  Raises:
    ValueError: a capture is already open in this thread (nested captures
      are refused), or, on exit, `token_mask` matched no layer input.

  Example:
    >>> with mac_optax.linen.capture():
    ...   logits, v = model.apply({'params': params}, x,
    ...                           mutable=['intermediates'])
    >>> updates, state = tx.update(grads, state, params,
    ...                            intermediates=v['intermediates'])
  """
  options = capture_core.Options.checked(
      attention, embed_lookup, token_mask, exclude,
      where='mac_optax.linen.capture')
  interceptor = functools.partial(_interceptor, options=options, calls=[])
  _OPEN.enter(options)
  try:
    with nn.intercept_methods(interceptor):
      yield
  except BaseException:
    _OPEN.exit(options)
    raise
  _, verify = _OPEN.exit(options)
  verify()


def sow_attention(projection: nn.Module, inputs: jax.Array, *,
                  probs: Optional[jax.Array] = None,
                  weights: Optional[jax.Array] = None,
                  columns: str = 'qkv',
                  mode: Optional[str] = None) -> None:
  """Sows the attention-aware statistic of a hand-written attention layer.

  For custom attention modules (GPT style: one ``Dense`` to ``3·D`` followed
  by a hand-written softmax, or a flash kernel). `projection` is the module
  that owns the fused kernel (``(D, 3·D)``, columns ``[q | k | v]``); this
  sows, as ``mac_optax.ATTENTION_MEAN`` at its path, the ``[G, D]``
  statistic of :func:`mac_optax.attention.grouped_statistic`: ``x̄`` for the
  query and key column groups, the attention-mixed mean for the value group.
  The layer is preconditioned with this statistic; the plain mean a capture
  records for the projection's call is not used. Give either the
  probabilities `probs` (``[B, H, Nq, Nk]``, after softmax and masks, before
  dropout; reduced at once) or the per-key weights `weights`
  ``= mean_{h,i} P_bhij`` (``[B, Nk]``), e.g. from
  :func:`mac_optax.attention.key_weights_from_attention`. Each call sows one
  entry; a projection used for several attention calls gets the mean.
  A no-op when the ``'intermediates'`` collection is not mutable.

  Args:
    projection: the bound linen module owning the kernel.
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
  stat = capture_core.attention_statistic(
      _path(projection), inputs, probs=probs, weights=weights,
      columns=columns, mode=mode, current=_OPEN.current())
  if projection.is_mutable_collection(COLLECTION):
    projection.sow(COLLECTION, statistics.ATTENTION_MEAN, stat)


def plan(model: nn.Module, variables: Any, *args, attention: str = 'exact',  # pylint: disable=redefined-outer-name
         embed_lookup: bool = False, exclude: Any = None,
         **kwargs) -> plan_lib.LayerPlan:
  """The layer plan of a linen model: what MAC preconditions, and how.

  Runs one abstract forward pass (``jax.eval_shape``, no FLOPs) under
  :func:`capture` with the same options as the training step, and pairs the
  statistics with the parameters. ``print(plan)`` shows the coverage table.

  Args:
    model: the linen module.
    variables: its variables (``{'params': ...}``), arrays or shapes.
    *args: example inputs of ``model.apply`` (arrays or shapes; one
      example's batch is enough). Python scalars among them (a ``train``
      flag given by position) are static, as outside ``jit``.
    attention: as in :func:`capture` (keyword only, like every option).
    embed_lookup: as in :func:`capture`.
    exclude: as in :func:`capture`; the excluded layers' parameters are
      listed as passed through, 'excluded by the user'.
    **kwargs: keyword arguments of ``model.apply`` (e.g. ``train=True``).

  Returns:
    A :class:`mac_optax.LayerPlan` for ``mac(plan=...)``.

  Raises:
    ValueError: a supported layer was called but its statistic did not come
      back (``nn.scan`` without ``'intermediates'`` in ``variable_axes``), or
      a statistic does not fit its parameter.

  Example:
    >>> plan = mac_optax.linen.plan(model, variables, x[:1])
    >>> print(plan)
    >>> tx = mac_optax.mac_sgd(0.1, momentum=0.9, plan=plan)
  """
  survey = capture_core.Survey()
  traced, rebuild = capture_core.static_scalars(args)
  excluded = capture_core.excluder(exclude)

  def forward(variables, traced):
    with capture_core.surveying(survey), capture(
        attention=attention, embed_lookup=embed_lookup, exclude=excluded):
      _, state = model.apply(variables, *rebuild(traced), mutable=True,
                             **kwargs)
    return state.get(COLLECTION, {})

  like = jax.eval_shape(forward, variables, traced)
  result = capture_core.mark_excluded(plan_lib.from_statistics(
      variables['params'], like, kinds=survey.kinds,
      module_types=survey.module_types, called=survey.called,
      layouts=survey.layouts), excluded)

  def program_fn(params, traced):
    return model.apply({**variables, 'params': params}, *rebuild(traced),
                       mutable=True, **kwargs)
  return program_plan.checked_capture_plan(
      result, program_fn, variables['params'], (traced,), {})


def intermediates_like(model: nn.Module, variables: Any, *args,
                       attention: str = 'exact',  # pylint: disable=redefined-outer-name
                       embed_lookup: bool = False, exclude: Any = None,
                       **kwargs) -> Any:
  """Shapes of the intermediates a captured ``model.apply`` returns.

  ``plan(...).intermediates_like``; prefer passing the plan itself to
  ``mac(plan=...)``.

  Returns:
    A pytree of ``jax.ShapeDtypeStruct`` like ``v['intermediates']``.
  """
  return plan(model, variables, *args, attention=attention,
              embed_lookup=embed_lookup, exclude=exclude,
              **kwargs).intermediates_like
