"""Attention statistics as pure array functions (framework-agnostic).

Used by ``mac_optax.linen.capture()`` and ``mac_optax.linen.sow_attention``,
and reusable from NNX or any hand-written attention: reduce probabilities to
per-key weights, mix the value input, build the ``[3, D]`` statistic of a
fused qkv projection, get the weights of a flash kernel.
"""

from mac_optax._src.attention import grouped_statistic
from mac_optax._src.attention import key_weights
from mac_optax._src.attention import key_weights_from_attention
from mac_optax._src.attention import mixed_mean
from mac_optax._src.attention import token_frequencies

__all__ = ['grouped_statistic', 'key_weights', 'key_weights_from_attention',
           'mixed_mean', 'token_frequencies']
