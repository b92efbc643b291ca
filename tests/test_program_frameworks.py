"""Equinox and NNX-through-raw-scan models, found from the program alone.

Equinox: its own Linear, Conv2d, MultiheadAttention, Embedding and
LayerNorm, batched with jax.vmap as Equinox code does. NNX: stacked blocks
run by a raw ``jax.lax.scan`` over their state. Each asserts >= 95% of the
parameters preconditioned and the update equal to the float64 reference
from inputs the test recomputes from the model's own parts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mac_optax
from tests import program_reference as ref
from tests.test_program_layers import check_layer
from tests.test_program_layers import mac_step

eqx = pytest.importorskip('equinox')


class EqxNet(eqx.Module):
  embed: eqx.nn.Embedding
  conv: eqx.nn.Conv2d
  norm: eqx.nn.LayerNorm
  mha: eqx.nn.MultiheadAttention
  head: eqx.nn.Linear

  def __init__(self, key, vocab=13, d=8, heads=2, classes=5):
    k = jax.random.split(key, 5)
    self.embed = eqx.nn.Embedding(vocab, d, key=k[0])
    self.conv = eqx.nn.Conv2d(1, d, 3, padding=1, key=k[1])
    self.norm = eqx.nn.LayerNorm(d)
    self.mha = eqx.nn.MultiheadAttention(heads, d, key=k[2])
    self.head = eqx.nn.Linear(d, classes, key=k[3])

  def features(self, ids, image):
    x = jax.vmap(self.embed)(ids) + jnp.mean(self.conv(image), axis=(1, 2))
    return jax.vmap(self.norm)(x)

  def __call__(self, ids, image):
    x = self.features(ids, image)
    x = x + self.mha(x, x, x)
    return jax.vmap(self.head)(x)


def test_equinox_model_from_its_own_layers():
  model = EqxNet(jax.random.PRNGKey(0))
  params, static = eqx.partition(model, eqx.is_array)
  fn = lambda p, ids, image: jax.vmap(eqx.combine(p, static))(ids, image)
  k = jax.random.split(jax.random.PRNGKey(1), 2)
  ids = jax.random.randint(k[0], (3, 4), 0, 13)
  image = jax.random.normal(k[1], (3, 1, 5, 5))
  plan = mac_optax.plan(fn, params, ids, image, embed_lookup=True)
  assert plan.fraction >= 0.95, plan
  assert plan['mha/value_proj/weight'].kind == 'attention_value', plan
  assert 'norm/weight' in {p.path for p in plan.passed}
  grads, updates, stats = mac_step(fn, params, (ids, image), plan)
  # Inputs recomputed from the model's own parts, in float64 where it counts.
  x = np.asarray(jax.vmap(model.features)(ids, image), np.float64)  # [b,t,d]
  rows = ref.rows_mean(x)
  mha = model.mha
  heads, d = 2, 8
  hd = d // heads
  q = np.einsum('btd,od->bto', x, np.asarray(mha.query_proj.weight))
  kk = np.einsum('btd,od->bto', x, np.asarray(mha.key_proj.weight))
  v = np.einsum('btd,od->bto', x, np.asarray(mha.value_proj.weight))
  q, kk, v = (a.reshape(3, 4, heads, hd) for a in (q, kk, v))
  logits = np.einsum('bqhe,bthe->bhqt', q / np.sqrt(hd), kk)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  mixed = np.einsum('bhqt,btd->hbqd', probs, x).reshape(heads, -1, d).mean(1)
  attn = np.einsum('bhqt,bthe->bqhe', probs, v).reshape(3, 4, d)
  for name, mean, group in (('query_proj', rows, None),
                            ('key_proj', rows, None),
                            ('value_proj', mixed, 0),
                            ('output_proj', ref.rows_mean(attn), None)):
    check_layer(grads, updates, f'mha/{name}/weight', None, mean,
                in_axes=(1,), group_axis=group)
  after = x + np.asarray(jax.vmap(lambda a: model.mha(a, a, a))(
      jnp.asarray(x, jnp.float32)))
  check_layer(grads, updates, 'head/weight', 'head/bias',
              ref.rows_mean(after), in_axes=(1,))
  freq = np.bincount(np.asarray(ids).ravel(), minlength=13) / ids.size
  check_layer(grads, updates, 'embed/weight', None, freq, in_axes=(0,))
  # The conv (O, I, kh, kw): d_in over (I, kh, kw); one input channel.
  nhwc = np.asarray(image, np.float64).transpose(0, 2, 3, 1)
  check_layer(grads, updates, 'conv/weight', 'conv/bias',
              ref.rows_mean(ref.conv_rows(nhwc, (3, 3), 1, 1)),
              in_axes=(1, 2, 3))


class Block(nnx.Module):

  def __init__(self, d, rngs):
    self.lin = nnx.Linear(d, d, rngs=rngs)
    self.norm = nnx.LayerNorm(d, use_scale=False, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.lin(self.norm(x)))


def test_nnx_blocks_through_raw_lax_scan_are_stacked_layers():
  depth, d = 3, 6
  blocks = [Block(d, nnx.Rngs(i)) for i in range(depth)]
  graphdef, _ = nnx.split(blocks[0])
  state = jax.tree.map(lambda *a: jnp.stack(a),
                       *[nnx.state(b, nnx.Param) for b in blocks])

  def fn(state, x):
    def body(x, s):
      return nnx.merge(graphdef, s)(x), None
    return jax.lax.scan(body, x, state)[0]

  x = jax.random.normal(jax.random.PRNGKey(5), (4, 2, d))
  plan = mac_optax.plan(fn, state, x)
  assert plan.fraction == 1.0, plan
  layer = plan['lin/kernel']
  assert layer.layout.stat_shape == (depth, 1, d) and layer.bias == 'lin/bias'
  assert layer.layout.roles() == 'sio'
  grads, updates, stats = mac_step(fn, state, (x,), plan)
  h = x
  for i, block in enumerate(blocks):
    rows = ref.rows_mean(block.norm(h))
    ref.assert_close(stats['lin/kernel'][i, 0], rows)
    g = jax.tree.map(lambda a: a[i], grads)
    u = jax.tree.map(lambda a: a[i], updates)
    check_layer(g, u, 'lin/kernel', 'lin/bias', rows, in_axes=(0,))
    h = block(h)
