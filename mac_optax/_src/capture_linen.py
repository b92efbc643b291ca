"""Capture of MAC statistics from unmodified Flax linen models.

Inside :func:`capture`, the first module call of a ``model.apply`` (or of
any module called from outside a captured call, e.g. through
``apply(..., method=...)``) is evaluated through the program interpreter
that :func:`mac_optax.plan` uses: every layer of the call is found in the
traced program, whatever code defines it (Flax's ``Dense``, ``Conv``,
``Einsum``, attention, a custom module's ``x @ w.T``), and its statistic is
sown into the ``'intermediates'`` collection (:mod:`sown_program` says
where), so that ``params[p]['kernel']`` pairs with
``intermediates[p]['mac_mean']``. The model must be applied with
``mutable=['intermediates']`` for the values to come back. The only reach
into the model is ``nn.intercept_methods``; no layer class is named here.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mac_optax._src import capture_core
from mac_optax._src import mean_inputs
from mac_optax._src import plan as plan_lib
from mac_optax._src import sown_program
from mac_optax._src import statistics
from mac_optax._src.smac import GRAD_SQ
from mac_optax._src.smac import PROBES

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


# Set while a module's call is evaluated by the program interpreter: the
# calls inside it are part of that program and pass through.
_EVALUATING = threading.local()


@contextlib.contextmanager
def _evaluating(root: tuple[str, ...]) -> Iterator[None]:
  outer = getattr(_EVALUATING, 'root', None)
  _EVALUATING.root = root
  try:
    yield
  finally:
    _EVALUATING.root = outer


def _call_with_statistics(module: nn.Module, method: str, args, kwargs,
                          options: Optional[capture_core.Options],
                          probes: Optional[dict],
                          survey: Optional[capture_core.Survey]) -> Any:
  """Evaluates ``module.<method>(*args, **kwargs)`` through the program.

  The module is applied afresh to its own variables (its parameters as the
  program's inputs, the same RNG streams and mutable collections), so the
  interpreter sees every layer of the call, whatever code defines it; the
  mutated collections are written back to the module's scope, with each
  layer's statistic sown at its place (:mod:`sown_program`) when a MAC
  capture is open (`options`), and SMAC's `probes` on the layers' outputs.
  """
  scope = module.scope
  variables = flax.core.unfreeze(module.variables)
  params = variables.get('params', {})
  root = tuple(module.path)

  def fn(params, *args, **kwargs):
    with _evaluating(root):
      return module.clone(parent=None).apply(
          {**variables, 'params': params}, *args, method=method,
          mutable=scope.mutable, rngs=scope.rngs, **kwargs)

  result, placed = sown_program.evaluate(
      fn, params, args, kwargs, options or capture_core.Options.checked(
          'exact', False), root, _OPEN.mask_check(), survey, probes)
  # `apply` returns the mutated collections only when some are mutable.
  out, mutated = result if scope.mutable is not False else (result, {})
  mutated = flax.core.unfreeze(mutated)
  if options is not None:
    mutated[COLLECTION] = sown_program.add_sown(
        mutated.get(COLLECTION, {}), placed)
  for collection, tree in mutated.items():
    if collection == 'params':
      continue
    for name, value in tree.items():
      module.put_variable(collection, name, value)
  return out


def _probes_of(module: nn.Module) -> Optional[dict]:
  """SMAC's probes in `module`'s variables, by kernel, if SMAC is probing."""
  if not capture_core.probing():
    return None
  tree = module.variables.get(PROBES)
  if not tree:
    return None
  leaves = jax.tree_util.tree_leaves(tree)
  return {statistics.join(path[:-1] + ('kernel',)): leaves[i]
          for path, i in statistics.leaf_paths(tree).items()
          if path[-1:] == (GRAD_SQ,)}


def interceptor(next_fun: Callable, args, kwargs, context) -> Any:
  """The root call of this thread's open captures (MAC's, SMAC's, or both)."""
  module = context.module
  survey = capture_core.current_survey()
  inside = getattr(_EVALUATING, 'root', None)
  if survey is not None:
    survey.module_types['/'.join((inside or ()) + tuple(module.path))] = (
        type(module).__name__)
  if inside is not None or module.is_initializing():
    return next_fun(*args, **kwargs)
  options = _OPEN.current()
  if options is not None and not module.is_mutable_collection(COLLECTION):
    options = None
  probes = _probes_of(module)
  if options is None and probes is None:
    return next_fun(*args, **kwargs)
  return _call_with_statistics(module, context.method_name, args, kwargs,
                               options, probes, survey)


@contextlib.contextmanager
def capture(*, attention: str = 'exact',  # pylint: disable=redefined-outer-name
            embed_lookup: bool = False,
            token_mask: Optional[jax.Array] = None,
            exclude: Any = None) -> Iterator[None]:
  """Sows MAC statistics from every layer of an unmodified model.

  The model's call is evaluated through the program interpreter of
  :func:`mac_optax.plan`: a layer is a parameter reaching a matrix product
  (``dot_general``: ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``,
  ``Embed.attend``, a custom module's ``jnp.einsum`` or ``x @ w.T``), a
  convolution (``nn.Conv``, any rank, strides, padding, dilation,
  ``feature_group_count``) or, with `embed_lookup`, a table lookup,
  through reshapes, transposes and casts; its axis roles come from the op.
  Through ``nn.scan`` (statistics stacked like the parameters, with or
  without ``'intermediates'`` in its ``variable_axes``), ``nn.remat``,
  ``nn.jit``, ``nn.cond``, models applied inside the model. A layer called
  several times contributes the mean of its calls' means. A parameter the
  program cannot model (an einsum summing a kernel axis away, a parameter
  entering a ``while_loop`` or a custom-derivative call) is passed through,
  and the plan's table says why.

  Attention (Flax's attention modules, ``jax.nn.dot_product_attention``,
  hand-written ``softmax`` + ``einsum``, GQA by repeat, fused projections
  split after the op): a value projection whose output is contracted over
  its input's token axis with data-dependent weights gets the
  attention-mixed mean ``E_{b,h,i}[Σ_j P_bhij x_bj]`` (per head group
  where the heads are the kernel's first output axis); query, key and
  output projections their plain input means. Attention inside an opaque
  kernel: :func:`mac_optax.linen.sow_attention`.

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
      same ``exclude``. For layers MAC should not touch (one it cannot
      model is passed through anyway, with the reason).

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
    ValueError: no layer found (MAC would be plain SGD), or a statistic
      sown with ``sow_mean`` does not fit its parameter.

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
  return sown_program.plan_of(survey, variables['params'], like, excluded)


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
