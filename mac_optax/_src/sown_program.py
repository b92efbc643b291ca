"""The layers of a Flax model's traced program, as its capture sows them.

Both Flax captures find layers the way :func:`mac_optax.plan` does: they
evaluate the model's call through the program interpreter (one discovery,
whatever code defines the layers) and sow each layer's statistic into the
intermediates at the place this module gives it, so that a plan built from
the same capture pairs it with the right parameters:

* a ``kernel`` whose layout is the prefix rule ``(*stack, *in, *out)`` and
  whose bias (if any) is the sibling ``bias``: ``MEAN`` at the module's path
  (Dense, DenseGeneral, Conv, custom layers);
* a ``kernel`` of another layout: ``EINSUM_MEAN`` at the module's path (its
  layout recorded in the plan);
* an ``embedding`` used transposed (``Embed.attend``): ``ATTEND_MEAN``; an
  ``embedding`` looked up: ``LOOKUP_MEAN``;
* any other kernel (a parameter ``w``, a bias of another name):
  ``PROGRAM`` (``PROGRAM_LOOKUP``) at the kernel's own path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from mac_optax._src import capture_core
from mac_optax._src import plan as plan_lib
from mac_optax._src import program
from mac_optax._src import program_plan
from mac_optax._src import statistics
from mac_optax._src.layout import KernelLayout
from mac_optax._src.layout import LayoutError

Path = statistics.Path

_KINDS = {program.DENSE: plan_lib.DENSE, program.CONV: plan_lib.CONV,
          program.LOOKUP: plan_lib.EMBED_LOOKUP,
          program.ATTENTION_VALUE: plan_lib.ATTENTION_VALUE}


@dataclasses.dataclass(frozen=True)
class Sown:
  """Where a found layer's statistic is sown, and what the plan records."""
  path: Path                 # relative to the evaluated module
  name: str
  kind: str
  layout: KernelLayout
  bias: Optional[Path]       # the bias parameter's path, or None
  leaf: int                  # the kernel's flat index in the parameters
  keys: tuple = ()           # `path` as the parameters' own keys


def _prefix_rule(layout: KernelLayout, transposed: bool = False) -> bool:
  """Whether the statistic's shape alone gives back `layout`."""
  try:
    return KernelLayout.from_statistic(
        layout.stat_shape, layout.shape, layout.bias_shape,
        transposed=transposed) == layout
  except LayoutError:
    return False


def _in_kernel_order(layout: KernelLayout) -> KernelLayout:
  """`layout` with a bias in kernel order written as the default (None)."""
  if layout.bias_axes is not None and list(layout.bias_axes) == sorted(
      layout.bias_axes):
    return dataclasses.replace(layout, bias_axes=None)
  return layout


def place(registry: program.Registry, found: program.Found) -> Sown:
  """The place and name of `found`'s statistic in the intermediates."""
  names = registry.leaf_names
  kernel = statistics.split(names[found.leaf])
  module, leaf = kernel[:-1], kernel[-1]
  bias = (None if found.bias_leaf is None
          else statistics.split(names[found.bias_leaf]))
  layout = found.layout
  # The layout the sown names' prefix rule would describe.
  natural = _in_kernel_order(layout)
  kind = _KINDS[found.kind]
  sibling_bias = module + ('bias',)
  if found.kind == program.LOOKUP:
    if leaf == 'embedding' and _prefix_rule(natural):
      return Sown(module, statistics.LOOKUP_MEAN, kind, natural, None,
                  found.leaf)
    return Sown(kernel, statistics.PROGRAM_LOOKUP, kind, layout, None,
                found.leaf)
  if leaf == 'embedding' and bias is None and _prefix_rule(natural, True):
    return Sown(module, statistics.ATTEND_MEAN, plan_lib.EMBED_ATTEND,
                natural, None, found.leaf)
  bias_is_sibling = (bias == sibling_bias if bias is not None else
                     statistics.join(sibling_bias) not in names)
  if leaf == 'kernel' and bias_is_sibling:
    if natural.bias_axes is None and _prefix_rule(natural):
      return Sown(module, statistics.MEAN, kind, natural, bias, found.leaf)
    return Sown(module, statistics.EINSUM_MEAN,
                plan_lib.EINSUM if kind == plan_lib.DENSE else kind,
                layout, bias, found.leaf)
  return Sown(kernel, statistics.PROGRAM, kind, layout, bias, found.leaf)


def evaluate(fn: Callable[..., Any], params: Any, args: tuple, kwargs: dict,
             options: capture_core.Options, root: Path, mask_check: Any,
             survey: Optional[capture_core.Survey],
             probes: Optional[dict] = None
             ) -> tuple[Any, list[tuple[Sown, Any]]]:
  """Runs ``fn(params, *args, **kwargs)`` through the program interpreter.

  Args:
    fn: the module's call with its parameters as an argument.
    params: the module's parameters.
    args: the call's positional arguments.
    kwargs: its keyword arguments.
    options: the open capture's options (`exclude` on module paths).
    root: the module's path in the model (for `exclude` and the survey).
    mask_check: the open capture's token-mask check, or None.
    survey: the plan's survey, or None.
    probes: SMAC's zero probes by kernel path (relative), or None.

  Returns:
    ``fn``'s output, and each found layer's place with its statistic.
  """
  registry = program.Registry.of(
      params,
      lambda leaf: options.exclude(
          statistics.join(root + statistics.split(leaf)[:-1])),
      options.embed_lookup, options.attention)
  registry.token_mask = options.token_mask
  registry.mask_check = mask_check
  registry.probes = probes
  out, stats = program.run(fn, registry, params, args, kwargs)
  placed = []
  for found in registry.layers():
    if found.key in stats:
      placed.append((place(registry, found), stats[found.key]))
  if survey is not None:
    _record(survey, registry, placed, root)
  # The intermediates are keyed like the parameters (NNX lists: integers).
  keys = statistics.leaf_keys(params)
  return out, [(dataclasses.replace(sown, keys=keys[sown.leaf][
      :len(sown.path)]), stat) for sown, stat in placed]


def _record(survey: capture_core.Survey, registry: program.Registry,
            placed: list, root: Path) -> None:
  """What the plan needs beyond the statistics' shapes."""
  for sown, _ in placed:
    path = statistics.join(root + sown.path)
    survey.kinds[path] = sown.kind
    survey.called.add(path)
    if sown.name in (statistics.EINSUM_MEAN, statistics.PROGRAM,
                     statistics.PROGRAM_LOOKUP):
      survey.record_layout(path, sown.layout, path)
    if sown.name == statistics.PROGRAM and sown.bias is not None:
      survey.biases[path] = statistics.join(root + sown.bias)
  for leaf, reason in program_plan.pass_reasons(registry).items():
    survey.reasons[statistics.join(root + statistics.split(leaf))] = reason


def plan_of(survey: capture_core.Survey, params: Any, like: Any,
            excluded: Callable[[str], bool]) -> plan_lib.LayerPlan:
  """The plan of a capture's abstract pass: its statistics `like`, paired.

  Raises:
    ValueError: no layer found (MAC would be plain SGD).
  """
  return program_plan.not_empty(capture_core.mark_excluded(
      plan_lib.from_statistics(
          params, like, kinds=survey.kinds, module_types=survey.module_types,
          called=survey.called, layouts=survey.layouts,
          biases=survey.biases, reasons=survey.reasons), excluded))


def add_sown(intermediates: dict, placed: list) -> dict:
  """`intermediates` (a nested dict) with each statistic appended at its place.

  Like ``sow``: each entry is a tuple, one element per call.
  """
  for sown, stat in placed:
    node = intermediates
    for name in sown.keys:
      node = node.setdefault(name, {})
    node[sown.name] = tuple(node.get(sown.name, ())) + (stat,)
  return intermediates
