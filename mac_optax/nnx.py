"""Flax NNX capture of MAC statistics: ``mac_optax.nnx.capture(model)``.

Example:
  >>> plan = mac_optax.nnx.plan(model, x[:1])
  >>> print(plan)                                  # the coverage table
  >>> optimizer = nnx.Optimizer(
  ...     model, mac_optax.mac_sgd(0.1, momentum=0.9, plan=plan), wrt=nnx.Param)
  >>> @nnx.jit
  ... def train_step(model, optimizer, x, y):
  ...   def loss_fn(model):
  ...     logits, inter = mac_optax.nnx.capture(model)(x)   # unmodified model
  ...     return loss(logits, y), inter
  ...   (l, inter), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  ...   optimizer.update(model, grads, intermediates=inter)
  ...   return l
"""

from mac_optax._src.capture_nnx import capture
from mac_optax._src.capture_nnx import input_mean
from mac_optax._src.capture_nnx import intermediates_like
from mac_optax._src.capture_nnx import plan
from mac_optax._src.capture_nnx import sow_attention
from mac_optax._src.capture_nnx import sow_mean

__all__ = ['capture', 'input_mean', 'intermediates_like', 'plan',
           'sow_attention', 'sow_mean']
