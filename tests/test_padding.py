"""Padding masks: a padded batch gives the statistics of its unpadded sequences.

The reference shares no masking code with the library: each sequence is run
alone, unpadded (batch 1, its own length), in float64, and the statistics of
the batch are the token-weighted combination of the per-sequence ones
(``Σ_b L_b ā_b / Σ_b L_b`` for layers whose rows are tokens, ``mean_b ā_b``
for the head on pooled features). The per-sequence statistics are the plain
captures the other tests check against explicit dense references. The padded
batch carries garbage ids at its padding positions, and its mask is traced
(the capture is opened inside ``jax.jit``).
"""

import re

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
from tests import reference

B, T, D, V = 3, 8, 8, 11   # D == T: the pooled [B, D] has the mask's shape
LENGTHS = (8, 5, 3)
DAMPING = 0.5


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
  mask = np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]
  return ids, mask


def _pool(x, mask):
  m = mask[..., None].astype(x.dtype)
  return jnp.sum(x * m, axis=1) / jnp.sum(m, axis=1)


class _Linen(nn.Module):

  @nn.compact
  def __call__(self, ids, mask):
    x = nn.Embed(V, D, name='embed')(ids)
    x = nn.Dense(D, name='dense')(x)
    attention_mask = nn.combine_masks(nn.make_attention_mask(mask, mask),
                                      nn.make_causal_mask(ids))
    x = x + nn.MultiHeadDotProductAttention(2, name='attn')(
        x, mask=attention_mask)
    h = nn.Einsum((D, 2, 4), 'btd,dnh->btnh', name='einsum')(x)
    x = nn.DenseGeneral(D, axis=(-2, -1), name='proj')(h)
    return nn.Dense(3, name='head')(_pool(x, mask))   # not token rows


class _Nnx(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.dense = nnx.Linear(D, D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, D, decode=False, rngs=rngs)
    self.einsum = nnx.Einsum('btd,dnh->btnh', (D, 2, 4), (2, 4), rngs=rngs)
    self.proj = nnx.LinearGeneral((2, 4), D, axis=(-2, -1), rngs=rngs)
    self.head = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, ids, mask):
    x = self.dense(self.embed(ids))
    attention_mask = nnx.combine_masks(nnx.make_attention_mask(mask, mask),
                                       nnx.make_causal_mask(ids))
    x = x + self.attn(x, mask=attention_mask)
    x = self.proj(self.einsum(x))
    return self.head(_pool(x, mask))


def _combine(per_sequence):
  """Token-weighted mean of per-sequence statistics; the head: plain mean."""
  lengths = np.asarray(LENGTHS, np.float64)

  def combine(path, *leaves):
    stats = np.stack([np.asarray(a, np.float64) for a in leaves])
    w = np.ones(B) if 'head' in jax.tree_util.keystr(path) else lengths
    return np.tensordot(w / w.sum(), stats, axes=1)

  return jax.tree_util.tree_map_with_path(combine, *per_sequence)


def _check(padded, expected):
  flat, _ = jax.tree_util.tree_flatten_with_path(expected)
  got = dict(jax.tree_util.tree_flatten_with_path(padded)[0])
  assert len(flat) == 9   # embed, dense, q, k, v, out, einsum, proj, head
  for path, want in flat:
    np.testing.assert_allclose(got[path], want, rtol=2e-5, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))


def _check_update(plan, params, padded, expected):
  """The MAC update from the padded batch's statistics = the reference's."""
  rng = np.random.default_rng(1)
  grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  tx = mac_optax.mac(DAMPING, 0.0, plan=plan)
  state = tx.init(params)
  as32 = lambda tree: jax.tree_util.tree_map(
      lambda a: jnp.asarray(a, jnp.float32), tree)
  got, _ = tx.update(grads, state, params, intermediates=padded)
  want, _ = tx.update(grads, state, params, intermediates=as32(expected))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
      got, want)


def test_linen_padded_batch_equals_unpadded_sequences():
  ids, mask = _batch()
  model = _Linen()
  variables = jax.jit(model.init)(jax.random.key(0), ids, mask)

  @jax.jit
  def padded_stats(variables, ids, mask):
    with mac_optax.linen.capture(embed_lookup=True, token_mask=mask):
      _, v = model.apply(variables, ids, mask, mutable=['intermediates'])
    return v['intermediates']

  padded = padded_stats(variables, ids, mask)
  per_sequence = []
  with reference.x64():
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                 variables)
    for b, n in enumerate(LENGTHS):
      with mac_optax.linen.capture(embed_lookup=True):
        _, v = model.apply(v64, ids[b:b + 1, :n], mask[b:b + 1, :n],
                           mutable=['intermediates'])
      per_sequence.append(jax.tree_util.tree_map(np.asarray,
                                                 v['intermediates']))
  expected = _combine(per_sequence)
  _check(padded, expected)

  # Without the mask, padding enters the token statistics (the test can
  # fail) but the head on pooled features is unchanged.
  with mac_optax.linen.capture(embed_lookup=True):
    _, v = model.apply(variables, ids, mask, mutable=['intermediates'])
  unmasked = v['intermediates']
  assert np.abs(unmasked['dense'][mac_optax.MEAN][0]
                - expected['dense'][mac_optax.MEAN][0]).max() > 1e-2
  np.testing.assert_allclose(unmasked['head'][mac_optax.MEAN][0],
                             padded['head'][mac_optax.MEAN][0], rtol=1e-6)

  plan = mac_optax.linen.plan(model, variables, ids[:1], mask[:1],
                              embed_lookup=True)
  _check_update(plan, variables['params'], padded, expected)


def test_nnx_padded_batch_equals_unpadded_sequences():
  ids, mask = _batch()
  net = _Nnx(nnx.Rngs(0))

  @nnx.jit
  def padded_stats(net, ids, mask):
    _, inter = mac_optax.nnx.capture(net, embed_lookup=True,
                                     token_mask=mask)(ids, mask)
    return inter

  padded = padded_stats(net, ids, mask)
  graphdef, state = nnx.split(net)
  per_sequence = []
  with reference.x64():
    net64 = nnx.merge(graphdef, jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64)
        if jnp.issubdtype(a.dtype, jnp.floating) else a, state))
    for b, n in enumerate(LENGTHS):
      _, inter = mac_optax.nnx.capture(net64, embed_lookup=True)(
          ids[b:b + 1, :n], mask[b:b + 1, :n])
      per_sequence.append(jax.tree_util.tree_map(np.asarray, inter))
  expected = _combine(per_sequence)
  _check(padded, expected)
  plan = mac_optax.nnx.plan(net, ids[:1], mask[:1], embed_lookup=True)
  params = nnx.state(net, nnx.Param)
  _check_update(plan, params, padded, expected)


class _Conv(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (3,), name='conv')(x)


def test_conv_over_a_masked_token_axis_raises():
  x = jnp.ones((2, 6, 3))
  model = _Conv()
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="convolution 'conv/kernel'.*token mask"):
    with mac_optax.linen.capture(token_mask=jnp.ones((2, 6), bool)):
      model.apply(variables, x, mutable=['intermediates'])
  # A mask no input leads with is a wrong mask, not an image model.
  with pytest.raises(ValueError, match=r'shape \(2, 5\) matched no layer '
                     r'input.*\(2, 6, 3\)'):
    with mac_optax.linen.capture(token_mask=jnp.ones((2, 5), bool)):
      model.apply(variables, x, mutable=['intermediates'])


_LINEAR = nnx.Linear(3, 2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('mask,why', [
    (np.ones((2, 3), np.float32), 'booleans'),
    (np.ones((), bool), 'booleans'),
])
def test_malformed_masks_raise(mask, why):
  with pytest.raises(ValueError, match=why):
    mac_optax.linen.capture(token_mask=mask).__enter__()
  with pytest.raises(ValueError, match=why):
    mac_optax.nnx.capture(_LINEAR, token_mask=mask)


def test_product_of_means_with_a_mask_raises():
  with pytest.raises(ValueError, match='product_of_means'):
    mac_optax.nnx.capture(_LINEAR, attention='product_of_means',
                          token_mask=np.ones((2, 3), bool))


def test_sow_attention_gqa_padded_equals_unpadded():
  from tests import test_gqa   # pylint: disable=g-import-not-at-top
  _, mask = _batch()
  x = jax.random.normal(jax.random.key(2), (B, T, test_gqa.D))
  model = test_gqa._LinenGQA()   # causal: real queries never read padding
  variables = model.init(jax.random.key(1), x)

  @jax.jit
  def padded_stats(variables, x, mask):
    with mac_optax.linen.capture(token_mask=mask):
      _, v = model.apply(variables, x, mutable=['intermediates'])
    return v['intermediates']

  padded = padded_stats(variables, x, mask)
  per_sequence = []
  with reference.x64():
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                 variables)
    for b, n in enumerate(LENGTHS):
      with mac_optax.linen.capture():
        _, v = model.apply(v64, jnp.asarray(x[b:b + 1, :n], jnp.float64),
                           mutable=['intermediates'])
      per_sequence.append(jax.tree_util.tree_map(np.asarray,
                                                 v['intermediates']))
  expected = _combine(per_sequence)
  got = padded['kv'][mac_optax.ATTENTION_MEAN][0]
  np.testing.assert_allclose(got, expected['kv'][mac_optax.ATTENTION_MEAN][0],
                             rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(padded['q'][mac_optax.MEAN][0],
                             expected['q'][mac_optax.MEAN][0],
                             rtol=2e-5, atol=2e-6)


def test_key_weights_from_attention_with_a_query_mask():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
  m = np.arange(5)[None, :] < np.array([[5], [2]])
  w = mac_optax.attention.key_weights_from_attention(
      jax.nn.dot_product_attention, q, k, query_mask=m)
  s = np.einsum('bihd,bjhd->bhij', np.asarray(q, np.float64),
                np.asarray(k, np.float64)) / 2.0
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expected = np.einsum('bhij,bi->bj', p, m) / (3 * m.sum(-1, keepdims=True))
  np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      mac_optax.attention.key_weights(jnp.asarray(p, jnp.float32), m),
      expected, rtol=1e-5, atol=1e-6)


class _ScanBody(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return nn.tanh(nn.Dense(D, name='dense')(x)), None


class _Stack(nn.Module):

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_ScanBody, variable_axes={'params': 0, 'intermediates': 0},
                   split_rngs={'params': True}, length=2)
    return scan(name='blocks')(x, None)[0]


def test_mask_inside_nn_scan_is_the_masked_mean_per_layer():
  _, mask = _batch()
  x = jax.random.normal(jax.random.key(3), (B, T, D))
  model = _Stack()
  variables = model.init(jax.random.key(0), x)

  @jax.jit
  def stats(variables, x, mask):
    with mac_optax.linen.capture(token_mask=mask):
      _, v = model.apply(variables, x, mutable=['intermediates'])
    return v['intermediates']['blocks']['dense'][mac_optax.MEAN][0]

  got = stats(variables, x, mask)                        # [2 layers, 1, D]
  m = np.asarray(mask, np.float64)[..., None]
  xd = np.asarray(x, np.float64)
  kernel = np.asarray(variables['params']['blocks']['dense']['kernel'],
                      np.float64)
  bias = np.asarray(variables['params']['blocks']['dense']['bias'],
                    np.float64)
  inputs = [xd, np.tanh(xd @ kernel[0] + bias[0])]
  for layer, h in enumerate(inputs):
    np.testing.assert_allclose(got[layer, 0], (h * m).sum((0, 1)) / m.sum(),
                               rtol=1e-5, atol=1e-6)


class _Fused(nn.Module):
  use_weights: bool

  @nn.compact
  def __call__(self, x, mask):
    b, n, d = x.shape
    c_attn = nn.Dense(3 * d, name='c_attn')
    q, k, v = (t.reshape(b, n, 2, -1) for t in jnp.split(c_attn(x), 3, -1))
    allowed = mask[:, None, None, :] & jnp.tril(jnp.ones((n, n), bool))
    s = jnp.einsum('bihd,bjhd->bhij', q, k) / np.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(allowed, s, -1e9))
    if self.use_weights:
      w = mac_optax.attention.key_weights_from_attention(
          jax.nn.dot_product_attention, q, k, query_mask=mask,
          mask=allowed)
      mac_optax.linen.sow_attention(c_attn, x, weights=w)
    else:
      mac_optax.linen.sow_attention(c_attn, x, probs=p)
    return jnp.einsum('bhij,bjhd->bihd', p, v).reshape(b, n, d)


def test_sow_attention_weights_under_a_mask_equal_probs():
  _, mask = _batch()
  x = jax.random.normal(jax.random.key(4), (B, T, D))
  stats = []
  for use_weights in (False, True):
    model = _Fused(use_weights)
    variables = model.init(jax.random.key(0), x, mask)
    with mac_optax.linen.capture(token_mask=mask):
      _, v = model.apply(variables, x, mask, mutable=['intermediates'])
    stats.append(v['intermediates']['c_attn'][mac_optax.ATTENTION_MEAN][0])
  np.testing.assert_allclose(stats[1], stats[0], rtol=1e-5, atol=1e-6)
  # The q/k rows are the real-token mean of x.
  m = np.asarray(mask, np.float64)[..., None]
  np.testing.assert_allclose(
      stats[0][0], (np.asarray(x, np.float64) * m).sum((0, 1)) / m.sum(),
      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape', [(B, T + 1), (T, B), (B, T, 1)])
def test_linen_mask_that_leads_no_input_raises_at_trace_time(shape):
  ids, mask = _batch()
  model = _Linen()
  variables = jax.jit(model.init)(jax.random.key(0), ids, mask)

  @jax.jit
  def stats(variables, ids, mask, token_mask):
    with mac_optax.linen.capture(token_mask=token_mask):
      _, v = model.apply(variables, ids, mask, mutable=['intermediates'])
    return v['intermediates']

  pattern = (rf'token_mask=\.\.\.\) of shape {re.escape(str(shape))} '
             rf'matched no layer input.*{re.escape(str((B, T, D)))}')
  with pytest.raises(ValueError, match=pattern):
    stats(variables, ids, mask, jnp.ones(shape, bool))


def test_nnx_mask_that_leads_no_input_raises_at_trace_time():
  ids, mask = _batch()
  net = _Nnx(nnx.Rngs(0))

  @nnx.jit
  def stats(net, ids, mask, token_mask):
    _, inter = mac_optax.nnx.capture(net, token_mask=token_mask)(ids, mask)
    return inter

  with pytest.raises(ValueError, match=rf'of shape \({B}, {T + 2}\) matched '
                     rf'no layer input.*\({B}, {T}, {D}\)'):
    stats(net, ids, mask, jnp.ones((B, T + 2), bool))
  # The matching mask still works after the failed capture closed.
  assert jax.tree_util.tree_leaves(stats(net, ids, mask, mask))
