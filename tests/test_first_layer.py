"""The exact first layer against naive all-patches covariances and dense inverses."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
from mac_optax import first_layer
from mac_optax import linen as mac_linen

DAMPING = 0.5


def _naive_patches(x, kernel, stride, pads, groups):
  """All im2col patches by explicit loops: [rows, G, kh·kw·C/G] (Flax order)."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  b, h, w, c = x.shape
  cg = c // groups
  rows = []
  for n in range(b):
    for i in range(0, h - kernel[0] + 1, stride[0]):
      for j in range(0, w - kernel[1] + 1, stride[1]):
        row = []
        for g in range(groups):
          row.append([x[n, i + ki, j + kj, g * cg + ci]
                      for ki in range(kernel[0]) for kj in range(kernel[1])
                      for ci in range(cg)])
        rows.append(row)
  return np.asarray(rows)


def _naive_moment(a, bias):
  if bias:
    a = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)
  return np.einsum('rgi,rgj->gij', a, a) / a.shape[0]


class Stem(nn.Module):
  """A conv (or patch-embedding) stem followed by a Dense head."""
  conv: nn.Module

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.conv(x))
    return nn.Dense(3, name='head')(x.mean(axis=(1, 2)))


# name -> (layer, input shape, kernel, stride, pads, groups)
CONVS = {
    'stem_3x3_same_bias': (nn.Conv(4, (3, 3), padding='SAME'),
                           (7, 5, 5, 3), (3, 3), (1, 1), ((1, 1), (1, 1)), 1),
    'grouped_strided_no_bias': (
        nn.Conv(4, (2, 3), strides=(2, 1), padding='VALID',
                feature_group_count=2, use_bias=False),
        (5, 6, 5, 4), (2, 3), (2, 1), ((0, 0), (0, 0)), 2),
    'vit_patch_embedding': (
        nn.Conv(6, (2, 2), strides=(2, 2), padding='VALID'),
        (6, 4, 6, 3), (2, 2), (2, 2), ((0, 0), (0, 0)), 1),
}


def _data(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) + 0.3


def init_params(model, *args, seed=0, scale=0.5):
  """Random parameters without compiling an initializer (numpy from shapes)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (scale * rng.normal(size=s.shape)).astype(s.dtype), shapes)


@pytest.mark.parametrize('name', sorted(CONVS))
def test_conv_second_moment_and_inverse_match_naive(name):
  conv, shape, kernel, stride, pads, groups = CONVS[name]
  model = Stem(conv)
  x = _data(shape)
  variables = {'params': init_params(model, x[:1])}
  bias = conv.use_bias
  # Uneven batches: streaming must weigh every patch row equally.
  batches = ([(x[:3], None), (x[3:4], None), (x[4:], None)]
             if name == 'stem_3x3_same_bias' else [(x, None)])
  moment = first_layer.input_second_moment(model, variables, batches, 'conv',
                                           progress=False)
  naive = _naive_moment(_naive_patches(x, kernel, stride, pads, groups), bias)
  assert moment.has_bias == bias
  np.testing.assert_allclose(moment.matrix, naive, rtol=1e-5, atol=1e-5)

  exact = first_layer.exact_preconditioner(moment, DAMPING)
  eye = np.eye(naive.shape[-1])
  expected = np.stack([np.linalg.inv(s + DAMPING * eye) for s in naive])
  np.testing.assert_allclose(exact['conv'], expected, rtol=1e-4, atol=1e-5)

  chol = first_layer.exact_preconditioner(moment, DAMPING, form='cholesky')
  lower = np.linalg.cholesky(naive + DAMPING * np.eye(naive.shape[-1]))
  expected_chol = np.swapaxes(np.linalg.inv(lower), -1, -2)
  np.testing.assert_allclose(chol['conv'], expected_chol, rtol=1e-4,
                             atol=1e-5)
  assert np.allclose(np.tril(chol['conv'], -1), 0)


def test_dense_layer_on_tokens():
  class Tokens(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name='head')(nn.Dense(5, name='embed')(x))

  x = _data((4, 3, 6), seed=2)
  model = Tokens()
  variables = {'params': init_params(model, x)}
  moment = first_layer.input_second_moment(model, variables, [x[:2], x[2:]],
                                           'embed', progress=False)
  naive = _naive_moment(x.reshape(-1, 1, 6).astype(np.float64), True)
  np.testing.assert_allclose(moment.matrix, naive, rtol=1e-5, atol=1e-5)
  assert moment.rows == 12


@pytest.mark.parametrize('name', sorted(CONVS))
def test_layer_inputs_and_batch_sums_of_a_lone_layer(name):
  layer, shape, kernel, stride, pads, groups = CONVS[name]
  x = _data(shape, seed=4)
  naive = _naive_patches(x, kernel, stride, pads, groups)   # [rows, G, d]
  np.testing.assert_allclose(first_layer.layer_inputs(layer, x), naive,
                             rtol=1e-5, atol=1e-5)
  total, rows = first_layer.batch_second_moment_sum(layer, x, True)
  np.testing.assert_allclose(total / rows, _naive_moment(naive, True),
                             rtol=1e-5, atol=1e-5)
  tokens = _data((2, 3, 6), seed=5)
  np.testing.assert_allclose(
      first_layer.layer_inputs(nn.DenseGeneral((2, 2), axis=(-2, -1)),
                               tokens), tokens.reshape(2, 1, 18), rtol=1e-6)


def test_a_layer_of_its_own_code_stored_out_in():
  class OwnCode(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param('w', nn.initializers.normal(0.5), (5, x.shape[-1]))
      b = self.param('b', nn.initializers.zeros, (5,))
      return nn.Dense(2, name='head')(jnp.tanh(x @ w.T + b))

  x = _data((4, 3, 6), seed=3)
  model = OwnCode()
  variables = {'params': init_params(model, x)}
  # Found in the program like MAC's statistics: the kernel `w`, its bias `b`.
  moment = first_layer.input_second_moment(model, variables, [x], 'w')
  naive = _naive_moment(x.reshape(-1, 1, 6).astype(np.float64), True)
  np.testing.assert_allclose(moment.matrix, naive, rtol=1e-5, atol=1e-5)
  assert moment.has_bias and moment.rows == 12


@functools.partial(jax.jit, static_argnums=0)
def _grads_and_stats(model, params, x):
  def loss(p):
    with mac_linen.capture():
      y, v = model.apply({'params': p}, x, mutable=['intermediates'])
    return jnp.sum(jnp.sin(y)), v['intermediates']
  return jax.grad(loss, has_aux=True)(params)


@pytest.mark.parametrize('name,form', [
    ('stem_3x3_same_bias', 'inverse'), ('stem_3x3_same_bias', 'cholesky'),
    ('grouped_strided_no_bias', 'inverse')])
def test_update_matches_dense_formula(name, form):
  conv, shape, kernel, stride, pads, groups = CONVS[name]
  model = Stem(conv)
  x = _data(shape, seed=3)
  params = init_params(model, x, seed=1)
  exact = first_layer.exact_first_layer(model, {'params': params}, [x],
                                        'conv', DAMPING, form=form,
                                        progress=False)
  grads, inter = _grads_and_stats(model, params, x)
  tx = mac_optax.mac(damping=DAMPING, exact_layers=exact)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      intermediates=inter)
  # Dense formula: per group, Ĝ_aug (d_in [+1], d_out_g) ← P_g Ĝ_aug.
  p = np.asarray(exact['conv'], np.float64)
  k = np.asarray(grads['conv']['kernel'], np.float64)
  d_out = k.shape[-1]
  g_mat = k.reshape(-1, d_out)
  if conv.use_bias:
    g_mat = np.concatenate(
        [g_mat, np.asarray(grads['conv']['bias']).reshape(1, -1)], axis=0)
  og = d_out // groups
  new = np.concatenate([p[g] @ g_mat[:, g * og:(g + 1) * og]
                        for g in range(groups)], axis=1)
  d_in = g_mat.shape[0] - int(conv.use_bias)
  np.testing.assert_allclose(updates['conv']['kernel'],
                             new[:d_in].reshape(k.shape), rtol=1e-4, atol=1e-6)
  if conv.use_bias:
    np.testing.assert_allclose(updates['conv']['bias'], new[d_in], rtol=1e-4,
                               atol=1e-6)
  # The other layers keep plain MAC; the exact layer has no MAC state.
  plain, _ = jax.jit(mac_optax.mac(damping=DAMPING).update)(
      grads, mac_optax.mac().init(params), params, intermediates=inter)
  np.testing.assert_allclose(updates['head']['kernel'],
                             plain['head']['kernel'], rtol=1e-5, atol=1e-7)
  assert 'conv' not in state.layers and 'head' in state.layers


def test_bad_inputs_raise_clear_errors():
  conv = CONVS['stem_3x3_same_bias'][0]
  model = Stem(conv)
  x = _data((2, 5, 5, 3))
  params = init_params(model, x)
  good = np.eye(28)
  with pytest.raises(ValueError, match="'nope'.*not a layer"):
    mac_optax.mac(exact_layers={'nope': good}).init(params)
  with pytest.raises(ValueError, match="'conv'.*does not fit the kernel"):
    mac_optax.mac(exact_layers={'conv': np.eye(27)}).init(params)
  with pytest.raises(ValueError, match="'conv'.*not positive definite"):
    mac_optax.mac(exact_layers={'conv': -good})
  with pytest.raises(ValueError, match="'conv'.*symmetric positive definite"):
    mac_optax.mac(exact_layers={'conv': np.tril(np.ones((28, 28)))})
  with pytest.raises(ValueError, match="'conv'.*square"):
    mac_optax.mac(exact_layers={'conv': np.ones((28, 27))})
  with pytest.raises(ValueError, match="'head/nope'.*Layers called"):
    first_layer.input_second_moment(model, {'params': params}, [x],
                                    'head/nope', progress=False)
  bad = first_layer.SecondMoment(-3 * np.eye(4), 1, 'conv', True)
  with pytest.raises(ValueError, match="'conv'.*not positive definite"):
    first_layer.exact_preconditioner(bad, 1.0)
  with pytest.raises(ValueError, match='form'):
    first_layer.exact_preconditioner(bad, 1.0, form='sqrt')
  with pytest.raises(ValueError, match='no batches'):
    first_layer.input_second_moment(model, {'params': params}, [], 'conv',
                                    progress=False)


def test_exact_first_layer_runs_without_tqdm():
  """tqdm is not a dependency: the default path must not import it."""
  import subprocess
  import sys
  import textwrap  # pylint: disable=g-import-not-at-top,multiple-imports
  code = textwrap.dedent("""
      import sys
      sys.modules['tqdm'] = None          # any tqdm import now fails
      import flax.linen as nn, jax, numpy as np
      from mac_optax import first_layer
      model = nn.Sequential([nn.Dense(2), nn.relu, nn.Dense(1)])
      x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
      variables = model.init(jax.random.key(0), x)
      exact = first_layer.exact_first_layer(model, variables, [x[:4], x[4:]],
                                            'layers_0', damping=1.0)
      a = np.concatenate([x, np.ones((6, 1))], axis=1).astype(np.float64)
      want = np.linalg.inv(a.T @ a / 6 + np.eye(4))
      np.testing.assert_allclose(exact['layers_0'][0], want, rtol=1e-5, atol=1e-6)
      try:
        first_layer.exact_first_layer(model, variables, [x], 'layers_0',
                                      progress=True)
      except ImportError as e:
        assert 'pip install tqdm' in str(e) and 'progress=False' in str(e), e
      else:
        raise AssertionError('progress=True without tqdm did not raise')
  """)
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def test_a_root_layer_is_found_at_the_empty_path():
  """A model that is itself the layer (``nn.Dense(...)``) has the path ''."""
  model = nn.Dense(2)
  x = _data((5, 3))
  params = init_params(model, x)
  moment = first_layer.input_second_moment(model, {'params': params}, [x], '')
  a = np.concatenate([x, np.ones((5, 1))], axis=1).astype(np.float64)
  np.testing.assert_allclose(moment.matrix[0], a.T @ a / 5, rtol=1e-5,
                             atol=1e-6)
  assert moment.has_bias and moment.rows == 5
