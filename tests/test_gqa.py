"""Grouped-query attention (nnx.MultiHeadAttention(num_kv_heads=...)).

The value projection's input is shared by every query head, so its
attention-mixed mean ``E_{b,h,i}[Σ_j P_bhij x_bj]`` averages over all query
heads; the reference materializes the probabilities explicitly (float64,
query head ``h`` reading kv head ``h // (H / H_kv)``).
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
from tests import reference


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(8, 16, qkv_features=16, num_kv_heads=2,
                                       decode=False, rngs=rngs)

  def __call__(self, x):
    return self.attn(x)


def test_gqa_8_query_heads_2_kv_heads_value_mean_matches_explicit_probs():
  if 'num_kv_heads' not in nnx.MultiHeadAttention.__init__.__code__.co_varnames:
    pytest.skip('this Flax has no num_kv_heads')
  net = _Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  with mac_optax.nnx.capture():
    _, inter = nnx.capture(net, nnx.Intermediate)(x)
  (value,) = inter['attn']['value'][mac_optax.MEAN]
  plan = mac_optax.nnx.plan(net, x)
  assert plan['attn/value'].kind == 'attention_value'

  a = net.attn
  with reference.x64():
    xd = jnp.asarray(x, jnp.float64)
    proj = lambda m: jnp.einsum('bnd,dhk->bnhk', xd,
                                jnp.asarray(m.kernel[...], jnp.float64)) + (
                                    jnp.asarray(m.bias[...], jnp.float64))
    q, k = proj(a.query), proj(a.key)
    k = jnp.repeat(k, 4, axis=2)   # query head h reads kv head h // 4
    s = jnp.einsum('bihd,bjhd->bhij', q, k) / np.sqrt(q.shape[-1])
    p = np.asarray(jax.nn.softmax(s, axis=-1))
  expected = np.einsum('bhij,bjd->d', p, np.asarray(x, np.float64)) / (
      p.shape[0] * p.shape[1] * p.shape[2])
  np.testing.assert_allclose(value[0], expected, rtol=1e-5, atol=1e-6)
