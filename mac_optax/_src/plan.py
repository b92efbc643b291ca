"""The layer plan: every layer MAC preconditions, as MAC sees it.

A :class:`LayerPlan` is built once, from the model's parameters and the
statistics a captured forward pass sows (``mac_optax.linen.plan``,
``mac_optax.nnx.plan``, or :func:`from_statistics` for shapes alone). It is
what ``mac(plan=...)``'s ``init`` builds the complete state from, what
``update`` checks the captured statistics against, what diagnostics read, and
what the user prints to see the coverage::

    print(plan)     # each preconditioned layer, each parameter passed through

The pairing of statistics with parameters (:func:`pair`) is strict: a
planned layer without its statistic, a statistic the plan does not know, a
statistic of the wrong shape, or no statistic at all raise at trace time with
the layer's path and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from mac_optax._src import statistics
from mac_optax._src.layout import KernelLayout
from mac_optax._src.layout import LayoutError

# Kinds shown in the coverage table.
DENSE = 'dense'
CONV = 'conv'
EMBED_ATTEND = 'embed_attend'
EMBED_LOOKUP = 'embed_lookup'
ATTENTION_VALUE = 'attention_value'
ATTENTION_FUSED = 'attention_fused'
EINSUM = 'einsum'
CUSTOM = 'custom'
STATISTIC = 'statistic'   # known from a statistic's shape only

# Statistics whose kernel layout only the capture knows (recorded in the
# survey, given to `from_statistics` as `layouts`).
_RECORDED_LAYOUT = (statistics.EINSUM_MEAN, statistics.PROGRAM,
                    statistics.PROGRAM_LOOKUP)
_KERNEL_OF_KIND = {EMBED_ATTEND: 'embedding', EMBED_LOOKUP: 'embedding'}
_KIND_OF_STAT = {statistics.ATTEND_MEAN: EMBED_ATTEND,
                 statistics.LOOKUP_MEAN: EMBED_LOOKUP,
                 statistics.ATTENTION_MEAN: ATTENTION_FUSED}

NO_STATISTICS = """\
mac: update() received no MAC statistic at all, so no layer could be \
preconditioned (MAC would silently be plain SGD). The usual causes:
  1. the forward pass ran outside `mac_optax.linen.capture()` (NNX: call \
`mac_optax.nnx.capture(model)(x)`): run the forward pass through the capture;
  2. linen `model.apply(..., mutable=[...])` without 'intermediates': pass \
mutable=['intermediates'] and give v['intermediates'] to update;
  3. the forward function was jitted and traced before the capture was \
entered (jit reuses a trace that sowed nothing): enter the capture inside \
the jitted function;
  4. the statistics of another model, or of no layer: build the plan from \
the same model and pass plan= to mac."""


@dataclasses.dataclass(frozen=True)
class PlannedLayer:
  """One preconditioned layer."""
  path: str              # module path, 'Block_0/Dense_1'
  statistic: str         # the sown name (mac_optax.MEAN, ...)
  kind: str              # 'dense', 'conv', 'attention_value', ...
  layout: KernelLayout   # the kernel's axis roles and the statistic's shape
  # Layers found in a program (mac_optax.plan) name their leaves: the kernel
  # and bias parameter paths ('Block_0/w'); None: `path`/<param>, `path`/bias.
  kernel: Optional[str] = None
  bias: Optional[str] = None
  note: str = ''         # shown in the coverage table

  @property
  def key(self) -> str:
    """The layer's key in the optimizer state (a lookup gets '@lookup')."""
    if self.statistic in statistics.LOOKUPS:
      return self.path + '@lookup'
    return self.path

  @property
  def param(self) -> str:
    return statistics.PARAM[self.statistic]

  @property
  def kernel_leaf(self) -> statistics.Path:
    """The kernel's parameter path."""
    if self.kernel is not None:
      return statistics.split(self.kernel)
    return statistics.split(self.path) + (self.param,)

  @property
  def bias_leaf(self) -> Optional[statistics.Path]:
    """The bias's parameter path, or None without a bias."""
    if not self.has_bias:
      return None
    if self.kernel is not None:
      return statistics.split(self.bias)
    return statistics.split(self.path) + ('bias',)

  @property
  def has_bias(self) -> bool:
    return self.layout.bias_shape is not None


@dataclasses.dataclass(frozen=True)
class PassedParam:
  """A parameter MAC passes through unchanged, and why."""
  path: str
  shape: tuple[int, ...]
  reason: str


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """The layers MAC preconditions and the parameters it passes through.

  Attributes:
    layers: the preconditioned layers, sorted by path.
    passed: every other parameter, with the reason.
    intermediates_like: shapes of the captured intermediates (for
      :func:`mac_optax.multi_steps`), or None.
  """
  layers: tuple[PlannedLayer, ...]
  passed: tuple[PassedParam, ...] = ()
  intermediates_like: Any = dataclasses.field(default=None, compare=False,
                                              repr=False)
  # mac_optax.plan's options (exclude, embed_lookup), for with_statistics.
  program_options: Any = dataclasses.field(default=None, compare=False,
                                           repr=False)

  def __post_init__(self):
    keys = [layer.key for layer in self.layers]
    if len(set(keys)) != len(keys):
      raise ValueError(f'mac: a plan lists a layer twice: {sorted(keys)}.')

  def __getitem__(self, key: str) -> PlannedLayer:
    for layer in self.layers:
      if layer.key == key:
        return layer
    raise KeyError(f'mac: no layer {key!r} in the plan; planned: '
                   f'{[layer.key for layer in self.layers]}.')

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(layer.key for layer in self.layers)

  @property
  def preconditioned_params(self) -> int:
    counted, total = set(), 0
    for layer in self.layers:   # a tied table counts once
      if layer.kernel_leaf not in counted:
        counted.add(layer.kernel_leaf)
        total += layer.layout.param_count
    return total

  @property
  def total_params(self) -> int:
    return self.preconditioned_params + sum(
        math.prod(p.shape) for p in self.passed)

  @property
  def fraction(self) -> float:
    """The share of parameters MAC preconditions."""
    return self.preconditioned_params / max(self.total_params, 1)

  def summary(self) -> str:
    """The coverage table: each layer, each parameter passed through."""
    rows = [('layer', 'kind', 'roles', 'd_in', 'groups', 'params')]
    for layer in self.layers:
      layout = layer.layout
      kind = f'{layer.kind} ({layer.note})' if layer.note else layer.kind
      rows.append((layer.key or '(root)', kind, layout.roles(),
                   f'{layout.d_in:,}',
                   f'{layout.groups:,}', f'{layout.param_count:,}'))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f'MAC layer plan: {len(self.layers)} '
        f"layer{'' if len(self.layers) == 1 else 's'} preconditioned, "
        f'{self.fraction:.1%} of {self.total_params:,} parameters']
    for row in rows:
      lines.append('  ' + '  '.join(
          c.ljust(w) if i < 3 else c.rjust(w)
          for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    if self.passed:
      lines.append(f'passed through unchanged ({1 - self.fraction:.1%}):')
      width = max(len(f'{p.path} {p.shape}') for p in self.passed)
      for p in self.passed:
        lines.append(f'  {f"{p.path} {p.shape}".ljust(width)}  {p.reason}')
    return '\n'.join(lines)

  def __str__(self) -> str:
    return self.summary()


# ------------------------------------------------------------------ building


def _shape(leaf) -> tuple[int, ...]:
  return tuple(np.shape(leaf))


def _layer_layout(path: str, name: str, calls: Sequence[Any],
                  kernel_shape, bias_shape,
                  layouts: Mapping[str, Any]) -> KernelLayout:
  shapes = sorted({_shape(c) for c in calls})
  if len(shapes) != 1:
    raise ValueError(f"mac: layer '{path}' was called with inputs of "
                     f'different feature shapes: statistics {shapes}.')
  if name in _RECORDED_LAYOUT:
    # Which kernel axes are batched or contracted is in the equation, not in
    # the statistic's shape: only the capture that saw the call knows it.
    roles = layouts.get(path)
    if roles is None:
      raise ValueError(
          f"mac: layer '{path}' has a kernel that is not laid out "
          '(*inputs, *outputs) (an einsum with batched or reordered axes, '
          'a kernel stored (out, in) or named other than `kernel`): its '
          'layout cannot be inferred from the statistic. Pass '
          'plan=mac_optax.linen.plan(...) / mac_optax.nnx.plan(...) to mac '
          '(intermediates_like= and the quick start cannot express it).')
    try:
      layout = roles
      layout.check_fits(kernel_shape, bias_shape)
    except (ValueError, LayoutError) as e:
      raise ValueError(f"mac: layer '{path}': {e}") from None
    if shapes[0] != layout.stat_shape:
      raise ValueError(
          f"mac: layer '{path}': statistic of shape {shapes[0]} does not "
          f'match its einsum layout {layout.stat_shape} (roles '
          f'{layout.roles()}).')
    return layout
  try:
    return KernelLayout.from_statistic(
        shapes[0], kernel_shape, bias_shape,
        transposed=name == statistics.ATTEND_MEAN)
  except LayoutError as e:
    raise ValueError(f"mac: layer '{path}': {e}") from None


def _pass_reason(path: statistics.Path, module_types: Mapping[str, str],
                 called: Iterable[str], found: Optional[str]) -> str:
  module = statistics.join(path[:-1])
  kind = module_types.get(module)
  leaf = path[-1]
  if kind is not None and 'Norm' in kind:
    return f'normalization parameter ({kind})'
  if leaf == 'embedding' and kind is not None and 'Embed' in kind:
    return ('embedding lookup (capture(embed_lookup=True) preconditions it '
            'with token frequencies)')
  if found is not None:
    return found
  if leaf in ('kernel', 'embedding', 'bias'):
    if kind is None:
      return f'{leaf} without a statistic (layer not called in the forward pass?)'
    if module in called:
      return f'{leaf} of {kind} without a MAC statistic'
    return f'unsupported layer type {kind}'
  return f'{leaf}: not a layer kernel' + (f' ({kind})' if kind else '')


def _bias_of(path: statistics.Path, name: str,
             recorded: Optional[str]) -> Optional[statistics.Path]:
  """The bias a statistic's layer takes if the parameter exists, or None.

  ``path/bias`` for the names with a bias row; for a ``PROGRAM`` statistic
  the bias the capture recorded (`recorded`).
  """
  if name == statistics.PROGRAM:
    return statistics.split(recorded) if recorded else None
  return path + ('bias',) if name in statistics.WITH_BIAS else None


def from_statistics(
    params: Any,
    intermediates: Any,
    *,
    kinds: Optional[Mapping[str, str]] = None,
    module_types: Optional[Mapping[str, str]] = None,
    called: Iterable[str] = (),
    skip_missing_params: bool = False,
    layouts: Optional[Mapping[str, Any]] = None,
    biases: Optional[Mapping[str, Optional[str]]] = None,
    reasons: Optional[Mapping[str, str]] = None,
) -> LayerPlan:
  """Builds the plan from parameters and the statistics a capture sowed.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    intermediates: the captured statistics (arrays or shapes).
    kinds: ``{module path: kind}`` from the capture (default: each layer's
      kind from its statistic alone).
    module_types: ``{module path: class name}`` of the model's modules, to
      say why a parameter is passed through.
    called: module paths of supported layers the forward pass called.
    skip_missing_params: skip statistics whose parameter is absent (masked
      out) instead of raising.
    layouts: ``{path: KernelLayout}`` recorded by the capture for layers
      whose kernel layout is not the prefix rule (``EINSUM_MEAN``,
      ``PROGRAM``, ``PROGRAM_LOOKUP``).
    biases: ``{path: bias parameter path or None}`` of the ``PROGRAM``
      statistics (sown at their kernel's path).
    reasons: ``{parameter path: why it is passed through}``, where the
      capture knows better than the module type.

  Raises:
    ValueError: a statistic has no parameter, does not fit it, a layer's
      kernel is masked out and its bias not (or the reverse), or a layer
      the capture supports was called but no statistic came back.
  """
  kinds = dict(kinds or {})
  layouts = dict(layouts or {})
  biases = dict(biases or {})
  reasons = dict(reasons or {})
  module_types = dict(module_types or {})
  leaves = jax.tree_util.tree_leaves(params)
  index = statistics.leaf_paths(params)
  masked = statistics.masked_paths(params)
  found = statistics.sown_statistics(intermediates)
  fused = {path for path, name in found if name == statistics.ATTENTION_MEAN}
  layers, used = [], set()
  for (path, name), calls in sorted(found.items()):
    if name in statistics.REPLACED_BY_ATTENTION and path in fused:
      continue   # sow_attention's statistic replaces the capture's
    key = statistics.join(path)
    kernel_path = statistics.kernel_of(path, name)
    bias_path = _bias_of(path, name, biases.get(key))
    if bias_path is not None:
      check_masked_together(key, kernel_path, bias_path, index, masked)
    if kernel_path not in index:
      if skip_missing_params:
        continue
      raise ValueError(
          f"mac: a statistic '{name}' was sown at '{key}' but there is no "
          f"parameter '{statistics.join(kernel_path)}': statistics must be "
          'sown by the module that owns the parameter.')
    has_bias = bias_path is not None and bias_path in index
    layout = _layer_layout(
        key, name, calls, _shape(leaves[index[kernel_path]]),
        _shape(leaves[index[bias_path]]) if has_bias else None, layouts)
    kind = _KIND_OF_STAT.get(name) or kinds.get(key, STATISTIC)
    if name in (statistics.PROGRAM, statistics.PROGRAM_LOOKUP):
      layers.append(PlannedLayer(
          key, name, kind, layout, kernel=key,
          bias=statistics.join(bias_path) if has_bias else None))
    else:
      layers.append(PlannedLayer(key, name, kind, layout))
    used.add(kernel_path)
    if has_bias:
      used.add(bias_path)
  planned = {layer.path for layer in layers}
  # A layer whose kernel is no parameter of this model belongs to a model
  # applied inside it (`nn.Dense(...).apply({'params': {'kernel': t.T}}, h)`):
  # its statistic could never come back here.
  lost = sorted(p for p in set(called) - planned
                if statistics.split(p) + (_KERNEL_OF_KIND.get(
                    kinds.get(p), 'kernel'),) in index)
  if lost:
    raise ValueError(
        f'mac: the layers {lost} were called under the capture but their '
        'statistics did not come back. Inside nn.scan / nn.vmap (or '
        "nnx.scan / nnx.vmap) add 'intermediates' (nnx.Intermediate) to the "
        'variable axes so the statistics of the transformed layers come out.')
  passed = [PassedParam(statistics.join(p), _shape(leaves[i]),
                        _pass_reason(p, module_types, called,
                                     reasons.get(statistics.join(p))))
            for p, i in sorted(index.items()) if p not in used]
  return LayerPlan(tuple(layers), tuple(passed), intermediates)


# ------------------------------------------------------------------- pairing


@dataclasses.dataclass(frozen=True)
class Pairing:
  """A planned layer's place in the gradients and this step's statistic."""
  layer: PlannedLayer
  kernel_index: int
  bias_index: Optional[int]
  calls: Optional[tuple]   # None: an optional layer not called this step


def _check_real(layer: PlannedLayer, leaves, *indices) -> None:
  for i in indices:
    if i is None:
      continue
    dtype = leaves[i].dtype
    if dtype == jax.dtypes.float0:
      raise ValueError(
          f"mac: layer '{layer.path}': its gradient is float0, the gradient "
          'of an integer parameter (jax.grad(..., allow_int=True)). MAC '
          'preconditions real floating gradients: make the parameter '
          'floating, or exclude the layer with optax.masked / '
          'optax.partition.')
    if np.issubdtype(dtype, np.complexfloating):
      raise ValueError(
          f"mac: layer '{layer.path}': its gradient is complex "
          f'({dtype}). MAC is defined for real weights; exclude '
          'the layer with optax.masked / optax.partition.')


def check_masked_together(key: str, kernel: statistics.Path,
                          bias: statistics.Path, index, masked) -> None:
  """Raises if ``optax.masked``/``optax.partition`` split a kernel and bias."""
  for part, other in ((kernel, bias), (bias, kernel)):
    if part in masked and other in index:
      raise ValueError(
          f"mac: layer '{key}': its {part[-1]} is masked out (optax.masked / "
          f'optax.partition) but its {other[-1]} is not. MAC preconditions a '
          "layer's kernel and bias together (the bias is the kernel's extra "
          'input row): give both the same mask or partition label.')


def check_not_nested(wanted: Iterable[statistics.Path],
                     index: Mapping[statistics.Path, int]) -> None:
  """Raises if the parameters MAC looks for are all under a prefix in `grads`.

  The gradients of the whole variables dict (``{'params': ...}``) would
  otherwise look like every layer masked out, and pass through raw.
  Masked-out parameters are absent from `index`, so they never match.
  """
  wanted = [w for w in wanted if w]
  if not wanted or any(w in index for w in wanted):
    return
  for w in wanted:
    for p in index:
      if len(p) > len(w) and p[len(p) - len(w):] == w:
        prefix = statistics.join(p[:len(p) - len(w)])
        raise ValueError(
            f"mac: the layers' parameters are in the gradients under "
            f"'{prefix}' ('{statistics.join(p)}' for "
            f"'{statistics.join(w)}'): pass the gradients of the parameters "
            "alone, e.g. of variables['params'] rather than of the whole "
            'variables dict, and init with the same tree.')


def _check_known(plan: LayerPlan, found, index) -> None:
  """Raises on a sown statistic the plan does not know."""
  planned = {(layer.path, layer.statistic) for layer in plan.layers}
  fused = {p for p, n in planned if n == statistics.ATTENTION_MEAN}
  # A statistic whose parameter is masked out of `grads` is not this
  # transform's business.
  unknown = sorted(
      statistics.join(p) + f' ({n})' for p, n in found
      if (statistics.join(p), n) not in planned
      and not (n in statistics.REPLACED_BY_ATTENTION
               and statistics.join(p) in fused)
      and statistics.kernel_of(p, n) in index)
  if unknown:
    raise ValueError(
        f'mac: statistics of layers the plan does not know: {unknown}. '
        'Build the plan from the same model, inputs and capture options '
        '(attention=, embed_lookup=, exclude=) as the training step.')


def _program_statistics(plan: LayerPlan, stats: Any) -> dict:
  """The statistics of `mac_optax.with_statistics`, keyed like sown ones."""
  if not isinstance(stats, Mapping) or not all(
      isinstance(k, str) for k in stats):
    raise ValueError(
        'mac: this plan was built by mac_optax.plan(fn, params, ...); its '
        'statistics are the dict `stats` returned by '
        '`mac_optax.with_statistics(fn, plan)(params, ...)`, keyed by layer, '
        f'got {type(stats).__name__}.')
  unknown = sorted(set(stats) - set(plan.keys))
  if unknown:
    raise ValueError(
        f'mac: statistics of layers the plan does not know: {unknown}. '
        'Build the plan from the same function and inputs as the step.')
  return {(statistics.split(key), statistics.PROGRAM): [value]
          for key, value in stats.items()}


def pair(plan: LayerPlan, grads: Any, intermediates: Any,
         optional_layers: Sequence[str] = ()) -> list[Pairing]:
  """Pairs each planned layer present in `grads` with its statistic, strictly.

  Layers whose kernel is absent from `grads` (masked out by
  ``optax.masked``/``optax.partition``) are skipped.

  Raises:
    ValueError: no statistic at all (the four usual causes), a planned layer
      without its statistic (unless in `optional_layers`), a statistic the
      plan does not know, a statistic of the wrong shape or given as a
      shape, a complex or float0 gradient, a kernel masked apart from its
      bias, or the planned parameters all under a prefix (the gradients of
      the whole variables dict).
  """
  leaves = jax.tree_util.tree_leaves(grads)
  index = statistics.leaf_paths(grads)
  if plan.program_options is not None or (
      statistics.is_program_statistics(intermediates)
      and any(layer.kernel is not None for layer in plan.layers)):
    found = _program_statistics(plan, intermediates)
  else:
    found = statistics.sown_statistics(intermediates)
    _check_known(plan, found, index)
  masked = statistics.masked_paths(grads)
  pairings, missing = [], []
  for layer in plan.layers:
    path = statistics.split(layer.path)
    kernel_index = index.get(layer.kernel_leaf)
    bias_index = index.get(layer.bias_leaf) if layer.has_bias else None
    if layer.has_bias:
      check_masked_together(layer.key, layer.kernel_leaf, layer.bias_leaf,
                            index, masked)
    if kernel_index is None:
      continue
    if layer.has_bias and bias_index is None:
      raise ValueError(
          f"mac: layer '{layer.key}': the gradients have no "
          f"'{statistics.join(layer.bias_leaf)}' but the plan's layer has a "
          f'bias of shape {layer.layout.bias_shape}: build the plan from the '
          'same model as the gradients.')
    _check_real(layer, leaves, kernel_index, bias_index)
    try:
      layer.layout.check_fits(
          leaves[kernel_index].shape,
          None if bias_index is None else leaves[bias_index].shape)
    except LayoutError as e:
      raise ValueError(f"mac: layer '{layer.key}': {e}") from None
    calls = found.get((path, layer.statistic))
    if calls is None:
      if layer.key not in optional_layers:
        missing.append(layer.key)
      pairings.append(Pairing(layer, kernel_index, bias_index, None))
      continue
    for call in calls:
      if isinstance(call, jax.ShapeDtypeStruct):
        raise ValueError(
            f"mac: layer '{layer.key}': its statistic is a "
            'jax.ShapeDtypeStruct, a shape, not an array: '
            '`plan.intermediates_like` / `intermediates_like=` describe the '
            'statistics for init; give update the statistics captured in '
            "this step's forward pass.")
      if _shape(call) != layer.layout.stat_shape:
        raise ValueError(
            f"mac: layer '{layer.key}': statistic of shape {_shape(call)} "
            f'does not match the plan {layer.layout.stat_shape} '
            '([*stack, groups, d_in]).')
    pairings.append(Pairing(layer, kernel_index, bias_index, tuple(calls)))
  if not pairings:
    check_not_nested((layer.kernel_leaf for layer in plan.layers), index)
  if missing and not found:
    raise ValueError(NO_STATISTICS)
  lookups = [key for key in missing if key.endswith('@lookup')]
  if lookups:
    raise ValueError(
        f'mac: the plan preconditions the embedding lookups {lookups} (it was '
        'built with embed_lookup=True) but no lookup statistic came back: '
        'open the capture with embed_lookup=True like the plan, or build the '
        'plan without it.')
  if missing:
    raise ValueError(
        f'mac: no statistic for the planned layers {missing}. If the model '
        'legitimately skips them on some steps, list them in '
        'mac(optional_layers=...); otherwise check that the forward pass '
        'calls them under the capture (and that the capture does not '
        'exclude= layers the plan was built with).')
  return pairings
