"""The paper's exact first layer: ``(Σ + λI)⁻¹`` of the full input second moment.

The authors precondition the first layer (a conv stem, a ViT patch embedding)
not with the rank-one MAC factor but with the exact damped inverse of its input
second moment, computed once over the training set before training::

    Σ = E[a aᵀ]                        # a: im2col patch (+ a trailing 1 with bias)
    Ĝ_aug ← P Ĝ_aug,   P = (Σ + λI)⁻¹   # Ĝ_aug laid out (d_in [+1], d_out)

``Σ`` is ``d × d`` (27×27 for a 3×3×3 stem, 769×769 for a 16×16×3 patch
embedding with bias). A grouped convolution has one ``Σ_g`` per column group,
over the patches of its channel slice, and ``P`` is ``[G, d, d]``.

Two forms of ``P`` (``form=``):

* ``'inverse'`` (default): ``P = (Σ + λI)⁻¹``, the paper and the authors'
  current code (``torch.linalg.inv``; SMAC's ``cholesky_inverse``).
* ``'cholesky'``: ``P = L⁻ᵀ`` with ``L Lᵀ = Σ + λI``, which only a January
  2025 version of the authors' CIFAR code used (``grad_mat @ L⁻¹`` in
  PyTorch's ``(d_out, d_in)`` layout). ``L⁻ᵀ L⁻¹ = (Σ + λI)⁻¹``: half of the
  preconditioner, applied on one side only.

Differences from the reference kept on purpose: ``Σ`` is the mean over all
patch rows of the data (the reference averages per-batch means, which weighs
a smaller last batch more), accumulated in float64 on the host.

Usage::

    P = mac_optax.first_layer.exact_first_layer(
        model, variables, batches, path='Conv_0', damping=1.0)
    tx = mac_optax.mac_sgd(0.1, exact_layers=P)   # or mac(exact_layers=P)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mac_optax._src import program
from mac_optax._src import statistics
from mac_optax._src.exact import path_key as _path_key

_COLLECTION = 'mac_second_moment'
_SUM, _ROWS = 'sum', 'rows'


class SecondMoment(NamedTuple):
  """The input second moment of one layer, from :func:`input_second_moment`."""
  matrix: np.ndarray   # [G, d, d] float64, E[a aᵀ]; d = d_in (+1 with bias)
  rows: int            # number of input rows (patches, tokens) averaged
  path: str            # module path, e.g. 'Conv_0'
  has_bias: bool       # the last coordinate of `a` is the constant 1


# ------------------------------------------------------------------ inputs --

def _rows_of(module: nn.Module, x: jax.Array, keep_rows: bool
             ) -> tuple[program.Registry, str]:
  """`module` applied to `x` by the interpreter, its own layer's rows wanted.

  The module's own kernel (``kernel``, or its only parameter of rank ≥ 2)
  is the layer; the parameters' values do not change its input, so the
  module runs on zeros of their shapes.
  """
  module = module.clone(parent=None)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)['params']
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  shapes)
  kernels = [statistics.join(p) for p in statistics.leaf_paths(params)]
  kernels = [k for k, leaf in zip(kernels, jax.tree_util.tree_leaves(params))
             if k == 'kernel' or leaf.ndim >= 2]
  kernel = 'kernel' if 'kernel' in kernels else (
      kernels[0] if len(kernels) == 1 else None)
  registry = _with_moments(lambda p, x: module.apply({'params': p}, x),
                           params, x, kernel, keep_rows)
  if kernel not in registry.moment_sums:
    raise ValueError(
        f'mac: exact preconditioning needs a layer whose kernel reaches a '
        f'matrix product or a convolution; {type(module).__name__} has the '
        f'parameters {list(registry.leaf_names)}.')
  return registry, kernel


def _with_moments(fn: Callable[..., Any], params: Any, x: jax.Array,
                  kernel: Optional[str], keep_rows: bool = False
                  ) -> program.Registry:
  """``fn(params, x)`` run by the interpreter, `kernel`'s moment wanted."""
  registry = program.Registry.of(params)
  registry.moments = frozenset({kernel})
  registry.keep_rows = keep_rows
  program.run(fn, registry, params, (jax.lax.stop_gradient(x),), {})
  return registry


def layer_inputs(module: nn.Module, x: jax.Array) -> jax.Array:
  """The ``[rows, G, d_in]`` input vectors ``a`` a layer's kernel sees.

  The layer is found in the module's traced program, as MAC finds layers.

  Args:
    module: a bound or unbound linen layer (``nn.Dense``,
      ``nn.DenseGeneral``, ``nn.Conv`` of any rank, padding, strides,
      dilations and groups, or a module of its own with one kernel).
    x: the layer's input.

  Returns:
    One row per batch element and output position (im2col patches for a
    convolution, tokens for a Dense), ``G`` groups (one per kernel batch
    index or convolution group), ``d_in`` in the kernel's input order.

  Raises:
    ValueError: the module applies no kernel to `x`.
  """
  registry, kernel = _rows_of(module, x, keep_rows=True)
  return jnp.concatenate(registry.moment_rows[kernel], axis=0)


def batch_second_moment_sum(module: nn.Module, x: jax.Array,
                            has_bias: bool) -> tuple[jax.Array, jax.Array]:
  """``(Σ_rows a aᵀ [G, d, d], rows)`` of one batch, float32, jit-safe."""
  registry, kernel = _rows_of(module, x, keep_rows=False)
  aa, a, rows = registry.moment_sums[kernel]
  if has_bias:
    aa = _with_bias(aa, a, rows)
  return aa, rows.astype(jnp.int32)


def _with_bias(aa, a, rows):
  """``Σ ã ãᵀ`` of ``ã = (a, 1)`` from ``Σ a aᵀ``, ``Σ a`` and the rows."""
  top = jnp.concatenate([aa, a[..., :, None]], axis=-1)
  bottom = jnp.concatenate(
      [a, jnp.broadcast_to(rows, a.shape[:-1])[..., None]], axis=-1)
  return jnp.concatenate([top, bottom[..., None, :]], axis=-2)


# ----------------------------------------------------------- second moment --

def _default_inputs(batch: Any) -> Any:
  if isinstance(batch, (tuple, list)):
    return batch[0]
  if isinstance(batch, Mapping):
    for key in ('image', 'images', 'x', 'inputs'):
      if key in batch:
        return batch[key]
  return batch


def input_second_moment(
    model: nn.Module,
    variables: Any,
    batches: Iterable[Any],
    path: str,
    *,
    inputs_fn: Callable[[Any], Any] = _default_inputs,
    apply_kwargs: Optional[Mapping[str, Any]] = None,
    progress: bool = False,
    total: Optional[int] = None,
) -> SecondMoment:
  """``Σ = E[a aᵀ]`` of the inputs of the layer at ``path``, over a dataset.

  Streams: each batch runs the (jitted) forward pass, whose only output is
  the ``[G, d, d]`` sum of ``a aᵀ`` of that batch (XLA drops the rest of the
  model), accumulated in float64 on the host. No patches outlive a batch.

  Args:
    model: a linen module.
    variables: its variables (``{'params': ..., 'batch_stats': ...}``).
    batches: an iterable of batches (arrays, ``(x, y)`` tuples or dicts).
    path: the layer's module path, ``'Conv_0'`` or ``'Stem/Conv_0'``.
    inputs_fn: batch -> the model's positional input (default: ``batch[0]``
      of a tuple, ``batch['image']`` of a dict, else the batch itself).
    apply_kwargs: extra keyword arguments of ``model.apply`` (``train=False``).
    progress: show a progress bar; needs ``tqdm``, which is not a dependency
      of mac_optax (``pip install tqdm``).
    total: the number of batches, for the progress bar.

  Returns:
    A :class:`SecondMoment`; a bias coordinate is included when the layer has
    a ``bias`` parameter.

  Raises:
    ValueError: no layer's kernel at ``path`` is called outside
      scan/remat/cond (the message lists the layers that are), or
      ``batches`` is empty.
    ImportError: ``progress=True`` without ``tqdm`` installed.

  Example:
    >>> moment = input_second_moment(model, variables, loader, 'Conv_0')
    >>> moment.matrix.shape   # 3x3 stem on RGB, with bias
    (1, 28, 28)
  """
  key = _path_key(path)
  params = variables.get('params', {}) if isinstance(variables, Mapping) else {}
  apply_kwargs = dict(apply_kwargs or {})
  names = {statistics.join(p) for p in statistics.leaf_paths(params)}
  # The layer at `path`: the module's `kernel`, or the parameter itself.
  kernel = next((k for k in ('/'.join(filter(None, (key, 'kernel'))), key)
                 if k in names), None)
  found = {}

  @jax.jit
  def batch_sum(variables, x):
    registry = _with_moments(
        lambda p, x: model.apply({**variables, 'params': p}, x,
                                 **apply_kwargs),
        variables['params'], x, kernel)
    if kernel not in registry.moment_sums:
      layers = sorted(f.key for f in registry.layers())
      raise ValueError(
          f"mac: no layer whose kernel is '{kernel or key}' is called at "
          f"path '{key}' outside scan/remat/cond (the second moment needs "
          f'its input rows). Layers called in the forward pass: '
          f'{layers}.')
    found['bias'] = registry.found[kernel].bias_leaf is not None
    aa, a, rows = registry.moment_sums[kernel]
    if found['bias']:   # the bias is the input's trailing constant 1
      aa = _with_bias(aa, a, rows)
    return aa, rows

  iterator = iter(batches)
  if progress:
    try:
      import tqdm  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"mac: input_second_moment('{key}', progress=True) shows its "
          "progress bar with tqdm, which is not installed: `pip install "
          "tqdm`, or pass progress=False (the default).") from e
    iterator = tqdm.tqdm(iterator, total=total,
                         desc=f'second moment of {key}', leave=False)
  accumulated, rows = None, 0
  for batch in iterator:
    moment, count = batch_sum(variables, inputs_fn(batch))
    moment = np.asarray(moment, np.float64)
    accumulated = moment if accumulated is None else accumulated + moment
    rows += int(count)
  if accumulated is None or rows == 0:
    raise ValueError(f"mac: input_second_moment('{key}'): no batches.")
  return SecondMoment(accumulated / rows, rows, key, found['bias'])


# ---------------------------------------------------------- preconditioner --

FORMS = ('inverse', 'cholesky')


def exact_preconditioner(moment: SecondMoment, damping: float = 1.0, *,
                         form: str = 'inverse') -> dict[str, np.ndarray]:
  """The matrix ``P`` that left-multiplies the layer's ``Ĝ_aug``.

  ``form='inverse'``: ``P = (Σ + λI)⁻¹`` (default, the paper).
  ``form='cholesky'``: ``P = L⁻ᵀ`` with ``L Lᵀ = Σ + λI`` (a January 2025
  version of the authors' CIFAR code; their current code uses the inverse).

  Args:
    moment: from :func:`input_second_moment` (or built by hand).
    damping: ``λ > 0`` added to the diagonal.
    form: ``'inverse'`` or ``'cholesky'``.

  Returns:
    ``{moment.path: P}`` with ``P`` ``[G, d, d]`` float32, ready for
    ``mac(exact_layers=...)`` / ``mac_sgd(exact_layers=...)``.

  Raises:
    ValueError: ``form`` unknown, ``damping ≤ 0``, ``Σ`` not ``[G, d, d]``
      square and finite, or ``Σ + λI`` not positive definite.
  """
  if form not in FORMS:
    raise ValueError(f"mac: form must be one of {FORMS}, got '{form}'.")
  if not damping > 0:
    raise ValueError(f'mac: damping must be > 0, got {damping}.')
  sigma = np.asarray(moment.matrix, np.float64)
  if sigma.ndim == 2:
    sigma = sigma[None]
  if sigma.ndim != 3 or sigma.shape[-1] != sigma.shape[-2]:
    raise ValueError(f"mac: layer '{moment.path}': the second moment must be "
                     f'[G, d, d] or [d, d], got shape {sigma.shape}.')
  if not np.all(np.isfinite(sigma)):
    raise ValueError(f"mac: layer '{moment.path}': the second moment has "
                     'non-finite entries.')
  sigma = 0.5 * (sigma + np.swapaxes(sigma, -1, -2))
  damped = sigma + damping * np.eye(sigma.shape[-1])
  try:
    chol = np.linalg.cholesky(damped)
  except np.linalg.LinAlgError as e:
    raise ValueError(
        f"mac: layer '{moment.path}': Σ + λI is not positive definite "
        f'(λ={damping}); is Σ a second moment E[a aᵀ]?') from e
  eye = np.broadcast_to(np.eye(sigma.shape[-1]), sigma.shape)
  chol_inv = np.tril(np.linalg.solve(chol, eye))    # L⁻¹, lower triangular
  if form == 'cholesky':
    matrix = np.swapaxes(chol_inv, -1, -2)           # L⁻ᵀ
  else:
    matrix = np.swapaxes(chol_inv, -1, -2) @ chol_inv  # L⁻ᵀ L⁻¹
  return {moment.path: matrix.astype(np.float32)}


def exact_first_layer(model: nn.Module, variables: Any,
                      batches: Iterable[Any], path: str,
                      damping: float = 1.0, *, form: str = 'inverse',
                      **kwargs: Any) -> dict[str, np.ndarray]:
  """:func:`input_second_moment` then :func:`exact_preconditioner`, one call.

  Needs only mac_optax's own dependencies; ``progress=True`` (a progress bar
  over ``batches``) also needs ``tqdm``.

  Args:
    model: a linen module.
    variables: its variables (``{'params': ..., 'batch_stats': ...}``).
    batches: an iterable of batches, as for :func:`input_second_moment`.
    path: the layer's module path, ``'Conv_0'`` or ``'Stem/Conv_0'``.
    damping: ``λ > 0`` added to the diagonal of ``Σ``.
    form: ``'inverse'`` or ``'cholesky'`` (:func:`exact_preconditioner`).
    **kwargs: :func:`input_second_moment`'s keywords (``inputs_fn``,
      ``apply_kwargs``, ``progress``, ``total``).

  Returns:
    ``{path: P}``, ready for ``mac(exact_layers=...)``.

  Example:
    >>> exact = exact_first_layer(model, variables, train_batches, 'Conv_0')
    >>> tx = mac_optax.presets.cifar(total_steps, exact_layers=exact)
  """
  moment = input_second_moment(model, variables, batches, path, **kwargs)
  return exact_preconditioner(moment, damping, form=form)
