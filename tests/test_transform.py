"""The `mac` transform against an explicit dense inverse, and its behaviour."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax import linen as mac_linen
from tests import reference

DAMPING = 0.7


def _random_like(tree, seed):
  """Normal(0, 1/2) arrays shaped like `tree` (arrays or shape structs)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda l: jnp.asarray(0.5 * rng.normal(size=l.shape), l.dtype), tree)


def _init(model, *inputs):
  """Random parameters without running (or compiling) Flax initializers."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)
  return _random_like(shapes['params'], 100)


def _normal(shape, seed, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _captured(model, params, x):
  with mac_linen.capture():
    _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  return v['intermediates']


def _layer_apply(layer):
  def apply_fn(kernel, bias, x):
    params = {'kernel': kernel}
    if bias is not None:
      params['bias'] = bias
    return layer.apply({'params': params}, x)
  return apply_fn


LAYERS = {
    'dense_3d_input': (nn.Dense(5), (2, 3, 4), 1),
    'dense_no_bias': (nn.Dense(5, use_bias=False), (6, 4), 1),
    'dense_general_two_in_axes': (
        nn.DenseGeneral(5, axis=(-2, -1)), (3, 2, 4), 1),
    'dense_general_two_out_axes': (
        nn.DenseGeneral((2, 3), axis=-1), (3, 2, 4), 2),
    'dense_general_middle_axis': (
        nn.DenseGeneral(3, axis=1, use_bias=False), (2, 4, 3), 1),
    'conv1d_stride_dilation': (
        nn.Conv(4, (3,), strides=2, kernel_dilation=2), (2, 11, 3), 1),
    'conv1d_causal': (nn.Conv(4, (3,), padding='CAUSAL'), (2, 7, 2), 1),
    'conv2d_same_stride': (
        nn.Conv(4, (3, 3), strides=(2, 1), padding='SAME'), (2, 7, 6, 3), 1),
    'conv2d_valid_no_bias': (
        nn.Conv(4, (2, 3), padding='VALID', use_bias=False),
        (2, 5, 6, 3), 1),
    'conv2d_explicit_padding_dilation': (
        nn.Conv(4, (3, 2), padding=((2, 0), (1, 3)), kernel_dilation=(1, 2)),
        (2, 6, 5, 2), 1),
    'conv2d_groups': (
        nn.Conv(6, (3, 3), feature_group_count=3, padding='SAME'),
        (2, 5, 5, 6), 1),
    'conv2d_circular_groups_no_bias': (
        nn.Conv(4, (3, 3), feature_group_count=2, padding='CIRCULAR',
                use_bias=False), (2, 5, 4, 4), 1),
    'conv2d_input_dilation': (
        nn.Conv(3, (2, 2), input_dilation=2, padding=1), (1, 4, 4, 2), 1),
    'conv2d_no_batch_axis': (nn.Conv(3, (2, 2)), (4, 4, 2), 1),
}


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('name', sorted(LAYERS))
def test_single_layer_matches_dense_inverse(name, dtype):
  layer, shape, n_out = LAYERS[name]
  with reference.x64() if dtype == np.float64 else _nullcontext():
    layer = layer.clone(param_dtype=dtype, dtype=dtype)
    x = _normal(shape, 1, dtype) + 0.5
    params = _init(layer, x)
    grads = _random_like(params, 2)
    inter = _captured(layer, params, x)
    means = reference.column_means(_layer_apply(layer), params['kernel'],
                                   params.get('bias'), x, n_out)
    for exact in (False, True):
      tx = mac_optax.mac(DAMPING, stat_decay=0.9, exact_inverse=exact,
                         stat_dtype=dtype)
      updates, _ = jax.jit(tx.update)(grads, tx.init(params), params,
                                      intermediates=inter)
      kernel, bias = reference.dense_update(
          grads['kernel'], grads.get('bias'), means, DAMPING, exact)
      assert updates['kernel'].dtype == dtype
      reference.assert_close(updates['kernel'], kernel, dtype)
      if bias is not None:
        reference.assert_close(updates['bias'], bias, dtype)
      # The update is not the raw gradient: the preconditioner did something.
      assert not np.allclose(updates['kernel'], grads['kernel'])


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *args):
    return False


class MixedNet(nn.Module):
  """Conv, DenseGeneral and Dense, plus a LayerNorm without statistics."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1, 4)
    x = nn.DenseGeneral((2, 3))(x)
    x = nn.LayerNorm()(x)
    x = nn.DenseGeneral(5, axis=(-2, -1))(x)
    return nn.Dense(3)(x.mean(1))


def _mixed_setup():
  model = MixedNet()
  x = _normal((4, 6, 6, 2), 3)
  params = _init(model, x)
  return model, params, x


def test_mixed_model_every_layer_matches_reference_and_norms_pass_through():
  model, params, x = _mixed_setup()
  grads = _random_like(params, 4)
  inter = _captured(model, params, x)
  tx = mac_optax.mac(DAMPING)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      intermediates=inter)
  assert set(state.layers) == {'Conv_0', 'DenseGeneral_0', 'DenseGeneral_1',
                               'Dense_0'}
  np.testing.assert_array_equal(updates['LayerNorm_0']['scale'],
                                grads['LayerNorm_0']['scale'])
  np.testing.assert_array_equal(updates['LayerNorm_0']['bias'],
                                grads['LayerNorm_0']['bias'])
  # Reference: the mean input of each layer from the inputs it really sees.
  inputs = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.path:
      inputs[context.module.path[0]] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({'params': params}, x)
  layers = {'Conv_0': (nn.Conv(4, (3, 3), strides=2), 1),
            'DenseGeneral_0': (nn.DenseGeneral((2, 3)), 2),
            'DenseGeneral_1': (nn.DenseGeneral(5, axis=(-2, -1)), 1),
            'Dense_0': (nn.Dense(3), 1)}
  for name, (layer, n_out) in layers.items():
    p, g = params[name], grads[name]
    means = reference.column_means(_layer_apply(layer), p['kernel'], p['bias'],
                                   inputs[name], n_out)
    kernel, bias = reference.dense_update(g['kernel'], g['bias'], means,
                                          DAMPING)
    reference.assert_close(updates[name]['kernel'], kernel)
    reference.assert_close(updates[name]['bias'], bias)


def _dense_setup(seed=0, d_in=3, d_out=2):
  layer = nn.Dense(d_out)
  params = _init(layer, jnp.ones((1, d_in)))
  return layer, params


def _stat(mean):
  """Intermediates carrying a given batch mean for the Dense layer at root."""
  return {mac_optax.MEAN: (jnp.asarray(mean, jnp.float32)[None, :],)}


def _root(tree):
  """A single-layer linen model lives at the root path: wrap it."""
  return {'layer': tree}


def test_ema_and_bias_correction_over_steps():
  _, params = _dense_setup()
  params = _root(params)
  beta = 0.8
  tx = mac_optax.mac(DAMPING, stat_decay=beta)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  m = np.zeros(3)
  for t in range(1, 6):
    batch_mean = rng.normal(size=3)
    grads = _random_like(params, t)
    updates, state = tx.update(grads, state, params,
                               intermediates=_root(_stat(batch_mean)))
    m = beta * m + (1 - beta) * batch_mean
    a_hat = m / (1 - beta ** t)
    np.testing.assert_allclose(state.layers['layer'].mean[0], m, rtol=1e-5)
    assert int(state.layers['layer'].count) == t
    means = np.tile(np.append(a_hat, 1.0), (2, 1))
    kernel, bias = reference.dense_update(grads['layer']['kernel'],
                                          grads['layer']['bias'], means,
                                          DAMPING)
    reference.assert_close(updates['layer']['kernel'], kernel)
    reference.assert_close(updates['layer']['bias'], bias)


def _authors_cadence(batch_means, beta, cov_every, inv_every):
  """The authors' loop: a global step counter; stats on `step % Tcov == 0`,
  the preconditioner refreshed on `step % Tinv == 0`, counter bumped after."""
  step, ema, folded, used, out = 0, np.zeros(3), 0, None, []
  for batch_mean in batch_means:
    if step % cov_every == 0:
      ema = beta * ema + (1 - beta) * batch_mean
      folded += 1
    if step % inv_every == 0:
      used = ema / (1 - beta ** folded)
    out.append(used)
    step += 1
  return out


@pytest.mark.parametrize('cov_every,inv_every', [(2, 3), (5, 5), (3, 1)])
def test_cadences_match_authors_step_counter(cov_every, inv_every):
  _, params = _dense_setup()
  params = _root(params)
  beta = 0.9
  rng = np.random.default_rng(1)
  batch_means = [rng.normal(size=3) for _ in range(11)]
  expected = _authors_cadence(batch_means, beta, cov_every, inv_every)
  tx = mac_optax.mac(DAMPING, beta, cov_every=cov_every, inv_every=inv_every)
  update = jax.jit(tx.update)
  state = tx.init(params)
  grads = _random_like(params, 0)
  for batch_mean, a_hat in zip(batch_means, expected):
    updates, state = update(grads, state, params,
                            intermediates=_root(_stat(batch_mean)))
    means = np.tile(np.append(a_hat, 1.0), (2, 1))
    kernel, _ = reference.dense_update(grads['layer']['kernel'],
                                       grads['layer']['bias'], means, DAMPING)
    reference.assert_close(updates['layer']['kernel'], kernel)
  assert update._cache_size() == 2  # pylint: disable=protected-access


def test_jit_equals_eager_and_state_structure_is_fixed_after_first_step():
  model, params, x = _mixed_setup()
  tx = mac_optax.mac(DAMPING)
  inter = _captured(model, params, x)
  grads = _random_like(params, 5)
  eager_state = tx.init(params)
  jit_state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(3):
    eager_updates, eager_state = tx.update(grads, eager_state, params,
                                           intermediates=inter)
    jit_updates, jit_state = update(grads, jit_state, params,
                                    intermediates=inter)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        eager_updates, jit_updates)
  assert (jax.tree_util.tree_structure(eager_state)
          == jax.tree_util.tree_structure(jit_state))


def test_intermediates_like_builds_the_complete_state_in_init():
  model, params, x = _mixed_setup()
  like = mac_linen.intermediates_like(model, {'params': params}, x)
  tx = mac_optax.mac(DAMPING, intermediates_like=like)
  state = tx.init(params)
  _, after = tx.update(_random_like(params, 0), state, params,
                       intermediates=_captured(model, params, x))
  assert (jax.tree_util.tree_structure(state)
          == jax.tree_util.tree_structure(after))
  assert state.layers['Conv_0'].mean.shape == (1, 18)


def test_chain_inject_hyperparams_and_partition():
  model, params, x = _mixed_setup()
  inter = _captured(model, params, x)
  grads = _random_like(params, 6)
  plain = optax.chain(mac_optax.mac(DAMPING), optax.scale(-0.1))
  expected, _ = plain.update(grads, plain.init(params), params,
                             intermediates=inter)

  injected = optax.chain(
      optax.inject_hyperparams(mac_optax.mac, static_args=('cov_every',))(
          damping=DAMPING, stat_decay=0.95, cov_every=1),
      optax.scale(-0.1))
  got, state = jax.jit(injected.update)(grads, injected.init(params), params,
                                        intermediates=inter)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      expected, got)
  assert float(state[0].hyperparams['damping']) == pytest.approx(DAMPING)

  # partition: MAC on the dense layers, plain SGD on everything else.
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: 'mac' if path[0].key.startswith('Dense') else 'sgd',
      params)
  partitioned = optax.partition(
      {'mac': optax.chain(mac_optax.mac(DAMPING), optax.scale(-0.1)),
       'sgd': optax.scale(-0.1)}, labels)
  got, _ = partitioned.update(grads, partitioned.init(params), params,
                              intermediates=inter)
  for name in ('DenseGeneral_0', 'DenseGeneral_1', 'Dense_0'):
    np.testing.assert_allclose(got[name]['kernel'], expected[name]['kernel'],
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['Conv_0']['kernel'],
                             -0.1 * grads['Conv_0']['kernel'], rtol=1e-6)


class ScannedMLP(nn.Module):
  """Three Dense+relu blocks stacked with nn.scan, each block rematerialized."""

  @nn.compact
  def __call__(self, x):
    block = nn.remat(_Block)
    scan = nn.scan(block, variable_axes={'params': 0, 'intermediates': 0},
                   split_rngs={'params': True}, length=3)
    x, _ = scan()(x, None)
    return nn.Dense(2)(x)


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(4)(x)), None


def test_scan_and_remat_stack_statistics_and_match_per_layer_reference():
  model = ScannedMLP()
  x = _normal((5, 4), 7)
  params = _init(model, x)
  grads = _random_like(params, 8)
  inter = _captured(model, params, x)
  tx = mac_optax.mac(DAMPING)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      intermediates=inter)
  key = 'ScanCheckpoint_Block_0/Dense_0'
  scanned = params['ScanCheckpoint_Block_0']['Dense_0']
  assert scanned['kernel'].shape == (3, 4, 4)
  assert state.layers[key].mean.shape == (3, 1, 4)
  assert state.layers[key].count.shape == (3,)
  # Recompute each block's input by hand and check each slice.
  h = x
  for i in range(3):
    kernel, bias = scanned['kernel'][i], scanned['bias'][i]
    a = np.append(np.asarray(h).mean(0), 1.0)
    g = grads['ScanCheckpoint_Block_0']['Dense_0']
    ref_k, ref_b = reference.dense_update(g['kernel'][i], g['bias'][i],
                                          np.tile(a, (4, 1)), DAMPING)
    u = updates['ScanCheckpoint_Block_0']['Dense_0']
    reference.assert_close(u['kernel'][i], ref_k)
    reference.assert_close(u['bias'][i], ref_b)
    h = jax.nn.relu(h @ kernel + bias)


class TwiceCalled(nn.Module):

  @nn.compact
  def __call__(self, x, y):
    shared = nn.Dense(2)
    return shared(x) + shared(y).mean(0)


def test_layer_called_twice_uses_mean_over_calls():
  model = TwiceCalled()
  x = _normal((4, 3), 0)
  y = _normal((6, 3), 1) + 2.0
  params = _init(model, x, y)
  with mac_linen.capture():
    _, v = model.apply({'params': params}, x, y, mutable=['intermediates'])
  # One statistic per layer: the mean of its calls' means.
  assert len(v['intermediates']['Dense_0'][mac_optax.MEAN]) == 1
  grads = _random_like(params, 0)
  tx = mac_optax.mac(DAMPING)
  updates, _ = tx.update(grads, tx.init(params), params,
                         intermediates=v['intermediates'])
  a = np.append((np.asarray(x).mean(0) + np.asarray(y).mean(0)) / 2, 1.0)
  g = grads['Dense_0']
  kernel, _ = reference.dense_update(g['kernel'], g['bias'],
                                     np.tile(a, (2, 1)), DAMPING)
  reference.assert_close(updates['Dense_0']['kernel'], kernel)


class CustomLayer(nn.Module):
  """A hand-written layer that sows its own statistic."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (x.shape[-1], 3))
    mac_linen.sow_mean(self, mac_linen.input_mean(x))
    return x @ kernel


def test_custom_layer_sows_its_own_statistic():
  model = CustomLayer()
  x = _normal((5, 4), 0)
  params = _init(model, x)
  _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  grads = _random_like(params, 1)
  tx = mac_optax.mac(DAMPING)
  updates, _ = tx.update(grads, tx.init(params), params,
                         intermediates=v['intermediates'])
  a = np.asarray(x).mean(0)
  kernel, _ = reference.dense_update(grads['kernel'], None,
                                     np.tile(a, (3, 1)), DAMPING)
  reference.assert_close(updates['kernel'], kernel)


def test_missing_intermediates_says_how_to_capture():
  _, params = _dense_setup()
  tx = mac_optax.mac()
  with pytest.raises(ValueError, match='capture'):
    tx.update(params, tx.init(params), params)


def test_statistic_that_does_not_fit_names_layer_and_shapes():
  _, params = _dense_setup()
  params = _root(params)
  tx = mac_optax.mac()
  with pytest.raises(ValueError, match=r"'layer'.*\(1, 5\).*\(3, 2\)"):
    tx.update(params, tx.init(params), params,
              intermediates=_root(_stat(np.ones(5))))
  with pytest.raises(ValueError, match="none of the 1 captured.*'other/kernel'"):
    tx.update(params, tx.init(params), params,
              intermediates={'other': _stat(np.ones(3))})


@pytest.mark.parametrize('kwargs,message', [
    ({'damping': 0.0}, 'damping'),
    ({'damping': -1.0}, 'damping'),
    ({'stat_decay': 1.0}, 'stat_decay'),
    ({'stat_decay': -0.1}, 'stat_decay'),
    ({'cov_every': 0}, 'cov_every'),
    ({'inv_every': -2}, 'inv_every'),
    ({'inv_every': 1.5}, 'inv_every'),
])
def test_invalid_hyperparameters_raise_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    mac_optax.mac(**kwargs)


def test_non_finite_batch_is_not_folded_and_training_continues():
  _, params = _dense_setup()
  params = _root(params)
  tx = mac_optax.mac(DAMPING, stat_decay=0.5)
  update = jax.jit(tx.update)
  grads = _random_like(params, 0)
  first = np.array([1.0, 2.0, 3.0])
  _, state = update(grads, tx.init(params), params,
                    intermediates=_root(_stat(first)))
  before = state.layers['layer']
  _, state = update(grads, state, params,
                    intermediates=_root(_stat([np.nan, 1.0, np.inf])))
  np.testing.assert_array_equal(state.layers['layer'].mean, before.mean)
  assert int(state.layers['layer'].count) == 1
  assert np.all(np.isfinite(state.layers['layer'].mean))
  second = np.array([-1.0, 0.0, 1.0])
  updates, state = update(grads, state, params,
                          intermediates=_root(_stat(second)))
  m = 0.5 * (0.5 * first) + 0.5 * second
  a_hat = m / (1 - 0.5 ** 2)
  kernel, _ = reference.dense_update(grads['layer']['kernel'],
                                     grads['layer']['bias'],
                                     np.tile(np.append(a_hat, 1.0), (2, 1)),
                                     DAMPING)
  reference.assert_close(updates['layer']['kernel'], kernel)
