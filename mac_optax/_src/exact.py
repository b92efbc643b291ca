"""Layers preconditioned with a fixed matrix: ``Ĝ_aug ← P Ĝ_aug`` (pure jnp).

The paper's exact first layer uses ``P = (Σ + λI)⁻¹`` of the layer's full
input second moment (or ``L⁻ᵀ`` with ``L Lᵀ = Σ + λI``), computed once before
training (:func:`mac_optax.first_layer.exact_first_layer`). ``Ĝ_aug`` is the kernel
gradient laid out ``(d_in, d_out)`` with the bias gradient as an extra row;
a layer with ``G`` column groups has one ``P_g`` per group, ``P`` is
``[G, d, d]`` with ``d = d_in (+1 with a bias)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mac_optax._src import statistics
from mac_optax._src.layout import KernelLayout
from mac_optax._src.layout import LayoutError


def path_key(path) -> str:
  return path if isinstance(path, str) else '/'.join(path)


def check_exact_layers(exact_layers: Optional[Mapping[str, Any]]
                       ) -> dict[str, np.ndarray]:
  """Validates ``mac(exact_layers=...)``: ``{path: P [G, d, d] or [d, d]}``.

  Each ``P`` must be concrete, finite, and either symmetric positive definite
  (``(Σ+λI)⁻¹``) or upper triangular with a positive diagonal (``L⁻ᵀ``).

  Raises:
    ValueError: naming the path, for any other matrix.
  """
  checked = {}
  for path, matrix in (exact_layers or {}).items():
    key = path_key(path)
    try:
      p = np.asarray(matrix, np.float64)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
      raise ValueError(f"mac: exact_layers['{key}'] must be a concrete "
                       'array.') from e
    if p.ndim == 2:
      p = p[None]
    if p.ndim != 3 or p.shape[-1] != p.shape[-2] or p.shape[-1] < 1:
      raise ValueError(f"mac: exact_layers['{key}'] must be a square [d, d] "
                       f'or [G, d, d] matrix, got shape {p.shape}.')
    if not np.all(np.isfinite(p)):
      raise ValueError(f"mac: exact_layers['{key}'] has non-finite entries.")
    scale = max(np.abs(p).max(), 1e-30)
    symmetric = np.allclose(p, np.swapaxes(p, -1, -2), atol=1e-5 * scale)
    upper = np.allclose(np.tril(p, -1), 0)
    diagonal = np.diagonal(p, axis1=-2, axis2=-1)
    if symmetric:
      if np.linalg.eigvalsh(0.5 * (p + np.swapaxes(p, -1, -2))).min() <= 0:
        raise ValueError(f"mac: exact_layers['{key}'] is symmetric but not "
                         'positive definite.')
    elif not (upper and np.all(diagonal > 0)):
      raise ValueError(
          f"mac: exact_layers['{key}'] must be symmetric positive definite "
          '((Σ+λI)⁻¹) or upper triangular with a positive diagonal (L⁻ᵀ).')
    checked[key] = np.asarray(matrix, np.float32).reshape(p.shape)
  return checked


def _find(key: str, paths: dict) -> tuple[int, Optional[int]]:
  path = statistics.split(key)   # '' is the root module
  kernel_index = paths.get(path + ('kernel',))
  if kernel_index is None:
    layers = sorted('/'.join(p[:-1]) for p in paths if p[-1:] == ('kernel',))
    raise ValueError(
        f"mac: exact_layers['{key}'] is not a layer: no parameter "
        f"'{key}/kernel'. Layers with a kernel: {layers}.")
  return kernel_index, paths.get(path + ('bias',))


def layout_for(key: str, matrix_shape, kernel_shape,
               bias_shape) -> KernelLayout:
  """The layout of an exact layer's kernel (no stack or batched axes)."""
  groups, d = matrix_shape[0], matrix_shape[-1]
  d_in = d - int(bias_shape is not None)
  try:
    layout = KernelLayout.from_statistic((groups, d_in), kernel_shape,
                                         bias_shape)
  except LayoutError as e:
    raise ValueError(
        f"mac: exact_layers['{key}']: a matrix of shape "
        f'{tuple(matrix_shape)} does not fit the kernel of shape '
        f"{tuple(kernel_shape)}{' with a bias' if bias_shape else ''}: "
        'expected [G, d, d] with d = prod(kernel input axes)'
        + (' + 1' if bias_shape else '') + f' ({e})') from None
  return layout


def check_fits(exact: dict[str, np.ndarray], params: Any) -> None:
  """Raises ValueError if an exact matrix does not fit its layer in `params`."""
  if not exact or params is None:
    return
  leaves = jax.tree_util.tree_leaves(params)
  paths = statistics.leaf_paths(params)
  for key, matrix in exact.items():
    kernel_index, bias_index = _find(key, paths)
    layout_for(key, matrix.shape, np.shape(leaves[kernel_index]),
               None if bias_index is None else np.shape(leaves[bias_index]))


def precondition_exact(exact: dict[str, np.ndarray], updates: Any,
                       leaves: list) -> None:
  """``Ĝ_aug ← P Ĝ_aug`` for every exact layer, in place on the flat `leaves`.

  For group ``g``: ``[K_g; b_g] ← P_g [K_g; b_g]`` with ``K_g`` the kernel
  gradient's ``(d_in, d_out_g)`` slice and ``b_g`` its bias row.
  """
  if not exact:
    return
  paths = statistics.leaf_paths(updates)
  for key, matrix in exact.items():
    kernel_index, bias_index = _find(key, paths)
    kernel = leaves[kernel_index]
    bias = None if bias_index is None else leaves[bias_index]
    layout = layout_for(key, matrix.shape, kernel.shape,
                        None if bias is None else bias.shape)
    d_in, groups = layout.d_in, layout.column_groups
    # The first layer is small and unsharded in practice: flattening its
    # input axes is cheap here, unlike in the rank-one apply.
    g_aug = kernel.astype(jnp.float32).reshape(d_in, groups, -1)
    if bias is not None:
      g_aug = jnp.concatenate(
          [g_aug, bias.astype(jnp.float32).reshape(1, groups, -1)], axis=0)
    new = jnp.einsum('gij,jgo->igo', jnp.asarray(matrix), g_aug,
                     precision=jax.lax.Precision.HIGHEST)
    leaves[kernel_index] = new[:d_in].reshape(kernel.shape).astype(
        kernel.dtype)
    if bias is not None:
      leaves[bias_index] = new[d_in].reshape(bias.shape).astype(bias.dtype)

