"""MAC for any JAX function of a parameter pytree: plan and statistics.

The framework-neutral entry: ``mac_optax.plan(fn, params, *args)`` finds
the layers in ``fn``'s traced program and ``mac_optax.with_statistics(fn,
plan)`` runs ``fn`` returning its statistics too, inside the caller's
``jit``/``grad`` (no second forward pass). Equinox and plain-JAX models use
them directly; any Flax model can, through ``model.apply``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import jax

from mac_optax._src import plan as plan_lib
from mac_optax._src import program
from mac_optax._src import statistics
from mac_optax._src import token_mask as token_mask_lib

Exclude = Union[Sequence[str], Callable[[str], bool]]


def default_reason(shape) -> str:
  if len(shape) <= 1:
    return 'not a layer kernel (rank ≤ 1, elementwise: a scale or shift)'
  return ('reaches no dot_general / conv / gather through layout-only ops '
          '(used elementwise, or only after arithmetic)')


def pass_reasons(registry: program.Registry) -> dict[str, str]:
  """``{leaf path: why the program passes it through}``, for every leaf.

  A parameter entering an opaque call, a kernel used with two layouts, or
  one that reaches no layer op (also given for the leaves of found layers).
  """
  reasons = {registry.leaf_names[i]: r for i, r in registry.reasons.items()}
  for key, reason in registry.dropped.items():
    found = registry.found.get(key)
    if found is not None:
      reasons.setdefault(registry.leaf_names[found.leaf], reason)
  for name, shape in zip(registry.leaf_names, registry.leaf_shapes):
    reasons.setdefault(name, default_reason(shape))
  return reasons


def _plan_from(registry: program.Registry, stats) -> plan_lib.LayerPlan:
  layers, used = [], set()
  for found in registry.layers():
    if found.key not in stats:
      continue
    names = registry.leaf_names
    layers.append(plan_lib.PlannedLayer(
        path=found.key, statistic=statistics.PROGRAM, kind=found.kind,
        layout=found.layout, kernel=names[found.leaf],
        bias=None if found.bias_leaf is None else names[found.bias_leaf],
        note=found.note))
    used.add(found.leaf)
    if found.bias_leaf is not None:
      used.add(found.bias_leaf)
  passed = []
  reasons = pass_reasons(registry)
  for i, (name, shape) in enumerate(zip(registry.leaf_names,
                                        registry.leaf_shapes)):
    if i not in used:
      passed.append(plan_lib.PassedParam(name, shape, reasons[name]))
  return plan_lib.LayerPlan(tuple(sorted(layers, key=lambda l: l.key)),
                            tuple(passed))


def _with_options(result: plan_lib.LayerPlan, options) -> plan_lib.LayerPlan:
  return plan_lib.LayerPlan(result.layers, result.passed,
                            program_options=options)


def plan(fn: Callable[..., Any], params: Any, *args: Any,
         exclude: Exclude = (), embed_lookup: bool = False,
         **kwargs: Any) -> plan_lib.LayerPlan:
  """The layers MAC finds in ``fn(params, *args, **kwargs)``.

  One abstract trace of ``fn`` (no computation). A parameter leaf that
  reaches an operand of ``dot_general`` or ``conv_general_dilated`` through
  layout-only ops (reshape, transpose, casts, the slicing of ``scan``) is a
  layer: the contracted kernel axes are its inputs, the batch axes it
  shares with the other operand its groups, the rest its outputs; a
  parameter added to the op's output is its bias. A value projection whose
  output is contracted over a token axis with data-dependent weights
  (attention) gets the attention-mixed mean. Every other parameter is
  passed through, with the reason in ``print(plan)``.

  Args:
    fn: any function ``fn(params, *args, **kwargs)``, e.g. a model's
      forward pass or loss.
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``); the
      gradients given to ``update`` must have its structure.
    *args: example arguments (arrays or shapes).
    exclude: parameter paths (or prefixes) not to precondition, or a
      predicate on a kernel's path.
    embed_lookup: precondition embedding lookups (``table[ids]``) with the
      token frequencies.
    **kwargs: example keyword arguments.

  Returns:
    The :class:`mac_optax.LayerPlan` for ``mac(plan=...)``.

  Raises:
    ValueError: no layer found (MAC would be plain SGD); the message lists
      every parameter and why it was passed through.

  Example:
    >>> params = {'w': jnp.ones((3, 4)), 'b': jnp.zeros(4)}
    >>> fn = lambda p, x: x @ p['w'] + p['b']
    >>> plan = mac_optax.plan(fn, params, jnp.ones((2, 3)))
    >>> plan.keys
    ('w',)
  """
  registry = program.Registry.of(params, exclude, embed_lookup)
  _, stats = jax.eval_shape(
      lambda p, a, k: program.run(fn, registry, p, a, k), params, args,
      kwargs)
  return not_empty(_with_options(_plan_from(registry, stats),
                                 (exclude, embed_lookup)))


def not_empty(result: plan_lib.LayerPlan) -> plan_lib.LayerPlan:
  """`result`, if it has a layer (`mac_optax.plan` and the captures' plans).

  Raises:
    ValueError: no layer found (MAC would be plain SGD); the message lists
      every parameter and why it was passed through.
  """
  if not result.layers:
    raise ValueError(
        'mac: no layer found in the program: MAC would be plain SGD.\n'
        + result.summary() + '\nA layer is a parameter that reaches a '
        'matrix product (dot_general, einsum, @) or a convolution through '
        'reshapes/transposes/casts only.')
  return result


def _check_same(plan: plan_lib.LayerPlan, registry: program.Registry,
                stats) -> None:
  now = {f.key: f for f in registry.layers() if f.key in stats}
  missing = sorted(set(plan.keys) - set(now))
  extra = sorted(set(now) - set(plan.keys))
  if missing or extra:
    raise ValueError(
        f'mac: the layers of this call differ from the plan: missing '
        f'{missing}, not planned {extra}. Build the plan from the same '
        'function, with arguments shaped like the training step\'s.')
  for layer in plan.layers:
    found = now[layer.key]
    if found.layout != layer.layout:
      raise ValueError(
          f"mac: layer '{layer.key}': this call's layout "
          f'{found.layout.roles()} {found.layout.stat_shape} differs from '
          f'the plan\'s {layer.layout.roles()} {layer.layout.stat_shape}.')


def with_statistics(fn: Callable[..., Any], plan: plan_lib.LayerPlan, *,
                    token_mask: Any = None
                    ) -> Callable[..., tuple[Any, dict]]:
  """``fn`` returning ``(output, stats)``: the statistics of every layer.

  Call it inside the training step's ``jit`` and ``grad`` (return the
  statistics as an auxiliary output); it evaluates the same primitives as
  ``fn`` plus one mean per layer input, so there is no second forward pass.
  The statistics have no gradient.

  Args:
    fn: the function the plan was built from.
    plan: its :func:`plan` (whose ``exclude``/``embed_lookup`` apply).
    token_mask: ``[*batch, tokens]`` real tokens (True or non-zero) of this
      batch, or None. The inputs whose row axes lead with its shape average
      over real tokens only, lookups count real tokens, and attention-mixed
      means average over real queries (the rule of
      ``mac_optax.linen.capture(token_mask=...)``).

  Returns:
    ``g(params, *args, **kwargs) -> (fn's output, stats)``, ``stats`` a
    dict ``{layer key: [*stack, G, d_in]}`` for ``update(...,
    intermediates=stats)``.

  Raises:
    ValueError: (at trace time) the call's layers differ from the plan's,
      or a token mask matches no layer input.

  Example:
    >>> def loss_fn(p, x, y):
    ...   out, stats = mac_optax.with_statistics(fn, plan)(p, x)
    ...   return jnp.mean((out - y) ** 2), stats
    >>> (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    ...     params, x, y)
  """
  if not isinstance(plan, plan_lib.LayerPlan) or plan.program_options is None:
    raise TypeError('mac: with_statistics(fn, plan) needs the plan from '
                    f'mac_optax.plan(fn, ...), got {plan!r:.80}.')
  exclude, embed_lookup = plan.program_options

  def wrapped(params, *args, **kwargs):
    registry = program.Registry.of(params, exclude, embed_lookup)
    registry.token_mask = token_mask_lib.checked(token_mask)
    if registry.token_mask is not None:
      registry.mask_check = token_mask_lib.MaskCheck(registry.token_mask,
                                                     'with_statistics')
    out, stats = program.run(fn, registry, params, args, kwargs)
    if registry.mask_check is not None:
      registry.mask_check.verify()
    _check_same(plan, registry, stats)
    return out, stats

  return wrapped
