"""Presets: each builds and steps; CIFAR follows the authors' update rules."""

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax import linen as mac_linen
from tests.example_scripts import load_example
from tests.test_first_layer import _naive_patches
from tests.test_first_layer import init_params


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding='SAME', name='stem')(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding='SAME', use_bias=False,
                        name='conv')(x))
    return nn.Dense(5, name='head')(x.mean(axis=(1, 2)))


MODEL = SmallCNN()
_RNG = np.random.default_rng(0)
BATCHES = [_RNG.normal(size=(8, 6, 6, 2)).astype(np.float32) + 0.5
           for _ in range(4)]
LABELS = [_RNG.integers(0, 5, size=(8,)) for _ in range(4)]


def _loss(params, x, y):
  logits = MODEL.apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _raw_inputs_interceptor(next_fun, args, kwargs, context):
  if context.method_name == '__call__' and isinstance(
      context.module, (nn.Conv, nn.Dense)):
    context.module.sow('raw', 'x', args[0])
  return next_fun(*args, **kwargs)


@jax.jit
def _grads_and_inputs(params, x, y):
  """Gradients and each layer's raw input, for the numpy reference."""
  def loss(p):
    with nn.intercept_methods(_raw_inputs_interceptor):
      logits, v = MODEL.apply({'params': p}, x, mutable=['raw'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {k: v['raw'][k]['x'][0] for k in ('conv', 'head')}
  return jax.grad(loss, has_aux=True)(params)


def _authors_trajectory(params, steps, lr_fn, tcov, tinv, sigma, wd=5e-4,
                        momentum=0.9, beta=0.95, damping=1.0):
  """The reference's rules in numpy, in PyTorch's (d_out, d_in [+1]) layout.

  Per step t: hooks fold ā into exp_avg when t % Tcov == 0; step() rebuilds
  A_inv = I − ââᵀ/(λ + ‖â‖²) (â bias-corrected by the layer's fold count) when
  t % Tinv == 0; the first layer uses inv(Σ + λI); v = grad_mat @ A_inv;
  d = v + wd·p; buf = m·buf + d (buf from zeros); p −= lr_t·buf; t += 1.
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  buf = jax.tree.map(np.zeros_like, p)
  exp_avg = {'conv': 0.0, 'head': 0.0}
  count = {'conv': 0, 'head': 0}
  a_inv = {'stem': np.linalg.inv(sigma + damping * np.eye(sigma.shape[0]))}
  trajectory = []
  for t in range(steps):
    x, y = BATCHES[t % 4], LABELS[t % 4]
    grads, raw = _grads_and_inputs(jax.tree.map(np.float32, p), x, y)
    grads = jax.tree.map(lambda a: np.asarray(a, np.float64), grads)
    if t % tcov == 0:
      means = {
          'conv': _naive_patches(np.asarray(raw['conv']), (3, 3), (2, 2),
                                 ((0, 1), (0, 1)), 1)[:, 0].mean(0),
          'head': np.append(np.asarray(raw['head'], np.float64).mean(0), 1.0),
      }
      for k in means:
        exp_avg[k] = beta * exp_avg[k] + (1 - beta) * means[k]
        count[k] += 1
    if t % tinv == 0:
      for k in ('conv', 'head'):
        a = exp_avg[k] / (1 - beta ** count[k])
        a_inv[k] = np.eye(a.size) - np.outer(a, a) / (damping + a @ a)
    for k in ('stem', 'conv', 'head'):
      kernel = grads[k]['kernel']
      grad_mat = kernel.reshape(-1, kernel.shape[-1]).T       # (d_out, d_in)
      if 'bias' in grads[k]:
        grad_mat = np.concatenate([grad_mat, grads[k]['bias'][:, None]], 1)
      v = grad_mat @ a_inv[k]
      grads[k]['kernel'] = v[:, :kernel.size // kernel.shape[-1]].T.reshape(
          kernel.shape)
      if 'bias' in grads[k]:
        grads[k]['bias'] = v[:, -1]
    lr = lr_fn(t)
    buf = jax.tree.map(lambda b, g, q: momentum * b + (g + wd * q), buf, grads,
                       p)
    p = jax.tree.map(lambda q, b: q - lr * b, p, buf)
    trajectory.append(p)
  return trajectory


@pytest.mark.parametrize('tcov,tinv', [(5, 50), (2, 3)])
def test_cifar_preset_follows_the_authors_update_rules(tcov, tinv):
  steps, total = 20, 40
  params = init_params(MODEL, BATCHES[0])
  exact = mac_optax.first_layer.exact_first_layer(
      MODEL, {'params': params}, BATCHES, 'stem', 1.0, progress=False)
  overrides = {} if (tcov, tinv) == (5, 50) else dict(cov_every=tcov,
                                                      inv_every=tinv)
  tx = mac_optax.presets.cifar(
      total, exact_layers=exact,
      intermediates_like=mac_linen.intermediates_like(
          MODEL, {'params': params}, BATCHES[0]), **overrides)

  @jax.jit
  def step(params, state, x, y):
    def loss(p):
      with mac_linen.capture():
        logits, v = MODEL.apply({'params': p}, x, mutable=['intermediates'])
      return (optax.softmax_cross_entropy_with_integer_labels(logits, y)
              .mean(), v['intermediates'])
    grads, inter = jax.grad(loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, intermediates=inter)
    return optax.apply_updates(params, updates), state

  # Σ of the stem, naively from all patches of the 4 batches.
  patches = np.concatenate([_naive_patches(b, (3, 3), (1, 1), ((1, 1), (1, 1)),
                                           1)[:, 0] for b in BATCHES])
  patches = np.concatenate([patches, np.ones((len(patches), 1))], 1)
  sigma = patches.T @ patches / len(patches)
  lr_fn = lambda t: 0.1 * 0.5 * (1 + np.cos(np.pi * t / total))
  expected = _authors_trajectory(params, steps, lr_fn, tcov, tinv, sigma)

  state = tx.init(params)
  moved = 0.0
  for t in range(steps):
    params, state = step(params, state, BATCHES[t % 4], LABELS[t % 4])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=2e-4, atol=2e-6, err_msg=f'step {t}'), params, expected[t])
  moved = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - b).max()), params,
      init_params(MODEL, BATCHES[0]))))
  assert moved > 1e-2  # the trajectory is not trivially static
  assert int(mac_optax.diagnostics.find_mac_state(state).step) == steps


class Tiny(nn.Module):
  """Dense, LayerNorm, BatchNorm-free: kernels, biases and norm scales."""
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.Dense(4)(x))
    return nn.Dense(3)(nn.relu(x))


@functools.lru_cache(maxsize=None)
def _tiny_problem():
  model = Tiny()
  x = np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5)
  params = init_params(model, x)

  def loss(p):
    with mac_linen.capture():
      y, v = model.apply({'params': p}, x, mutable=['intermediates'])
    return jnp.sum(y ** 2), v['intermediates']
  grads, inter = jax.jit(jax.grad(loss, has_aux=True))(params)
  return params, grads, inter


def _tiny_step(make_tx, grads_scale=1.0, zero=False, steps=1):
  params, grads, inter = _tiny_problem()
  tx = make_tx(intermediates_like=inter)
  grads = jax.tree.map(lambda g: 0 * g if zero else grads_scale * g, grads)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(grads, state, params, intermediates=inter)
  return params, grads, updates


@pytest.mark.parametrize('name', ['cifar', 'imagenet', 'vit', 'nanogpt'])
def test_each_preset_builds_and_steps(name):
  make = {'cifar': lambda **k: mac_optax.presets.cifar(100, **k),
          'imagenet': lambda **k: mac_optax.presets.imagenet(100, 10, **k),
          'vit': lambda **k: mac_optax.presets.vit(100, 10, **k),
          'nanogpt': lambda **k: mac_optax.presets.nanogpt(100, 10, **k)}
  params, _, updates = _tiny_step(make[name], steps=2)  # lr(0) = 0 in warmup
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  assert any(np.abs(u).max() > 0 for u in jax.tree.leaves(updates))


def test_masks():
  params = {'Dense_0': {'kernel': np.ones((5, 4)), 'bias': np.ones(4)},
            'LayerNorm_0': {'scale': np.ones(4), 'bias': np.ones(4)},
            'Block': {'BatchNorm_0': {'scale': np.ones(4),
                                      'bias': np.ones(4)}}}
  keep = mac_optax.presets.not_norm_mask(params)
  assert keep['Dense_0'] == {'kernel': True, 'bias': True}
  assert keep['LayerNorm_0'] == {'scale': False, 'bias': False}
  assert keep['Block']['BatchNorm_0'] == {'scale': False, 'bias': False}
  matrices = mac_optax.presets.matrix_mask(params)
  assert matrices['Dense_0'] == {'kernel': True, 'bias': False}
  assert not matrices['LayerNorm_0']['scale']


def test_weight_decay_styles_with_zero_gradients():
  # CIFAR, coupled on everything: first update = −lr·wd·p.
  params, _, updates = _tiny_step(
      lambda **k: mac_optax.presets.cifar(100, **k), zero=True)
  jax.tree.map(lambda u, p: np.testing.assert_allclose(
      u, -0.1 * 5e-4 * p, rtol=1e-5, atol=1e-9), updates, params)
  # ViT, decoupled on ≥2-D only; warmup 1 step: lr(1) = 0.5.
  params, _, updates = _tiny_step(
      lambda **k: mac_optax.presets.vit(100, 1, **k), zero=True, steps=2)
  mask = mac_optax.presets.matrix_mask(params)
  jax.tree.map(lambda u, p, m: np.testing.assert_allclose(
      u, -0.5 * 1e-4 * p * m, rtol=1e-5, atol=1e-9), updates, params, mask)
  # ImageNet, decoupled except on the LayerNorm.
  params, _, updates = _tiny_step(
      lambda **k: mac_optax.presets.imagenet(100, 1, **k), zero=True, steps=2)
  np.testing.assert_allclose(updates['Dense_0']['bias'],
                             -0.5 * 2e-5 * params['Dense_0']['bias'],
                             rtol=1e-5)
  assert not np.any(updates['LayerNorm_0']['scale'])


def test_nanogpt_clips_before_preconditioning():
  # Huge gradients are clipped to norm 1; MAC never grows a norm; Nesterov
  # from a zero buffer gives (1 + μ)·g̃: ‖update + lr·wd·p‖ ≤ lr·1.9.
  params, _, updates = _tiny_step(
      lambda **k: mac_optax.presets.nanogpt(100, warmup_steps=0, **k),
      grads_scale=1e6)
  lr = 1e-3
  mask = mac_optax.presets.matrix_mask(params)
  rest = jax.tree.map(lambda u, p, m: u + lr * 0.1 * p * m, updates, params,
                      mask)
  norm = float(optax.tree.norm(rest))
  assert 0.1 * lr < norm <= lr * 1.9 * (1 + 1e-5)


def test_smac_preset_needs_and_uses_grad_sq():
  with pytest.raises(ValueError, match='grad_sq'):
    _tiny_step(lambda **k: mac_optax.presets.cifar(100, smac=True, **k))


@pytest.mark.slow
def test_reproduction_script_runs():
  results = load_example('reproduce_cifar_recipe').main(['--epochs', '1', '--seeds', '1', '--no-progress'])
  assert len(results) == 3
  assert all(0.0 <= a <= 1.0 for accs in results.values() for a in accs)


@pytest.mark.parametrize('name', ['cifar', 'imagenet', 'vit', 'nanogpt'])
def test_preset_signatures_carry_the_recipe_table(name):
  parameters = inspect.signature(getattr(mac_optax.presets, name)).parameters
  for key, value in mac_optax.presets.RECIPES[name].items():
    if key != 'batch_size':
      assert parameters[key].default == value, key
  assert set(mac_optax.presets.STATIC_ARGS) <= set(parameters)


def test_warmup_cosine_equals_optax_schedule():
  # The presets' own warmup-cosine (traceable peak) is optax's schedule.
  from mac_optax._src.presets import _warmup_cosine  # pylint: disable=g-import-not-at-top
  ours = _warmup_cosine(0.5, 100, 10, 6e-5)
  theirs = optax.warmup_cosine_decay_schedule(0.0, 0.5, 10, 100, 6e-5)
  np.testing.assert_allclose([ours(t) for t in range(0, 120, 7)],
                             [theirs(t) for t in range(0, 120, 7)],
                             rtol=1e-5, atol=1e-8)
