"""Where statistics live in the intermediates, and which parameter each fits.

A capture (linen or NNX) sows, at the path of every layer it understands, one
entry per call of the layer under one of the names below. Each entry is an
array of shape ``[G, d_in]`` (``G`` mean vectors, see
:class:`mac_optax.KernelLayout`); layers stacked by ``nn.scan``/``nnx.scan``/
``vmap`` get extra leading axes, ``[*stack, G, d_in]``.

The statistic sown at module path ``p`` preconditions the parameter at
``p/<param>``:

* ``MEAN`` → ``p/kernel`` laid out ``(*stack, *in_axes, *out_axes)`` and the
  optional ``p/bias`` (Dense, DenseGeneral, Conv, custom layers).
* ``ATTENTION_MEAN`` → the same kernel, from ``sow_attention`` (a fused
  projection whose column groups get attention-aware means). A layer with
  this statistic is preconditioned with it; the ``MEAN`` or ``EINSUM_MEAN``
  a capture also records for that layer's call is then not used (an einsum
  projection must then have its input axes leading its kernel).
* ``ATTEND_MEAN`` → ``p/embedding`` laid out ``(*stack, d_out, d_in)``
  (``Embed.attend``: the table used transposed). No bias.
* ``EINSUM_MEAN`` → ``p/kernel`` (and ``p/bias``) of an einsum-style layer
  (``nn.Einsum``, ``nnx.Einsum``, ``DenseGeneral``/``LinearGeneral`` with
  batch axes), ``[*stack, G, d_in]`` with one group per batched index. Its
  kernel layout is not a prefix rule: the capture records it in the layer
  plan, and a transform without the plan refuses the statistic.
* ``LOOKUP_MEAN`` → ``p/embedding`` laid out ``(*stack, d_in, d_out)``
  (``Embed`` lookup: a one-hot input of size ``d_in = vocab``, mean = token
  frequencies). No bias. A tied table may carry both embedding statistics;
  they act on different axes and are applied one after the other.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

# Sown names. Public as `mac_optax.MEAN`, `mac_optax.ATTEND_MEAN`, ...
MEAN = 'mac_mean'
ATTENTION_MEAN = 'mac_attention_mean'
ATTEND_MEAN = 'mac_attend_mean'
LOOKUP_MEAN = 'mac_lookup_mean'
EINSUM_MEAN = 'mac_einsum_mean'
# Layers found in a traced program whose kernel the names above cannot
# reach (a parameter `w`, a bias of another name or order): keyed by the
# kernel's own path (`mac_optax.plan`), or sown there by a Flax capture;
# the plan names the kernel and bias leaves.
PROGRAM = 'mac_program_mean'
PROGRAM_LOOKUP = 'mac_program_lookup_mean'

# sown name -> the parameter leaf it preconditions.
PARAM = {MEAN: 'kernel', ATTENTION_MEAN: 'kernel', ATTEND_MEAN: 'embedding',
         LOOKUP_MEAN: 'embedding', EINSUM_MEAN: 'kernel'}
# Every name a capture sows.
SOWN = (*PARAM, PROGRAM, PROGRAM_LOOKUP)
# Statistics of embedding lookups (their layer's key ends in '@lookup').
LOOKUPS = (LOOKUP_MEAN, PROGRAM_LOOKUP)
# Statistics whose layer's bias is an extra input row.
WITH_BIAS = (MEAN, ATTENTION_MEAN, EINSUM_MEAN)
# What a capture sows for a projection that `sow_attention` also sows at: the
# attention statistic replaces it (an einsum projection's included).
REPLACED_BY_ATTENTION = (MEAN, EINSUM_MEAN)

# Keys that wrap a leaf without naming a module (NNX variables, boxed metadata).
_WRAPPER_KEYS = ('value', 'raw_value', 'unbox')

Path = tuple[str, ...]


def kernel_of(path: Path, name: str) -> Path:
  """The parameter a statistic sown at `path` under `name` preconditions."""
  if name in (PROGRAM, PROGRAM_LOOKUP):
    return path
  return path + (PARAM[name],)


def key_value(key: Any) -> Any:
  """A path entry of `jax.tree_util` as the key it is (``'w'``, ``0``)."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def key_name(key: Any) -> str:
  """A path entry of `jax.tree_util` as a plain string."""
  return str(key_value(key))


def _keys(path) -> tuple:
  """A leaf's path as its own keys, the wrapper keys at its end dropped."""
  keys = tuple(key_value(k) for k in path)
  while keys and str(keys[-1]) in _WRAPPER_KEYS:
    keys = keys[:-1]
  return keys


def leaf_keys(tree: Any) -> list[tuple]:
  """The path of every leaf of `tree` as its own keys, wrapper keys dropped."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [_keys(path) for path, _ in flat]


def _names(path) -> Path:
  return tuple(str(k) for k in _keys(path))


def leaf_paths(tree: Any) -> dict[Path, int]:
  """Maps the string path of every leaf of `tree` to its flat index."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_names(path): index for index, (path, _) in enumerate(flat)}


def masked_paths(tree: Any) -> set[Path]:
  """Paths ``optax.masked``/``optax.partition`` masked out of `tree`.

  A masked-out leaf is an ``optax.MaskedNode``: a node without leaves, so
  absent from :func:`leaf_paths`, but still at its path.
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)
  return {_names(path) for path, leaf in flat if is_masked(leaf)}


def join(path: Path) -> str:
  return '/'.join(path)


def split(path: str) -> Path:
  return tuple(path.split('/')) if path else ()


def strip_collection(intermediates: Any) -> Any:
  """Accepts the whole collection too: ``{'intermediates': {...}}``.

  A linen ``mutable`` result, as a dict or a ``FrozenDict``, possibly with
  other collections (``batch_stats``) beside it: those hold no statistic.
  """
  if isinstance(intermediates, Mapping) and 'intermediates' in intermediates \
      and not any(_sown(v) for k, v in intermediates.items()
                  if k != 'intermediates'):
    return intermediates['intermediates']
  return intermediates


def _sown(tree: Any) -> bool:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return any(key_name(k) in SOWN for path, _ in flat for k in path)


def is_program_statistics(tree: Any) -> bool:
  """A flat ``{layer key: array}`` dict, as ``with_statistics`` returns."""
  return (isinstance(tree, dict) and bool(tree)
          and all(isinstance(k, str) and hasattr(v, 'shape')
                  for k, v in tree.items()))


def sown_statistics(intermediates: Any) -> dict[tuple[Path, str], list]:
  """Every sown statistic: ``(layer path, name) -> [one entry per call]``."""
  found: dict[tuple[Path, str], list] = {}
  flat, _ = jax.tree_util.tree_flatten_with_path(
      strip_collection(intermediates))
  for path, leaf in flat:
    names = [key_name(k) for k in path]
    for i, name in enumerate(names):
      if name in SOWN:
        found.setdefault((tuple(names[:i]), name), []).append(leaf)
        break
  return found
