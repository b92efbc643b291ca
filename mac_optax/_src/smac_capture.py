"""SMAC's probes: ``E_rows[g²]`` of every linen Dense/DenseGeneral/Conv output.

See :func:`mac_optax.smac.scale_by_grad_sq` for the math; this is the linen side (a
custom-VJP identity on each layer output whose backward pass sends
``mean_rows(g²)`` to a zero probe variable created by ``Module.perturb``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mac_optax._src.smac import GRAD_SQ
from mac_optax._src.smac import PROBES


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _probe(y: jax.Array, probe: jax.Array, n_out: int) -> jax.Array:
  """``y``, unchanged; its VJP sends ``mean_rows(g²)`` to ``probe``."""
  del probe, n_out
  return y


def _probe_fwd(y, probe, n_out):
  del probe, n_out
  return y, None


def _probe_bwd(n_out, residual, g):
  del residual
  g32 = g.astype(jnp.float32)
  rows = g32.reshape((-1,) + g.shape[g.ndim - n_out:])
  return g, jnp.mean(jnp.square(rows), axis=0)


_probe.defvjp(_probe_fwd, _probe_bwd)


def _output_axes(module: nn.Module) -> Optional[int]:
  """Number of trailing output-unit axes of a supported layer, else None."""
  if isinstance(module, nn.DenseGeneral):
    features = module.features
    return 1 if isinstance(features, int) else len(features)
  if isinstance(module, (nn.Dense, nn.Conv)):
    return 1
  return None


def _interceptor(next_fun, args, kwargs, context):
  y = next_fun(*args, **kwargs)
  n_out = _output_axes(context.module) if context.method_name == '__call__' \
      else None
  if n_out is None or not isinstance(y, jax.Array):
    return y
  zeros = jnp.zeros(y.shape[y.ndim - n_out:], jnp.float32)
  probe = context.module.perturb(GRAD_SQ, zeros, collection=PROBES)
  return _probe(y, probe, n_out)


@contextlib.contextmanager
def capture() -> Iterator[None]:
  """Routes ``E_rows[g²]`` of every Dense/DenseGeneral/Conv to its probe.

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
      matter, the batch size does not).
    **kwargs: keyword arguments of ``model.apply``.

  Returns:
    ``{path...: {'mac_grad_sq': zeros(output units)}}``, float32.
  """
  def forward(variables, *args):
    with capture():
      _, state = model.apply(variables, *args, mutable=[PROBES], **kwargs)
    return state.get(PROBES, {})

  shapes = jax.eval_shape(forward, variables, *args)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
