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
  _, inter = mac_optax.nnx.capture(net)(x)
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
  # One mixed mean per kv head: over the 4 query heads reading it.
  b, h, n = p.shape[:3]
  expected = np.einsum('bgrij,bjd->gd', p.reshape(b, 2, h // 2, n, n),
                       np.asarray(x, np.float64)) / (b * (h // 2) * n)
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------- hand-written GQA, sow_attention
#
# Einsum projections: queries (D, H, hd), a fused key/value (D, 2, K, hd)
# whose first output axis splits into the 'k' and 'v' column groups. Query
# head h reads kv head h // (H / K).
import flax.linen as nn  # noqa: E402

D, H, K, HD, N = 8, 8, 2, 2, 5
DAMPING = 0.5


def _gqa_probs(x, q, k):
  """Causal probabilities [B, H, N, N] from per-head q [B,N,H,hd], k [B,N,K,hd]."""
  k = jnp.repeat(k, H // K, axis=2)
  s = jnp.einsum('bink,bjnk->bnij', q, k) / np.sqrt(q.shape[-1])
  n = q.shape[1]
  return jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -1e9))


def _gqa_out(p, v):
  return jnp.einsum('bnij,bjnk->bink', p, jnp.repeat(v, H // K, axis=2))


class _LinenGQA(nn.Module):

  @nn.compact
  def __call__(self, x):
    q = nn.Einsum((D, H, HD), 'btd,dnh->btnh', name='q')(x)
    kv_proj = nn.Einsum((D, 2, K, HD), 'btd,dckh->cbtkh', name='kv')
    k, v = kv_proj(x)
    p = _gqa_probs(x, q, k)
    mac_optax.linen.sow_attention(kv_proj, x, probs=p, columns='kv')
    return nn.Einsum((H, HD, D), 'btnh,nhd->btd', name='o')(_gqa_out(p, v))


class _NnxGQA(nnx.Module):

  def __init__(self, rngs):
    self.q = nnx.Einsum('btd,dnh->btnh', (D, H, HD), (H, HD), rngs=rngs)
    self.kv = nnx.Einsum('btd,dckh->cbtkh', (D, 2, K, HD), (2, K, HD),
                         rngs=rngs)
    self.o = nnx.Einsum('btnh,nhd->btd', (H, HD, D), (D,), rngs=rngs)

  def __call__(self, x):
    q = self.q(x)
    k, v = self.kv(x)
    p = _gqa_probs(x, q, k)
    mac_optax.nnx.sow_attention(self.kv, x, probs=p, columns='kv')
    return self.o(_gqa_out(p, v))


def _gqa_reference(x, params):
  """``[2, D]``: x̄ for the key group, E_{b,h,i}[Σ_j P_bhij x_bj] for values."""
  with reference.x64():
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    xd = f64(x)
    q = jnp.einsum('btd,dnh->btnh', xd, f64(params['q']['kernel'])) + f64(
        params['q']['bias'])
    kv = jnp.einsum('btd,dckh->cbtkh', xd, f64(params['kv']['kernel'])) + (
        f64(params['kv']['bias'])[:, None, None])
    p = np.asarray(_gqa_probs(xd, q, kv[0]))
  xn = np.asarray(x, np.float64)
  mixed = np.einsum('bhij,bjd->d', p, xn) / (p.shape[0] * H * p.shape[2])
  return np.stack([xn.mean((0, 1)), mixed])


def _check_kv_update(stat, grads, updates):
  """Key columns with x̄, value columns with the mixed mean: explicit inverses."""
  g_k = np.asarray(grads['kernel'], np.float64).reshape(D, 2 * K * HD)
  g_b = np.asarray(grads['bias'], np.float64).reshape(2 * K * HD)
  rows = np.repeat(np.concatenate([stat, np.ones((2, 1))], axis=1),
                   K * HD, axis=0)
  u_k, u_b = reference.dense_update(g_k, g_b, rows, DAMPING)
  np.testing.assert_allclose(
      np.asarray(updates['kernel']).reshape(u_k.shape), u_k, rtol=2e-4,
      atol=1e-6)
  np.testing.assert_allclose(np.asarray(updates['bias']).reshape(u_b.shape),
                             u_b, rtol=2e-4, atol=1e-6)


def _mac_update(plan, params, inter):
  rng = np.random.default_rng(1)
  grads = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
  tx = mac_optax.mac(DAMPING, 0.0, plan=plan)
  updates, _ = tx.update(grads, tx.init(params), params, intermediates=inter)
  return grads, updates


def test_hand_written_gqa_sow_attention_linen_and_nnx():
  x = jax.random.normal(jax.random.key(0), (2, N, D))
  model = _LinenGQA()
  variables = model.init(jax.random.key(1), x)
  params = variables['params']
  plan = mac_optax.linen.plan(model, variables, x)
  assert plan['kv'].statistic == mac_optax.ATTENTION_MEAN
  assert plan['kv'].layout.stat_shape == (2, D)
  assert plan.fraction == 1.0
  with mac_optax.linen.capture():
    _, v = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))(
        variables, x)
  inter = v['intermediates']
  (stat,) = inter['kv'][mac_optax.ATTENTION_MEAN]
  expected = _gqa_reference(x, params)
  # Mixing over all 8 query heads moves the value group's mean.
  assert np.abs(expected[1] - expected[0]).max() > 1e-2
  np.testing.assert_allclose(stat, expected, rtol=1e-5, atol=1e-6)
  grads, updates = _mac_update(plan, params, inter)
  _check_kv_update(expected, grads['kv'], updates['kv'])

  net = _NnxGQA(nnx.Rngs(0))
  for name in ('q', 'kv', 'o'):
    layer = getattr(net, name)
    layer.kernel[...] = params[name]['kernel']
    layer.bias[...] = params[name]['bias']
  nnx_plan = mac_optax.nnx.plan(net, x)
  assert nnx_plan['kv'].statistic == mac_optax.ATTENTION_MEAN
  _, nnx_inter = mac_optax.nnx.capture(net)(x)
  (nnx_stat,) = nnx_inter['kv'][mac_optax.ATTENTION_MEAN]
  np.testing.assert_allclose(nnx_stat, expected, rtol=1e-5, atol=1e-6)
  nnx_params = nnx.state(net, nnx.Param)
  grads, updates = _mac_update(nnx_plan, nnx_params, nnx_inter)
  _check_kv_update(expected, grads['kv'], updates['kv'])


# ------------------------------------------------------------- normalize_qk


def _layer_norm(t, scale):
  mu = t.mean(-1, keepdims=True)
  var = ((t - mu) ** 2).mean(-1, keepdims=True)
  return (t - mu) / np.sqrt(var + 1e-6) * scale


def _normalized_mixed_mean(x, p):
  """The value's mixed mean with LayerNorm on q and k, explicit float64."""
  f = lambda a: np.asarray(a, np.float64)
  xd = f(x)
  proj = lambda m: np.einsum('bnd,dhk->bnhk', xd, f(m['kernel'])) + f(
      m['bias'])
  q = _layer_norm(proj(p['query']), f(p['query_ln']['scale']))
  k = _layer_norm(proj(p['key']), f(p['key_ln']['scale']))
  s = np.einsum('bihd,bjhd->bhij', q, k) / np.sqrt(q.shape[-1])
  s = s - s.max(-1, keepdims=True)
  probs = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
  plain = np.einsum('bhij,bjd->hd', np.ones_like(probs) / probs.shape[-1],
                    xd)
  mixed = np.einsum('bhij,bjd->hd', probs, xd)       # per head
  n = probs.shape[0] * probs.shape[2]
  return mixed / n, plain / n


def _scaled(tree, seed):
  """LayerNorm scales away from one, so that they matter."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(rng.uniform(0.5, 3.0, a.shape), a.dtype)
      if 'scale' in jax.tree_util.keystr(path) else a, tree)


def test_normalize_qk_linen_and_nnx_value_mean_matches_explicit_probs():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(4, normalize_qk=True,
                                             name='attn')(x)

  model = Net()
  params = _scaled(model.init(jax.random.key(1), x)['params'], 2)
  with mac_optax.linen.capture():
    _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  (value,) = v['intermediates']['attn']['value'][mac_optax.MEAN]
  expected, plain = _normalized_mixed_mean(x, params['attn'])
  assert np.abs(expected - plain).max() > 1e-2
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
  plan = mac_optax.linen.plan(model, {'params': params}, x)
  assert plan['attn/value'].kind == 'attention_value'

  class NnxNet(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.MultiHeadAttention(4, 16, normalize_qk=True,
                                         decode=False, rngs=rngs)

    def __call__(self, x):
      return self.attn(x)

  net = NnxNet(nnx.Rngs(0))
  graphdef, state = nnx.split(net)
  net = nnx.merge(graphdef, _scaled(state, 3))
  _, inter = mac_optax.nnx.capture(net)(x)
  (value,) = inter['attn']['value'][mac_optax.MEAN]
  params = nnx.state(net, nnx.Param)
  to_pure = getattr(nnx, 'to_pure_dict', lambda s: s.to_pure_dict())
  pure = jax.tree_util.tree_map(np.asarray, to_pure(params))
  expected, _ = _normalized_mixed_mean(x, pure['attn'])
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
  assert mac_optax.nnx.plan(net, x)['attn/value'].kind == 'attention_value'
