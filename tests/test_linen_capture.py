"""Linen capture: what it sows, and that it changes nothing else."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
from mac_optax import linen as mac_linen
from tests import reference


class Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding='SAME')(x)
    x = nn.Dense(features=5)(inputs=x)            # keyword call
    return nn.DenseGeneral(3, axis=(-3, -2, -1))(x)


def _setup():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 2)),
                  jnp.float32)
  model = Net()
  params = model.init(jax.random.PRNGKey(0), x)['params']
  return model, params, x


def test_capture_sows_one_statistic_per_layer_and_keeps_outputs():
  model, params, x = _setup()
  plain = model.apply({'params': params}, x)
  with mac_linen.capture():
    out, v = model.apply({'params': params}, x, mutable=['intermediates'])
  np.testing.assert_array_equal(out, plain)
  inter = v['intermediates']
  assert inter['Conv_0'][mac_optax.MEAN][0].shape == (1, 18)
  assert inter['Dense_0'][mac_optax.MEAN][0].shape == (1, 4)
  assert inter['DenseGeneral_0'][mac_optax.MEAN][0].shape == (1, 80)
  np.testing.assert_allclose(inter['Conv_0'][mac_optax.MEAN][0].reshape(
      3, 3, 2)[1, 1], np.asarray(x).mean((0, 1, 2)), rtol=1e-5)


def test_capture_is_inert_without_mutable_intermediates_and_in_init():
  model, params, x = _setup()
  with mac_linen.capture():
    out = model.apply({'params': params}, x)
    variables = model.init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(out, model.apply({'params': params}, x))
  assert set(variables) == {'params'}
  _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  assert not v.get('intermediates')   # nothing sown outside capture


class TiedLM(nn.Module):
  """Token embedding whose table is also the output layer."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(7, 4)
    h = nn.Dense(4)(embed(tokens))
    return embed.attend(h)


def test_embed_attend_preconditions_the_table_along_features():
  model = TiedLM()
  tokens = jnp.array([[1, 2, 3], [4, 5, 6]])
  params = model.init(jax.random.PRNGKey(0), tokens)['params']
  with mac_linen.capture():
    _, v = model.apply({'params': params}, tokens, mutable=['intermediates'])
  inter = v['intermediates']
  assert mac_optax.ATTEND_MEAN in inter['Embed_0']
  grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.random.default_rng(1).normal(size=p.shape),
                            p.dtype), params)
  tx = mac_optax.mac(0.5)
  updates, _ = tx.update(grads, tx.init(params), params, intermediates=inter)
  # The attend input is the Dense output h; the table is (vocab, features):
  # its transpose (features, vocab) is the (d_in, d_out) gradient.
  h = nn.Dense(4).apply({'params': params['Dense_0']},
                        params['Embed_0']['embedding'][tokens])
  a = np.asarray(h).reshape(-1, 4).mean(0)
  kernel, _ = reference.dense_update(grads['Embed_0']['embedding'].T, None,
                                     np.tile(a, (7, 1)), 0.5)
  reference.assert_close(updates['Embed_0']['embedding'], kernel.T)


def test_dense_general_with_batch_dims_sows_one_mean_per_batch_index():
  # Batched kernels are covered in tests/test_einsum.py; here: no rows, so
  # the statistic of batch index n is x[n] itself.
  layer = nn.DenseGeneral(3, axis=-1, batch_dims=0)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
  params = layer.init(jax.random.PRNGKey(0), x)['params']
  with mac_linen.capture():
    _, v = layer.apply({'params': params}, x, mutable=['intermediates'])
  np.testing.assert_allclose(v['intermediates']['mac_einsum_mean'][0], x,
                             rtol=1e-6)


def test_intermediates_like_matches_real_capture_shapes():
  model, params, x = _setup()
  like = mac_linen.intermediates_like(model, {'params': params}, x)
  with mac_linen.capture():
    _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  assert (jax.tree_util.tree_map(lambda a: a.shape, like)
          == jax.tree_util.tree_map(lambda a: a.shape, v['intermediates']))


def test_nested_captures_raise_and_leave_no_capture_open():
  model, params, x = _setup()
  with pytest.raises(ValueError, match='another capture is open'):
    with mac_linen.capture(embed_lookup=True):
      with mac_linen.capture():
        pass
  # The outer capture closed on the error: a new one opens and sows once.
  with mac_linen.capture():
    _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  assert len(v['intermediates']['Dense_0'][mac_optax.MEAN]) == 1
  # A plan is a capture too: building one inside a capture is nesting.
  with pytest.raises(ValueError, match='another capture is open'):
    with mac_linen.capture():
      mac_linen.plan(model, {'params': params}, x)


class Mixer(nn.Module):
  """A layer MAC cannot model ('bd,dd->bd' reads the kernel's diagonal)."""

  @nn.compact
  def __call__(self, x):
    h = nn.Einsum((4, 4), 'bd,dd->bd', use_bias=False, name='mix')(x)
    return nn.Dense(3, name='out')(jnp.tanh(h))


def test_exclude_passes_a_layer_mac_cannot_model_through():
  model = Mixer()
  x = jax.random.normal(jax.random.PRNGKey(2), (5, 4))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  # Without exclude= the layer is passed through, and the table says why.
  plan = mac_linen.plan(model, {'params': params}, x)
  assert plan.keys == ('out',)
  assert 'reaches no dot_general' in {p.path: p.reason
                                      for p in plan.passed}['mix/kernel']
  for exclude in (['mix'], 'mix', lambda path: path.startswith('mix')):
    plan = mac_linen.plan(model, {'params': params}, x, exclude=exclude)
    assert plan.keys == ('out',)
    reasons = {p.path: p.reason for p in plan.passed}
    assert reasons == {'mix/kernel': 'excluded by the user'}
    assert 'excluded by the user' in str(plan)
  grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.random.default_rng(3).normal(size=p.shape),
                            p.dtype), params)
  with mac_linen.capture(exclude=['mix']):
    _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  assert set(v['intermediates']) == {'out'}
  tx = mac_optax.mac(0.5, plan=plan)
  updates, _ = tx.update(grads, tx.init(params), params,
                         intermediates=v['intermediates'])
  np.testing.assert_array_equal(updates['mix']['kernel'],
                                grads['mix']['kernel'])
  h = np.tanh(np.asarray(x, np.float64) * np.diag(
      np.asarray(params['mix']['kernel'], np.float64)))
  kernel, bias = reference.dense_update(
      grads['out']['kernel'], grads['out']['bias'],
      np.tile(np.append(h.mean(0), 1.0), (3, 1)), 0.5)
  reference.assert_close(updates['out']['kernel'], kernel)
  reference.assert_close(updates['out']['bias'], bias)
  with pytest.raises(TypeError, match='exclude='):
    mac_linen.capture(exclude=3).__enter__()


class Switch(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4)(x)
    return nn.Dropout(0.5, deterministic=not train)(x)


def test_plan_takes_a_python_flag_given_by_position():
  model = Switch()
  x = jnp.ones((2, 3))
  variables = model.init(jax.random.PRNGKey(0), x, False)
  by_position = mac_linen.plan(model, variables, x, False)
  assert by_position == mac_linen.plan(model, variables, x, train=False)
  assert by_position.keys == ('Dense_0',)


def test_lookup_plan_with_a_capture_without_lookups_says_embed_lookup():
  model = TiedLM()
  tokens = jnp.array([[1, 2, 3], [4, 5, 6]])
  params = model.init(jax.random.PRNGKey(0), tokens)['params']
  plan = mac_linen.plan(model, {'params': params}, tokens, embed_lookup=True)
  with mac_linen.capture():
    _, v = model.apply({'params': params}, tokens, mutable=['intermediates'])
  tx = mac_optax.mac(0.5, plan=plan)
  with pytest.raises(ValueError, match=r"\['Embed_0@lookup'\].*capture with "
                     'embed_lookup=True like the plan, or build the plan '
                     'without it'):
    tx.update(params, tx.init(params), params,
              intermediates=v['intermediates'])


class Attending(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='out')(
        nn.MultiHeadDotProductAttention(2, name='attn')(x))


def test_excluding_an_attention_projection_keeps_the_others():
  model = Attending()
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 4))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  plan = mac_linen.plan(model, {'params': params}, x, exclude=['attn/value'])
  assert set(plan.keys) == {'attn/query', 'attn/key', 'attn/out', 'out'}
  assert {p.reason for p in plan.passed} == {'excluded by the user'}
  with mac_linen.capture(exclude=['attn/value']):
    _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  assert set(v['intermediates']['attn']) == {'query', 'key', 'out'}
  tx = mac_optax.mac(0.5, plan=plan)
  updates, _ = tx.update(params, tx.init(params), params,
                         intermediates=v['intermediates'])
  np.testing.assert_array_equal(updates['attn']['value']['kernel'],
                                params['attn']['value']['kernel'])
  # The plan and the capture must exclude the same layers; each error says so.
  with mac_linen.capture():
    _, unexcluded = model.apply({'params': params}, x,
                                mutable=['intermediates'])
  with pytest.raises(ValueError, match=r"attn/value.*exclude="):
    tx.update(params, tx.init(params), params,
              intermediates=unexcluded['intermediates'])
  full = mac_optax.mac(0.5, plan=mac_linen.plan(model, {'params': params}, x))
  with pytest.raises(ValueError, match=r"\['attn/value'\].*exclude="):
    full.update(params, full.init(params), params,
                intermediates=v['intermediates'])


class _Stateful(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6)(x)
    h = nn.BatchNorm(use_running_average=False)(h)
    h = nn.Dropout(0.5, deterministic=False)(h)
    self.sow('intermediates', 'hidden', h)
    return nn.Dense(2)(h)


def test_the_capture_applies_the_same_rngs_and_collections():
  # The capture re-applies the model with its scope's `rngs` and `mutable`
  # (attributes of flax.core.Scope): outputs, dropout masks, batch
  # statistics and the model's own sown values are those of the plain call.
  model = _Stateful()
  x = jax.random.normal(jax.random.key(0), (4, 3))
  variables = model.init({'params': jax.random.key(1),
                          'dropout': jax.random.key(2)}, x)
  run = lambda: model.apply(variables, x, rngs={'dropout': jax.random.key(3)},
                            mutable=['batch_stats', 'intermediates'])
  plain_out, plain = run()
  with mac_linen.capture():
    out, captured = run()
  np.testing.assert_array_equal(out, plain_out)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         captured['batch_stats'], plain['batch_stats'])
  np.testing.assert_array_equal(captured['intermediates']['hidden'][0],
                                plain['intermediates']['hidden'][0])
  assert set(captured['intermediates']) == {'hidden', 'Dense_0', 'Dense_1'}
  scope = model.bind(variables, mutable=['batch_stats'],
                     rngs={'dropout': jax.random.key(3)}).scope
  assert scope.mutable == ['batch_stats'] and 'dropout' in scope.rngs, (
      'flax.core.Scope no longer has `mutable`/`rngs` as mac_optax.linen.'
      'capture reads them (capture_linen._call_with_statistics): update it.')
