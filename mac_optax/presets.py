"""The authors' recipes as ready optimizers: ``mac_optax.presets.cifar``."""

from mac_optax._src.presets import cifar
from mac_optax._src.presets import imagenet
from mac_optax._src.presets import matrix_mask
from mac_optax._src.presets import nanogpt
from mac_optax._src.presets import not_norm_mask
from mac_optax._src.presets import RECIPES
from mac_optax._src.presets import STATIC_ARGS
from mac_optax._src.presets import vit

__all__ = ['RECIPES', 'STATIC_ARGS', 'cifar', 'imagenet', 'matrix_mask',
           'nanogpt', 'not_norm_mask', 'vit']
