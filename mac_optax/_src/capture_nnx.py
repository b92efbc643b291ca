"""Capture of MAC statistics from unmodified Flax NNX models.

NNX has no method interceptor. Inside :func:`capture`, the ``__call__`` of
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``,
``nnx.MultiHeadAttention``
and ``nnx.Embed`` (lookups only with ``embed_lookup=True``), and
``nnx.Embed.attend``, are replaced on their classes by wrappers that sow the
mean input of the call with ``module.sow(nnx.Intermediate, name, mean)`` and
then run the original method unchanged. The value lands at the layer's own
path of the ``nnx.capture(model, nnx.Intermediate)`` result, so
``grads[p]['kernel']`` pairs with ``intermediates[p]['mac_mean']`` exactly as
on the linen path. The statistics themselves are computed in
the framework-neutral statistics core shared with the
other capture.

Properties of the patching:

* installed when the first capture opens, removed when the last one closes
  (also on exceptions, and when it is closed from another thread). A patch
  is removed only if the class still holds it (by identity); if another
  library wrapped the method meanwhile, that wrapper is left in place and
  ours stays inside it, permanently inactive;
* a wrapper only does work in a thread that is inside :func:`capture` and
  for a module that ``nnx.capture`` is collecting from (the Flax private
  ``__captures__`` attribute, pinned by a test); anywhere else it calls the
  original method directly;
* subclasses that do not override the patched method are captured too.

``nnx.MultiHeadAttention`` runs through
the shared attention-call recorder: the value projection gets
the attention-mixed mean from the probabilities the layer computes. Given a
``module``, Flax computes attention through its explicit-probabilities path
instead of ``jax.nn.dot_product_attention``: inside the capture the layer's
output agrees with the uncaptured one to float rounding, not bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, Optional

from flax import nnx
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

_OPEN = capture_core.OpenCaptures()
input_mean = capture_core.input_mean

# The attribute `nnx.capture` gives every module it collects from, for the
# duration of the call (a Flax private; tests/test_capture_nnx.py pins it).
CAPTURES_ATTRIBUTE = '__captures__'


def _collecting(module: nnx.Module) -> bool:
  """Whether ``nnx.capture`` is collecting sown values from `module`.

  Outside it, ``Module.sow`` takes a deprecated attribute-creating path the
  capture must never take.
  """
  return getattr(module, CAPTURES_ATTRIBUTE, None) is not None


def sow_mean(module: nnx.Module, mean: jax.Array, *,
             name: str = statistics.MEAN) -> None:
  """Sows a layer statistic from inside a custom NNX module.

  Use this when a layer computes ``y = x @ kernel (+ bias)`` with its own
  ``nnx.Param`` attributes named ``kernel``/``bias`` (the kernel laid out
  ``(*input axes, *output axes)``) instead of an ``nnx.Linear``/``nnx.Conv``.
  The statistic is the mean of ``x`` over everything but the contracted
  features, ``[G, d_in]``; :func:`mac_optax.nnx.input_mean` computes it. A
  no-op outside ``nnx.capture(model, nnx.Intermediate)``.

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


# --------------------------------------------------------------------------
# Statistics of each supported layer: (name, statistic) or None.


def _first_input(args, kwargs, name='inputs'):
  return args[0] if args else kwargs[name]


def _linear(module, args, kwargs, options):
  del module
  return statistics.MEAN, mean_inputs.dense_mean(
      _first_input(args, kwargs), mask=options.token_mask)


_EXCLUDE_HINT = ('exclude=[the module] (e.g. exclude=[model.mix]) to '
                 'mac_optax.nnx.capture and exclude=[its path] to '
                 'mac_optax.nnx.plan')


def _einsum_roles(module) -> Optional[einsum_layout.AxisRoles]:
  """The kernel roles the plan records for `module` (from its attributes).

  NNX calls do not know their module's path, so the plan reads the layout
  from the module's constructor arguments; each call is checked against it.
  """
  where = type(module).__name__
  if isinstance(module, nnx.Einsum):
    return einsum_layout.roles_of(module.einsum_str,
                                  tuple(module.kernel_shape), where,
                                  exclude=_EXCLUDE_HINT)
  if isinstance(module, nnx.LinearGeneral) and module.batch_axis:
    return einsum_layout.dense_general_roles(
        tuple(module.batch_axis.values()), module.in_features,
        module.out_features)
  return None


def _checked_roles(module, roles: einsum_layout.AxisRoles) -> None:
  planned = _einsum_roles(module)
  if roles != planned:
    raise ValueError(
        f'mac: {type(module).__name__} was called with kernel roles {roles}, '
        f'its constructor arguments give {planned}: the NNX plan reads the '
        'layout from the constructor, so an einsum_str given to the call '
        'must classify the kernel axes the same way.')


def _linear_general(module, args, kwargs, options):
  x, mask = _first_input(args, kwargs), options.token_mask
  if module.batch_axis:
    stat, roles = einsum_layout.dense_general_call(
        x, tuple(module.batch_axis), module.axis, module.out_features,
        type(module).__name__, mask)
    _checked_roles(module, roles)
    return statistics.EINSUM_MEAN, stat
  return statistics.MEAN, mean_inputs.dense_mean(x, module.axis, mask)


def _einsum(module, args, kwargs, options):
  equation = args[1] if len(args) > 1 else kwargs.get('einsum_str')
  equation = module.einsum_str if equation is None else equation
  stat, roles = einsum_layout.call_statistic(
      equation, _first_input(args, kwargs), jnp.shape(module.kernel[...]),
      type(module).__name__, options.token_mask, exclude=_EXCLUDE_HINT)
  _checked_roles(module, roles)
  return statistics.EINSUM_MEAN, stat


def _conv(module, args, kwargs, options):
  return statistics.MEAN, mean_inputs.conv_statistic(
      _first_input(args, kwargs), ConvGeometry.of(module),
      options.token_mask, type(module).__name__)


def _attend(module, args, kwargs, options):
  del module
  return statistics.ATTEND_MEAN, mean_inputs.dense_mean(
      _first_input(args, kwargs, 'query'), mask=options.token_mask)


def _lookup(module, args, kwargs, options):
  if not options.embed_lookup:
    return None
  return statistics.LOOKUP_MEAN, attention.token_frequencies(
      _first_input(args, kwargs), module.num_embeddings, options.token_mask)


# --------------------------------------------------------------------------
# Attention calls in progress, per thread: (owner module, AttentionCall).

_LOCAL = threading.local()
_PROJECTIONS = ('query', 'key', 'value', 'out')


def _attention_calls() -> list:
  if not hasattr(_LOCAL, 'calls'):
    _LOCAL.calls = []
  return _LOCAL.calls


def _owner_call(module: nnx.Module) -> Optional[capture_core.AttentionCall]:
  """The attention call `module` is a projection of, if any."""
  calls = _attention_calls()
  if not calls:
    return None
  owner, call = calls[-1]
  if any(getattr(owner, name, None) is module for name in _PROJECTIONS):
    return call
  return None


# --------------------------------------------------------------------------
# Patches.


@dataclasses.dataclass(eq=False)
class _Patch:
  cls: type
  name: str
  original: Callable
  wrapper: Callable = None
  active: bool = True


def _options_for(patch: _Patch, module: nnx.Module
                 ) -> Optional[capture_core.Options]:
  """The capture options a patched call of `module` works under, or None.

  None (run the original method untouched) when the patch was retired, no
  capture is open in this thread, or ``nnx.capture`` is not collecting from
  `module`.
  """
  options = _OPEN.current()
  if (not patch.active or options is None or not _collecting(module)
      or options.exclude(module)):
    return None
  _claim(module, options)
  return options


# Modules run by each open capture: module id -> (module, options). One
# model object run by two captures at once (two threads) cannot be captured:
# nnx.capture keeps the sown values on the module objects themselves.
_CLAIMS: dict[int, tuple[nnx.Module, capture_core.Options]] = {}
_CLAIMS_LOCK = threading.Lock()

SHARED = (
    "mac: the NNX module {name} is run under mac_optax.nnx.capture() by two "
    'threads at once. nnx.capture keeps the values it collects on the module '
    'objects themselves (and the capture swaps the attention_fn of attention '
    "layers for the call), so two threads' statistics would mix (for "
    "attention: 'could not identify its value projection'). Give each thread "
    'its own model object (nnx.clone(model), or nnx.split / nnx.merge in the '
    'thread; under nnx.jit each trace already has its own), or run the '
    'captured forward passes one at a time.')


def _claim(module: nnx.Module, options: capture_core.Options) -> None:
  with _CLAIMS_LOCK:
    held = _CLAIMS.setdefault(id(module), (module, options))
  if held[0] is module and held[1] is not options:
    raise ValueError(SHARED.format(name=type(module).__name__))


def _release_claims(options: capture_core.Options) -> None:
  with _CLAIMS_LOCK:
    for key in [k for k, (_, o) in _CLAIMS.items() if o is options]:
      del _CLAIMS[key]


def _stat_wrapper(patch: _Patch, statistic: Callable) -> Callable:
  original = patch.original

  @functools.wraps(original)
  def wrapper(self, *args, **kwargs):
    options = _options_for(patch, self)
    if options is None:
      out = original(self, *args, **kwargs)
      current = _OPEN.current()
      call = _owner_call(self)
      if current is not None and call is not None and current.exclude(self):
        call.skip(out)   # an excluded projection of an attention call
      return out
    found = statistic(self, args, kwargs, options)
    if found is None:
      return original(self, *args, **kwargs)
    name, mean = found
    sow = lambda m: self.sow(nnx.Intermediate, name, m)
    call = _owner_call(self) if name == statistics.MEAN else None
    if call is None:
      sow(mean)
      return original(self, *args, **kwargs)
    out = original(self, *args, **kwargs)
    call.hold(sow, mean, _first_input(args, kwargs), out)
    return out

  return wrapper


def _attention_wrapper(patch: _Patch) -> Callable:
  original = patch.original

  @functools.wraps(original)
  def wrapper(self, *args, **kwargs):
    options = _options_for(patch, self)
    if options is None:
      return original(self, *args, **kwargs)
    decode = kwargs.get('decode')
    decode = self.decode if decode is None else decode
    if options.attention == attention.PLAIN or decode:
      return original(self, *args, **kwargs)
    call = capture_core.AttentionCall(type(self).__name__, options)
    attention_fn = self.attention_fn
    # The static attribute is swapped for this call only, bypassing NNX's
    # attribute bookkeeping: the graph structure does not change. No other
    # capture runs this module meanwhile (_options_for); an uncaptured
    # thread calling it passes through the recorder.
    object.__setattr__(self, 'attention_fn', call.recording(attention_fn))
    _attention_calls().append((self, call))
    try:
      out = original(self, *args, **kwargs)
    finally:
      object.__setattr__(self, 'attention_fn', attention_fn)
      _attention_calls().pop()
    call.release()
    return out

  return wrapper


def _patch_table() -> list[tuple[type, str, Callable]]:
  """``(class, method, make wrapper)`` of every supported layer."""
  stat = lambda fn: functools.partial(_stat_wrapper, statistic=fn)
  return [(nnx.Linear, '__call__', stat(_linear)),
          (nnx.LinearGeneral, '__call__', stat(_linear_general)),
          (nnx.Einsum, '__call__', stat(_einsum)),
          (nnx.Conv, '__call__', stat(_conv)),
          (nnx.Embed, 'attend', stat(_attend)),
          (nnx.Embed, '__call__', stat(_lookup)),
          (nnx.MultiHeadAttention, '__call__', _attention_wrapper)]


_LOCK = threading.Lock()
_INSTALLED: list[_Patch] = []


def _install() -> None:
  for cls, name, make in _patch_table():
    patch = _Patch(cls, name, cls.__dict__[name])
    patch.wrapper = make(patch)
    setattr(cls, name, patch.wrapper)
    _INSTALLED.append(patch)


def _uninstall() -> None:
  for patch in _INSTALLED:
    patch.active = False
    if patch.cls.__dict__.get(patch.name) is patch.wrapper:
      setattr(patch.cls, patch.name, patch.original)
  _INSTALLED.clear()


class _Capture:
  """The context manager :func:`capture` returns."""

  def __init__(self, options: capture_core.Options):
    self._options = options

  def __enter__(self) -> None:
    with _LOCK:
      if _OPEN.enter(self._options) == 1:
        _install()

  def __exit__(self, exc_type, *exc) -> None:
    _release_claims(self._options)
    with _LOCK:
      remaining, verify = _OPEN.exit(self._options)
      if remaining == 0:
        _uninstall()
    if exc_type is None:
      verify()


def capture(*, attention: str = 'exact',  # pylint: disable=redefined-outer-name
            embed_lookup: bool = False,
            token_mask: Optional[jax.Array] = None,
            exclude: Any = None) -> _Capture:
  """Sows MAC statistics from every supported layer of an unmodified model.

  Run the model through ``nnx.capture(model, nnx.Intermediate)`` inside this
  context; the returned ``nnx.State`` holds, at the path of each layer, the
  statistic the transform pairs with the layer's ``kernel`` (or tied
  ``embedding``). Supported: ``nnx.Linear``, ``nnx.LinearGeneral`` (any
  contracted axes and output shape; with ``batch_axis`` one mean input per
  batch index), ``nnx.Einsum`` (any explicit two-operand equation: kernel
  axes contracted with the input, batched (shared by input, kernel and
  output: one mean input per index) or output-only; sown as
  ``mac_optax.EINSUM_MEAN``, whose layout only the plan knows, so
  ``mac(plan=mac_optax.nnx.plan(...))`` is required; the plan reads the
  layout from the constructor's ``einsum_str``, and an equation MAC cannot
  model raises), ``nnx.Conv`` (any
  rank, strides, padding modes including ``'CIRCULAR'``/``'REFLECT'``/
  ``'CAUSAL'``, input and kernel dilation, ``feature_group_count``),
  ``nnx.Embed.attend`` (tied output layer) and ``nnx.MultiHeadAttention``
  (value projection with the attention-mixed mean); inside ``nnx.scan`` /
  ``nnx.vmap`` (statistics stacked like the parameters) and ``nnx.remat``.
  A layer called several times contributes the mean of its calls' means.

  Outside this context, in another thread, or when the model is called
  without ``nnx.capture``, the layers run exactly as without it. One
  capture per thread: entering one inside another raises.

  Args:
    attention: the value statistic of ``nnx.MultiHeadAttention``:
      ``'exact'`` (``E_{b,h,i}[Σ_j P_bhij x_bj]``), ``'product_of_means'``
      (the authors' ``Σ_j w_j x̄_j``) or ``'plain'`` (the value projection's
      plain input mean, like any ``LinearGeneral``).
    embed_lookup: also precondition ``nnx.Embed`` lookup tables ``(V, D)``
      along the vocabulary axis with the token frequencies of the batch,
      sown as ``mac_optax.LOOKUP_MEAN``.
    token_mask: the batch's ``[batch, tokens]`` padding mask (True or
      non-zero for a real token; traced values welcome). Statistics with
      token rows (an input leading with the mask's shape on axes the layer
      neither contracts, batches nor sums) average over real tokens only,
      as in :func:`mac_optax.linen.capture`; the value projection of
      ``nnx.MultiHeadAttention`` averages over real queries. A ``Conv``
      input leading with the mask's shape raises, and so does a mask that
      leads no layer input of the forward pass (on exit).
    exclude: layers not to capture, passed through unchanged: a list of
      modules (``[model.mix]``; each with everything below it) or a
      predicate ``module -> bool``. NNX calls do not know their paths, so
      the capture takes the modules; :func:`plan` takes paths too.

  Raises:
    ValueError: a capture is already open in this thread, or, on exit,
      `token_mask` matched no layer input.

  Example:
    >>> def loss_fn(model):
    ...   with mac_optax.nnx.capture():
    ...     logits, inter = nnx.capture(model, nnx.Intermediate)(x)
    ...   return loss(logits, y), inter
    >>> (l, inter), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    >>> optimizer.update(model, grads, intermediates=inter)
  """
  return _Capture(capture_core.Options.checked(
      attention, embed_lookup, token_mask, _module_excluder(exclude),
      where='mac_optax.nnx.capture'))


def _module_excluder(exclude: Any) -> Callable[[nnx.Module], bool]:
  """``exclude=`` of the NNX capture as a predicate on modules."""
  if isinstance(exclude, nnx.Module):   # modules are callable too
    exclude = [exclude]
  if exclude is None or callable(exclude):
    return exclude
  if not isinstance(exclude, (list, tuple)) or not all(
      isinstance(m, nnx.Module) for m in exclude):
    raise TypeError(
        'mac: mac_optax.nnx.capture(exclude=...) takes modules '
        '([model.mix]) or a predicate module -> bool (NNX calls do not know '
        f'their paths), got {exclude!r}.')
  ids = {id(node) for m in exclude for _, node in nnx.iter_graph(m)
         if isinstance(node, nnx.Module)}
  return lambda module: id(module) in ids


def sow_attention(projection: nnx.Module, inputs: jax.Array, *,
                  probs: Optional[jax.Array] = None,
                  weights: Optional[jax.Array] = None,
                  columns: str = 'qkv',
                  mode: Optional[str] = None) -> None:
  """Sows the attention-aware statistic of a hand-written NNX attention layer.

  The NNX twin of :func:`mac_optax.linen.sow_attention` (see there): sows,
  as ``mac_optax.ATTENTION_MEAN`` at `projection`'s path, the ``[G, D]``
  statistic of a fused projection (``x̄`` for the query and key groups, the
  attention-mixed mean for the value group). A no-op outside
  ``nnx.capture(..., nnx.Intermediate)``.

  Args:
    projection: the module owning the fused ``kernel`` (an ``nnx.Linear``).
    inputs: ``[B, N, D]`` input of the projection.
    probs: ``[B, H, Nq, Nk]`` probabilities (after softmax and masks, before
      dropout), reduced at once.
    weights: ``[B, Nk]`` per-key weights ``mean_{h,i} P_bhij`` instead of
      `probs`.
    columns: order of the column groups (``'qkv'``, ``'kv'``, ``'v'``).
    mode: ``'exact'`` or ``'product_of_means'``; by default the open
      capture's (``'exact'`` outside one).

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
  stat = capture_core.attention_statistic(
      type(projection).__name__, inputs, probs=probs, weights=weights,
      columns=columns, mode=mode, current=_OPEN.current())
  if _collecting(projection):
    projection.sow(nnx.Intermediate, statistics.ATTENTION_MEAN, stat)


# --------------------------------------------------------------------------
# The plan.

_KINDS = ((nnx.Conv, plan_lib.CONV), (nnx.Einsum, plan_lib.EINSUM),
          (nnx.LinearGeneral, plan_lib.DENSE),
          (nnx.Linear, plan_lib.DENSE), (nnx.Embed, plan_lib.EMBED_ATTEND))


def _survey(model: nnx.Module, attention_mode: str) -> capture_core.Survey:
  """Module types and layer kinds by path, from the model's graph."""
  survey = capture_core.Survey()
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    key = '/'.join(str(p) for p in path)
    survey.module_types[key] = type(node).__name__
    kind = next((k for cls, k in _KINDS if isinstance(node, cls)),
                plan_lib.CUSTOM)
    survey.kinds.setdefault(key, kind)
    try:
      roles = _einsum_roles(node)
    except ValueError:
      roles = None   # an equation MAC cannot model raises when it is called
    if roles is not None:
      survey.kinds[key] = plan_lib.EINSUM
      survey.layouts[key] = roles
    if (isinstance(node, nnx.MultiHeadAttention)
        and attention_mode != attention.PLAIN):
      survey.kinds['/'.join(filter(None, (key, 'value')))] = (
          plan_lib.ATTENTION_VALUE)
  return survey


def plan(model: nnx.Module, *args, attention: str = 'exact',  # pylint: disable=redefined-outer-name
         embed_lookup: bool = False, exclude: Any = None,
         **kwargs) -> plan_lib.LayerPlan:
  """The layer plan of an NNX model: what MAC preconditions, and how.

  Runs one abstract forward pass (``jax.eval_shape``, no FLOPs; `model` is
  not modified) under :func:`capture` with the same options as the training
  step and pairs the statistics with the ``nnx.Param`` parameters.
  ``print(plan)`` shows the coverage table.

  Args:
    model: the NNX module.
    *args: example inputs of ``model(...)`` (arrays or shapes). Python
      scalars among them (a flag given by position) are static.
    attention: as in :func:`capture` (keyword only, like every option).
    embed_lookup: as in :func:`capture`.
    exclude: layers the training step's capture excludes: paths
      (``['mix']``, each with everything below it), a predicate
      ``path -> bool``, or the modules themselves; their parameters are
      listed as passed through, 'excluded by the user'.
    **kwargs: keyword arguments of ``model(...)``.

  Returns:
    A :class:`mac_optax.LayerPlan` for ``mac(plan=...)``.

  Example:
    >>> plan = mac_optax.nnx.plan(model, x[:1])
    >>> print(plan)
    >>> optimizer = nnx.Optimizer(
    ...     model, mac_optax.mac_sgd(0.1, momentum=0.9, plan=plan),
    ...     wrt=nnx.Param)
  """
  graphdef, state = nnx.split(model)
  traced, rebuild = capture_core.static_scalars(args)
  excluded = _excluded_paths(model, exclude)

  def forward(state, traced):
    copy = nnx.merge(graphdef, state)
    modules = [node for path, node in nnx.iter_graph(copy)
               if isinstance(node, nnx.Module)
               and excluded(_join(path))]
    with capture(attention=attention, embed_lookup=embed_lookup,
                 exclude=modules):
      _, inter = nnx.capture(copy, nnx.Intermediate)(*rebuild(traced),
                                                     **kwargs)
    return inter

  like = jax.eval_shape(forward, state, traced)
  survey = _survey(model, attention)
  params = nnx.state(model, nnx.Param)
  result = capture_core.mark_excluded(plan_lib.from_statistics(
      params, like, kinds=survey.kinds,
      module_types=survey.module_types, layouts=survey.layouts), excluded)
  graph, _, rest = nnx.split(model, nnx.Param, ...)

  def program_fn(params, traced):
    return nnx.merge(graph, params, rest)(*rebuild(traced), **kwargs)
  return program_plan.checked_capture_plan(result, program_fn, params,
                                           (traced,), {})


def _join(path) -> str:
  return '/'.join(str(p) for p in path)


def _excluded_paths(model: nnx.Module, exclude: Any
                    ) -> Callable[[str], bool]:
  """``exclude=`` of :func:`plan` (paths, a predicate or modules) on paths."""
  if isinstance(exclude, nnx.Module) or (
      isinstance(exclude, (list, tuple))
      and any(isinstance(m, nnx.Module) for m in exclude)):
    chosen = _module_excluder(exclude)
    paths = [_join(p) for p, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Module) and chosen(node)]
    return capture_core.excluder(paths)
  return capture_core.excluder(exclude)


def intermediates_like(model: nnx.Module, *args, attention: str = 'exact',  # pylint: disable=redefined-outer-name
                       embed_lookup: bool = False, exclude: Any = None,
                       **kwargs) -> Any:
  """Shapes of the intermediates a captured forward pass of `model` returns.

  ``plan(...).intermediates_like``; prefer passing the plan itself to
  ``mac(plan=...)``.
  """
  return plan(model, *args, attention=attention, embed_lookup=embed_lookup,
              exclude=exclude, **kwargs).intermediates_like
