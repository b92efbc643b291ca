"""Layers from the traced program: discovery and statistics, one interpreter.

A layer, as MAC needs it, is visible in any traced JAX program: a parameter
leaf that reaches an operand of ``dot_general`` / ``conv_general_dilated``
(or the table of a ``gather``) through layout-only operations. The op's
dimension numbers give the kernel's axis roles (contracted → input, shared
batch → groups, the rest → output), the other operand is the layer input,
and a later contraction of the layer's output over one of its input's
token axes with a data-dependent matrix is attention mixing.

:func:`run` evaluates a function's jaxpr equation by equation inside the
caller's trace (so under the user's ``jit``/``grad`` the same primitives
are bound, plus one mean per layer input) and returns its outputs, the
statistics keyed by layer, and a :class:`Registry` of what it found. Plan
building runs the same interpreter abstractly; a training step runs it on
the real values. Sub-programs are followed: nested ``jit`` (inlined),
``remat`` (re-wrapped with the same policy), ``scan`` (stacked layers give
stacked statistics), ``cond`` (layers called in every branch); other
higher-order primitives and custom-derivative calls are bound unchanged,
and a parameter that enters them is passed through with the reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from mac_optax._src import attention as attention_lib
from mac_optax._src import axis_labels
from mac_optax._src import capture_core
from mac_optax._src import grad_sq_probe
from mac_optax._src import mean_inputs
from mac_optax._src import statistics
from mac_optax._src import token_mask as token_mask_lib
from mac_optax._src.axis_labels import Trail
from mac_optax._src.layout import KernelLayout
from mac_optax._src.layout import LayoutError

_HIGHEST = jax.lax.Precision.HIGHEST

DENSE = 'dense'
CONV = 'conv'
LOOKUP = 'embed_lookup'
ATTENTION_VALUE = 'attention_value'


# ------------------------------------------------------------------ registry


@dataclasses.dataclass
class Found:
  """A layer found in the program (one per key, over all its calls)."""
  key: str                       # kernel leaf path, '+@lookup' for lookups
  leaf: int                      # flat index of the kernel leaf
  kind: str
  layout: KernelLayout
  stack_scans: tuple = ()        # the scan of each stack axis, outermost first
  bias_leaf: Optional[int] = None
  note: str = ''                 # e.g. why attention mixing is not modelled


@dataclasses.dataclass
class Registry:
  """What the interpreter saw: layers, and why other leaves pass through."""
  leaf_names: tuple[str, ...]
  leaf_shapes: tuple[tuple[int, ...], ...]
  exclude: Callable[[str], bool]
  embed_lookup: bool = False
  # The value statistic: 'exact' (mixed), 'product_of_means' or 'plain'.
  attention: str = attention_lib.EXACT
  token_mask: Any = None         # [*batch, tokens], or None
  # What the mask met (the captures' check: it must match some input).
  mask_check: Optional[token_mask_lib.MaskCheck] = None
  found: dict[str, Found] = dataclasses.field(default_factory=dict)
  dropped: dict[str, str] = dataclasses.field(default_factory=dict)
  reasons: dict[int, str] = dataclasses.field(default_factory=dict)
  # Layers whose input second moment is also wanted (the exact first
  # layer), and, for those called outside any sub-program, per key
  # `(Σ a aᵀ [G, d, d], Σ a [G, d], rows)` over this call's rows.
  moments: frozenset = frozenset()
  moment_sums: dict[str, tuple] = dataclasses.field(default_factory=dict)
  moment_rows: dict[str, list] = dataclasses.field(default_factory=dict)
  keep_rows: bool = False        # also keep the rows a (`layer_inputs`)
  top_level: int = -1
  # SMAC's zero probes by layer key: each such layer's output goes through
  # the probe (its cotangent's E_rows[g²] becomes the probe's gradient).
  probes: Optional[dict[str, Any]] = None

  @classmethod
  def of(cls, params, exclude: Any = (), embed_lookup: bool = False,
         attention: str = attention_lib.EXACT) -> Registry:
    """A registry for `params` (arrays or shapes).

    Args:
      params: the parameter pytree.
      exclude: kernel paths (or prefixes) not to treat as layers, or a
        predicate on a kernel's path.
      embed_lookup: register table lookups as layers.
      attention: the value statistic ('exact', 'product_of_means', 'plain').

    Raises:
      TypeError: a leaf of `params` is not an array.
    """
    leaves = jax.tree_util.tree_leaves(params)
    index = statistics.leaf_paths(params)
    names = [''] * len(index)
    for path, i in index.items():
      names[i] = statistics.join(path)
    for name, leaf in zip(names, leaves):
      if not hasattr(leaf, 'shape') or not hasattr(leaf, 'dtype'):
        raise TypeError(
            f"mac: parameter '{name}' is a {type(leaf).__name__}, not an "
            'array. Pass only the arrays as `params` (Equinox: '
            '`params, static = eqx.partition(model, eqx.is_array)` and '
            '`fn = lambda p, x: eqx.combine(p, static)(x)`).')
    return cls(tuple(names), tuple(tuple(x.shape) for x in leaves),
               capture_core.excluder(exclude), bool(embed_lookup), attention)

  def pass_leaf(self, leaf: int, reason: str) -> None:
    self.reasons.setdefault(leaf, reason)

  def drop(self, key: str, reason: str) -> None:
    """A layer seen in some places and not modellable in others."""
    self.dropped.setdefault(key, reason)

  def add(self, found: Found) -> Optional[Found]:
    """Registers a call's layer; the layer, or None if it cannot be one."""
    known = self.found.get(found.key)
    if known is None:
      self.found[found.key] = found
      return found
    if known.layout.shape != found.layout.shape or (
        known.layout.inputs, known.layout.batch, known.layout.stack) != (
            found.layout.inputs, found.layout.batch, found.layout.stack):
      self.drop(found.key, 'used as a kernel with different axis roles in '
                f'different ops ({known.layout.roles()} and '
                f'{found.layout.roles()})')
      return None
    return known

  def layers(self) -> list[Found]:
    return [f for k, f in sorted(self.found.items()) if k not in self.dropped]


# -------------------------------------------------------------- statistics


@dataclasses.dataclass
class _Call:
  """One call of a layer at one level of the program."""
  key: str
  level: int
  contribution: Any             # [G, d_in] this call's mean input
  rows: Any = None              # [*free, d_in] the input, rows first
  free: tuple[int, ...] = ()    # the input axes of `rows`' leading axes


class _Level:
  """The calls of one traced function (a scan body, a branch, ...)."""
  _ids = itertools.count()

  def __init__(self):
    self.id = next(self._ids)
    self.calls: list[_Call] = []

  def totals(self, registry: Registry) -> dict[str, tuple[Any, Any]]:
    """``{key: (Σ contributions, number of calls)}`` of this level."""
    out: dict[str, tuple[Any, Any]] = {}
    for call in self.calls:
      found = registry.found.get(call.key)
      if found is None:
        continue
      contribution = _as_groups(call.contribution, found.layout)
      total, count = out.get(call.key, (0.0, 0.0))
      out[call.key] = (total + contribution, count + 1.0)
    return {k: (t, jnp.asarray(c, jnp.float32)) for k, (t, c) in out.items()}


def _as_groups(stat, layout: KernelLayout):
  """A plain ``[1, d]`` mean serves every column group of a mixed layer."""
  groups = layout.groups
  if stat.shape[-2] == groups:
    return stat
  return jnp.broadcast_to(stat, stat.shape[:-2] + (groups, stat.shape[-1]))


def _add_totals(a: dict, b: dict, registry: Registry) -> dict:
  out = dict(a)
  for key, (total, count) in b.items():
    if key in out:
      t0, c0 = out[key]
      layout = registry.found[key].layout
      out[key] = (_as_groups(t0, layout) + _as_groups(total, layout),
                  c0 + count)
    else:
      out[key] = (total, count)
  return out


# -------------------------------------------------------------- interpreter


class _Context:
  def __init__(self, registry: Registry):
    self.registry = registry
    self.scan_ids = itertools.count()


def _read(env, var):
  if type(var).__name__ == 'Literal':
    return var.val
  return env[var]


def _bind(eqn, values):
  """Binds an equation's primitive unchanged (any jax version)."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):   # older jax: (subfuns, params)
    subfuns, params = params
  ctx = getattr(eqn, 'ctx', None)
  manager = getattr(ctx, 'manager', None)
  if manager is not None:
    with manager:
      return eqn.primitive.bind(*subfuns, *values, **params)
  return eqn.primitive.bind(*subfuns, *values, **params)


def _closed(jaxpr_like):
  """``(jaxpr, consts)`` of a Jaxpr or ClosedJaxpr."""
  if hasattr(jaxpr_like, 'jaxpr') and hasattr(jaxpr_like, 'consts'):
    return jaxpr_like.jaxpr, list(jaxpr_like.consts)
  return jaxpr_like, []


def _param_trails(trails) -> list[Trail]:
  return [t for t in trails if t is not None and t.source[0] == 'param']


def _evaluate(ctx: _Context, level: _Level, jaxpr, consts, args, trails):
  """Evaluates `jaxpr`; returns ``(outputs, output trails, totals)``.

  ``totals`` are the statistics of the levels nested in this one (scan
  bodies, branches, remat); this level's own calls are in ``level``.
  """
  env, trail_env = {}, {}
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x, t in zip(jaxpr.invars, args, trails):
    env[v] = x
    if t is not None:
      trail_env[v] = t
  totals: dict = {}
  for eqn in jaxpr.eqns:
    values = [_read(env, v) for v in eqn.invars]
    in_trails = [None if type(v).__name__ == 'Literal' else trail_env.get(v)
                 for v in eqn.invars]
    outs, out_trails, nested = _equation(ctx, level, eqn, values, in_trails)
    totals = _add_totals(totals, nested, ctx.registry)
    for v, x, t in zip(eqn.outvars, outs, out_trails):
      if type(v).__name__ == 'DropVar':
        continue
      env[v] = x
      if t is not None:
        trail_env[v] = t
  outs = [_read(env, v) for v in jaxpr.outvars]
  out_trails = [None if type(v).__name__ == 'Literal' else trail_env.get(v)
                for v in jaxpr.outvars]
  return outs, out_trails, totals


def _equation(ctx, level, eqn, values, trails):
  name = eqn.primitive.name
  registry = ctx.registry
  # Parameters enter sub-programs only as operands: without a trail in,
  # nothing inside is a layer.
  if not any(t is not None for t in trails):
    out = _bind(eqn, values)
    outs = out if eqn.primitive.multiple_results else [out]
    return outs, [None] * len(outs), {}
  handler = _HANDLERS.get(name)
  if handler is not None:
    return handler(ctx, level, eqn, values, trails)
  out = _bind(eqn, values)
  outs = out if eqn.primitive.multiple_results else [out]
  if name in axis_labels.IDENTITY and len(outs) == len(trails):
    return outs, list(trails), {}
  if len(trails) == 1 and len(outs) == 1:
    shape_in = tuple(getattr(values[0], 'shape', ()))
    shape_out = tuple(getattr(outs[0], 'shape', ()))
    trail = axis_labels.propagate(name, eqn.params, trails[0], shape_in,
                                  shape_out)
    if trail is not None:
      return outs, [trail], {}
  if name in _CUSTOM_DERIVATIVE:
    passed = _passed_through(eqn, trails)
    if any(t is not None for t in passed):
      return outs, passed, {}
  for t in _param_trails(trails):
    if name in _HIGHER_ORDER or name in _OPAQUE:
      registry.pass_leaf(t.source[1], f'enters `{name}`, which MAC does not '
                         'look inside (its layers are invisible)')
  if name in ('add', 'add_any'):
    return outs, [_bias(ctx, level, trails, values)], {}
  if name == 'split' and trails[0] is not None:
    return outs, _split_parts(trails[0], eqn.params, values[0].shape), {}
  if name == 'unstack' and trails[0] is not None:   # `k, v = kv` (jax 0.12)
    return outs, _unstacked_parts(trails[0], eqn.params['axis'],
                                  values[0].shape), {}
  return outs, [None] * len(outs), {}


# --------------------------------------------------------------- layers


def _split_parts(trail: Trail, params, shape) -> list:
  """``jnp.split`` of a layer output: each piece a part (fused q/k/v)."""
  if trail.source[0] != 'out':
    return [None] * len(params['sizes'])
  axis, start, out = params['axis'], 0, []
  for size in params['sizes']:
    out.append(axis_labels.take_part(trail, axis, start, start + size,
                                     shape[axis]))
    start += size
  return out


def _unstacked_parts(trail: Trail, axis: int, shape) -> list:
  """``unstack`` of a layer output: each index a part, its axis dropped."""
  out = []
  for i in range(shape[axis]):
    part = (axis_labels.take_part(trail, axis, i, i + 1, shape[axis])
            if trail.source[0] == 'out' else None)
    out.append(None if part is None else axis_labels.squeeze(part, (axis,)))
  return out


def _roles_of(trail: Trail, shape, role_of_axis: dict[int, str]
              ) -> tuple[Optional[dict[int, str]], str]:
  """Each parameter axis's role, or (None, why)."""
  roles: dict[int, str] = {}
  for pos, (axis, scan) in enumerate(trail.stack):
    roles[axis] = 'stack'
    if axis != pos:
      return None, 'a scan slices a parameter axis that is not leading'
  for op_axis, role in role_of_axis.items():
    for lab in trail.axes[op_axis]:
      if lab[0] == 'r':
        return None, 'the kernel is broadcast before the op'
      whole = len(lab) == 2 and lab[0] == 'p'
      if not whole and role != 'output':
        return None, (f'an {role} axis of the kernel is split or merged '
                      'with others before the op')
      for axis in axis_labels.label_axes((lab,)):
        if roles.setdefault(axis, role) != role:
          return None, (f'kernel axis {axis} is used both as '
                        f'{roles[axis]} and {role}')
  for axis, n in enumerate(shape):
    if axis not in roles:
      if n != 1:
        return None, f'kernel axis {axis} does not reach the op'
      roles[axis] = 'input'
  return roles, ''


def _layout_from_roles(shape, roles, stack_len, column_groups=1,
                       bias_shape=None, bias_axes=None) -> KernelLayout:
  by = {r: tuple(sorted(a for a, v in roles.items() if v == r))
        for r in ('stack', 'input', 'batch', 'output')}
  return KernelLayout(tuple(shape), tuple(range(stack_len)), by['input'],
                      by['batch'], by['output'], column_groups, bias_shape,
                      bias_axes)


def _arranged_input(x, pairs, trail: Trail, shape):
  """The layer input as ``[*free, *batch param axes, *input param axes]``.

  ``pairs``: ``(x axis, kernel operand axis, role)`` of the contracted and
  batch axes. Each x axis is split into the parameter axes its kernel
  partner holds and laid out in ascending parameter-axis order, the
  row-major order of the statistic.
  Returns ``(arranged x, free x axes, (G, d_in))``.
  """
  paired = {xa: ka for xa, ka, _ in pairs}
  new_shape, labels = [], []
  for xa in range(x.ndim):
    if xa in paired:
      axes = axis_labels.param_axes(trail.axes[paired[xa]])
      for a in axes:
        new_shape.append(shape[a])
        labels.append(('p', a))
    else:
      new_shape.append(x.shape[xa])
      labels.append(('x', xa))
  x = x.reshape(new_shape)
  role = {}
  for _, ka, r in pairs:
    for a in axis_labels.param_axes(trail.axes[ka]):
      role[a] = r
  free = [i for i, lab in enumerate(labels) if lab[0] == 'x']
  batch = sorted((lab[1], i) for i, lab in enumerate(labels)
                 if lab[0] == 'p' and role[lab[1]] == 'batch')
  inputs = sorted((lab[1], i) for i, lab in enumerate(labels)
                  if lab[0] == 'p' and role[lab[1]] == 'input')
  order = free + [i for _, i in batch] + [i for _, i in inputs]
  x = jnp.transpose(x, order)
  groups = math.prod(shape[a] for a, _ in batch)
  d_in = math.prod(shape[a] for a, _ in inputs)
  free_axes = tuple(labels[i][1] for i in free)
  return x, free_axes, (groups, d_in)


def _register(registry: Registry, trail: Trail, role_of_axis: dict,
              key: str, kind: str, op: str, column_groups: int = 1
              ) -> Optional[Found]:
  """The layer of one call: its roles checked and registered, or None.

  A parameter that cannot be this layer is passed through with the reason.
  """
  leaf = trail.source[1]
  if registry.exclude(registry.leaf_names[leaf]):
    registry.pass_leaf(leaf, 'excluded by the user (exclude=)')
    return None
  shape = registry.leaf_shapes[leaf]
  roles, why = _roles_of(trail, shape, role_of_axis)
  layout = None
  if roles is not None:
    try:
      layout = _layout_from_roles(shape, roles, len(trail.stack),
                                  column_groups=column_groups)
    except LayoutError as e:
      why = str(e)
  if layout is None:
    _unmodellable(registry, leaf, why, op)
    return None
  return registry.add(Found(key, leaf, kind, layout,
                            tuple(s for _, s in trail.stack)))


def _kernel_key(registry: Registry, leaf: int, suffix: str = '') -> str:
  return registry.leaf_names[leaf] + suffix


def _unmodellable(registry, leaf, why, op):
  registry.pass_leaf(leaf, f'reaches `{op}` in a way MAC cannot model: {why}')


def _dot_general(ctx, level, eqn, values, trails):
  out = _bind(eqn, values)
  registry = ctx.registry
  (contract_l, contract_r), (batch_l, batch_r) = eqn.params[
      'dimension_numbers']
  is_param = [t is not None and t.source[0] == 'param' for t in trails]
  if all(is_param):
    for t in trails:
      _unmodellable(registry, t.source[1], 'multiplied by another parameter',
                    'dot_general')
    return [out], [None], {}
  if not any(is_param):
    _mix_attention(ctx, level, eqn, values, trails)
    return [out], [None], {}
  k = 1 if is_param[1] else 0
  trail, x = trails[k], values[1 - k]
  leaf = trail.source[1]
  key = _kernel_key(registry, leaf)
  contract_k = (contract_l, contract_r)[k]
  contract_x = (contract_l, contract_r)[1 - k]
  batch_k, batch_x = (batch_l, batch_r)[k], (batch_l, batch_r)[1 - k]
  role_of_axis = {a: 'output' for a in range(values[k].ndim)}
  role_of_axis.update({a: 'input' for a in contract_k})
  role_of_axis.update({a: 'batch' for a in batch_k})
  if _register(registry, trail, role_of_axis, key, DENSE,
               'dot_general') is None:
    return [out], [None], {}
  shape = registry.leaf_shapes[leaf]
  pairs = ([(xa, ka, 'input') for xa, ka in zip(contract_x, contract_k)]
           + [(xa, ka, 'batch') for xa, ka in zip(batch_x, batch_k)])
  rows, free, (groups, d_in) = _arranged_input(x, pairs, trail, shape)
  rows = jax.lax.stop_gradient(rows)
  flat = rows.reshape(rows.shape[:len(free)] + (groups * d_in,))
  mask = registry.token_mask
  if registry.mask_check is not None:
    registry.mask_check.note(flat.shape[:-1], token_mask_lib.row_weights(
        mask, flat.shape, range(flat.ndim - 1), jnp.float32) is not None)
  stat = mean_inputs.dense_mean(flat, (-1,), mask).reshape(groups, d_in)
  if _wants_moment(registry, level, key):
    _add_moment(registry, key, rows.reshape(-1, groups, d_in))
  call = _Call(key, level.id, stat, rows.reshape(
      rows.shape[:len(free)] + (groups, d_in)), free)
  level.calls.append(call)
  # The output's axes: batch dims, then the lhs's free, then the rhs's.
  out_axes = []
  for xa, ka in zip(batch_x, batch_k):
    out_axes.append(trail.axes[ka] + (('x', xa),))
  for side in (0, 1):
    contract = (contract_l, contract_r)[side]
    batch = (batch_l, batch_r)[side]
    for a in range(values[side].ndim):
      if a in contract or a in batch:
        continue
      out_axes.append(trail.axes[a] if side == k else (('x', a),))
  out = _probed(registry, key, out, out_axes)
  return [out], [_output_trail(level, key, out_axes)], {}


def _wants_moment(registry: Registry, level: _Level, key: str) -> bool:
  """Whether `key`'s second moment is wanted here (outside sub-programs)."""
  return key in registry.moments and level.id == registry.top_level


def _add_moment(registry: Registry, key: str, a) -> None:
  """Adds ``Σ a aᵀ`` (and ``Σ a``, the rows) of rows ``a`` ``[rows, G, d]``."""
  if registry.keep_rows:
    registry.moment_rows.setdefault(key, []).append(a)
  a = jax.lax.stop_gradient(a).astype(jnp.float32)
  sums = (jnp.einsum('rgi,rgj->gij', a, a, precision=_HIGHEST),
          jnp.sum(a, axis=0), jnp.asarray(a.shape[0], jnp.float32))
  known = registry.moment_sums.get(key)
  registry.moment_sums[key] = sums if known is None else tuple(
      s + k for s, k in zip(sums, known))


def _conv_patches(x, p, kernel_size, groups):
  """``[rows, G, (*taps, C/G)]`` im2col patches of a channels-last input."""
  n = len(kernel_size)
  x = x.reshape((-1,) + x.shape[x.ndim - n - 1:])
  patches = jax.lax.conv_general_dilated_patches(
      jnp.moveaxis(x, -1, 1), kernel_size, p['window_strides'],
      [tuple(q) for q in p['padding']],
      lhs_dilation=p['lhs_dilation'] or (1,) * n,
      rhs_dilation=p['rhs_dilation'] or (1,) * n)
  # [N, C·prod(k), *out], C major -> [N·prod(out), G, *k, C/G].
  patches = jnp.moveaxis(patches, 1, -1)
  channels = x.shape[-1]
  patches = patches.reshape(-1, groups, channels // groups, *kernel_size)
  return jnp.moveaxis(patches, 2, -1).reshape(patches.shape[0], groups, -1)


def _probed(registry: Registry, key: str, out, out_axes):
  """`out` through SMAC's probe, if the layer `key` has one.

  Raises:
    ValueError: the layer is stacked (inside ``scan``) or its output does
      not hold each output axis of its kernel as one axis.
  """
  if registry.probes is None or key not in registry.probes:
    return out
  layout = registry.found[key].layout
  kernel_axes = []
  for labels in out_axes:
    params = [lab for lab in labels if lab[0] == 'p']
    whole = len(params) == 1 and len(params[0]) == 2
    kernel_axes.append(params[0][1] if whole else None)
  try:
    if layout.stack:
      raise ValueError('it is stacked (inside scan)')
    spec = grad_sq_probe.spec(layout, kernel_axes)
  except ValueError as e:
    raise ValueError(f"smac: layer '{key}' cannot be probed: {e}. Build "
                     'the probes with mac_optax.smac.probes_like, which '
                     'leaves such layers out.') from None
  return grad_sq_probe.probe(out, registry.probes[key], spec)


def _output_trail(level: _Level, key: str, axes) -> Trail:
  """The trail of the output of the layer call just added to `level`."""
  return Trail(('out', len(level.calls) - 1, level.id, key), tuple(axes))


def _conv(ctx, level, eqn, values, trails):
  out = _bind(eqn, values)
  registry = ctx.registry
  lhs_t, rhs_t = trails
  if lhs_t is not None and lhs_t.source[0] == 'param':
    _unmodellable(registry, lhs_t.source[1], 'a parameter as the image',
                  'conv_general_dilated')
  if rhs_t is None or rhs_t.source[0] != 'param':
    return [out], [None], {}
  leaf = rhs_t.source[1]
  key = _kernel_key(registry, leaf)
  p = eqn.params
  dn = p['dimension_numbers']
  lhs_spec, rhs_spec = tuple(dn.lhs_spec), tuple(dn.rhs_spec)
  if p.get('batch_group_count', 1) != 1:
    _unmodellable(registry, leaf, 'batch_group_count > 1',
                  'conv_general_dilated')
    return [out], [None], {}
  groups = p['feature_group_count']
  role_of_axis = {rhs_spec[0]: 'output'}
  role_of_axis.update({a: 'input' for a in rhs_spec[1:]})
  if _register(registry, rhs_t, role_of_axis, key, CONV,
               'conv_general_dilated', groups) is None:
    return [out], [None], {}
  shape = registry.leaf_shapes[leaf]
  x = values[0]
  channels_last = jnp.transpose(x, (lhs_spec[0],) + lhs_spec[2:] +
                                (lhs_spec[1],))
  token_mask_lib.check_not_conv(registry.token_mask, channels_last.shape, key)
  kernel_size = tuple(values[1].shape[a] for a in rhs_spec[2:])
  n = len(kernel_size)
  patch = mean_inputs.conv_mean_patch(
      channels_last, kernel_size, strides=p['window_strides'],
      padding=[tuple(q) for q in p['padding']],
      input_dilation=p['lhs_dilation'] or (1,) * n,
      kernel_dilation=p['rhs_dilation'] or (1,) * n,
      feature_group_count=groups)           # [G, (*taps, C/G)]
  # The patch's axes are the operand's spatial axes, then its input
  # features; the statistic wants the kernel's input axes in order.
  operand_axes = rhs_spec[2:] + (rhs_spec[1],)
  sizes, names = [], []
  for a in operand_axes:
    for param_axis in axis_labels.param_axes(rhs_t.axes[a]):
      sizes.append(shape[param_axis])
      names.append(param_axis)
  patch = patch.reshape((groups,) + tuple(sizes))
  order = [0] + [1 + i for i in sorted(range(len(names)),
                                       key=lambda i: names[i])]
  stat = jnp.transpose(patch, order).reshape(groups, -1)
  if _wants_moment(registry, level, key):
    rows = _conv_patches(channels_last, p, kernel_size, groups)
    rows = rows.reshape((rows.shape[0], groups) + tuple(sizes))
    _add_moment(registry, key, jnp.transpose(
        rows, [0] + [a + 1 for a in order]).reshape(rows.shape[0], groups,
                                                    -1))
  level.calls.append(_Call(key, level.id, stat))
  # Only the feature axis is traced on (for the bias); the spatial axes are
  # not token axes of the input.
  out_spec = tuple(dn.out_spec)
  out_axes = [()] * out.ndim
  out_axes[out_spec[1]] = rhs_t.axes[rhs_spec[0]]
  out = _probed(registry, key, out, out_axes)
  return [out], [_output_trail(level, key, out_axes)], {}


def _gather(ctx, level, eqn, values, trails):
  out = _bind(eqn, values)
  registry = ctx.registry
  trail = trails[0]
  if trail is None or trail.source[0] != 'param':
    return [out], [None], {}
  leaf = trail.source[1]
  axis, column = _lookup_axis(eqn, values[0])
  if axis is None:
    _unmodellable(registry, leaf, 'a gather that is not a row lookup',
                  'gather')
    return [out], [None], {}
  table = values[0]
  key = _kernel_key(registry, leaf, '@lookup')
  if not registry.embed_lookup:
    registry.pass_leaf(leaf, 'embedding lookup (plan(..., embed_lookup=True)'
                       ' preconditions it with token frequencies)')
    return [out], [None], {}
  role_of_axis = {a: 'output' for a in range(table.ndim)}
  role_of_axis[axis] = 'input'
  if _register(registry, trail, role_of_axis, key, LOOKUP, 'gather') is None:
    return [out], [None], {}
  ids = values[1][..., column]
  mask = registry.token_mask
  if registry.mask_check is not None:
    registry.mask_check.note(ids.shape, token_mask_lib.leads(mask, ids.shape))
  stat = attention_lib.token_frequencies(ids, table.shape[axis], mask)
  level.calls.append(_Call(key, level.id, stat))
  return [out], [None], {}


def _lookup_axis(eqn, table) -> tuple[Optional[int], Optional[int]]:
  """``(table axis, index column)`` of a row lookup ``table[ids]``, or Nones.

  One axis is read one entry at a time, every other axis whole (their
  start index is then 0), as ``table[ids]``, ``jnp.take`` and their
  ``vmap``s produce.
  """
  dn = eqn.params['dimension_numbers']
  sizes = eqn.params['slice_sizes']
  partial = [a for a in range(table.ndim) if sizes[a] != table.shape[a]]
  if (len(partial) != 1 or sizes[partial[0]] != 1
      or tuple(getattr(dn, 'operand_batching_dims', ()))
      or partial[0] not in dn.start_index_map
      or not set(dn.collapsed_slice_dims) <= set(partial)):
    return None, None
  return partial[0], list(dn.start_index_map).index(partial[0])


def _bias(ctx, level, trails, values) -> Optional[Trail]:
  """A parameter added to a layer's output is its bias; the sum's trail."""
  registry = ctx.registry
  outs = [t for t in trails if t is not None and t.source[0] == 'out']
  params = _param_trails(trails)
  if len(outs) != 1 or len(params) != 1:
    return None
  out_t, bias_t = outs[0], params[0]
  key = out_t.source[3]
  found = registry.found.get(key)
  bias_leaf = bias_t.source[1]
  if found is None or found.kind not in (DENSE, CONV):
    return None
  bias_shape = registry.leaf_shapes[bias_leaf]
  if len(bias_t.stack) != len(found.layout.stack) or any(
      axis != pos for pos, (axis, _) in enumerate(bias_t.stack)):
    return None
  mapping = list(found.layout.stack)
  for b in range(len(bias_t.stack), len(bias_shape)):
    if bias_shape[b] == 1:
      continue
    where = [i for i, labs in enumerate(bias_t.axes) if ('p', b) in labs]
    if len(where) != 1 or len(bias_t.axes[where[0]]) != 1:
      return None
    kernel = axis_labels.param_axes(
        tuple(lab for lab in out_t.axes[where[0]] if lab[0] == 'p'))
    if not kernel:
      return None
    mapping.extend(kernel)
  for i, labs in enumerate(bias_t.axes):
    if any(lab[0] == 'p' for lab in labs):
      continue
    if any(lab[0] == 'p' for lab in out_t.axes[i]):
      return None   # a column the bias does not cover
  default = [a for a in range(len(found.layout.shape))
             if a not in found.layout.inputs]
  try:
    layout = dataclasses.replace(
        found.layout, bias_shape=tuple(bias_shape),
        bias_axes=None if mapping == default else tuple(mapping))
  except LayoutError:
    return None
  if found.bias_leaf not in (None, bias_leaf):
    return None
  found.layout, found.bias_leaf = layout, bias_leaf
  return out_t


# -------------------------------------------------------------- attention


def _mix_attention(ctx, level, eqn, values, trails):
  """``P · V`` over V's token axis: V's layer gets the mixed mean."""
  if ctx.registry.attention == attention_lib.PLAIN:
    return
  (contract_l, contract_r), (batch_l, batch_r) = eqn.params[
      'dimension_numbers']
  for v_side in (0, 1):
    v_trail = trails[v_side]
    if v_trail is None or v_trail.source[0] != 'out':
      continue
    contract_v = (contract_l, contract_r)[v_side]
    tokens = [v_trail.axes[a] for a in contract_v]
    if not contract_v or not all(
        len(labs) == 1 and labs[0][0] == 'x' and len(labs[0]) == 2
        for labs in tokens):
      continue
    p_side = 1 - v_side
    if trails[p_side] is not None:
      continue
    _mixed_statistic(ctx, level, eqn, values, v_side, v_trail)


def _is_head_group(lab, first_out: int) -> bool:
  """A label that makes P's axis the column groups of the first output axis."""
  return lab[0] == 'p' and lab[1] == first_out and (
      len(lab) == 2 or lab[3] == 0)


def _mixed_statistic(ctx, level, eqn, values, v_side, v_trail):
  """The attention-mixed mean ``mean_rows Σ_t w_t x_t`` of V's layer.

  The rows are the queries, and the query heads each column serves; per
  head group when the heads are the value kernel's first output axis,
  one part of a fused projection's groups when V is a slice of it.
  """
  registry = ctx.registry
  _, call_index, level_id, key = v_trail.source
  found = registry.found.get(key)
  if found is None:
    return
  def plain(why):
    found.note = f'plain mean: {why}'
  if level_id != level.id:
    return plain('attention computed inside another transformation than '
                 'its value projection')
  call = level.calls[call_index]
  layout = found.layout
  if layout.batch:
    return plain('a value projection with batched kernel axes')
  first_out = layout.outputs[0]
  parts, part_index = 1, None
  if v_trail.part is not None:
    axis, start, stop = v_trail.part
    width = stop - start
    if (axis != first_out or layout.shape[axis] % width or start % width):
      return plain('a fused projection split on an axis that is not its '
                   'first output axis')
    parts, part_index = layout.shape[axis] // width, start // width
  (contract_l, contract_r), (batch_l, batch_r) = eqn.params[
      'dimension_numbers']
  contract_v = (contract_l, contract_r)[v_side]
  contract_p = (contract_l, contract_r)[1 - v_side]
  batch_v = (batch_l, batch_r)[v_side]
  batch_p = (batch_l, batch_r)[1 - v_side]
  probs = jax.lax.stop_gradient(values[1 - v_side])
  dtype = mean_inputs.stat_dtype(probs.dtype)
  # Each axis of P becomes: an input axis of x (batch or token), the head
  # groups 'G' (with repeats around them), or rows to average over.
  letters = iter('abcdefhijklmnopqrstuvwyz')
  p_letters, shape, x_letter, tokens, queries = [], [], {}, set(), []
  groups = None
  for pa in range(probs.ndim):
    n = probs.shape[pa]
    if pa in contract_p:
      labs = v_trail.axes[contract_v[contract_p.index(pa)]]
      tokens.add(labs[0][1])
      p_letters.append(x_letter.setdefault(labs[0][1], next(letters)))
      shape.append(n)
      continue
    labs = v_trail.axes[batch_v[batch_p.index(pa)]] if pa in batch_p else ()
    xs = [lab for lab in labs if lab[0] == 'x']
    if xs:
      if len(labs) != 1 or len(xs[0]) != 2:
        return plain('an attention batch axis merges the input\'s axes')
      p_letters.append(x_letter.setdefault(xs[0][1], next(letters)))
      shape.append(n)
      continue
    heads = [i for i, lab in enumerate(labs)
             if part_index is None and _is_head_group(lab, first_out)]
    if (len(heads) == 1 and groups is None
        and all(lab[0] == 'r' for i, lab in enumerate(labs) if i != heads[0])):
      lab = labs[heads[0]]
      groups = layout.shape[first_out] if len(lab) == 2 else lab[2][0]
      sub = ''.join('G' if i == heads[0] else next(letters)
                    for i in range(len(labs)))
      p_letters.append(sub)
      shape.extend(groups if i == heads[0] else labs[i][1]
                   for i in range(len(labs)))
      continue
    p_letters.append(next(letters))   # queries, heads shared by all columns
    shape.append(n)
    if pa not in batch_p and n > 1:   # (a size-1 axis: a broadcast group)
      queries.append((p_letters[-1], n))
  group = 'G' if groups else ''
  w_spec = group + ''.join(x_letter.values())
  probs = probs.astype(dtype).reshape(shape)
  averaged = probs.size / max(probs.size // math.prod(
      n for n, c in zip(shape, ''.join(p_letters)) if c not in w_spec), 1)
  rows = call.rows.astype(dtype)[..., 0, :]          # [*free, d_in]
  row_letters, batch, batch_letters, batch_shape = '', 1, '', ()
  for xa, n in zip(call.free, rows.shape[:-1]):
    row_letters += x_letter.get(xa) or next(letters)
    if xa not in tokens:
      batch *= n
      batch_letters += row_letters[-1]
      batch_shape += (n,)
  mask = registry.token_mask
  if (mask is not None and len(queries) == 1
      and batch_shape + (queries[0][1],) == tuple(mask.shape)):
    # Real queries only: Σ_{b,q} m_bq Σ_t P_bqt x_bt / Σ m (and heads).
    registry.mask_check.note(batch_shape + (queries[0][1],), True)
    m = jax.lax.stop_gradient(mask != 0).astype(dtype)
    w = jnp.einsum(f"{''.join(p_letters)},{batch_letters}{queries[0][0]}"
                   f'->{w_spec}', probs, m, precision=_HIGHEST)
    w = w / (averaged / queries[0][1])
    batch = jnp.maximum(jnp.sum(m), 1.0)
  else:
    w = jnp.einsum(f"{''.join(p_letters)}->{w_spec}", probs,
                   precision=_HIGHEST) / averaged   # the mean over rows
  if registry.attention == attention_lib.PRODUCT_OF_MEANS:
    mixed = _product_of_means(w, w_spec, group, rows, row_letters,
                              [x_letter[t] for t in x_letter if t in tokens],
                              batch)
  else:
    mixed = jnp.einsum(f'{w_spec},{row_letters}z->{group}z', w, rows,
                       precision=_HIGHEST) / batch
  if not groups:
    mixed = mixed[None]
  new_groups = groups or parts
  if layout.column_groups not in (1, new_groups):
    return plain('its output is mixed with different groupings')
  try:
    found.layout = dataclasses.replace(layout, column_groups=new_groups)
  except LayoutError:
    return plain('the heads do not split the value kernel')
  found.kind, found.note = ATTENTION_VALUE, ''
  if part_index is None:
    call.contribution = mixed
  else:
    base = _as_groups(call.contribution, found.layout)
    call.contribution = base.at[part_index].set(mixed[0])


def _product_of_means(w, w_spec, group, rows, row_letters, tokens, batch):
  """The authors' ``Σ_t w̄_t x̄_t``: weights and inputs averaged separately."""
  tok = ''.join(tokens)
  w_batch = math.prod(n for c, n in zip(w_spec, w.shape)
                      if c not in group + tok)
  w_bar = jnp.einsum(f'{w_spec}->{group}{tok}', w,
                     precision=_HIGHEST) / w_batch
  x_tok = ''.join(c for c in row_letters if c in tok)
  x_bar = jnp.einsum(f'{row_letters}z->{x_tok}z', rows,
                     precision=_HIGHEST) / batch
  return jnp.einsum(f'{group}{tok},{x_tok}z->{group}z', w_bar, x_bar,
                    precision=_HIGHEST)


def _passed_through(eqn, trails) -> list:
  """The trails of a custom-derivative call's outputs that are its inputs.

  The function's value is its primal jaxpr: an output that is an input
  unchanged (an identity with its own backward rule, e.g. a probe on a
  layer's output) keeps that input's trail; the call is bound unchanged.
  """
  closed = eqn.params.get('call_jaxpr') or eqn.params.get('fun_jaxpr')
  jaxpr = getattr(closed, 'jaxpr', closed)
  if jaxpr is None or len(jaxpr.invars) != len(trails):
    return [None] * len(eqn.outvars)
  where = {id(v): i for i, v in enumerate(jaxpr.invars)}
  return [trails[where[id(v)]] if id(v) in where else None
          for v in jaxpr.outvars]


# ------------------------------------------------------- sub-programs


def _inline(ctx, level, eqn, values, trails):
  """Nested ``jit``: evaluated in place (XLA inlines it anyway)."""
  jaxpr, consts = _closed(eqn.params['jaxpr'])
  outs, out_trails, totals = _evaluate(ctx, level, jaxpr, consts, values,
                                       trails)
  return outs, out_trails, totals


def _finish(level: _Level, nested: dict, registry: Registry) -> dict:
  return _add_totals(level.totals(registry), nested, registry)


def _remat(ctx, level, eqn, values, trails):
  jaxpr, consts = _closed(eqn.params['jaxpr'])
  box = {}

  def body(*args):
    inner = _Level()
    outs, out_trails, nested = _evaluate(ctx, inner, jaxpr, consts, args,
                                         trails)
    box['trails'] = out_trails
    return outs, _finish(inner, nested, ctx.registry)

  wrapped = jax.checkpoint(body, prevent_cse=eqn.params.get('prevent_cse',
                                                            True),
                           policy=eqn.params.get('policy'))
  outs, totals = wrapped(*values)
  return list(outs), [_only_params(t) for t in box['trails']], totals


def _only_params(trail):
  # A layer output's trail does not cross a sub-program boundary (its
  # statistic's call lives in the inner level).
  return trail if trail is not None and trail.source[0] == 'param' else None


def _scan(ctx, level, eqn, values, trails):
  p = eqn.params
  jaxpr, consts = _closed(p['jaxpr'])
  n_consts, n_carry = _scan_counts(p, len(values))
  scan_id = next(ctx.scan_ids)
  body_trails = list(trails[:n_consts]) + [None] * n_carry
  for t in trails[n_consts + n_carry:]:
    body_trails.append(_sliced(t, scan_id))
  const_vals = values[:n_consts]
  box = {}

  def body(carry, xs):
    inner = _Level()
    outs, out_trails, nested = _evaluate(
        ctx, inner, jaxpr, consts, list(const_vals) + list(carry) + list(xs),
        body_trails)
    box['trails'] = out_trails
    return list(outs[:n_carry]), (list(outs[n_carry:]),
                                  _finish(inner, nested, ctx.registry))

  carry, (ys, stacked) = jax.lax.scan(
      body, list(values[n_consts:n_consts + n_carry]),
      list(values[n_consts + n_carry:]), length=p['length'],
      reverse=p['reverse'], unroll=p.get('unroll', 1))
  totals = {}
  for key, (total, count) in stacked.items():
    found = ctx.registry.found.get(key)
    if found is not None and scan_id in found.stack_scans:
      totals[key] = (total, count)           # one layer per iteration
    else:
      totals[key] = (jnp.sum(total, 0), jnp.sum(count, 0))
  return list(carry) + list(ys), [None] * (len(carry) + len(ys)), totals


def _scan_counts(params, n_operands: int) -> tuple[int, int]:
  """``(consts, carries)`` among a scan's operands, in any jax version."""
  if 'num_consts' in params:
    return params['num_consts'], params['num_carry']
  # jax >= 0.12: `ft_in` is a flat tree of the operand groups (consts,
  # carry, xs); laying the operands' indices out on it gives the groups.
  groups = params['ft_in'].update(list(range(n_operands))).unpack()
  consts, carry = (list(g) for g in list(groups)[:2])
  return len(consts), len(carry)


def _sliced(trail, scan_id):
  """The trail of one iteration's slice of a scanned-over parameter."""
  if trail is None or trail.source[0] != 'param':
    return None
  lead = axis_labels.param_axes(trail.axes[0])
  if lead is None or len(lead) != 1:
    return None
  return Trail(trail.source, trail.axes[1:],
               trail.stack + ((lead[0], scan_id),))


def _cond(ctx, level, eqn, values, trails):
  branches = eqn.params['branches']
  index, operands = values[0], values[1:]
  op_trails = trails[1:]

  def branch_fn(closed):
    jaxpr, consts = _closed(closed)

    def fn(*ops):
      inner = _Level()
      outs, _, nested = _evaluate(ctx, inner, jaxpr, consts, ops, op_trails)
      return outs, _finish(inner, nested, ctx.registry)
    return fn

  fns = [branch_fn(b) for b in branches]
  keys = [set(jax.eval_shape(f, *operands)[1]) for f in fns]
  common = set.intersection(*keys) if keys else set()
  for key in set.union(*keys) - common:
    ctx.registry.drop(key, 'called in only some branches of a lax.cond')

  def restricted(fn):
    def g(*ops):
      outs, totals = fn(*ops)
      return outs, {k: v for k, v in totals.items() if k in common}
    return g

  outs, totals = jax.lax.switch(index, [restricted(f) for f in fns],
                                *operands)
  return list(outs), [None] * len(outs), totals


_HANDLERS = {
    'dot_general': _dot_general,
    'conv_general_dilated': _conv,
    'gather': _gather,
    'pjit': _inline,
    'jit': _inline,
    'closed_call': _inline,
    'core_call': _inline,
    'remat': _remat,
    'remat2': _remat,
    'checkpoint': _remat,
    'scan': _scan,
    'cond': _cond,
}
_HIGHER_ORDER = frozenset(_HANDLERS) - {'dot_general', 'conv_general_dilated',
                                         'gather'}
_CUSTOM_DERIVATIVE = frozenset({'custom_jvp_call', 'custom_vjp_call',
                                'custom_vjp_call_jaxpr'})
_OPAQUE = frozenset({'while', 'custom_jvp_call', 'custom_vjp_call',
                     'custom_vjp_call_jaxpr', 'shard_map', 'xla_pmap',
                     'pure_callback', 'custom_partitioning', 'pallas_call'})


# ------------------------------------------------------------------ entry


def run(fn: Callable, registry: Registry, params, args, kwargs):
  """Evaluates ``fn(params, *args, **kwargs)``; returns ``(out, stats)``.

  ``stats`` maps each layer key to its ``[*stack, G, d_in]`` mean input.
  """
  # Python scalars (a `train` flag given by position) stay Python values;
  # the parameters are arrays (`Registry.of` checks), so they lead `flat`.
  flat, rebuild = capture_core.static_scalars((params, args, kwargs))
  n_params = len(jax.tree_util.tree_leaves(params))
  out_tree = {}

  def flat_fn(*leaves):
    p, a, k = rebuild(list(leaves))
    out = fn(p, *a, **k)
    leaves_out, out_tree['tree'] = jax.tree_util.tree_flatten(out)
    return leaves_out

  closed = jax.make_jaxpr(flat_fn)(*flat)
  trails = []
  for i, x in enumerate(flat):
    if i < n_params:
      trails.append(Trail(('param', i), tuple((('p', a),)
                                              for a in range(jnp.ndim(x)))))
    else:
      trails.append(None)
  level = _Level()
  registry.top_level = level.id
  outs, _, nested = _evaluate(_Context(registry), level, closed.jaxpr,
                              list(closed.consts), flat, trails)
  totals = _finish(level, nested, registry)
  stats = {}
  for found in registry.layers():
    if found.key not in totals:
      continue
    total, count = totals[found.key]
    total = _as_groups(total, found.layout)
    count = jnp.reshape(count, count.shape + (1, 1))
    stats[found.key] = total / jnp.maximum(count, 1.0)
  return jax.tree_util.tree_unflatten(out_tree['tree'], outs), stats
