"""What the linen and NNX captures share: options, open captures, surveys.

The captures differ only in how they reach the model's call (linen: Flax's
method interceptor; NNX: the model given to the capture) and where the
statistics go (the ``'intermediates'`` collection, an ``nnx.State``); both
evaluate the call through the program interpreter (:mod:`sown_program`).
Written once here:

* :class:`Options` and :class:`OpenCaptures`: the options of the open
  captures, at most one per thread (nesting raises), entered and exited
  from any thread; a token mask that matched no input raises on exit;
* :func:`attention_statistic`: the statistic of ``sow_attention``;
* :class:`Survey`: what a plan-building forward pass saw (module types,
  layer kinds and layouts, why parameters pass through).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from mac_optax._src import attention
from mac_optax._src import mean_inputs
from mac_optax._src import token_mask as token_mask_lib



def input_mean(x: jax.Array, axis: Sequence[int] = (-1,),
               token_mask: Optional[jax.Array] = None) -> jax.Array:
  """``[1, d_in]`` mean of ``x`` over all axes but the contracted ``axis``.

  The statistic of a layer computing ``y = x @ kernel`` over the contracted
  axes, for :func:`mac_optax.linen.sow_mean` / :func:`mac_optax.nnx.sow_mean`.
  With `token_mask` (``[*batch, tokens]``) and ``x`` leading with its shape,
  the mean over real tokens only.

  Example:
    >>> input_mean(jnp.ones((2, 5, 8))).shape
    (1, 8)
  """
  return mean_inputs.dense_mean(x, axis, token_mask_lib.checked(token_mask))


# ------------------------------------------------------------ open captures


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
  """The options of one open capture (compared by identity).

  ``token_mask`` is the capture's ``[*batch, tokens]`` padding mask (an
  array, traced under ``jit``) or None; see the token-mask module for which
  inputs it applies to. ``exclude`` says which layers are not captured
  (linen: a predicate on paths, :func:`excluder`; NNX: on modules);
  ``where`` names the capture in errors.
  """
  attention: str
  embed_lookup: bool
  token_mask: Optional[jax.Array] = None
  exclude: Callable[[str], bool] = lambda path: False
  where: str = 'capture'

  @classmethod
  def checked(cls, attention_mode: str, embed_lookup: bool,
              token_mask: Any = None, exclude: Any = None,
              where: str = 'capture') -> Options:
    """Validated options.

    Raises:
      ValueError: an unknown attention mode, a malformed mask, a mask
        with ``attention='product_of_means'`` (whose ``Σ_j w_j x̄_j`` has no
        real-token form), or a malformed `exclude`.
    """
    mode = attention.check_mode(attention_mode)
    mask = token_mask_lib.checked(token_mask)
    if mask is not None and mode == attention.PRODUCT_OF_MEANS:
      raise ValueError("mac: attention='product_of_means' is not defined "
                       "with a token_mask; use attention='exact'.")
    return cls(mode, bool(embed_lookup), mask, excluder(exclude), where)


EXCLUDED = 'excluded by the user'


def excluder(exclude: Any) -> Callable[[str], bool]:
  """``exclude=`` as a predicate on layer paths (``'Block_0/Dense_1'``).

  Args:
    exclude: None, a path, a sequence of paths (a layer and every layer
      below it: ``'Block_0'`` excludes ``'Block_0/Dense_1'``), or a
      predicate ``path -> bool``.

  Raises:
    TypeError: anything else.
  """
  if exclude is None:
    return lambda path: False
  if callable(exclude):
    return lambda path: bool(exclude(path))
  paths = (exclude,) if isinstance(exclude, str) else exclude
  if not isinstance(paths, (list, tuple, set, frozenset)) or not all(
      isinstance(p, str) for p in paths):
    raise TypeError(
        'mac: exclude= takes a layer path, a list of paths '
        "(['Block_0/Dense_1']) or a predicate path -> bool, got "
        f'{exclude!r}.')
  paths = tuple(p.strip('/') for p in paths)
  return lambda path: any(path == p or path.startswith(p + '/')
                          for p in paths)


NESTED = (
    'mac: {where}() was entered while another capture is open in this '
    'thread. Nested captures have no single meaning (which options, which '
    'token mask, sown once or twice?), so MAC refuses them: open one capture '
    'around the forward pass, with the options it needs.')


class OpenCaptures:
  """The open captures of all threads, at most one per thread.

  ``exit`` removes an entry by identity, so a capture entered in one thread
  may be exited in another. Each capture with a token mask watches what
  the mask met (the token-mask module) and :meth:`exit` reports it.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._open: list[tuple[int, Options,
                           Optional[token_mask_lib.MaskCheck]]] = []

  def enter(self, options: Options) -> int:
    """Registers `options` for this thread; returns the number open.

    Raises:
      ValueError: this thread already has an open capture.
    """
    me = threading.get_ident()
    with self._lock:
      if any(t == me for t, _, _ in self._open):
        raise ValueError(NESTED.format(where=options.where))
      check = token_mask_lib.watch(options.token_mask, options.where)
      self._open.append((me, options, check))
      return len(self._open)

  def exit(self, options: Options
           ) -> tuple[int, Callable[[], None]]:
    """Removes `options` (from any thread).

    Returns:
      The number still open, and a function that raises if the capture's
      token mask matched no input (call it when no other error is under
      way, after cleaning up).
    """
    with self._lock:
      mine = [c for _, o, c in self._open if o is options]
      self._open = [e for e in self._open if e[1] is not options]
      remaining = len(self._open)
    for check in mine:
      token_mask_lib.unwatch(check)

    def verify() -> None:
      for check in mine:
        if check is not None:
          check.verify()

    return remaining, verify

  def mask_check(self) -> Optional[token_mask_lib.MaskCheck]:
    """What this thread's open capture's token mask met, or None."""
    me = threading.get_ident()
    with self._lock:
      mine = [c for t, _, c in self._open if t == me]
    return mine[-1] if mine else None

  def current(self) -> Optional[Options]:
    """The open capture of this thread, or None."""
    me = threading.get_ident()
    with self._lock:
      mine = [o for t, o, _ in self._open if t == me]
    return mine[-1] if mine else None


def mark_excluded(plan: Any, excluded: Callable[[str], bool]) -> Any:
  """`plan` with the excluded layers' parameters passed as :data:`EXCLUDED`."""
  passed = tuple(
      dataclasses.replace(p, reason=EXCLUDED)
      if excluded(p.path.rpartition('/')[0]) else p for p in plan.passed)
  return dataclasses.replace(plan, passed=passed)


def static_scalars(args: Any) -> tuple[list, Callable[[list], Any]]:
  """Splits the example inputs of a plan into traced leaves and the rest.

  Python scalars (a ``train`` flag given by position) stay Python values,
  as they are when the model is called outside ``jit``: traced, a flag
  would fail in the model's ``if`` with a tracer error.

  Returns:
    The array leaves, and a function rebuilding `args` from them.
  """
  leaves, treedef = jax.tree_util.tree_flatten(args)
  static = [isinstance(leaf, (bool, int, float, complex, str))
            for leaf in leaves]
  traced = [leaf for leaf, s in zip(leaves, static) if not s]

  def rebuild(new: list) -> Any:
    it = iter(new)
    return jax.tree_util.tree_unflatten(
        treedef, [leaf if s else next(it) for leaf, s in zip(leaves, static)])

  return traced, rebuild


# -------------------------------------------------------------- attention


def reduce_probs(probs: jax.Array, mask: Optional[jax.Array]
                 ) -> tuple[jax.Array, Optional[jax.Array]]:
  """``(w_bj, n_b or None)``: key weights over real queries, their counts."""
  queries = token_mask_lib.query_weights(mask, probs.shape)
  counts = None if queries is None else jnp.sum(queries, axis=-1)
  return attention.key_weights(probs, queries), counts


def attention_statistic(where: str, inputs: jax.Array, *,
                        probs: Optional[jax.Array],
                        weights: Optional[jax.Array], columns: str,
                        mode: Optional[str],
                        current: Optional[Options]) -> jax.Array:
  """The ``[len(columns), D]`` statistic of ``sow_attention``.

  `mode` None takes the open capture's (`current`; ``'exact'`` outside one);
  the token mask is the open capture's. Under a token mask: with `probs`, the queries are real where ``P``'s
  batch and query axes are token rows; `weights` given instead must already
  average over heads and real queries
  (``key_weights_from_attention(..., query_mask=mask)``), and each example
  counts with its real tokens ``Σ_t m_bt``.

  Raises:
    ValueError: not exactly one of `probs` and `weights`, or `weights`
      whose batch axes are not the mask's.
  """
  if (probs is None) == (weights is None):
    raise ValueError(f"mac: sow_attention at '{where}': give exactly one of "
                     'probs= and weights=.')
  if mode is None:
    mode = current.attention if current is not None else attention.EXACT
  token_mask = current.token_mask if current is not None else None
  if weights is None:
    weights, counts = reduce_probs(probs, token_mask)
  elif token_mask is None:
    counts = None
  elif tuple(weights.shape[:-1]) != tuple(token_mask.shape[:-1]):
    raise ValueError(
        f"mac: sow_attention at '{where}': weights of shape {weights.shape} "
        f'do not have the batch axes of the token mask {token_mask.shape}; '
        'give probs= instead.')
  else:
    counts = jnp.sum(token_mask != 0, axis=-1)
  stat = attention.grouped_statistic(inputs, weights, columns=columns,
                                     mode=mode, token_mask=token_mask,
                                     query_counts=counts)
  return stat.astype(mean_inputs.stat_dtype(stat.dtype))


# ------------------------------------------------------------------ probing

_PROBING = threading.local()


@contextlib.contextmanager
def probing_on():
  """Within: SMAC's probes (if in the variables) go on the layers' outputs."""
  depth = getattr(_PROBING, 'depth', 0)
  _PROBING.depth = depth + 1
  try:
    yield
  finally:
    _PROBING.depth = depth


def probing() -> bool:
  return getattr(_PROBING, 'depth', 0) > 0


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
  # Layers found in the program and sown at their kernel's path: the bias
  # path of each; and why the program passed a parameter through.
  biases: dict[str, str] = dataclasses.field(default_factory=dict)
  reasons: dict[str, str] = dataclasses.field(default_factory=dict)

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
