"""The paper's exact first layer: ``mac_optax.first_layer.exact_first_layer``."""

from mac_optax._src.second_moment import batch_second_moment_sum
from mac_optax._src.second_moment import exact_first_layer
from mac_optax._src.second_moment import exact_preconditioner
from mac_optax._src.second_moment import input_second_moment
from mac_optax._src.second_moment import layer_inputs
from mac_optax._src.second_moment import SecondMoment

__all__ = [
    'SecondMoment',
    'batch_second_moment_sum',
    'exact_first_layer',
    'exact_preconditioner',
    'input_second_moment',
    'layer_inputs',
]
