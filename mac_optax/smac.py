"""SMAC: the diagonal gradient-side factor, ``mac_optax.smac.scale_by_grad_sq``."""

from mac_optax._src.smac_capture import capture
from mac_optax._src.smac import GRAD_SQ
from mac_optax._src.smac_capture import probes_like
from mac_optax._src.smac import PROBES
from mac_optax._src.smac import scale_by_grad_sq
from mac_optax._src.smac import SmacLayerState
from mac_optax._src.smac import SmacState
from mac_optax._src.smac import unscaled_layers

__all__ = [
    'GRAD_SQ',
    'PROBES',
    'SmacLayerState',
    'SmacState',
    'capture',
    'probes_like',
    'scale_by_grad_sq',
    'unscaled_layers',
]
