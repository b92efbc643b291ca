"""Capture of MAC statistics from unmodified Flax NNX models.

``mac_optax.nnx.capture(model)(x)`` is ``nnx.capture(model,
nnx.Intermediate)(x)`` with MAC's statistics added: the call is evaluated
through the program interpreter that :func:`mac_optax.plan` uses (the
model split into its ``nnx.Param`` state and the rest, merged again inside
the traced function, its other state written back afterwards), so every
layer of the call is found in the traced program, whatever code defines it,
and its statistic lands in the returned ``nnx.State`` at the place
``sown_program`` gives it: ``grads[p]['kernel']`` pairs with
``intermediates[p]['mac_mean']`` exactly as on the linen path. No class is
patched and no layer class is named here.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from flax import nnx
import jax
import jax.numpy as jnp

from mac_optax._src import capture_core
from mac_optax._src import mean_inputs
from mac_optax._src import plan as plan_lib
from mac_optax._src import sown_program
from mac_optax._src import statistics

_OPEN = capture_core.OpenCaptures()
input_mean = capture_core.input_mean

# The attribute `nnx.capture` gives every module it collects from, for the
# duration of the call (a Flax private; tests/test_nnx_capture.py pins it).
# Only `sow_mean`/`sow_attention` read it, to stay silent outside a capture.
CAPTURES_ATTRIBUTE = '__captures__'


def _collecting(module: nnx.Module) -> bool:
  """Whether ``nnx.capture`` is collecting sown values from `module`.

  Outside it, ``Module.sow`` takes a deprecated attribute-creating path the
  capture must never take.
  """
  return getattr(module, CAPTURES_ATTRIBUTE, None) is not None


MIGRATE = (
    'mac: mac_optax.nnx.capture takes the model (or a function of it, like '
    'nnx.capture) and returns its call with the statistics: write\n'
    '  logits, inter = mac_optax.nnx.capture(model)(x)\n'
    'in place of\n'
    '  with mac_optax.nnx.capture():\n'
    '    logits, inter = nnx.capture(model, nnx.Intermediate)(x)')


def _call_of(fn: Any) -> tuple[Optional[nnx.Module], Callable[..., Any]]:
  """``(the module, or None if it is the first argument, call(module, ...))``."""
  if isinstance(fn, nnx.Module):
    return fn, lambda m, *a, **k: m(*a, **k)
  if inspect.ismethod(fn) and isinstance(fn.__self__, nnx.Module):
    name = fn.__name__
    return fn.__self__, lambda m, *a, **k: getattr(m, name)(*a, **k)
  if callable(fn):
    return None, fn
  raise TypeError(MIGRATE if fn is None else
                  f'mac: mac_optax.nnx.capture takes an nnx.Module, a bound '
                  f'method of one or a function of one, got {fn!r:.80}.')


def _with_statistics(inter: nnx.State, placed: list) -> nnx.State:
  """`inter` with each placed statistic added, as ``nnx.Intermediate``."""
  nested = sown_program.add_sown(nnx.to_pure_dict(inter), placed)
  return nnx.State(jax.tree_util.tree_map(
      nnx.Intermediate, nested, is_leaf=lambda x: isinstance(x, tuple)))


def capture(fn: Any = None, *, attention: str = 'exact',  # pylint: disable=redefined-outer-name
            embed_lookup: bool = False,
            token_mask: Optional[jax.Array] = None,
            exclude: Any = None) -> Callable[..., tuple[Any, nnx.State]]:
  """``nnx.capture(fn, nnx.Intermediate)`` with MAC's statistics added.

  The call is evaluated through the program interpreter of
  :func:`mac_optax.plan`: a layer is an ``nnx.Param`` reaching a matrix
  product (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``,
  ``Embed.attend``, a custom module's ``x @ w.T``), a convolution
  (``nnx.Conv``, any rank, strides, padding, dilation, groups) or, with
  `embed_lookup`, a table lookup, through reshapes, transposes and casts;
  through ``nnx.scan``/``nnx.vmap``/raw ``jax.lax.scan`` (statistics stacked
  like the parameters), ``nnx.remat``, ``nnx.jit``, ``nnx.cond``. A value
  projection whose output is contracted over its input's token axis with
  data-dependent weights (``nnx.MultiHeadAttention``, hand-written
  ``softmax`` + ``einsum``, GQA by repeat) gets the attention-mixed mean
  per head group. What the program cannot model is passed through, and
  the plan's table says why. The model's other state (batch statistics,
  RNG counts) is updated as by the plain call.

  Args:
    fn: the model (its ``__call__``), a bound method of it, or a function
      whose first argument is the model, as for ``nnx.capture``.
    attention: the value statistic: ``'exact'``
      (``E_{b,h,i}[Σ_j P_bhij x_bj]``), ``'product_of_means'`` (the
      authors' ``Σ_j w_j x̄_j``) or ``'plain'`` (the plain input mean).
    embed_lookup: also precondition lookup tables ``(V, D)`` along the
      vocabulary axis with the token frequencies of the batch, sown as
      ``mac_optax.LOOKUP_MEAN``.
    token_mask: the batch's ``[batch, tokens]`` padding mask (True or
      non-zero for a real token; traced values welcome). Statistics with
      token rows average over real tokens only, as in
      :func:`mac_optax.linen.capture`; attention-mixed means over real
      queries. A convolution input leading with the mask's shape raises,
      and so does a mask that leads no layer input.
    exclude: layers not to capture, passed through unchanged: paths
      (``['mix']``, each with everything below it), the modules themselves
      (``[model.mix]``), or a predicate ``path -> bool``.

  Returns:
    ``call(*args, **kwargs) -> (output, intermediates)``, the
    intermediates an ``nnx.State`` of ``nnx.Intermediate`` (the model's
    own sown values too).

  Raises:
    TypeError: called without a model (the context-manager form of 0.2).
    ValueError: a capture is already open in this thread, or `token_mask`
      matched no layer input.

  Example:
    >>> def loss_fn(model):
    ...   logits, inter = mac_optax.nnx.capture(model)(x)
    ...   return loss(logits, y), inter
    >>> (l, inter), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    >>> optimizer.update(model, grads, intermediates=inter)
  """
  bound, call = _call_of(fn)
  # The options' errors at once, before any call.
  capture_core.Options.checked(attention, embed_lookup, token_mask)

  def captured(*args, **kwargs):
    model = bound if bound is not None else args[0]
    if bound is None:
      args = args[1:]
    options = capture_core.Options.checked(
        attention, embed_lookup, token_mask,
        _excluded_paths(model, exclude), where='mac_optax.nnx.capture')
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    # The rest of the state is an argument too: the variables merged inside
    # the traced function must all belong to its trace.
    def forward(params, rest, *args, **kwargs):
      copy = nnx.merge(graphdef, params, rest)
      out, inter = nnx.capture(call, nnx.Intermediate)(copy, *args, **kwargs)
      return out, inter, nnx.split(copy, nnx.Param, ...)[2]

    _OPEN.enter(options)
    try:
      (out, inter, new_rest), placed = sown_program.evaluate(
          forward, params, (rest, *args), kwargs, options, (),
          _OPEN.mask_check(), capture_core.current_survey())
    finally:
      _, verify = _OPEN.exit(options)
    verify()
    nnx.update(model, new_rest)
    return out, _with_statistics(inter, placed)

  return captured


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


def plan(model: nnx.Module, *args, attention: str = 'exact',  # pylint: disable=redefined-outer-name
         embed_lookup: bool = False, exclude: Any = None,
         **kwargs) -> plan_lib.LayerPlan:
  """The layer plan of an NNX model, as :func:`mac_optax.linen.plan`.

  The abstract pass (``jax.eval_shape``) runs on a copy: `model` is not
  modified. The statistics pair with the ``nnx.Param`` parameters.

  Args:
    model: the NNX module.
    *args: example inputs of ``model(...)``; Python scalars stay static.
    attention: as in :func:`capture`.
    embed_lookup: as in :func:`capture`.
    exclude: as in :func:`capture` (listed as 'excluded by the user').
    **kwargs: keyword arguments of ``model(...)``.

  Returns:
    A :class:`mac_optax.LayerPlan` for ``mac(plan=...)``.

  Raises:
    ValueError: no layer found (MAC would be plain SGD).

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
  survey = capture_core.Survey()
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      survey.module_types[_join(path)] = type(node).__name__

  def forward(state, traced):
    copy = nnx.merge(graphdef, state)
    with capture_core.surveying(survey):
      _, inter = capture(copy, attention=attention, embed_lookup=embed_lookup,
                         exclude=excluded)(*rebuild(traced), **kwargs)
    return inter

  like = jax.eval_shape(forward, state, traced)
  return sown_program.plan_of(survey, nnx.state(model, nnx.Param), like,
                              excluded)


def _join(path) -> str:
  return '/'.join(str(p) for p in path)


def _excluded_paths(model: nnx.Module, exclude: Any
                    ) -> Callable[[str], bool]:
  """``exclude=`` (paths, a predicate on paths, or modules) on paths.

  Raises:
    TypeError: a list mixing modules and paths, or anything else.
  """
  if isinstance(exclude, nnx.Module):   # modules are callable too
    exclude = [exclude]
  if isinstance(exclude, (list, tuple)) and any(
      isinstance(m, nnx.Module) for m in exclude):
    if not all(isinstance(m, nnx.Module) for m in exclude):
      raise TypeError('mac: exclude= takes module paths, the modules '
                      f'themselves or a predicate on paths, got {exclude!r}.')
    ids = {id(node) for m in exclude for _, node in nnx.iter_graph(m)
           if isinstance(node, nnx.Module)}
    exclude = [_join(p) for p, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Module) and id(node) in ids]
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
