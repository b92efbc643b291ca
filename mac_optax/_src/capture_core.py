"""What the linen and NNX captures share: options, attention calls, surveys.

The captures differ only in how they reach a layer call (linen: a method
interceptor; NNX: a class patch) and how they sow (``module.sow`` into the
``'intermediates'`` collection or into ``nnx.Intermediate``). Everything
else is here, written once:

* :class:`Options` and :class:`OpenCaptures`: the options of the open
  captures, per thread, entered and exited from any thread;
* :class:`AttentionCall`: one call of a supported attention layer. Its
  projections' statistics are held until the call returns; the value
  projection is the one whose output is the ``value`` the layer's
  ``attention_fn`` received (array identity), and it gets the
  attention-mixed mean from the probabilities the layer computed (after
  softmax and masks, before dropout), reduced at once to per-key weights.
  If the value projection or the probabilities cannot be identified the
  call raises: the capture never falls back to a plain mean silently;
* :func:`attention_statistic`: the statistic of ``sow_attention``;
* :class:`Survey`: what a plan-building forward pass saw (module types,
  layer kinds, supported layers called, the axis roles of einsum layers).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from typing import Any, Callable, Optional, Sequence

import jax

from mac_optax._src import attention
from mac_optax._src import mean_inputs

_WEIGHTS_NAME = 'attention_weights'   # what Flax's attention sows


def input_mean(x: jax.Array, axis: Sequence[int] = (-1,)) -> jax.Array:
  """``[1, d_in]`` mean of ``x`` over all axes but the contracted ``axis``.

  The statistic of a layer computing ``y = x @ kernel`` over the contracted
  axes, for :func:`mac_optax.linen.sow_mean` / :func:`mac_optax.nnx.sow_mean`.

  Example:
    >>> input_mean(jnp.ones((2, 5, 8))).shape
    (1, 8)
  """
  return mean_inputs.dense_mean(x, axis)


# ------------------------------------------------------------ open captures


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
  """The options of one open capture (compared by identity)."""
  attention: str
  embed_lookup: bool

  @classmethod
  def checked(cls, attention_mode: str, embed_lookup: bool) -> Options:
    return cls(attention.check_mode(attention_mode), bool(embed_lookup))


class OpenCaptures:
  """The open captures of all threads; each thread sees its own innermost.

  ``exit`` removes an entry by identity, so a capture entered in one thread
  may be exited in another.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._open: list[tuple[int, Options]] = []

  def enter(self, options: Options) -> int:
    """Registers `options` for this thread; returns the number open."""
    with self._lock:
      self._open.append((threading.get_ident(), options))
      return len(self._open)

  def exit(self, options: Options) -> int:
    """Removes `options` (from any thread); returns the number still open."""
    with self._lock:
      self._open = [(t, o) for t, o in self._open if o is not options]
      return len(self._open)

  def current(self) -> Optional[Options]:
    """The innermost open capture of this thread, or None."""
    me = threading.get_ident()
    with self._lock:
      mine = [o for t, o in self._open if t == me]
    return mine[-1] if mine else None


# -------------------------------------------------------------- attention


class _Recorder:
  """Stands in for ``module`` in ``attention_fn(..., module=)``.

  Flax's ``dot_product_attention_weights`` hands ``module.sow`` the
  probabilities; they are reduced here to ``[B, Nk]`` at once. A real
  module given by the layer (``sow_weights=True``) still receives them.
  """

  def __init__(self, weights: list, module: Any):
    self._weights = weights
    self._module = module

  def __bool__(self) -> bool:
    return True

  def sow(self, collection, name, value, *args, **kwargs):
    if name == _WEIGHTS_NAME:
      self._weights.append(attention.key_weights(value))
    if self._module is not None:
      return self._module.sow(collection, name, value, *args, **kwargs)
    return False


def _accepts_module(fn: Callable) -> bool:
  try:
    return 'module' in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


@dataclasses.dataclass
class _Held:
  sow: Callable[[jax.Array], None]
  mean: jax.Array
  inputs: jax.Array
  output: Any
  on_value: Callable[[], None]


class AttentionCall:
  """One call of a supported attention layer, under capture.

  Args:
    where: the layer, for error messages (its path or class).
    mode: ``'exact'`` or ``'product_of_means'``.
  """

  def __init__(self, where: str, mode: str):
    self.where = where
    self.mode = mode
    self._value = None
    self._weights: list = []
    self._held: list[_Held] = []

  def recording(self, attention_fn: Callable) -> Callable:
    """A pass-through ``attention_fn`` that records ``value`` and weights."""
    if not _accepts_module(attention_fn):
      raise ValueError(
          f"mac: attention layer '{self.where}': its attention_fn "
          f'{getattr(attention_fn, "__name__", attention_fn)!r} has no '
          '`module` argument, so the capture cannot see the attention '
          "probabilities. Use capture(attention='plain') (plain value "
          'mean), or compute the statistic with sow_attention(..., '
          'weights=mac_optax.attention.key_weights_from_attention(...)).')

    @functools.wraps(attention_fn)  # keeps the signature Flax filters on
    def wrapper(query, key, value, *args, **kwargs):
      self._value = value
      kwargs['module'] = _Recorder(self._weights, kwargs.get('module'))
      return attention_fn(query, key, value, *args, **kwargs)

    return wrapper

  def hold(self, sow: Callable[[jax.Array], None], mean: jax.Array,
           inputs: jax.Array, output: Any,
           on_value: Callable[[], None] = lambda: None) -> None:
    """Holds a projection's statistic until :meth:`release`."""
    self._held.append(_Held(sow, mean, inputs, output, on_value))

  def release(self) -> None:
    """Sows the held statistics, the value projection's attention-mixed.

    Raises:
      ValueError: the probabilities were not recorded exactly once, or not
        exactly one projection produced the value the attention read.
    """
    values = [h for h in self._held if h.output is self._value]
    if len(self._weights) != 1 or len(values) != 1:
      raise ValueError(
          f"mac: attention layer '{self.where}': could not identify its "
          f'value projection ({len(values)} projection outputs are the value '
          f'its attention_fn read, {len(self._weights)} probability arrays '
          'were recorded; expected 1 and 1). Use '
          "capture(attention='plain') for this model, or sow_attention in a "
          'hand-written layer.')
    (value,) = values
    for held in self._held:
      if held is value:
        held.sow(attention.mixed_mean(self._weights[0], held.inputs,
                                      self.mode))
        held.on_value()
      else:
        held.sow(held.mean)


def attention_statistic(where: str, inputs: jax.Array, *,
                        probs: Optional[jax.Array],
                        weights: Optional[jax.Array], columns: str,
                        mode: str) -> jax.Array:
  """The ``[len(columns), D]`` statistic of ``sow_attention``."""
  if (probs is None) == (weights is None):
    raise ValueError(f"mac: sow_attention at '{where}': give exactly one of "
                     'probs= and weights=.')
  if weights is None:
    weights = attention.key_weights(probs)
  stat = attention.grouped_statistic(inputs, weights, columns=columns,
                                     mode=mode)
  return stat.astype(mean_inputs.stat_dtype(stat.dtype))


# ------------------------------------------------------------------ survey


@dataclasses.dataclass
class Survey:
  """What a plan-building forward pass saw, by module path."""
  module_types: dict[str, str] = dataclasses.field(default_factory=dict)
  kinds: dict[str, str] = dataclasses.field(default_factory=dict)
  called: set[str] = dataclasses.field(default_factory=set)
  # Kernel axis roles of layers the prefix rule cannot describe (einsum
  # layers), by path: `plan.from_statistics(layouts=...)`.
  layouts: dict[str, Any] = dataclasses.field(default_factory=dict)

  def record_layout(self, path: str, roles: Any, where: str) -> None:
    """Records a layer's axis roles; a second call must agree.

    Raises:
      ValueError: the layer was called with two different equations or
        kernel roles (one kernel cannot have two layouts).
    """
    known = self.layouts.setdefault(path, roles)
    if known != roles:
      raise ValueError(
          f"mac: einsum layer '{where}' was called with two different kernel "
          f'layouts ({known} and {roles}); MAC needs one layout per kernel.')


_SURVEYS = threading.local()


class surveying:  # pylint: disable=invalid-name
  """Context: record into a :class:`Survey` in this thread."""

  def __init__(self, survey: Survey):
    self.survey = survey

  def __enter__(self) -> Survey:
    stack = getattr(_SURVEYS, 'stack', None)
    if stack is None:
      stack = _SURVEYS.stack = []
    stack.append(self.survey)
    return self.survey

  def __exit__(self, *exc):
    _SURVEYS.stack.remove(self.survey)


def current_survey() -> Optional[Survey]:
  stack = getattr(_SURVEYS, 'stack', None)
  return stack[-1] if stack else None
