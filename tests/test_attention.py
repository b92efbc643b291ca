"""Attention-aware MAC: statistics and updates against dense references.

The references materialize the attention probabilities explicitly in numpy
(float64) from the parameters, form ``ā`` of every projection by hand and
apply ``λ (ā āᵀ + λI)⁻¹ Ĝ`` with an explicit inverse
(:func:`tests.reference.dense_update`).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
from mac_optax import linen as mac_linen
from tests import reference

B, N, NK, D, H = 2, 5, 4, 8, 2
DAMPING = 0.5


def _rng(seed=0):
  return np.random.default_rng(seed)


def _softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def _project(x, p):
  return np.einsum('bnd,dhk->bnhk', x, p['kernel']) + p['bias']


def _init(model, *args):
  """Parameters from a jitted init (eager init dispatches many small ops)."""
  init = jax.jit(lambda key: model.init(key, *args)['params'])
  return init(jax.random.PRNGKey(0))


def _np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _reference_means(params, xq, xkv, mask):
  """Plain, mixed and output-input means of an MHA, from explicit ``P``.

  ``[G, D]`` each: the value's mixed mean per head (its kernel's columns
  ``(h, :)`` serve head h), the others one group.
  """
  p = _np(params)
  q, k = _project(xq, p['query']), _project(xkv, p['key'])
  v = _project(xkv, p['value'])
  s = np.einsum('bihk,bjhk->bhij', q, k) / np.sqrt(q.shape[-1])
  probs = _softmax(np.where(mask, s, -1e30))                   # [B,H,Nq,Nk]
  mixed = np.einsum('bhij,bjd->bhid', probs, xkv).mean((0, 2))   # [H, D]
  out_in = np.einsum('bhij,bjhk->bihk', probs, v).mean((0, 1))
  return {'query': xq.mean((0, 1))[None], 'key': xkv.mean((0, 1))[None],
          'value': mixed, 'out': out_in.reshape(1, -1)}, probs


def _step(model, params, args, capture_kwargs=None, apply_kwargs=None):
  """Captured loss gradient and one MAC update (first step: batch means)."""
  apply_kwargs = apply_kwargs or {}

  def loss(params):
    with mac_linen.capture(**(capture_kwargs or {})):
      out, v = model.apply({'params': params}, *args,
                           mutable=['intermediates'], **apply_kwargs)
    return jnp.sum(out * jnp.cos(out)), v['intermediates']

  def step(params):
    grads, inter = jax.grad(loss, has_aux=True)(params)
    tx = mac_optax.mac(DAMPING, 0.95)
    updates, _ = tx.update(grads, tx.init(params), params,
                           intermediates=inter)
    return grads, inter, updates

  return jax.jit(step)(params)


def _stats(model, params, args, capture_kwargs=None, apply_kwargs=None):
  """Captured intermediates of a jitted forward pass (no gradient)."""

  def forward(params):
    with mac_linen.capture(**(capture_kwargs or {})):
      _, v = model.apply({'params': params}, *args, mutable=['intermediates'],
                         **(apply_kwargs or {}))
    return v['intermediates']

  return jax.jit(forward)(params)


def _check_update(grads, updates, mean, rtol=2e-4):
  """Layer update vs the explicit inverse; ``mean`` ``[G, d_in]``: column c
  of the ``(d_in, d_out)`` kernel uses group ``c // (d_out / G)``."""
  g_k, g_b = np.asarray(grads['kernel']), np.asarray(grads['bias'])
  d_out = g_b.size
  mean = np.atleast_2d(mean)
  width = d_out // len(mean)
  rows = np.stack([np.append(mean[c // width], 1.0) for c in range(d_out)])
  u_k, u_b = reference.dense_update(g_k.reshape(mean.shape[1], d_out), g_b,
                                    rows, DAMPING)
  np.testing.assert_allclose(updates['kernel'].reshape(u_k.shape), u_k,
                             rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(updates['bias'], u_b, rtol=rtol, atol=1e-6)


def _check_attention_layer(grads, inter, updates, means):
  for name in ('query', 'key', 'value', 'out'):
    stat = inter[name][mac_optax.MEAN]
    assert len(stat) == 1, name                  # the value sows once
    np.testing.assert_allclose(stat[0], means[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)
    _check_update(grads[name], updates[name], means[name])


class CausalSelf(nn.Module):

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    return nn.MultiHeadDotProductAttention(num_heads=H, name='attn')(
        x, mask=mask)


def test_causal_self_attention_matches_dense_reference():
  x = jnp.asarray(_rng().normal(size=(B, N, D)), jnp.float32)
  model = CausalSelf()
  params = _init(model, x)
  grads, inter, updates = _step(model, params, (x,))
  mask = np.tril(np.ones((N, N), bool))[None, None]
  means, _ = _reference_means(params['attn'], np.asarray(x, np.float64),
                              np.asarray(x, np.float64), mask)
  # The mixed mean differs from the plain one: the test can fail.
  assert np.abs(means['value'] - means['key']).max() > 1e-2
  _check_attention_layer(grads['params']['attn'] if 'params' in grads
                         else grads['attn'], inter['attn'], updates['attn'],
                         means)


class Cross(nn.Module):

  @nn.compact
  def __call__(self, xq, xkv, mask):
    return nn.MultiHeadDotProductAttention(num_heads=H, name='attn')(
        xq, xkv, mask=mask)


def test_cross_attention_with_padding_mask_matches_dense_reference():
  rng = _rng(1)
  xq = jnp.asarray(rng.normal(size=(B, N, D)), jnp.float32)
  xkv = jnp.asarray(rng.normal(size=(B, NK, D)) + 1.0, jnp.float32)
  valid = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)       # key padding
  mask = jnp.asarray(np.broadcast_to(valid[:, None, None, :], (B, 1, N, NK)))
  model = Cross()
  params = _init(model, xq, xkv, mask)
  grads, inter, updates = _step(model, params, (xq, xkv, mask))
  means, probs = _reference_means(params['attn'], np.asarray(xq, np.float64),
                                  np.asarray(xkv, np.float64),
                                  np.asarray(mask))
  assert np.all(probs[..., ~valid[1]][1] < 1e-12)          # padding unused
  _check_attention_layer(grads['attn'], inter['attn'], updates['attn'], means)


def test_product_of_means_matches_its_formula():
  x = jnp.asarray(_rng(2).normal(size=(B, N, D)) ** 2, jnp.float32)
  model = CausalSelf()
  params = _init(model, x)
  inter = _stats(model, params, (x,),
                 capture_kwargs={'attention': 'product_of_means'})
  mask = np.tril(np.ones((N, N), bool))[None, None]
  means, probs = _reference_means(params['attn'], np.asarray(x, np.float64),
                                  np.asarray(x, np.float64), mask)
  w = probs.mean((0, 2))                                      # [H, Nk]
  x_bar = np.asarray(x, np.float64).mean(0)                   # [Nk, D]
  expected = np.einsum('hj,jd->hd', w, x_bar)                 # per head
  got = inter['attn']['value'][mac_optax.MEAN][0]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert np.abs(expected - means['value']).max() > 1e-3      # differs
  np.testing.assert_allclose(inter['attn']['query'][mac_optax.MEAN][0],
                             means['query'], rtol=1e-5)


def test_plain_option_and_dropout_use_the_probabilities_the_values_meet():
  x = jnp.asarray(_rng(3).normal(size=(B, N, D)), jnp.float32)

  class Drop(nn.Module):

    @nn.compact
    def __call__(self, x, train):
      return nn.SelfAttention(num_heads=H, dropout_rate=0.5, name='attn')(
          x, deterministic=not train)

  model = Drop()
  params = _init(model, x, False)
  means, _ = _reference_means(params['attn'], np.asarray(x, np.float64),
                              np.asarray(x, np.float64),
                              np.ones((1, 1, N, N), bool))
  inter = _stats(model, params, (x, False))
  np.testing.assert_allclose(inter['attn']['value'][mac_optax.MEAN][0],
                             means['value'], rtol=1e-5)

  # With dropout the values meet the dropped-out probabilities (P·m/keep):
  # each key's statistic differs, their mean over keys is the plain P's.
  @jax.jit
  @jax.vmap
  def dropped(key):
    with mac_linen.capture():
      _, v = model.apply({'params': params}, x, True, rngs={'dropout': key},
                         mutable=['intermediates'])
    return v['intermediates']['attn']['value'][mac_optax.MEAN][0]

  stats = np.asarray(dropped(jax.random.split(jax.random.key(1), 256)),
                     np.float64)
  assert np.abs(stats[0] - stats[1]).max() > 1e-2
  assert np.abs(stats[0] - means['value']).max() > 1e-2
  np.testing.assert_allclose(stats.mean(0), means['value'], atol=0.05)
  inter = _stats(model, params, (x, False),
                 capture_kwargs={'attention': 'plain'})
  np.testing.assert_allclose(inter['attn']['value'][mac_optax.MEAN][0],
                             means['key'], rtol=1e-5)


def test_sow_weights_still_returns_probabilities_to_the_user():
  x = jnp.asarray(_rng(4).normal(size=(B, N, D)), jnp.float32)

  class Sow(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(num_heads=H, name='attn')(
          x, sow_weights=True)

  model = Sow()
  params = _init(model, x)
  inter = _stats(model, params, (x,))
  weights = inter['attn']['attention_weights'][0]
  assert weights.shape == (B, H, N, N)
  expected = np.einsum('bhij,bjd->hd', np.asarray(weights, np.float64),
                       np.asarray(x, np.float64)) / (B * N)
  np.testing.assert_allclose(
      inter['attn']['value'][mac_optax.MEAN][0], expected,
      rtol=1e-5)


class FusedQKV(nn.Module):
  """GPT-style attention: one Dense to 3·D and a hand-written softmax."""
  use_weights: bool = False

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    c_attn = nn.Dense(3 * d, name='c_attn')
    q, k, v = jnp.split(c_attn(x), 3, axis=-1)
    split = lambda t: t.reshape(b, n, H, d // H)
    q, k, v = split(q), split(k), split(v)
    s = jnp.einsum('bihd,bjhd->bhij', q, k) / np.sqrt(d // H)
    s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -1e9)
    p = jax.nn.softmax(s)
    if self.use_weights:   # as for a flash kernel: weights from a VJP
      w = mac_optax.attention.key_weights_from_attention(
          functools.partial(jax.nn.dot_product_attention, is_causal=True),
          q, k)
      mac_linen.sow_attention(c_attn, x, weights=w)
    else:
      mac_linen.sow_attention(c_attn, x, probs=p)
    y = jnp.einsum('bhij,bjhd->bihd', p, v).reshape(b, n, d)
    return nn.Dense(d, name='c_proj')(y)


@pytest.mark.parametrize('use_weights', [False, True])
def test_fused_qkv_module_matches_dense_reference(use_weights):
  x = jnp.asarray(_rng(5).normal(size=(B, N, D)) + 0.5, jnp.float32)
  model = FusedQKV(use_weights)
  params = _init(model, x)
  grads, inter, updates = _step(model, params, (x,))
  p = _np(params['c_attn'])
  xn = np.asarray(x, np.float64)
  qkv = xn @ p['kernel'] + p['bias']
  q, k = (t.reshape(B, N, H, D // H) for t in np.split(qkv, 3, -1)[:2])
  s = np.einsum('bihd,bjhd->bhij', q, k) / np.sqrt(D // H)
  probs = _softmax(np.where(np.tril(np.ones((N, N), bool)), s, -1e30))
  mixed = np.einsum('bhij,bjd->d', probs, xn) / (B * H * N)
  stat = inter['c_attn'][mac_optax.ATTENTION_MEAN]
  assert len(stat) == 1 and stat[0].shape == (3, D)
  expected = np.stack([xn.mean((0, 1)), xn.mean((0, 1)), mixed])
  np.testing.assert_allclose(stat[0], expected, rtol=1e-5, atol=1e-6)
  # Reference: column c of the kernel uses the mean of its own group.
  g_k = np.asarray(grads['c_attn']['kernel'])
  g_b = np.asarray(grads['c_attn']['bias'])
  rows = np.concatenate([np.tile(np.append(expected[g], 1.0), (D, 1))
                         for g in range(3)])
  u_k, u_b = reference.dense_update(g_k, g_b, rows, DAMPING)
  np.testing.assert_allclose(updates['c_attn']['kernel'], u_k, rtol=2e-4,
                             atol=1e-6)
  np.testing.assert_allclose(updates['c_attn']['bias'], u_b, rtol=2e-4,
                             atol=1e-6)
  y = np.einsum('bhij,bjhd->bihd', probs,
                np.split(qkv, 3, -1)[2].reshape(B, N, H, D // H))
  _check_update(grads['c_proj'], updates['c_proj'],
                y.reshape(B * N, D).mean(0))


def test_key_weights_from_attention_equals_explicit_probabilities():
  rng = _rng(6)
  q = jnp.asarray(rng.normal(size=(B, N, H, 4)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, N, H, 4)), jnp.float32)
  w = mac_optax.attention.key_weights_from_attention(
      functools.partial(jax.nn.dot_product_attention, is_causal=True), q, k)
  s = np.einsum('bihd,bjhd->bhij', np.asarray(q, np.float64),
                np.asarray(k, np.float64)) / 2.0
  probs = _softmax(np.where(np.tril(np.ones((N, N), bool)), s, -1e30))
  np.testing.assert_allclose(w, probs.mean((1, 2)), rtol=1e-5)


def test_sow_attention_rejects_ambiguous_arguments():
  x = jnp.ones((B, N, D))

  class Bad(nn.Module):

    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(3 * D, name='c_attn')
      y = dense(x)
      mac_linen.sow_attention(dense, x)
      return y

  with pytest.raises(ValueError, match='c_attn'):   # already at init
    Bad().init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='attention must be one of'):
    with mac_linen.capture(attention='mixed'):
      pass


class Block(nn.Module):
  train: bool = True

  @nn.compact
  def __call__(self, x, _):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    y = nn.MultiHeadDotProductAttention(num_heads=H, dropout_rate=0.1,
                                        deterministic=not self.train)(
                                            nn.LayerNorm()(x), mask=mask)
    x = x + y
    return x + nn.Dense(D)(nn.gelu(nn.Dense(2 * D)(nn.LayerNorm()(x)))), None


class ScanLM(nn.Module):
  layers: int = 2
  train: bool = True

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(11, D)
    x = embed(tokens)
    blocks = nn.scan(nn.remat(Block), variable_axes={
        'params': 0, 'intermediates': 0}, split_rngs={
            'params': True, 'dropout': True}, length=self.layers)
    x, _ = blocks(train=self.train, name='blocks')(x, None)
    return embed.attend(nn.LayerNorm()(x))


class LoopLM(nn.Module):
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(11, D)
    x = embed(tokens)
    for i in range(self.layers):
      x, _ = nn.remat(Block)(train=False, name=f'block_{i}')(x, None)
    return embed.attend(nn.LayerNorm()(x))


def test_scan_remat_transformer_step_has_no_quadratic_leaf():
  tokens = jnp.asarray(_rng(7).integers(0, 11, size=(B, N)))
  model = ScanLM(train=False)
  params = _init(model, tokens)

  @jax.jit
  def step(params, key):
    def loss(params):
      with mac_linen.capture():
        out, v = model.apply({'params': params}, tokens,
                             mutable=['intermediates'],
                             rngs={'dropout': key})
      return jnp.mean(out ** 2), v['intermediates']
    grads, inter = jax.grad(loss, has_aux=True)(params)
    tx = mac_optax.mac(DAMPING)
    updates, state = tx.update(grads, tx.init(params), params,
                               intermediates=inter)
    return grads, inter, updates, state

  grads, inter, updates, state = step(params, jax.random.key(0))
  sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(inter)]
  assert max(sizes) < B * H * N * N
  value = inter['blocks']['MultiHeadDotProductAttention_0']['value']
  assert value[mac_optax.MEAN][0].shape == (2, H, D)          # [L, G, D]
  # Same statistics as the unrolled model with the same weights.
  loop = {k: v for k, v in params.items() if k != 'blocks'}
  for i in range(2):
    loop[f'block_{i}'] = jax.tree_util.tree_map(lambda a: a[i],
                                                params['blocks'])
  unrolled = _stats(LoopLM(), loop, (tokens,))
  for i in range(2):
    got = unrolled[f'block_{i}']['MultiHeadDotProductAttention_0']
    np.testing.assert_allclose(got['value'][mac_optax.MEAN][0],
                               value[mac_optax.MEAN][0][i], rtol=1e-5)
  assert 'blocks/MultiHeadDotProductAttention_0/value' in state.layers
  assert jax.tree_util.tree_structure(updates) == (
      jax.tree_util.tree_structure(params))
  # Dropout on the probabilities (train=True, inside nn.scan + nn.remat):
  # the value statistic of each layer uses its dropped-out probabilities.
  dropped = _stats(ScanLM(train=True), params, (tokens,),
                   apply_kwargs={'rngs': {'dropout': jax.random.key(3)}})
  got = dropped['blocks']['MultiHeadDotProductAttention_0']['value'][
      mac_optax.MEAN][0]
  want = value[mac_optax.MEAN][0]
  assert got.shape == want.shape and np.all(np.isfinite(got))
  assert np.abs(got[0] - want[0]).max() > 1e-4


class TiedLM(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(7, D, name='embed')
    h = nn.Dense(D, name='hidden')(embed(tokens))
    return embed.attend(h)


def test_tied_embedding_attend_matches_dense_reference():
  tokens = jnp.asarray(_rng(8).integers(0, 7, size=(B, N)))
  model = TiedLM()
  params = _init(model, tokens)
  grads, inter, updates = _step(model, params, (tokens,))
  assert set(inter['embed']) == {mac_optax.ATTEND_MEAN}   # lookups left alone
  p = _np(params)
  h = p['embed']['embedding'][np.asarray(tokens)] @ p['hidden']['kernel'] + (
      p['hidden']['bias'])
  h_bar = h.reshape(-1, D).mean(0)
  g = np.asarray(grads['embed']['embedding'])               # (V, D)
  u, _ = reference.dense_update(g.T, None, np.tile(h_bar, (7, 1)), DAMPING)
  np.testing.assert_allclose(updates['embed']['embedding'], u.T, rtol=2e-4,
                             atol=1e-6)


def test_embedding_lookup_option_uses_token_frequencies():
  tokens = jnp.asarray(_rng(9).integers(0, 4, size=(B, N)))   # ids 4..6 unused
  model = TiedLM()
  params = _init(model, tokens)
  grads, inter, updates = _step(model, params, (tokens,),
                                capture_kwargs={'embed_lookup': True})
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=7) / tokens.size
  np.testing.assert_allclose(inter['embed'][mac_optax.LOOKUP_MEAN][0][0],
                             freq, rtol=1e-6)
  # Tied table: the lookup factor (vocab axis) and the attend factor
  # (feature axis) both apply: U = λ² A_V⁻¹ G A_D⁻¹.
  p = _np(params)
  h = p['embed']['embedding'][np.asarray(tokens)] @ p['hidden']['kernel'] + (
      p['hidden']['bias'])
  h_bar = h.reshape(-1, D).mean(0)
  a_v = np.outer(freq, freq) + DAMPING * np.eye(7)
  a_d = np.outer(h_bar, h_bar) + DAMPING * np.eye(D)
  g = np.asarray(grads['embed']['embedding'], np.float64)
  expected = DAMPING ** 2 * np.linalg.inv(a_v) @ g @ np.linalg.inv(a_d)
  np.testing.assert_allclose(updates['embed']['embedding'], expected,
                             rtol=2e-4, atol=1e-6)
