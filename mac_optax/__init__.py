"""mac_optax: MAC (Mean Activation approximated Curvature) for Optax and Flax."""

from mac_optax import attention
from mac_optax import diagnostics
from mac_optax import first_layer
from mac_optax import linen
from mac_optax import nnx
from mac_optax import presets
from mac_optax import smac
from mac_optax._src.accumulation import multi_steps
from mac_optax._src.accumulation import MultiStepsMacState
from mac_optax._src.alias import mac_sgd
from mac_optax._src.statistics import ATTEND_MEAN
from mac_optax._src.statistics import LOOKUP_MEAN
from mac_optax._src.statistics import MEAN
from mac_optax._src.train_state import TrainState
from mac_optax._src.transform import LayerState
from mac_optax._src.transform import mac
from mac_optax._src.transform import MacState

__version__ = '0.1.0'

__all__ = [
    'ATTEND_MEAN',
    'LayerState',
    'LOOKUP_MEAN',
    'MEAN',
    'MacState',
    'MultiStepsMacState',
    'TrainState',
    'attention',
    'diagnostics',
    'first_layer',
    'linen',
    'mac',
    'mac_sgd',
    'multi_steps',
    'nnx',
    'presets',
    'smac',
]
