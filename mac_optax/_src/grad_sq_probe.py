"""SMAC's probe: ``E_rows[g²]`` of a layer's output cotangent, as a gradient.

A custom-VJP identity ``y ↦ y`` with a zero ``probe`` operand, whose backward
pass returns the cotangent ``g`` unchanged to ``y`` and ``mean_rows(g²)``
(float32, laid out like the kernel's output units) as the cotangent of
``probe``: differentiating the loss with respect to the probes gives SMAC's
statistics without materializing ``g``. Framework-free: the program
interpreter applies it to each probed layer's output.
"""

from __future__ import annotations

import dataclasses
import functools
import string

import jax
import jax.numpy as jnp

from mac_optax._src.layout import KernelLayout


@dataclasses.dataclass(frozen=True)
class Spec:
  """How a layer's output cotangent reduces to its probe (static).

  ``y`` are the output's letters, ``z`` the kernel's non-input letters in
  kernel order (the output units, batch axes included), ``shape`` the
  probe's shape: the kernel's, with 1 on its input axes, from its first
  non-input axis on, so that ``kernel * probe`` scales each output unit of
  each batch index.
  """
  y: str
  z: str
  shape: tuple[int, ...]


def probe_shape(layout: KernelLayout) -> tuple[int, ...]:
  """The probe of an unstacked layer: kernel shape, 1 on the input axes."""
  shape = tuple(1 if a in layout.inputs else n
                for a, n in enumerate(layout.shape))
  first = min(a for a in range(len(shape)) if a not in layout.inputs)
  return shape[first:]


def spec(layout: KernelLayout, output_axes: list) -> Spec:
  """The probe's reduction of an output whose axis ``i`` is kernel axis
  ``output_axes[i]`` (or None: a row axis).

  Raises:
    ValueError: a non-input kernel axis is not one axis of the output.
  """
  letters = iter(string.ascii_letters)
  kernel = [next(letters) for _ in layout.shape]
  y = ''.join(kernel[a] if a is not None else next(letters)
              for a in output_axes)
  z = ''.join(kernel[a] for a in range(len(layout.shape))
              if a not in layout.inputs)
  if any(c not in y for c in z):
    raise ValueError('its output does not hold each output axis of its '
                     'kernel as one axis')
  return Spec(y, z, probe_shape(layout))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def probe(y: jax.Array, zeros: jax.Array, spec_: Spec) -> jax.Array:
  """``y``, unchanged; its VJP sends ``mean_rows(g²)`` to ``zeros``."""
  del zeros, spec_
  return y


def _probe_fwd(y, zeros, spec_):
  del zeros, spec_
  return y, None


def _probe_bwd(spec_, residual, g):
  del residual
  g32 = g.astype(jnp.float32)
  summed = jnp.einsum(f'{spec_.y}->{spec_.z}', jnp.square(g32),
                      precision=jax.lax.Precision.HIGHEST)
  rows = max(g.size // max(summed.size, 1), 1)
  return g, (summed / rows).reshape(spec_.shape)


probe.defvjp(_probe_fwd, _probe_bwd)
