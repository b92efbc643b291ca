"""The paper's exact first layer: ``mac_optax.first_layer.exact_first_layer``."""

from mac_optax._src.first_layer import batch_second_moment_sum
from mac_optax._src.first_layer import exact_first_layer
from mac_optax._src.first_layer import exact_preconditioner
from mac_optax._src.first_layer import input_second_moment
from mac_optax._src.first_layer import layer_inputs
from mac_optax._src.first_layer import SecondMoment

__all__ = [
    'SecondMoment',
    'batch_second_moment_sum',
    'exact_first_layer',
    'exact_preconditioner',
    'input_second_moment',
    'layer_inputs',
]
