"""Layers found in the traced program: plain JAX, custom Flax layers.

Each model is written the way third-party code writes it (its own einsum
module with a parameter `w`, kernels stored (out, in), a head applied by
another module with a transposed table, a jitted model, raw lax.scan over
NNX blocks). Each test asserts that >= 95% of the parameters are
preconditioned and that MAC's update equals a float64 reference built from
the layer inputs the test records itself (program_reference.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
from tests import program_reference as ref

LAM = 0.5


def mac_step(fn, params, args, plan):
  """Gradients, MAC's update (stat_decay 0: â is this batch's ā), stats."""
  tx = mac_optax.mac(LAM, 0.0, plan=plan)
  state = tx.init(params)

  def loss(p):
    out, stats = mac_optax.with_statistics(fn, plan)(p, *args)
    return 0.5 * jnp.sum(jnp.square(out)), stats

  (_, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  plain = jax.grad(lambda p: 0.5 * jnp.sum(jnp.square(fn(p, *args))))(params)
  # Same gradients as the plain function, to float32 rounding (XLA fuses
  # the two programs differently).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               grads, plain)
  updates, _ = jax.jit(tx.update)(grads, state, params, intermediates=stats)
  return grads, updates, stats


def check_layer(grads, updates, kernel, bias, mean, in_axes, group_axis=None):
  """The update of one layer against the float64 reference."""
  get = lambda tree, path: tree if path is None else _at(tree, path)
  g_bias = None if bias is None else get(grads, bias)
  want_k, want_b = ref.update(get(grads, kernel), g_bias, mean, LAM, in_axes,
                              group_axis)
  ref.assert_close(get(updates, kernel), want_k)
  if bias is not None:
    ref.assert_close(get(updates, bias), want_b)


def _at(tree, path):
  for part in path.split('/'):
    if isinstance(tree, (list, tuple)):
      tree = tree[int(part)]
    elif hasattr(tree, '__getitem__'):
      tree = tree[part]
    else:   # an Equinox module
      tree = getattr(tree, part)
  return tree


def _init(key, shape, scale=0.5):
  return scale * jax.random.normal(key, shape)


# ------------------------------------------------------------- plain JAX


def test_plain_jax_mlp_with_out_in_kernels_and_lookup():
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  params = {'embed': _init(k[0], (11, 6)),
            'c_fc': {'w': _init(k[1], (8, 6)), 'b': _init(k[2], (8,))},
            'proj': {'w': _init(k[3], (8, 5)), 'b': _init(k[4], (5,))}}
  records = {}

  def fn(p, ids):
    x = p['embed'][ids]
    records['c_fc'] = x
    h = jnp.tanh(x @ p['c_fc']['w'].T + p['c_fc']['b'])   # (out, in)
    records['proj'] = h
    return jnp.einsum('btf,fo->bto', h, p['proj']['w']) + p['proj']['b']

  ids = jax.random.randint(k[5], (3, 4), 0, 11)
  plan = mac_optax.plan(fn, params, ids, embed_lookup=True)
  assert plan.fraction == 1.0
  assert plan['c_fc/w'].layout.roles() == 'oi'
  assert plan['c_fc/w'].bias == 'c_fc/b'
  fn(params, ids)   # records the inputs eagerly
  seen = {k: np.asarray(v) for k, v in records.items()}
  grads, updates, stats = mac_step(fn, params, (ids,), plan)
  check_layer(grads, updates, 'c_fc/w', 'c_fc/b',
              ref.rows_mean(seen['c_fc']), in_axes=(1,))
  check_layer(grads, updates, 'proj/w', 'proj/b',
              ref.rows_mean(seen['proj']), in_axes=(0,))
  freq = np.bincount(np.asarray(ids).ravel(), minlength=11) / ids.size
  ref.assert_close(stats['embed@lookup'][0], freq)
  check_layer(grads, updates, 'embed', None, freq, in_axes=(0,))


def _conv(x, w, stride, padding, dims):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                      dimension_numbers=dims)


def test_plain_jax_cnn_in_nhwc_and_nchw_layouts():
  k = jax.random.split(jax.random.PRNGKey(1), 6)
  params = {'conv1': {'kernel': _init(k[0], (3, 3, 2, 4)),   # HWIO
                      'bias': _init(k[1], (4,))},
            'conv2': {'weight': _init(k[2], (5, 4, 3, 3))},  # OIHW
            'head': {'kernel': _init(k[3], (5, 3)), 'bias': _init(k[4], (3,))}}
  records = {}

  def fn(p, x):
    records['conv1'] = x
    h = _conv(x, p['conv1']['kernel'], 1, ((1, 1), (1, 1)),
              ('NHWC', 'HWIO', 'NHWC')) + p['conv1']['bias']
    h = jax.nn.relu(h)
    records['conv2'] = h
    h = _conv(jnp.transpose(h, (0, 3, 1, 2)), p['conv2']['weight'], 2,
              'VALID', ('NCHW', 'OIHW', 'NCHW'))
    h = jnp.mean(jax.nn.relu(h), axis=(2, 3))
    records['head'] = h
    return h @ p['head']['kernel'] + p['head']['bias']

  x = jax.random.normal(k[5], (2, 7, 7, 2))
  plan = mac_optax.plan(fn, params, x)
  assert plan.fraction == 1.0
  assert plan['conv1/kernel'].kind == 'conv'
  assert plan['conv2/weight'].layout.roles() == 'oiii'
  fn(params, x)
  seen = {k: np.asarray(v) for k, v in records.items()}
  grads, updates, _ = mac_step(fn, params, (x,), plan)
  check_layer(grads, updates, 'conv1/kernel', 'conv1/bias',
              ref.rows_mean(ref.conv_rows(seen['conv1'], (3, 3), 1, 1)),
              in_axes=(0, 1, 2))
  # OIHW: d_in runs over (I, H, W); the patches come as (H, W, I).
  patch = ref.rows_mean(ref.conv_rows(seen['conv2'], (3, 3), 2))
  patch = patch.reshape(3, 3, 4).transpose(2, 0, 1).reshape(-1)
  check_layer(grads, updates, 'conv2/weight', None, patch, in_axes=(1, 2, 3))
  check_layer(grads, updates, 'head/kernel', 'head/bias',
              ref.rows_mean(seen['head']), in_axes=(0,))


def test_no_layer_raises_with_every_reason():
  params = {'scale': jnp.ones(3), 'table': jnp.ones((3, 3))}
  fn = lambda p, x: x * p['scale'] + jnp.sum(p['table'] ** 2)
  with pytest.raises(ValueError, match='no layer found') as e:
    mac_optax.plan(fn, params, jnp.ones((2, 3)))
  assert 'table (3, 3)' in str(e.value)
  assert 'reaches no dot_general' in str(e.value)


def test_exclude_passes_a_layer_through_with_its_reason():
  params = {'a': jnp.ones((3, 4)), 'b': jnp.ones((4, 2))}
  fn = lambda p, x: jnp.tanh(x @ p['a']) @ p['b']
  plan = mac_optax.plan(fn, params, jnp.ones((2, 3)), exclude=['b'])
  assert plan.keys == ('a',)
  assert 'excluded by the user' in str(plan)
  _, stats = mac_optax.with_statistics(fn, plan)(params, jnp.ones((2, 3)))
  assert set(stats) == {'a'}


def test_a_changed_program_is_refused_at_trace_time():
  params = {'a': jnp.ones((3, 4)), 'b': jnp.ones((4, 2))}
  plan = mac_optax.plan(lambda p, x: x @ p['a'], params, jnp.ones((2, 3)))
  other = lambda p, x: jnp.tanh(x @ p['a']) @ p['b']
  with pytest.raises(ValueError, match=r"not planned \['b'\]"):
    mac_optax.with_statistics(other, plan)(params, jnp.ones((2, 3)))


# ------------------------------------------------------------- Flax linen


class Einsum(nn.Module):
  """Third-party style: a parameter `w`, the equation given at call time."""
  shape: tuple

  @nn.compact
  def __call__(self, eqn, x):
    w = self.param('w', nn.initializers.normal(0.5), self.shape)
    return jnp.einsum(eqn, x, w)


class GatedMlpBlock(nn.Module):
  d: int = 6
  f: int = 5

  @nn.compact
  def __call__(self, x):
    gate_up = Einsum((2, self.d, self.f), name='gating')('btd,gdf->gbtf', x)
    h = jax.nn.gelu(gate_up[0]) * gate_up[1]
    return x + Einsum((self.f, self.d), name='down')('btf,fd->btd', h)


class TiedLm(nn.Module):
  vocab: int = 13
  d: int = 6
  jit: bool = True

  @nn.compact
  def __call__(self, ids):
    table = self.param('embedding', nn.initializers.normal(1.0),
                       (self.vocab, self.d))
    x = jnp.take(table, ids, axis=0)
    block = nn.jit(GatedMlpBlock) if self.jit else GatedMlpBlock
    x = block(name='block')(x)
    # The head as some model code writes it: another module's apply with
    # the transposed table as its kernel.
    return nn.Dense(self.vocab, use_bias=False).apply(
        {'params': {'kernel': table.T}}, x)


def _linen_inputs(model, variables, *args):
  """The input of every custom-layer call, recorded by Flax's interceptor."""
  seen = {}

  def record(next_fun, args_, kwargs, context):
    out = next_fun(*args_, **kwargs)
    path = '/'.join(context.module.path)
    if isinstance(context.module, Einsum):
      seen[path] = np.asarray(args_[1])
    elif isinstance(context.module, GatedMlpBlock):
      seen[path + ':out'] = np.asarray(out)
    return out

  with nn.intercept_methods(record):
    model.apply(variables, *args)
  return seen


def test_linen_einsum_module_gated_mlp_jit_and_tied_head():
  model = TiedLm()
  ids = jax.random.randint(jax.random.PRNGKey(2), (2, 5), 0, 13)
  variables = model.init(jax.random.PRNGKey(3), ids)
  params = variables['params']
  fn = lambda p, ids: model.apply({'params': p}, ids)
  fn(params, ids)   # the nn.jit trace is cached before the plan
  plan = mac_optax.plan(fn, params, ids)
  assert plan.fraction >= 0.95, plan
  assert plan['embedding'].layout.roles() == 'oi'   # used as table.T
  assert plan['block/gating/w'].layout.roles() == 'oio'
  inputs = _linen_inputs(TiedLm(jit=False), variables, ids)
  grads, updates, _ = mac_step(fn, params, (ids,), plan)
  check_layer(grads, updates, 'block/gating/w', None,
              ref.rows_mean(inputs['block/gating']), in_axes=(1,))
  check_layer(grads, updates, 'block/down/w', None,
              ref.rows_mean(inputs['block/down']), in_axes=(0,))
  check_layer(grads, updates, 'embedding', None,
              ref.rows_mean(inputs['block:out']), in_axes=(1,))


# ------------------------------------------------------------- attention


def _gqa_attention(p, x, heads=4, kv_heads=2, head_dim=3, records=None):
  """Llama-style attention written by hand: softmax + einsum, GQA by repeat."""
  b, t, _ = x.shape
  q = (x @ p['wq']).reshape(b, t, heads, head_dim)
  k = (x @ p['wk']).reshape(b, t, kv_heads, head_dim)
  v = (x @ p['wv']).reshape(b, t, kv_heads, head_dim)
  k = jnp.repeat(k, heads // kv_heads, axis=2)
  v = jnp.repeat(v, heads // kv_heads, axis=2)
  scores = jnp.einsum('bqhd,bthd->bhqt', q, k) / np.sqrt(head_dim)
  causal = jnp.tril(jnp.ones((t, t), bool))
  probs = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
  if records is not None:
    records['probs'] = probs
  out = jnp.einsum('bhqt,bthd->bqhd', probs, v).reshape(b, t, -1)
  return out @ p['wo']


def _gqa_params(seed, d=5, heads=4, kv_heads=2, head_dim=3):
  """The attention's kernels and a [2, 6, d] input."""
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = {'wq': _init(k[0], (d, heads * head_dim)),
            'wk': _init(k[1], (d, kv_heads * head_dim)),
            'wv': _init(k[2], (d, kv_heads * head_dim)),
            'wo': _init(k[3], (heads * head_dim, d))}
  return params, jax.random.normal(k[4], (2, 6, d))


def test_hand_written_gqa_attention_gets_the_mixed_value_mean():
  d, heads, kv_heads = 5, 4, 2
  params, x = _gqa_params(4)
  fn = lambda p, x: _gqa_attention(p, x)
  plan = mac_optax.plan(fn, params, x)
  assert plan.fraction == 1.0
  value = plan['wv']
  assert value.kind == 'attention_value'
  assert value.layout.stat_shape == (kv_heads, d)
  assert plan['wk'].kind == plan['wq'].kind == 'dense'
  records = {}
  _gqa_attention(params, x, records=records)
  probs = np.asarray(records['probs'], np.float64)         # [b, h, q, t]
  xs = np.asarray(x, np.float64)
  # The rows the value kernel sees: (P x) per query and query head; kv head
  # g serves query heads [2g, 2g + 1].
  mixed = np.einsum('bhqt,btd->bhqd', probs, xs)
  mixed = mixed.reshape(2, kv_heads, heads // kv_heads, 6, d)
  expected = mixed.transpose(1, 0, 2, 3, 4).reshape(kv_heads, -1, d).mean(1)
  grads, updates, stats = mac_step(fn, params, (x,), plan)
  ref.assert_close(stats['wv'], expected)
  check_layer(grads, updates, 'wv', None, expected, in_axes=(0,),
              group_axis=1)
  check_layer(grads, updates, 'wq', None, ref.rows_mean(xs), in_axes=(0,))
  check_layer(grads, updates, 'wk', None, ref.rows_mean(xs), in_axes=(0,))


class EinsumAttention(nn.Module):
  """Gemma-style: q, fused kv and output projections through `Einsum`."""
  d: int = 6
  heads: int = 2
  head_dim: int = 3

  @nn.compact
  def __call__(self, x, records=None):
    n, h, d = self.heads, self.head_dim, self.d
    q = Einsum((n, d, h), name='q')('BTD,NDH->BTNH', x)
    k, v = Einsum((2, n, d, h), name='kv')('BSD,CNDH->CBSNH', x)
    logits = jnp.einsum('BTNH,BSNH->BNTS', q, k) / np.sqrt(h)
    probs = jax.nn.softmax(logits, axis=-1)
    if records is not None:
      records['probs'] = probs
    out = jnp.einsum('BNTS,BSNH->BTNH', probs, v)
    return Einsum((n, h, d), name='out')('BTNH,NHD->BTD', out)


def test_linen_einsum_attention_with_fused_kv():
  model = EinsumAttention()
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 5, 6))
  params = model.init(jax.random.PRNGKey(7), x)['params']
  fn = lambda p, x: model.apply({'params': p}, x)
  plan = mac_optax.plan(fn, params, x)
  assert plan.fraction == 1.0
  kv = plan['kv/w']
  assert kv.kind == 'attention_value' and kv.layout.roles() == 'ooio'
  assert kv.layout.stat_shape == (2, 6)   # the k part, the v part
  records = {}
  model.apply({'params': params}, x, records)
  probs = np.asarray(records['probs'], np.float64)     # [b, n, t, s]
  xs = np.asarray(x, np.float64)
  mixed = np.einsum('bnts,bsd->bntd', probs, xs).reshape(-1, 6).mean(0)
  grads, updates, stats = mac_step(fn, params, (x,), plan)
  expected = np.stack([ref.rows_mean(xs), mixed])
  ref.assert_close(stats['kv/w'], expected)
  check_layer(grads, updates, 'kv/w', None, expected, in_axes=(2,),
              group_axis=0)
  check_layer(grads, updates, 'q/w', None, ref.rows_mean(xs), in_axes=(1,))
  attn = np.einsum('bnts,bsnh->btnh', probs, np.einsum(
      'bsd,cndh->cbsnh', xs, np.asarray(params['kv']['w']))[1])
  check_layer(grads, updates, 'out/w', None,
              ref.rows_mean(attn.reshape(2, 5, -1)), in_axes=(0, 1))


# ------------------------------------------------------- sub-programs


@jax.custom_vjp
def _own_kernel(x, w):
  return x @ w


_own_kernel.defvjp(
    lambda x, w: (x @ w, (x, w)),
    lambda r, g: (g @ r[1].T, jnp.einsum('...d,...e->de', r[0], g)))


def _transformed(p, x):
  """remat, cond, fori_loop, dot_product_attention, custom_vjp."""
  h = jax.checkpoint(lambda h: jnp.tanh(h @ p['a']))(x)
  h = jax.lax.cond(jnp.sum(x) > 0, lambda h: h @ p['b'],
                   lambda h: 2.0 * h @ p['b'], h)
  h = jax.lax.cond(jnp.sum(x) > 0, lambda h: h @ p['only_one_branch'],
                   lambda h: h, h)
  h = jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ p['loop']), h)
  q, k, v = (jnp.einsum('btd,dnh->btnh', h, p[n]) for n in 'qkv')
  o = jax.nn.dot_product_attention(q, k, v, is_causal=True).mean(2)
  return _own_kernel(o, p['custom'])


def test_sub_programs_are_followed_and_opaque_calls_named():
  names = ('a', 'b', 'only_one_branch', 'loop', 'q', 'k', 'v', 'custom')
  shapes = {'a': (4, 5), 'q': (5, 2, 3), 'k': (5, 2, 3), 'v': (5, 2, 3),
            'custom': (3, 3)}
  keys = jax.random.split(jax.random.PRNGKey(8), len(names) + 1)
  params = {n: _init(k, shapes.get(n, (5, 5))) for n, k in zip(names, keys)}
  x = jax.random.normal(keys[-1], (2, 4, 4))
  plan = mac_optax.plan(_transformed, params, x)
  assert plan.keys == ('a', 'b', 'k', 'loop', 'q', 'v')
  assert plan['v'].kind == 'attention_value'
  assert plan['v'].layout.stat_shape == (2, 5)   # one per head
  reasons = {p.path: p.reason for p in plan.passed}
  assert reasons['only_one_branch'] == (
      'called in only some branches of a lax.cond')
  assert 'enters `custom_vjp_call`' in reasons['custom']
  loop = lambda p, x: jax.lax.while_loop(
      lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ p['w']), (0, x))[1]
  with pytest.raises(ValueError, match='enters `while`'):
    mac_optax.plan(loop, {'w': jnp.ones((3, 3))}, jnp.ones((2, 3)))
  grads, updates, stats = mac_step(_transformed, params, (x,), plan)
  # The loop's layer is called twice: the mean of both inputs.
  positive = bool(jnp.sum(x) > 0)
  h = (1.0 if positive else 2.0) * jnp.tanh(x @ params['a']) @ params['b']
  h = h @ params['only_one_branch'] if positive else h
  h1 = jnp.tanh(h @ params['loop'])
  ref.assert_close(stats['loop'][0], ref.rows_mean(
      np.concatenate([np.asarray(h).reshape(-1, 5),
                      np.asarray(h1).reshape(-1, 5)])))
  h2 = np.asarray(jnp.tanh(h1 @ params['loop']), np.float64)
  q = np.einsum('btd,dnh->btnh', h2, np.asarray(params['q']))
  k = np.einsum('btd,dnh->btnh', h2, np.asarray(params['k']))
  logits = np.einsum('bqnh,btnh->bnqt', q, k) / np.sqrt(3)
  logits = np.where(np.tril(np.ones((4, 4), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  mixed = np.einsum('bnqt,btd->nbqd', probs, h2).reshape(2, -1, 5).mean(1)
  ref.assert_close(stats['v'], mixed)
  check_layer(grads, updates, 'v', None, mixed, in_axes=(0,), group_axis=1)


def test_diagnostics_and_the_quick_start_read_program_plans():
  params = {'w': _init(jax.random.PRNGKey(9), (4, 3)), 'b': jnp.zeros(3)}
  fn = lambda p, x: jnp.tanh(x @ p['w'] + p['b'])
  x = jax.random.normal(jax.random.PRNGKey(10), (5, 4))
  plan = mac_optax.plan(fn, params, x)
  grads, updates, stats = mac_step(fn, params, (x,), plan)
  tx = mac_optax.mac(LAM, 0.0, plan=plan)
  _, state = tx.update(grads, tx.init(params), params, intermediates=stats)
  figures = mac_optax.diagnostics.layer_figures(grads, state, plan=plan)
  assert set(figures) == {'w'}
  ref.assert_close(figures['w'].mean_norm, np.linalg.norm(stats['w'],
                                                          axis=-1))
  with pytest.raises(ValueError, match='plan='):
    mac_optax.mac(LAM, 0.0).update(grads, mac_optax.mac().init(params),
                                   params, intermediates=stats)


def test_token_mask_averages_real_tokens_and_real_queries():
  d, kv_heads = 5, 2
  params, x = _gqa_params(11)
  mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  fn = lambda p, x: _gqa_attention(p, x)
  plan = mac_optax.plan(fn, params, x)
  _, stats = jax.jit(lambda p, x, m: mac_optax.with_statistics(
      fn, plan, token_mask=m)(p, x))(params, x, mask)
  records = {}
  _gqa_attention(params, x, records=records)
  probs = np.asarray(records['probs'], np.float64)
  xs, m = np.asarray(x, np.float64), np.asarray(mask, np.float64)
  ref.assert_close(stats['wq'][0], (xs * m[..., None]).sum((0, 1)) / m.sum())
  rows = np.einsum('bhqt,btd->bhqd', probs, xs) * m[:, None, :, None]
  rows = rows.reshape(2, kv_heads, 2, 6, d).sum((0, 2, 3))
  ref.assert_close(stats['wv'], rows / (2 * m.sum()))
  with pytest.raises(ValueError, match='matched no layer input'):
    mac_optax.with_statistics(fn, plan, token_mask=jnp.ones((2, 7), bool))(
        params, x)


class MixedNet(nn.Module):
  """A Flax Dense next to a layer written with its own code."""

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.normal(0.5), (5, x.shape[-1]))
    h = jnp.tanh(x @ w.T)   # (out, in), invisible to the class-based capture
    return nn.Dense(3)(h)


def _same_updates(plan_a, inter_a, plan_b, inter_b, params):
  grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.random.default_rng(5).normal(size=p.shape),
                            p.dtype), params)
  got = []
  for plan, inter in ((plan_a, inter_a), (plan_b, inter_b)):
    tx = mac_optax.mac(0.5, plan=plan)
    got.append(tx.update(grads, tx.init(params), params,
                         intermediates=inter)[0])
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      *got)
  moved = jax.tree_util.tree_map(lambda u, g: not np.allclose(u, g),
                                 got[0], grads)
  return moved


def test_linen_capture_preconditions_what_the_program_finds():
  x = jax.random.normal(jax.random.PRNGKey(11), (2, 4))
  model = MixedNet()
  variables = model.init(jax.random.PRNGKey(12), x)
  plan = mac_optax.linen.plan(model, variables, x)
  assert plan.keys == ('Dense_0', 'w') and plan.passed == ()
  # `w` (out, in), applied as x @ w.T: sown at its own path.
  assert plan['w'].statistic == mac_optax._src.statistics.PROGRAM
  assert plan['w'].layout.roles() == 'oi' and plan['w'].kind == 'dense'
  with mac_optax.linen.capture():
    _, v = model.apply(variables, x, mutable=['intermediates'])
  (stat,) = v['intermediates']['w'][plan['w'].statistic]
  np.testing.assert_allclose(stat[0], np.asarray(x).mean(0), rtol=1e-6)
  fn = lambda p, x: model.apply({'params': p}, x)
  program_plan = mac_optax.plan(fn, variables['params'], x)
  _, stats = mac_optax.with_statistics(fn, program_plan)(
      variables['params'], x)
  moved = _same_updates(plan, v['intermediates'], program_plan, stats,
                        variables['params'])
  assert all(jax.tree_util.tree_leaves(moved))
  # Einsum modules with `w`, an nn.jit block and a head applied through
  # another module: the capture's layers are the program's.
  model = TiedLm(jit=False)
  ids = jnp.zeros((1, 3), jnp.int32)
  variables = model.init(jax.random.PRNGKey(13), ids)
  plan = mac_optax.linen.plan(model, variables, ids)
  program_plan = mac_optax.plan(lambda p, i: model.apply({'params': p}, i),
                                variables['params'], ids)
  assert {(l.kernel_leaf, l.layout) for l in plan.layers} == {
      (l.kernel_leaf, l.layout) for l in program_plan.layers}


def test_nnx_capture_preconditions_what_the_program_finds():
  from flax import nnx   # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (5, 4)))
      self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.tanh(x @ self.w[...].T))

  net = Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(14), (2, 4))
  plan = mac_optax.nnx.plan(net, x)
  assert plan.keys == ('head', 'w') and plan['w'].layout.roles() == 'oi'
  _, inter = mac_optax.nnx.capture(net)(x)
  (stat,) = inter['w'][plan['w'].statistic]
  np.testing.assert_allclose(stat[0], np.asarray(x).mean(0), rtol=1e-6)
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)
  fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)
  program_plan = mac_optax.plan(fn, params, x)
  _, stats = mac_optax.with_statistics(fn, program_plan)(params, x)
  moved = _same_updates(plan, inter, program_plan, stats, params)
  assert all(jax.tree_util.tree_leaves(moved))
