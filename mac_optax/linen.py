"""Flax linen capture of MAC statistics: ``mac_optax.linen.capture()``."""

from mac_optax._src.linen_capture import capture
from mac_optax._src.linen_capture import input_mean
from mac_optax._src.linen_capture import intermediates_like
from mac_optax._src.linen_capture import sow_mean
from mac_optax._src.linen_attention import sow_attention

__all__ = ['capture', 'input_mean', 'intermediates_like', 'sow_attention',
           'sow_mean']
