"""SMAC's probes: ``E_rows[g²]`` of every linen Dense/DenseGeneral/Einsum/Conv output.

See :func:`mac_optax.smac.scale_by_grad_sq` for the math; this is the linen side (a
custom-VJP identity on each layer output whose backward pass sends
``mean_rows(g²)`` to a zero probe variable created by ``Module.perturb``).
The layers follow MAC's layer model: a batched layer (``DenseGeneral`` with
``batch_dims``, an ``Einsum`` with batch letters) is one layer per batch
index, so its probe has one entry per batch index and output unit, laid out
like the kernel with 1 on the input axes (``kernel * probe`` scales it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import string
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mac_optax._src import capture_core
from mac_optax._src import einsum_layout
from mac_optax._src.smac import GRAD_SQ
from mac_optax._src.smac import PROBES


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How a layer's output cotangent reduces to its probe (static).

  ``y`` are the output's letters, ``z`` the kernel's non-input letters in
  kernel order (the output units, batch letters of an einsum included),
  ``shape`` the probe's shape: the kernel's, with 1 on its input axes where
  they are not trailing-broadcast away, so that ``kernel * probe`` scales
  each output unit of each batch index.
  """
  y: str
  z: str
  shape: tuple[int, ...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _probe(y: jax.Array, probe: jax.Array, spec: _Spec) -> jax.Array:
  """``y``, unchanged; its VJP sends ``mean_rows(g²)`` to ``probe``."""
  del probe, spec
  return y


def _probe_fwd(y, probe, spec):
  del probe, spec
  return y, None


def _probe_bwd(spec, residual, g):
  del residual
  g32 = g.astype(jnp.float32)
  summed = jnp.einsum(f'{spec.y}->{spec.z}', jnp.square(g32),
                      precision=jax.lax.Precision.HIGHEST)
  rows = max(g.size // max(summed.size, 1), 1)
  return g, (summed / rows).reshape(spec.shape)


_probe.defvjp(_probe_fwd, _probe_bwd)


def _trailing(y: jax.Array, n_out: int) -> _Spec:
  """Output units on the trailing `n_out` axes (Dense, Conv, DenseGeneral)."""
  letters = string.ascii_letters[:y.ndim]
  return _Spec(letters, letters[y.ndim - n_out:], y.shape[y.ndim - n_out:])


def _einsum_spec(layer: einsum_layout.EinsumLayer, where: str,
                 has_bias: bool) -> _Spec:
  """Output units of an einsum layer: its kernel's batch and output axes."""
  r = layer.roles
  if has_bias and list(r.bias_axes) != sorted(r.bias_axes):
    raise ValueError(
        f"smac: einsum layer '{where}' ({layer.x},{layer.w}->{layer.y}) has "
        'a bias whose axes are in another order than its kernel\'s: SMAC '
        'cannot scale it. Order the output letters like the kernel\'s, or '
        'build the layer without a bias.')
  z = ''.join(c for a, c in enumerate(layer.w) if a not in r.inputs)
  shape = tuple(1 if a in r.inputs else n
                for a, n in enumerate(r.kernel_shape))
  first = min(a for a in range(len(shape)) if a not in r.inputs)
  return _Spec(layer.y, z, shape[first:])


def _spec(module: nn.Module, args, kwargs, y: jax.Array) -> Optional[_Spec]:
  """The probe's reduction for a supported layer call, else None."""
  x = args[0] if args else kwargs.get('inputs')
  path = '/'.join(module.path)
  if isinstance(module, nn.Einsum):
    equation = args[1] if len(args) > 1 else kwargs.get('einsum_str')
    equation = module.einsum_str if equation is None else equation
    layer = einsum_layout.parse(equation, x.ndim, module.shape, path)
    return _einsum_spec(layer, path, module.use_bias)
  if isinstance(module, nn.DenseGeneral):
    features = _tuple(module.features)
    batch_dims = _tuple(module.batch_dims)
    if batch_dims:
      batch_dims = tuple(a % x.ndim for a in batch_dims)
      axis = tuple(a % x.ndim for a in _tuple(module.axis))
      equation = einsum_layout.dense_general_equation(
          x.ndim, batch_dims, axis, len(features))
      kernel_shape = (tuple(x.shape[a] for a in batch_dims)
                      + tuple(x.shape[a] for a in axis) + features)
      layer = einsum_layout.parse(equation, x.ndim, kernel_shape, path)
      return _einsum_spec(layer, path, module.use_bias)
    return _trailing(y, len(features))
  if isinstance(module, (nn.Dense, nn.Conv)):
    return _trailing(y, 1)
  return None


def _tuple(value) -> tuple:
  return (value,) if isinstance(value, int) else tuple(value)


def _interceptor(next_fun, args, kwargs, context):
  y = next_fun(*args, **kwargs)
  if context.method_name != '__call__' or not isinstance(y, jax.Array):
    return y
  spec = _spec(context.module, args, kwargs, y)
  if spec is None:
    return y
  zeros = jnp.zeros(spec.shape, jnp.float32)
  probe = context.module.perturb(GRAD_SQ, zeros, collection=PROBES)
  return _probe(y, probe, spec)


@contextlib.contextmanager
def capture() -> Iterator[None]:
  """Routes ``E_rows[g²]`` of every Dense/DenseGeneral/Einsum/Conv to its probe.

  Without ``'mac_probes'`` in the applied variables the probes are constant
  zeros and nothing changes. Nest with :func:`mac_optax.linen.capture`.
  """
  with nn.intercept_methods(_interceptor):
    yield


def probes_like(model: nn.Module, variables: Any, *args, **kwargs) -> Any:
  """Zero probes for :func:`capture`: pass them as ``'mac_probes'``.

  Args:
    model: the linen module.
    variables: its variables (``{'params': ...}``), arrays or shapes.
    *args: example inputs of ``model.apply`` (arrays or shapes; only shapes
      matter, the batch size does not; Python scalars stay static).
    **kwargs: keyword arguments of ``model.apply``.

  Returns:
    ``{path...: {'mac_grad_sq': zeros(output units)}}``, float32.
  """
  traced, rebuild = capture_core.static_scalars(args)

  def forward(variables, traced):
    with capture():
      _, state = model.apply(variables, *rebuild(traced), mutable=[PROBES],
                             **kwargs)
    return state.get(PROBES, {})

  shapes = jax.eval_shape(forward, variables, traced)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
