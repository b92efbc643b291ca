"""mac_optax: MAC (Mean Activation approximated Curvature) for Optax and Flax.

``import mac_optax`` does not import Flax: the optax transforms, the plan type
and the array functions work without it. The Flax-facing modules
(``mac_optax.linen``, ``mac_optax.nnx``, ``mac_optax.smac``,
``mac_optax.first_layer``) and ``mac_optax.TrainState`` are imported on first
use.
"""

import importlib

from mac_optax import attention
from mac_optax import diagnostics
from mac_optax import presets
from mac_optax._src.accumulation import multi_steps
from mac_optax._src.accumulation import MultiStepsMacState
from mac_optax._src.alias import mac_sgd
from mac_optax._src.layout import KernelLayout
from mac_optax._src.plan import LayerPlan
from mac_optax._src.plan import PassedParam
from mac_optax._src.plan import PlannedLayer
from mac_optax._src.program_plan import plan
from mac_optax._src.program_plan import with_statistics
from mac_optax._src.statistics import ATTEND_MEAN
from mac_optax._src.statistics import ATTENTION_MEAN
from mac_optax._src.statistics import EINSUM_MEAN
from mac_optax._src.statistics import LOOKUP_MEAN
from mac_optax._src.statistics import MEAN
from mac_optax._src.transform import LayerState
from mac_optax._src.transform import mac
from mac_optax._src.transform import MacState

__version__ = '0.1.0'

# name -> (module, attribute or None for the module itself); need Flax.
_LAZY = {
    'first_layer': ('mac_optax.first_layer', None),
    'linen': ('mac_optax.linen', None),
    'nnx': ('mac_optax.nnx', None),
    'smac': ('mac_optax.smac', None),
    'TrainState': ('mac_optax._src.train_state', 'TrainState'),
}


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module_name, attribute = _LAZY[name]
  module = importlib.import_module(module_name)
  value = module if attribute is None else getattr(module, attribute)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))


__all__ = [
    'ATTEND_MEAN',
    'ATTENTION_MEAN',
    'EINSUM_MEAN',
    'KernelLayout',
    'LayerPlan',
    'LayerState',
    'LOOKUP_MEAN',
    'MEAN',
    'MacState',
    'MultiStepsMacState',
    'PassedParam',
    'PlannedLayer',
    'TrainState',
    'attention',
    'diagnostics',
    'first_layer',
    'linen',
    'mac',
    'mac_sgd',
    'multi_steps',
    'nnx',
    'plan',
    'presets',
    'smac',
    'with_statistics',
]
