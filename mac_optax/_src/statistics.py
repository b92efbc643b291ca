"""Where statistics live in the intermediates, and which parameters they fit.

A capture (linen or NNX) sows, at the path of every layer it understands, one
entry per call of the layer under a name below. Each entry is an array of
shape ``[G, d_in]`` (see :mod:`mac_optax._src.mean_inputs`); layers stacked by
``nn.scan``/``nnx.scan``/``vmap`` get extra leading axes, ``[*stack, G, d_in]``.

The transform pairs the statistic at path ``p`` with the parameters at the
same path ``p``:

* ``MEAN`` → ``p/kernel`` laid out ``(*stack, *in_axes, *out_axes)`` with
  ``prod(in_axes) = d_in`` (Dense, DenseGeneral, Conv, custom layers), and the
  optional ``p/bias`` ``(*stack, *out_axes)``.
* ``ATTEND_MEAN`` → ``p/embedding`` laid out ``(*stack, d_out, d_in)``
  (``Embed.attend``: the table is used transposed). No bias.
* ``LOOKUP_MEAN`` → ``p/embedding`` laid out ``(*stack, d_in, d_out)``
  (``Embed`` lookup: a one-hot input of size ``d_in = vocab``, mean = token
  frequencies). No bias. A tied table may carry both embedding statistics;
  they act on different axes and are applied one after the other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax

# Sown names. Public through `mac_optax.MEAN`/`mac_optax.ATTEND_MEAN`.
MEAN = 'mac_mean'
ATTEND_MEAN = 'mac_attend_mean'
LOOKUP_MEAN = 'mac_lookup_mean'

# sown name -> (parameter leaf name, is the table transposed (d_out, d_in)).
_PARAM_OF_STAT = {MEAN: ('kernel', False), ATTEND_MEAN: ('embedding', True),
                  LOOKUP_MEAN: ('embedding', False)}

# Keys that wrap a leaf without naming a module (NNX variables, boxed metadata).
_WRAPPER_KEYS = ('value', 'raw_value', 'unbox')

Path = tuple[str, ...]


def key_name(key: Any) -> str:
  """A path entry of `jax.tree_util` as a plain string."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_paths(tree: Any) -> dict[Path, int]:
  """Maps the string path of every leaf of `tree` to its flat index."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  paths = {}
  for index, (path, _) in enumerate(flat):
    names = tuple(key_name(k) for k in path)
    while names and names[-1] in _WRAPPER_KEYS:
      names = names[:-1]
    paths[names] = index
  return paths


@dataclasses.dataclass(frozen=True)
class Layer:
  """One preconditioned layer: its statistic and the parameters it fits."""
  path: Path            # module path, e.g. ('Block_0', 'Dense_0')
  stat_name: str        # MEAN or ATTEND_MEAN
  calls: tuple          # sown entries, each [*stack, G, d_in]
  kernel_index: int     # flat index of the kernel in the gradient tree
  bias_index: Optional[int]

  @property
  def key(self) -> str:
    key = '/'.join(self.path)
    # A tied table has an attend and a lookup statistic: distinct states.
    return key + '@lookup' if self.stat_name == LOOKUP_MEAN else key

  @property
  def transposed(self) -> bool:
    return _PARAM_OF_STAT[self.stat_name][1]


def sown_statistics(intermediates: Any) -> dict[tuple[Path, str], list]:
  """Finds every sown statistic: ``(layer path, name) -> [entries]``."""
  found: dict[tuple[Path, str], list] = {}
  flat, _ = jax.tree_util.tree_flatten_with_path(intermediates)
  for path, leaf in flat:
    names = [key_name(k) for k in path]
    for i, name in enumerate(names):
      if name in _PARAM_OF_STAT:
        found.setdefault((tuple(names[:i]), name), []).append(leaf)
        break
  return found


def _strip_collection(intermediates: Any, grad_paths: dict[Path, int]) -> Any:
  """Accepts ``{'intermediates': {...}}`` as well as its content."""
  if isinstance(intermediates, dict) and set(intermediates) == {'intermediates'}:
    if not any(p and p[0] == 'intermediates' for p in grad_paths):
      return intermediates['intermediates']
  return intermediates


def find_layers(grads: Any, intermediates: Any) -> list[Layer]:
  """Pairs sown statistics with the gradient leaves they precondition.

  A statistic whose parameter is absent from `grads` is skipped: inside
  ``optax.partition`` or ``optax.masked`` the other layers' gradients are
  masked out.

  Raises:
    ValueError: statistics were sown but none of them has a parameter in
      `grads` (the intermediates belong to another model, or were sown at
      the wrong path).
  """
  grad_paths = leaf_paths(grads)
  intermediates = _strip_collection(intermediates, grad_paths)
  found = sorted(sown_statistics(intermediates).items())
  layers = []
  for (path, name), calls in found:
    param_name, _ = _PARAM_OF_STAT[name]
    kernel_index = grad_paths.get(path + (param_name,))
    if kernel_index is None:
      continue
    bias_index = None
    if name == MEAN:
      bias_index = grad_paths.get(path + ('bias',))
    layers.append(Layer(path, name, tuple(calls), kernel_index, bias_index))
  if found and not layers:
    paths = ', '.join(f"'{'/'.join(p + (_PARAM_OF_STAT[n][0],))}'"
                      for (p, n), _ in found[:5])
    raise ValueError(
        f'mac: none of the {len(found)} captured statistics has a parameter '
        f'in the gradients (looked for {paths}, ...). Statistics must be sown '
        'at the path of the module that owns the parameter, and the '
        'intermediates must come from the same model as the gradients.')
  return layers


def stat_shape(layer: Layer) -> tuple[int, ...]:
  """The ``[*stack, G, d_in]`` shape of a layer's statistic (checked)."""
  shapes = {tuple(c.shape) for c in layer.calls}
  if len(shapes) != 1:
    raise ValueError(
        f"mac: layer '{layer.key}' was called with inputs of different "
        f'feature shapes: statistics {sorted(shapes)}.')
  shape = shapes.pop()
  if len(shape) < 2:
    raise ValueError(
        f"mac: layer '{layer.key}': a '{layer.stat_name}' statistic must be "
        f'[*stack, groups, d_in], got shape {shape}.')
  return shape


def kernel_view(layer: Layer, kernel_shape: tuple[int, ...],
                bias_shape: Optional[tuple[int, ...]]) -> tuple[int, ...]:
  """The ``[*stack, d_in, G, d_out_g]`` view of a kernel for its statistic.

  Raises:
    ValueError: the statistic does not fit the kernel (or the bias), naming the
      layer path and both shapes.
  """
  shape = stat_shape(layer)
  stack, groups, d_in = shape[:-2], shape[-2], shape[-1]
  s = len(stack)

  def fail(why):
    raise ValueError(
        f"mac: layer '{layer.key}': statistic of shape {shape} "
        f'([*stack, groups, d_in]) does not fit its '
        f"{'embedding' if layer.transposed else 'kernel'} of shape "
        f'{kernel_shape}: {why}.')

  if tuple(kernel_shape[:s]) != tuple(stack):
    fail(f'leading stack axes {stack} differ from the kernel\'s')
  body = kernel_shape[s:]
  if layer.transposed:
    if groups != 1 or len(body) != 2 or body[1] != d_in:
      fail(f'expected an embedding (*stack, vocab, {d_in}) and one group')
    return tuple(stack) + (d_in, 1, body[0])
  # The input axes are a prefix of the kernel's remaining axes whose sizes
  # multiply to d_in; the rest are outputs, split into `groups` equal parts.
  size, k = 1, 0
  while k < len(body) and size < d_in:
    size *= body[k]
    k += 1
  if size != d_in or k == len(body):
    fail(f'no leading kernel axes multiply to d_in={d_in} with output axes '
         'left over')
  d_out = math.prod(body[k:])
  if d_out % groups:
    fail(f'{d_out} output columns do not split into {groups} groups')
  if bias_shape is not None and (tuple(bias_shape[:s]) != tuple(stack)
                                 or math.prod(bias_shape[s:]) != d_out):
    fail(f'its bias of shape {bias_shape} does not match {d_out} output '
         'columns')
  return tuple(stack) + (d_in, groups, d_out // groups)
