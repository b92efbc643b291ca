"""NNX capture: same statistics and updates as linen, dense references, nnx.Optimizer."""

import inspect
import threading

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax._src import capture_nnx as mac_capture_nnx
from mac_optax._src.transform import UNPLANNED
from mac_optax import linen as mac_linen
from mac_optax import nnx as mac_nnx
from tests import reference
from tests.example_scripts import load_example

# nnx.MultiHeadAttention takes `is_causal=` from Flax 0.12.8 on; with older
# releases the tests pass the same causal mask explicitly.
HAS_IS_CAUSAL = 'is_causal' in inspect.signature(
    nnx.MultiHeadAttention.__call__).parameters


# nnx.as_pure (a State of plain arrays) exists from Flax 0.12.8 on.
as_pure = getattr(nnx, 'as_pure', lambda state: state)


def causal_call(mha, x):
  if HAS_IS_CAUSAL:
    return mha(x, is_causal=True)
  return mha(x, mask=nnx.make_causal_mask(jnp.ones(x.shape[:-1], bool)))

# Deprecated NNX calls (e.g. `Module.sow` outside `nnx.capture`) must not be
# reached from our code.
pytestmark = pytest.mark.filterwarnings('error::DeprecationWarning')

DAMPING = 0.5


def _normal(shape, seed, shift=0.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) + shift,
                     jnp.float32)


def _init(key, shape, dtype=jnp.float32):
  """A NumPy initializer seeded by the NNX key: no XLA compile per shape."""
  seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
  fan_in = max(1, int(np.prod(shape[:-1])))
  values = np.random.default_rng(seed).normal(size=shape) / np.sqrt(fan_in)
  return jnp.asarray(values, dtype)


INIT = dict(kernel_init=_init, bias_init=_init)


def _random_like(tree, seed=1):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return jax.tree_util.tree_unflatten(
      treedef, [_normal(l.shape, seed + i) for i, l in enumerate(leaves)])


def _nnx_capture(module, *args, call=None, jit=True, **options):
  """``call(module, *args)`` under both captures (jitted: one compile)."""
  fn = call or (lambda m, *a: m(*a))

  def run(module, *args):
    return mac_nnx.capture(fn, **options)(module, *args)
  return nnx.jit(run)(module, *args) if jit else run(module, *args)


def _mac_update(grads, inter):
  tx = mac_optax.mac(DAMPING)
  return jax.jit(lambda g, i: tx.update(g, tx.init(g), intermediates=i)[0])(
      grads, inter)


def _nnx_updates(model, inter, seed=1):
  """MAC updates of random gradients shaped like `model`'s params (pure dicts)."""
  grads = _random_like(nnx.state(model, nnx.Param), seed)
  updates = _mac_update(grads, inter)
  return nnx.to_pure_dict(grads), nnx.to_pure_dict(updates)


def _linen_updates(model, params, x, seed=1):
  """Linen capture + MAC updates with the same random gradients."""
  @jax.jit
  def forward(params, x):
    with mac_linen.capture():
      y, v = model.apply({'params': params}, x, mutable=['intermediates'])
    return y, v['intermediates']

  y, inter = forward(params, x)
  return y, inter, _mac_update(_random_like(params, seed), inter)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  a_leaves, a_def = jax.tree_util.tree_flatten(a)
  b_leaves, b_def = jax.tree_util.tree_flatten(b)
  assert a_def == b_def, (a_def, b_def)
  for x, y in zip(a_leaves, b_leaves):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def _functional(layer):
  """``(kernel, bias, x) -> layer(x)`` with the layer's own forward pass."""
  graphdef, state = nnx.split(layer)

  def apply(kernel, bias, x):
    values = {'kernel': kernel}
    if bias is not None:
      values['bias'] = bias
    new_state = jax.tree_util.tree_map(lambda v: v, state)
    nnx.replace_by_pure_dict(new_state, values)
    return nnx.merge(graphdef, new_state)(x)

  return apply


def _check_against_dense(layer, x, inter, grads, updates, n_out=1):
  """The update equals ``λ(āāᵀ+λI)⁻¹Ĝ`` with ā from differentiating the layer."""
  kernel = layer.kernel[...]
  bias = layer.bias[...] if layer.bias is not None else None
  means = jax.jit(lambda k, b, x: reference.column_means(
      _functional(layer), k, b, x, n_out))(kernel, bias, x)
  expected_k, expected_b = reference.dense_update(
      grads['kernel'], grads.get('bias'), means, DAMPING)
  reference.assert_close(updates['kernel'], expected_k)
  if bias is not None:
    reference.assert_close(updates['bias'], expected_b)
  assert not np.allclose(updates['kernel'], grads['kernel'])


# --------------------------------------------------------------------------
# Layer by layer: NNX == linen == dense reference.


def test_linear_matches_linen_and_dense_reference():
  x = _normal((3, 5, 4), 0, 1.0)
  layer = nnx.Linear(4, 6, rngs=nnx.Rngs(0), **INIT)
  y, inter = _nnx_capture(layer, x)
  np.testing.assert_allclose(y, layer(x), rtol=1e-6)
  assert inter[mac_optax.MEAN][0].shape == (1, 4)
  grads, updates = _nnx_updates(layer, inter)
  _check_against_dense(layer, x, inter, grads, updates)

  params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  y_lin, inter_lin, updates_lin = _linen_updates(
      nn.Dense(6), params, x)
  np.testing.assert_allclose(y, y_lin, rtol=1e-6)
  _assert_trees_close(inter[mac_optax.MEAN][0],
                      inter_lin[mac_optax.MEAN][0])
  _assert_trees_close(updates, updates_lin)


def test_linear_general_matches_linen_and_dense_reference():
  x = _normal((2, 3, 4, 5), 0, 0.5)
  layer = nnx.LinearGeneral((3, 5), (2, 4), axis=(1, -1), rngs=nnx.Rngs(0),
                            **INIT)
  y, inter = _nnx_capture(layer, x)
  assert inter[mac_optax.MEAN][0].shape == (1, 15)
  grads, updates = _nnx_updates(layer, inter)
  _check_against_dense(layer, x, inter, grads, updates, n_out=2)

  params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  y_lin, _, updates_lin = _linen_updates(
      nn.DenseGeneral((2, 4), axis=(1, -1)), params, x)
  np.testing.assert_allclose(y, y_lin, rtol=1e-5, atol=1e-6)
  _assert_trees_close(updates, updates_lin)


def test_linear_general_with_batch_axis_sows_one_mean_per_batch_index():
  # Batched kernels are covered in tests/test_einsum.py.
  layer = nnx.LinearGeneral(3, 2, batch_axis={0: 2}, rngs=nnx.Rngs(0),
                            **INIT)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3))
  _, inter = _nnx_capture(layer, x)
  np.testing.assert_allclose(inter['mac_einsum_mean'][0], x, rtol=1e-6)


CONV_CASES = {
    'circular_stride': dict(kernel_size=(3, 3), strides=(2, 1),
                            padding='CIRCULAR'),
    'pads_strides_dilations': dict(kernel_size=(2, 2), strides=(1, 2),
                                   input_dilation=(1, 2), kernel_dilation=2,
                                   padding=((1, 0), (2, 1))),
    'groups_reflect_no_bias': dict(kernel_size=(3, 3), feature_group_count=2,
                                   padding='REFLECT', use_bias=False),
    'causal_1d': dict(kernel_size=(3,), padding='CAUSAL', kernel_dilation=2),

}


@pytest.mark.parametrize('case', sorted(CONV_CASES))
def test_conv_matches_linen_and_dense_reference(case):
  kwargs = dict(CONV_CASES[case])
  one_d = len(kwargs['kernel_size']) == 1
  x = _normal((2, 7, 4) if one_d else (2, 6, 5, 4), 0, 1.0)
  layer = nnx.Conv(4, 6, rngs=nnx.Rngs(0), **INIT, **kwargs)
  y, inter = _nnx_capture(layer, x)
  groups = kwargs.get('feature_group_count', 1)
  assert inter[mac_optax.MEAN][0].shape[0] == groups
  grads, updates = _nnx_updates(layer, inter)
  _check_against_dense(layer, x, inter, grads, updates)

  params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  linen_kwargs = dict(kwargs)
  y_lin, inter_lin, updates_lin = _linen_updates(
      nn.Conv(6, **linen_kwargs), params, x)
  np.testing.assert_allclose(y, y_lin, rtol=1e-5, atol=1e-5)
  _assert_trees_close(inter[mac_optax.MEAN][0], inter_lin[mac_optax.MEAN][0])
  _assert_trees_close(updates, updates_lin)


class TiedLM(nnx.Module):
  """Token embedding whose table is also the output layer."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(7, 4, embedding_init=_init, rngs=rngs)
    self.hidden = nnx.Linear(4, 4, rngs=rngs, **INIT)

  def __call__(self, tokens):
    return self.embed.attend(self.hidden(self.embed(tokens)))


class TiedLMLinen(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(7, 4, name='embed')
    return embed.attend(nn.Dense(4, name='hidden')(embed(tokens)))


def test_tied_embedding_matches_linen_and_dense_reference():
  model = TiedLM(nnx.Rngs(0))
  tokens = jnp.array([[1, 2, 3], [4, 5, 6]])
  y, inter = _nnx_capture(model, tokens, jit=False)   # eager
  assert mac_optax.ATTEND_MEAN in inter['embed']
  assert mac_optax.MEAN not in inter['embed']   # lookups are left alone
  grads, updates = _nnx_updates(model, inter)

  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  y_lin, _, updates_lin = _linen_updates(TiedLMLinen(), params, tokens)
  np.testing.assert_allclose(y, y_lin, rtol=1e-5, atol=1e-6)
  _assert_trees_close(updates, updates_lin)

  # Dense reference: the attend layer is h @ Eᵀ with h the hidden output.
  h = model.hidden(model.embed(tokens))
  table_t = model.embed.embedding[...].T
  means = reference.column_means(lambda k, b, x: x @ k, table_t, None, h)
  expected, _ = reference.dense_update(grads['embed']['embedding'].T, None,
                                       means, DAMPING)
  reference.assert_close(updates['embed']['embedding'].T, expected)


# --------------------------------------------------------------------------
# Attention.


def _attention_reference(mha, x_q, x_kv, mask, is_causal):
  """Explicit probabilities ``P [B,H,Nq,Nk]`` and mixed values, in NumPy."""
  x_q, x_kv = np.asarray(x_q, np.float64), np.asarray(x_kv, np.float64)

  def project(x, layer):
    return (np.einsum('bnd,dhk->bnhk', x, np.asarray(layer.kernel[...]))
            + np.asarray(layer.bias[...]))

  q, k, v = project(x_q, mha.query), project(x_kv, mha.key), project(
      x_kv, mha.value)
  logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
  allowed = np.ones(logits.shape, bool)
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask, bool), logits.shape)
  if is_causal:
    allowed &= np.tril(np.ones(logits.shape[-2:], bool))
  logits = np.where(allowed, logits, -1e30)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return probs, np.einsum('bhqs,bshk->bqhk', probs, v)


@pytest.mark.parametrize('kind', ['causal_self', 'cross_padding_mask'])
def test_attention_factors_match_dense_reference(kind):
  b, n_q, n_kv, d, heads = 2, 4, 5, 6, 2
  mha = nnx.MultiHeadAttention(heads, d, qkv_features=8, decode=False,
                               rngs=nnx.Rngs(0), **INIT)
  x_q = _normal((b, n_q, d), 0, 0.5)
  if kind == 'causal_self':
    x_kv, mask, is_causal = x_q, None, True
    call = causal_call
    args = (x_q,)
  else:
    x_kv = _normal((b, n_kv, d), 1, -0.3)
    keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    mask = np.asarray(keep[:, None, None, :])       # [B, 1, 1, Nk] padding
    is_causal = False
    call = lambda m, x: m(x[0], x[1], mask=mask)
    args = ((x_q, x_kv),)
  y, inter = _nnx_capture(mha, *args, call=call)
  np.testing.assert_allclose(y, nnx.jit(call)(mha, *args), rtol=1e-5,
                             atol=1e-6)
  for name in ('query', 'key', 'value', 'out'):
    assert len(inter[name][mac_optax.MEAN]) == 1, name
  probs, mixed_out = _attention_reference(mha, x_q, x_kv, mask, is_causal)
  out_kernel = np.asarray(mha.out.kernel[...])
  np.testing.assert_allclose(
      y, np.einsum('bqhk,hkd->bqd', mixed_out, out_kernel)
      + np.asarray(mha.out.bias[...]), rtol=1e-4, atol=1e-5)
  # Value factor: E_{b,h,i} Σ_j P_bhij x_bj, from the explicit probabilities.
  x_q64, x_kv64 = np.asarray(x_q, np.float64), np.asarray(x_kv, np.float64)
  # [G, d_in]: the value's per head (its kernel's columns (h, :)).
  expected_means = {
      'query': x_q64.mean((0, 1))[None],
      'key': x_kv64.mean((0, 1))[None],
      'value': np.einsum('bhqs,bsd->hd', probs, x_kv64) / (b * n_q),
      'out': mixed_out.reshape(b * n_q, -1).mean(0)[None],
  }
  assert not np.allclose(expected_means['value'], expected_means['key'],
                         atol=1e-3)
  grads, updates = _nnx_updates(mha, inter)
  for name, mean in expected_means.items():
    np.testing.assert_allclose(inter[name][mac_optax.MEAN][0], mean,
                               rtol=1e-5, atol=1e-6)
    g_k, g_b = grads[name]['kernel'], grads[name]['bias']
    d_out = int(np.prod(g_b.shape))
    width = d_out // len(mean)
    means = np.stack([np.append(mean[c // width], 1.0)
                      for c in range(d_out)])
    expected_k, expected_b = reference.dense_update(g_k, g_b, means, DAMPING)
    reference.assert_close(updates[name]['kernel'], expected_k)
    reference.assert_close(updates[name]['bias'], expected_b)
  # Nothing of size B·H·N·N is captured.
  sizes = [np.size(l) for l in jax.tree_util.tree_leaves(inter)]
  assert max(sizes) < b * heads * n_q * n_kv


def _cross_attention_case(heads=2, d=6):
  mha = nnx.MultiHeadAttention(heads, d, qkv_features=8, decode=False,
                               rngs=nnx.Rngs(0), **INIT)
  x_q, x_kv = _normal((2, 4, d), 0, 0.5), _normal((2, 5, d), 1, -0.3)
  keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  mask = keep[:, None, None, :]
  return mha, x_q, x_kv, mask


@pytest.mark.parametrize('mode', ['product_of_means', 'plain'])
def test_attention_value_statistic_modes(mode):
  mha, x_q, x_kv, mask = _cross_attention_case()
  call = lambda m, x_q, x_kv: m(x_q, x_kv, mask=mask)
  _, inter = _nnx_capture(mha, x_q, x_kv, call=call, attention=mode)
  x = np.asarray(x_kv, np.float64)
  if mode == 'plain':
    expected = x.mean((0, 1))[None]
  else:   # the authors' Σ_j w_j x̄_j, w_j the mass key j receives, per head
    probs, _ = _attention_reference(mha, x_q, x_kv, mask, False)
    expected = np.einsum('hj,jd->hd', probs.mean((0, 2)), x.mean(0))
  np.testing.assert_allclose(inter['value'][mac_optax.MEAN][0], expected,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(inter['key'][mac_optax.MEAN][0][0],
                             x.mean((0, 1)), rtol=1e-5, atol=1e-6)


def test_attention_with_sow_weights_keeps_the_probabilities():
  mha, x_q, x_kv, mask = _cross_attention_case()
  call = lambda m, x_q, x_kv: m(x_q, x_kv, mask=mask, sow_weights=True)
  _, inter = _nnx_capture(mha, x_q, x_kv, call=call)
  probs, _ = _attention_reference(mha, x_q, x_kv, mask, False)
  np.testing.assert_allclose(inter['attention_weights'][0], probs,
                             rtol=1e-5, atol=1e-6)
  value_mean = np.einsum('bhqs,bsd->hd', probs,
                         np.asarray(x_kv, np.float64))
  np.testing.assert_allclose(inter['value'][mac_optax.MEAN][0],
                             value_mean / (probs.shape[0] * probs.shape[2]),
                             rtol=1e-5, atol=1e-6)


def test_attention_matches_linen():
  mha, x_q, x_kv, mask = _cross_attention_case()
  mask = np.asarray(mask & np.tril(np.ones((4, 5), bool)))  # padding + causal
  call = lambda m, x_q, x_kv: m(x_q, x_kv, mask=mask)
  y, inter = _nnx_capture(mha, x_q, x_kv, call=call)
  grads, updates = _nnx_updates(mha, inter)

  params = nnx.to_pure_dict(nnx.state(mha, nnx.Param))
  linen_mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)

  @jax.jit
  def forward(params, x_q, x_kv):
    with mac_linen.capture():
      y, v = linen_mha.apply({'params': params}, x_q, x_kv, mask=mask,
                             mutable=['intermediates'])
    return y, v['intermediates']

  y_lin, inter_lin = forward(params, x_q, x_kv)
  np.testing.assert_allclose(y, y_lin, rtol=1e-5, atol=1e-6)
  for name in ('query', 'key', 'value', 'out'):
    np.testing.assert_allclose(inter[name][mac_optax.MEAN][0],
                               inter_lin[name][mac_optax.MEAN][0],
                               rtol=1e-5, atol=1e-6)
  _assert_trees_close(updates, _mac_update(_random_like(params, 1),
                                           inter_lin))
  assert not np.allclose(updates['value']['kernel'], grads['value']['kernel'])


class AttentionBlock(nnx.Module):

  def __init__(self, d, rngs, dropout_rate=0.0):
    self.attn = nnx.MultiHeadAttention(2, d, decode=False, rngs=rngs,
                                       dropout_rate=dropout_rate,
                                       deterministic=False, **INIT)

  def __call__(self, x):
    return x + causal_call(self.attn, x)


class ScannedTransformer(nnx.Module):

  def __init__(self, rngs, depth=2, d=4, dropout_rate=0.0):
    self.blocks = _stacked([AttentionBlock(d, rngs, dropout_rate)
                            for _ in range(depth)])

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(x, self.blocks)


def test_attention_in_scanned_blocks_with_and_without_dropout():
  x = _normal((2, 3, 4), 0, 0.5)
  plain_model = ScannedTransformer(nnx.Rngs(0))
  y_plain, plain = _nnx_capture(plain_model, x)
  value = plain['blocks']['attn']['value'][mac_optax.MEAN][0]
  assert value.shape == (2, 2, 4)                # [L, heads, d_in]
  # Block by block: the first block's value factor from explicit probabilities.
  first = nnx.merge(nnx.graphdef(plain_model.blocks.attn),
                    jax.tree_util.tree_map(
                        lambda v: v[0], nnx.state(plain_model.blocks.attn)))
  probs, _ = _attention_reference(first, x, x, None, True)
  expected = np.einsum('bhqs,bsd->hd', probs, np.asarray(x, np.float64))
  np.testing.assert_allclose(
      value[0], expected / (probs.shape[0] * probs.shape[2]), rtol=1e-5,
      atol=1e-6)
  # With dropout on the probabilities (training mode) each block's value
  # statistic uses the dropped-out probabilities its values meet.
  dropout_model = ScannedTransformer(nnx.Rngs(0), dropout_rate=0.5)
  y_dropped, dropped = _nnx_capture(dropout_model, x)
  assert not np.allclose(y_dropped, y_plain)          # dropout is active
  got = dropped['blocks']['attn']['value'][mac_optax.MEAN][0]
  assert got.shape == value.shape and np.all(np.isfinite(got))
  assert np.abs(got[0] - value[0]).max() > 1e-4


class FusedAttention(nnx.Module):
  """GPT-style causal self-attention: one Linear to 3·D, hand-written softmax."""

  def __init__(self, d, heads, rngs):
    self.heads = heads
    self.c_attn = nnx.Linear(d, 3 * d, rngs=rngs, **INIT)
    self.c_proj = nnx.Linear(d, d, rngs=rngs, **INIT)

  def __call__(self, x):
    b, n, d = x.shape
    q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    split = lambda t: t.reshape(b, n, self.heads, -1)
    q, k, v = split(q), split(k), split(v)
    s = jnp.einsum('bihd,bjhd->bhij', q, k) / jnp.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -1e9))
    mac_nnx.sow_attention(self.c_attn, x, probs=p)
    return self.c_proj(jnp.einsum('bhij,bjhd->bihd', p, v).reshape(b, n, d))


def test_fused_qkv_sow_attention_matches_dense_reference():
  b, n, d, heads = 2, 5, 6, 2
  model = FusedAttention(d, heads, nnx.Rngs(0))
  x = _normal((b, n, d), 0, 0.3)
  _, inter = _nnx_capture(model, x)
  (stat,) = inter['c_attn'][mac_optax.ATTENTION_MEAN]  # what sow_attention gave
  assert stat.shape == (3, d)
  # Explicit probabilities in NumPy.
  x64 = np.asarray(x, np.float64)
  qkv = x64 @ np.asarray(model.c_attn.kernel[...]) + np.asarray(
      model.c_attn.bias[...])
  q, k = (t.reshape(b, n, heads, -1) for t in np.split(qkv, 3, -1)[:2])
  s = np.einsum('bihd,bjhd->bhij', q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  mixed = np.einsum('bhij,bjd->d', p, x64) / (b * heads * n)
  plain = x64.mean((0, 1))
  np.testing.assert_allclose(stat, np.stack([plain, plain, mixed]),
                             rtol=1e-5, atol=1e-6)
  grads, updates = _nnx_updates(model, inter)
  rows = [plain] * (2 * d) + [mixed] * d
  means = np.stack([np.append(r, 1.0) for r in rows])
  expected_k, expected_b = reference.dense_update(
      grads['c_attn']['kernel'], grads['c_attn']['bias'], means, DAMPING)
  reference.assert_close(updates['c_attn']['kernel'], expected_k)
  reference.assert_close(updates['c_attn']['bias'], expected_b)


def test_sow_attention_needs_exactly_one_of_probs_and_weights():
  layer = nnx.Linear(4, 12, rngs=nnx.Rngs(0), **INIT)
  with pytest.raises(ValueError, match='exactly one'):
    mac_nnx.sow_attention(layer, jnp.ones((1, 2, 4)))


def test_embed_lookup_option_matches_linen():
  model = TiedLM(nnx.Rngs(0))
  tokens = jnp.array([[1, 2, 2], [4, 2, 6]])
  _, inter = _nnx_capture(model, tokens, embed_lookup=True)
  frequencies = np.bincount(np.ravel(tokens), minlength=7) / tokens.size
  np.testing.assert_allclose(inter['embed'][mac_optax.LOOKUP_MEAN][0][0],
                             frequencies, rtol=1e-6)
  _, updates = _nnx_updates(model, inter)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  @jax.jit
  def forward(params, tokens):
    with mac_linen.capture(embed_lookup=True):
      _, v = TiedLMLinen().apply({'params': params}, tokens,
                                 mutable=['intermediates'])
    return v['intermediates']

  _assert_trees_close(updates, _mac_update(_random_like(params, 1),
                                           forward(params, tokens)))
  _, plain = _nnx_capture(model, tokens)
  assert mac_optax.LOOKUP_MEAN not in plain['embed']


# --------------------------------------------------------------------------
# Mechanism: restore, nesting, threads, no side effects.


def _layer_methods():
  return {(cls, name): cls.__dict__[name] for cls, name in [
      (nnx.Linear, '__call__'), (nnx.LinearGeneral, '__call__'),
      (nnx.Conv, '__call__'), (nnx.Embed, 'attend'),
      (nnx.MultiHeadAttention, '__call__')]}


seen = []


class _Probe(nnx.Module):
  """Records the layer classes' methods while a capture runs it."""

  def __init__(self, rngs):
    self.layer = nnx.Linear(3, 2, rngs=rngs, **INIT)

  def __call__(self, x):
    seen.append(_layer_methods())
    return self.layer(x)


def test_no_class_is_patched_and_nesting_raises():
  before = _layer_methods()
  seen.clear()
  model = _Probe(nnx.Rngs(0))
  _, inter = mac_nnx.capture(model)(jnp.ones((2, 3)))
  assert seen == [before] and _layer_methods() == before
  assert set(nnx.to_pure_dict(inter)) == {'layer'}
  # The 0.2 context-manager form says what to write instead.
  with pytest.raises(TypeError, match=r'mac_optax\.nnx\.capture\(model\)\(x\)'):
    with mac_nnx.capture():
      pass

  class Nested(nnx.Module):

    def __init__(self, rngs):
      self.inner = nnx.Linear(3, 2, rngs=rngs, **INIT)

    def __call__(self, x):
      return mac_nnx.capture(self.inner)(x)[0]

  with pytest.raises(ValueError, match='another capture is open'):
    mac_nnx.capture(Nested(nnx.Rngs(0)))(jnp.ones((2, 3)))
  # The failed call left nothing open.
  assert set(nnx.to_pure_dict(
      mac_nnx.capture(model)(jnp.ones((2, 3)))[1])) == {'layer'}


def test_the_model_is_unchanged_by_its_capture():
  model = TiedLM(nnx.Rngs(0))
  tokens = jnp.array([[1, 2, 3]])
  plain = model(tokens)
  state_before = nnx.state(model)
  out, inter = mac_nnx.capture(model)(tokens)
  np.testing.assert_allclose(out, plain, rtol=1e-6, atol=1e-7)
  _assert_trees_close(nnx.state(model), state_before)
  assert not hasattr(model.hidden, mac_optax.MEAN)
  _, outside = nnx.capture(model, nnx.Intermediate)(tokens)
  assert not jax.tree_util.tree_leaves(outside)
  assert jax.tree_util.tree_leaves(inter)


class _Attending(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(2, 4, qkv_features=4, decode=False,
                                       rngs=rngs, **INIT)
    self.out = nnx.Linear(4, 3, rngs=rngs, **INIT)

  def __call__(self, x):
    return self.out(causal_call(self.attn, x))


def test_threads_capture_one_model_at_once_each_as_alone():
  model = _Attending(nnx.Rngs(0))
  x = _normal((2, 3, 4), 0)
  alone = nnx.to_pure_dict(mac_nnx.capture(model)(x)[1])
  barrier, results, errors = threading.Barrier(2), {}, []

  def worker(i):
    try:
      barrier.wait(30)
      results[i] = nnx.to_pure_dict(mac_nnx.capture(model)(x)[1])
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  for i in range(2):
    _assert_trees_close(results[i], alone)


class _Mixer(nnx.Module):
  """A layer MAC cannot model ('bd,dd->bd' reads the kernel's diagonal)."""

  def __init__(self, rngs):
    self.mix = nnx.Einsum('bd,dd->bd', (4, 4), rngs=rngs)
    self.out = nnx.Linear(4, 3, rngs=rngs, **INIT)

  def __call__(self, x):
    return self.out(jnp.tanh(self.mix(x)))


def test_exclude_passes_a_layer_mac_cannot_model_through():
  model = _Mixer(nnx.Rngs(0))
  x = _normal((5, 4), 2)
  # Without exclude= the layer is passed through, and the table says why.
  assert 'reaches no dot_general' in {
      p.path: p.reason for p in mac_nnx.plan(model, x).passed}['mix/kernel']
  plan = mac_nnx.plan(model, x, exclude=['mix'])
  assert plan == mac_nnx.plan(model, x, exclude=[model.mix])
  assert plan.keys == ('out',)
  assert {p.path: p.reason for p in plan.passed} == {
      'mix/kernel': 'excluded by the user'}
  _, inter = mac_nnx.capture(model, exclude=[model.mix])(x)
  assert set(nnx.to_pure_dict(inter)) == {'out'}
  grads = _random_like(nnx.state(model, nnx.Param), 3)
  tx = mac_optax.mac(DAMPING, plan=plan)
  updates = nnx.to_pure_dict(tx.update(grads, tx.init(grads),
                                       intermediates=inter)[0])
  grads = nnx.to_pure_dict(grads)
  np.testing.assert_array_equal(updates['mix']['kernel'],
                                grads['mix']['kernel'])
  h = np.tanh(np.asarray(x, np.float64) * np.diag(
      np.asarray(model.mix.kernel[...], np.float64)))
  kernel, bias = reference.dense_update(
      grads['out']['kernel'], grads['out']['bias'],
      np.tile(np.append(h.mean(0), 1.0), (3, 1)), DAMPING)
  reference.assert_close(updates['out']['kernel'], kernel)
  reference.assert_close(updates['out']['bias'], bias)
  with pytest.raises(TypeError, match='takes the model'):
    mac_nnx.capture(exclude=['mix'])


def test_excluding_an_attention_projection_keeps_the_others():
  model = _Attending(nnx.Rngs(0))
  x = _normal((2, 3, 4), 0)
  plan = mac_nnx.plan(model, x, exclude=['attn/value'])
  assert set(plan.keys) == {'attn/query', 'attn/key', 'attn/out', 'out'}
  inter = nnx.to_pure_dict(_nnx_capture(model, x, exclude=[model.attn.value],
                                        jit=False)[1])
  assert set(inter['attn']) == {'query', 'key', 'out'}


class _Switch(nnx.Module):

  def __init__(self, rngs):
    self.layer = nnx.Linear(3, 4, rngs=rngs, **INIT)

  def __call__(self, x, train):
    y = self.layer(x)
    return y * 2.0 if train else y


def test_plan_takes_a_python_flag_given_by_position():
  model = _Switch(nnx.Rngs(0))
  x = jnp.ones((2, 3))
  by_position = mac_nnx.plan(model, x, True)
  assert by_position == mac_nnx.plan(model, x, train=True)
  assert by_position.keys == ('layer',)


class MyLinear(nnx.Module):
  """A hand-written layer using the public sowing helpers."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(_init(rngs.params(), (4, 3)))

  def __call__(self, x):
    mac_nnx.sow_mean(self, mac_nnx.input_mean(x))
    return x @ self.kernel[...]


def test_sow_mean_in_a_custom_module_and_noop_outside_capture():
  layer = MyLinear(nnx.Rngs(0))
  x = _normal((5, 4), 0)
  _, inter = nnx.capture(layer, nnx.Intermediate)(x)
  np.testing.assert_allclose(inter[mac_optax.MEAN][0][0], x.mean(0),
                             rtol=1e-6)
  layer(x)                                     # no deprecated sow outside
  assert not hasattr(layer, mac_optax.MEAN)
  grads, updates = _nnx_updates(layer, inter)
  assert not np.allclose(updates['kernel'], grads['kernel'])


# --------------------------------------------------------------------------
# Stacked layers, the transform's input forms, nnx.Optimizer.


class Block(nnx.Module):

  def __init__(self, d, rngs):
    self.mlp = nnx.Linear(d, d, rngs=rngs, **INIT)

  def __call__(self, x):
    return x + nnx.relu(self.mlp(x))


def _stacked(modules):
  """Modules stacked on a leading axis (as `nnx.vmap` creates them)."""
  return nnx.merge(nnx.graphdef(modules[0]), jax.tree_util.tree_map(
      lambda *v: jnp.stack(v), *[nnx.state(m) for m in modules]))


def _stacked_blocks(depth, d, rngs):
  return _stacked([Block(d, rngs) for _ in range(depth)])


class ScanNet(nnx.Module):
  """Linear stem, `nnx.scan` over stacked blocks, Linear head."""

  def __init__(self, rngs, depth=3, d=8, remat=False):
    self.proj = nnx.Linear(64, d, rngs=rngs, **INIT)
    self.remat = remat
    self.blocks = _stacked_blocks(depth, d, rngs)
    self.head = nnx.Linear(d, 10, rngs=rngs, **INIT)

  def __call__(self, x):
    x = self.proj(x.reshape(x.shape[0], -1))
    call = nnx.remat(lambda block, x: block(x)) if self.remat else (
        lambda block, x: block(x))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return call(block, x)

    return self.head(body(x, self.blocks))


def _data(n=6):
  return _normal((n, 8, 8, 1), 3), jnp.asarray(np.arange(n) % 10)


def _unrolled_block_means(model, x):
  """Each block's input mean, running the blocks one by one in Python."""
  h = model.proj(x.reshape(x.shape[0], -1))
  graphdef, stacked = nnx.split(model.blocks)
  means = []
  for i in range(stacked['mlp']['kernel'].shape[0]):
    block = nnx.merge(graphdef, jax.tree_util.tree_map(lambda v: v[i],
                                                       stacked))
    means.append(h.mean(0))
    h = block(h)
  return jnp.stack(means)


def test_scan_and_remat_stacked_blocks_get_stacked_statistics():
  # (Scan without remat: the nnx.Optimizer test below.)
  model = ScanNet(nnx.Rngs(0), remat=True)
  x, _ = _data()
  _, inter = _nnx_capture(model, x)
  stacked = inter['blocks']['mlp'][mac_optax.MEAN][0]
  assert stacked.shape == (3, 1, 8)
  unrolled = nnx.jit(_unrolled_block_means)(model, x)
  np.testing.assert_allclose(stacked[:, 0], unrolled,
                             rtol=1e-5, atol=1e-6)
  like = mac_nnx.intermediates_like(model, x)
  assert jax.tree_util.tree_map(lambda s: s.shape, like) == \
      jax.tree_util.tree_map(jnp.shape, inter)
  # Every block is preconditioned with its own mean.
  grads, updates = _nnx_updates(model, inter)
  for i in range(3):
    g_k = grads['blocks']['mlp']['kernel'][i]
    g_b = grads['blocks']['mlp']['bias'][i]
    means = np.tile(np.append(np.asarray(stacked[i, 0]), 1.0), (8, 1))
    expected_k, expected_b = reference.dense_update(g_k, g_b, means, DAMPING)
    reference.assert_close(updates['blocks']['mlp']['kernel'][i], expected_k)
    reference.assert_close(updates['blocks']['mlp']['bias'][i], expected_b)


class ListNet(nnx.Module):
  """Layers in an `nnx.List` (integer path entries)."""

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs, **INIT)
                           for _ in range(2)])

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return x


class Ensemble(nnx.Module):
  """Members stacked on axis 0, run with `nnx.vmap` in the forward pass."""

  def __init__(self, rngs, members=3):
    self.members = _stacked([nnx.Linear(4, 2, rngs=rngs, **INIT)
                             for _ in range(members)])

  def __call__(self, x):
    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def forward(member, x):
      return member(x)

    return forward(self.members, x)


def test_vmapped_members_get_one_mean_each():
  model = Ensemble(nnx.Rngs(0))
  x = _normal((3, 5, 4), 0, 0.5)                  # one batch per member
  _, inter = _nnx_capture(model, x, jit=False)
  # The vmapped kernel axis is a batch axis of the product: one group each.
  plan = mac_nnx.plan(model, x)
  assert plan['members'].layout.roles() == 'bio'
  stat = inter['members'][plan['members'].statistic][0]
  assert stat.shape == (3, 4)
  np.testing.assert_allclose(stat, np.asarray(x).mean(1), rtol=1e-5)
  grads = _random_like(nnx.state(model, nnx.Param), 1)
  tx = mac_optax.mac(DAMPING, plan=plan)
  updates = nnx.to_pure_dict(jax.jit(
      lambda g, i: tx.update(g, tx.init(g), intermediates=i)[0])(grads, inter))
  grads = nnx.to_pure_dict(grads)
  for i in range(3):
    means = np.tile(np.append(np.asarray(stat[i]), 1.0), (2, 1))
    expected_k, expected_b = reference.dense_update(
        grads['members']['kernel'][i], grads['members']['bias'][i], means,
        DAMPING)
    reference.assert_close(updates['members']['kernel'][i], expected_k)
    reference.assert_close(updates['members']['bias'][i], expected_b)


def test_intermediates_as_state_pure_state_or_dict_give_the_same_update():
  model = ListNet(nnx.Rngs(0))
  _, inter = _nnx_capture(model, _normal((3, 4), 0))
  assert set(inter['layers']) == {0, 1}
  grads = _random_like(nnx.state(model, nnx.Param))
  tx = mac_optax.mac(DAMPING)
  state = tx.init(grads)
  update = jax.jit(lambda g, i: tx.update(g, state, intermediates=i)[0])
  results = [
      update(g, i)
      for g, i in [(grads, inter),
                   (as_pure(grads), as_pure(inter)),
                   (nnx.to_pure_dict(grads), nnx.to_pure_dict(inter))]]
  expected = nnx.to_pure_dict(results[0])
  assert not np.allclose(expected['layers'][1]['kernel'],
                         nnx.to_pure_dict(grads)['layers'][1]['kernel'])
  _assert_trees_close(nnx.to_pure_dict(results[1]), expected)
  _assert_trees_close(results[2], expected)


def _train(model, tx, steps, use_like=False):
  x, y = _data()
  if use_like:
    tx = tx(mac_nnx.intermediates_like(model, x))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      logits, inter = mac_nnx.capture(model)(x)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), inter

    (loss, inter), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, intermediates=inter)
    return loss

  return [float(train_step(model, optimizer, x, y)) for _ in range(steps)]


def _manual_training(model, tx, steps):
  """The same steps on pure dicts with `jax.value_and_grad` and `tx.update`."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), as_pure(rest)
  x, y = _data()
  opt_state = tx.init(params)

  def loss_fn(params):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    m = nnx.merge(graphdef, state, rest)
    logits, inter = mac_nnx.capture(m)(x)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, y).mean(), nnx.to_pure_dict(inter)

  @jax.jit
  def step(params, opt_state):
    (_, inter), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   intermediates=inter)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params


def _make_tx(like=None, **mac_kwargs):
  return optax.chain(
      mac_optax.mac(DAMPING, intermediates_like=like, **mac_kwargs),
      optax.trace(0.9), optax.scale(-0.05))


def test_nnx_optimizer_in_jit_with_scan_matches_manual_updates():
  model = ScanNet(nnx.Rngs(0))
  reference_params = _manual_training(ScanNet(nnx.Rngs(0)), _make_tx(), 2)
  losses = _train(model, _make_tx, 2, use_like=True)
  assert losses[-1] < losses[0]
  _assert_trees_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                      reference_params, rtol=1e-4, atol=1e-5)
  assert not np.allclose(reference_params['blocks']['mlp']['kernel'],
                         nnx.to_pure_dict(nnx.state(
                             ScanNet(nnx.Rngs(0)), nnx.Param))['blocks'][
                                 'mlp']['kernel'])


def test_nnx_optimizer_with_lazily_created_layer_state():
  """Without `intermediates_like` the state is created at the first update.

  `nnx.Optimizer` writes it back as an `nnx.State` of the `LayerState`
  fields; with `inv_every=2` all three fields make the round trip.
  """
  model = ListNet(nnx.Rngs(0))
  x = _normal((6, 4), 0)
  y = jnp.asarray(np.arange(6) % 4)
  optimizer = nnx.Optimizer(model, _make_tx(inv_every=2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    def loss_fn(model):
      logits, inter = mac_nnx.capture(model)(x)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), inter

    (loss, inter), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, intermediates=inter)
    return loss

  for _ in range(3):
    train_step(model, optimizer)
  mac_state = optimizer.opt_state[0]
  # nnx.Optimizer merges the new state into the old, so it keeps the key
  # that marks a plan-less init state.
  assert sorted(set(mac_state.layers) - {UNPLANNED}) == ['layers/0',
                                                         'layers/1']
  assert int(mac_state.layers['layers/0']['count']) == 3

  # Same three steps by hand.
  expected = ListNet(nnx.Rngs(0))
  tx = _make_tx(inv_every=2)
  params = nnx.to_pure_dict(nnx.state(expected, nnx.Param))
  opt_state = tx.init(params)
  graphdef = nnx.graphdef(expected)

  def loss_fn(params):
    state = nnx.state(expected)
    nnx.replace_by_pure_dict(state, params)
    logits, inter = mac_nnx.capture(nnx.merge(graphdef, state))(x)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, y).mean(), inter

  @jax.jit
  def step(params, opt_state):
    (_, inter), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   intermediates=inter)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(3):
    params, opt_state = step(params, opt_state)
  _assert_trees_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), params,
                      rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('script', ['digits_cnn_nnx', 'transformer_nnx'])
def test_examples_run(script):
  results = load_example(script).main(['--steps', '3', '--no-progress'])
  assert results and all(np.isfinite(r['train_loss']) for r in results)


def test_flax_private_the_nnx_capture_relies_on():
  seen = []

  class Probe(nnx.Module):

    def __call__(self, x):
      seen.append(getattr(self, mac_capture_nnx.CAPTURES_ATTRIBUTE, None))
      return x

  probe = Probe()
  nnx.capture(probe, nnx.Intermediate)(jnp.ones(2))
  probe(jnp.ones(2))
  assert seen[0] is not None and seen[1] is None, (
      f'This Flax release no longer sets `{mac_capture_nnx.CAPTURES_ATTRIBUTE}` '
      'on the modules nnx.capture collects from (only during the call): '
      'mac_optax.nnx.sow_mean/sow_attention rely on it to know when sowing '
      'is collected; '
      'update mac_optax/_src/capture_nnx.py::_collecting.')
