"""Per-layer figures of the MAC preconditioner for logging (jit-safe)."""

from mac_optax._src.diagnostics import counters
from mac_optax._src.diagnostics import find_mac_state
from mac_optax._src.diagnostics import layer_figures
from mac_optax._src.diagnostics import LayerFigures
from mac_optax._src.diagnostics import summary

__all__ = ['LayerFigures', 'counters', 'find_mac_state', 'layer_figures',
           'summary']
