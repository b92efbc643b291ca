"""Flax linen capture of MAC statistics: ``mac_optax.linen.capture()``.

Example:
  >>> plan = mac_optax.linen.plan(model, variables, x[:1])
  >>> print(plan)                                  # the coverage table
  >>> tx = mac_optax.mac_sgd(0.1, momentum=0.9, plan=plan)
  >>> with mac_optax.linen.capture():
  ...   out, v = model.apply(variables, x, mutable=['intermediates'])
"""

from mac_optax._src.capture_linen import capture
from mac_optax._src.capture_linen import input_mean
from mac_optax._src.capture_linen import intermediates_like
from mac_optax._src.capture_linen import plan
from mac_optax._src.capture_linen import sow_attention
from mac_optax._src.capture_linen import sow_mean

__all__ = ['capture', 'input_mean', 'intermediates_like', 'plan',
           'sow_attention', 'sow_mean']
