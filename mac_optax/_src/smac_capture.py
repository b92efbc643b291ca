"""SMAC's probes on a linen model: ``E_rows[g²]`` of every layer's output.

See :func:`mac_optax.smac.scale_by_grad_sq` for the math. Inside
:func:`capture`, the model's call is evaluated through the program
interpreter (the one MAC's capture uses; with both open, one evaluation
does both), which puts each probed layer's output through the custom-VJP
identity of ``grad_sq_probe``: its backward pass sends ``mean_rows(g²)`` to
the layer's zero probe in the ``'mac_probes'`` collection. The layers are
the program's (a kernel named ``kernel`` reaching a matrix product or a
convolution, whatever class applies it); :func:`probes_like` lays out one
probe per such layer from the plan.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import flax.linen as nn
import jax.numpy as jnp

from mac_optax._src import capture_core
from mac_optax._src import capture_linen
from mac_optax._src import grad_sq_probe
from mac_optax._src import statistics
from mac_optax._src.smac import GRAD_SQ

# The statistics whose layer has a `kernel` and a sibling `bias`, as
# `scale_by_grad_sq` scales them.
_PROBED = (statistics.MEAN, statistics.EINSUM_MEAN)


@contextlib.contextmanager
def capture() -> Iterator[None]:
  """Routes ``E_rows[g²]`` of every probed layer's output to its probe.

  Without ``'mac_probes'`` in the applied variables nothing changes. Nest
  with :func:`mac_optax.linen.capture` (either order).
  """
  with capture_core.probing_on(), nn.intercept_methods(
      capture_linen.interceptor):
    yield


def probes_like(model: nn.Module, variables: Any, *args, **kwargs) -> Any:
  """Zero probes for :func:`capture`: pass them as ``'mac_probes'``.

  One probe per layer of ``mac_optax.linen.plan(model, variables, *args)``
  whose kernel is a ``kernel`` parameter with its sibling ``bias`` (not an
  ``Embed`` table, not a layer sown by hand) and that is not stacked by a
  ``scan``: :func:`mac_optax.smac.unscaled_layers` names the others.

  Args:
    model: the linen module.
    variables: its variables (``{'params': ...}``), arrays or shapes.
    *args: example inputs of ``model.apply`` (arrays or shapes; only shapes
      matter, the batch size does not; Python scalars stay static).
    **kwargs: keyword arguments of ``model.apply``.

  Returns:
    ``{path...: {'mac_grad_sq': zeros(output units)}}``, float32.

  Raises:
    ValueError: an einsum layer's bias runs over its output axes in another
      order than its kernel's (SMAC scales the bias like the kernel).
  """
  plan = capture_linen.plan(model, variables, *args, **kwargs)
  probes: dict = {}
  for layer in plan.layers:
    layout = layer.layout
    if layer.statistic not in _PROBED or layout.stack:
      continue
    if layout.bias_axes is not None and list(layout.bias_axes) != sorted(
        layout.bias_axes):
      raise ValueError(
          f"smac: einsum layer '{layer.path}' has a bias whose axes are in "
          "another order than its kernel's: SMAC cannot scale it. Order the "
          "output letters like the kernel's, or build the layer without a "
          'bias.')
    node = probes
    for name in statistics.split(layer.path):
      node = node.setdefault(name, {})
    node[GRAD_SQ] = jnp.zeros(grad_sq_probe.probe_shape(layout), jnp.float32)
  return probes
