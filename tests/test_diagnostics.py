"""Diagnostics against hand-computed and explicit-matrix values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax import diagnostics
from mac_optax import linen as mac_linen
from tests.test_first_layer import init_params


def test_hand_computed_values():
  # One Dense layer without bias, every input row equal to a = (1, 2):
  # ‖â‖ = √5, shrink = 1/(1+5) = 1/6. For Ĝ = (1, 0)ᵀ: c = âᵀĜ = 1,
  # U = Ĝ − â/6 = (5/6, −1/3), cos = (5/6)/‖U‖ = 5/√29.
  layer = nn.Dense(1, use_bias=False)
  x = jnp.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
  params = init_params(layer, x)
  with mac_linen.capture():
    _, v = layer.apply({'params': params}, x, mutable=['intermediates'])
  grads = {'kernel': jnp.array([[1.0], [0.0]])}
  tx = optax.chain(mac_optax.mac(damping=1.0, stat_decay=0.9),
                   optax.scale(-0.1))

  @jax.jit
  def run(grads, inter):
    updates, state = tx.update(grads, tx.init(params), params,
                               intermediates=inter)
    return updates, diagnostics.layer_figures(grads, state)
  updates, figures = run(grads, v['intermediates'])
  fig = figures['']
  np.testing.assert_allclose(fig.mean_norm, [np.sqrt(5.0)], rtol=1e-6)
  np.testing.assert_allclose(fig.shrink, [1 / 6], rtol=1e-6)
  np.testing.assert_allclose(fig.cosine, 5 / np.sqrt(29.0), rtol=1e-6)
  np.testing.assert_allclose(updates['kernel'][:, 0], [-5 / 60, 1 / 30],
                             rtol=1e-6)
  flat = diagnostics.summary(figures)
  np.testing.assert_allclose(flat['/shrink'], 1 / 6, rtol=1e-6)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=2, name='conv')(x))
    return nn.Dense(3, name='head')(x.mean(axis=(1, 2)))


@pytest.mark.parametrize('inv_every', [1, 3])
def test_figures_match_explicit_matrices_under_jit(inv_every):
  net = Net()
  damping, decay = 0.5, 0.9
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(4, 5, 5, 2)).astype(np.float32) + 1.0
        for _ in range(3)]
  params = init_params(net, xs[0], seed=7)
  tx = mac_optax.mac_sgd(
      0.1, damping=damping, stat_decay=decay, inv_every=inv_every,
      intermediates_like=mac_linen.intermediates_like(
          net, {'params': params}, xs[0]))

  traces = []

  @jax.jit
  def step(params, state, x):
    traces.append(1)

    def loss(p):
      with mac_linen.capture():
        out, v = net.apply({'params': p}, x, mutable=['intermediates'])
      return jnp.sum(jnp.sin(out)), v['intermediates']
    grads, inter = jax.grad(loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, intermediates=inter)
    figures = diagnostics.layer_figures(grads, state)
    return optax.apply_updates(params, updates), state, grads, inter, figures

  state = tx.init(params)
  ema, count, used = {}, 0, {}
  for t, x in enumerate(xs):
    params_before = params
    params, state, grads, inter, figures = step(params, state, x)
    count += 1
    for key in ('conv', 'head'):
      batch = np.asarray(inter[key][mac_optax.MEAN][0], np.float64)
      ema[key] = decay * ema.get(key, 0.0) + (1 - decay) * batch
      if t % inv_every == 0:
        used[key] = ema[key] / (1 - decay ** count)
      a = used[key]                                   # [G, d_in]
      np.testing.assert_allclose(figures[key].mean_norm,
                                 np.linalg.norm(a, axis=-1), rtol=1e-5)
      np.testing.assert_allclose(figures[key].shrink,
                                 damping / (damping + (a ** 2).sum(-1) + 1),
                                 rtol=1e-5)
      # Cosine with explicit per-group inverses on Ĝ_aug.
      kernel = np.asarray(grads[key]['kernel'], np.float64)
      groups = a.shape[0]
      g_aug = np.concatenate([kernel.reshape(a.shape[1], -1),
                              np.asarray(grads[key]['bias'])[None]], 0)
      og = g_aug.shape[1] // groups
      u = []
      for g in range(groups):
        a_aug = np.append(a[g], 1.0)
        inv = damping * np.linalg.inv(np.outer(a_aug, a_aug)
                                      + damping * np.eye(a_aug.size))
        u.append(inv @ g_aug[:, g * og:(g + 1) * og])
      u = np.concatenate(u, 1)
      cos = (g_aug * u).sum() / np.linalg.norm(g_aug) / np.linalg.norm(u)
      np.testing.assert_allclose(figures[key].cosine, cos, rtol=1e-5)
      assert 0 < float(figures[key].cosine) <= 1 + 1e-6
    del params_before
  assert len(traces) == 1  # figures never force a retrace


def test_preconditioned_argument_and_errors():
  net = Net()
  x = np.random.default_rng(0).normal(size=(2, 5, 5, 2)).astype(np.float32)
  params = init_params(net, x, seed=1)
  tx = mac_optax.mac(damping=2.0)

  @jax.jit
  def figures(params):
    with mac_linen.capture():
      _, v = net.apply({'params': params}, x, mutable=['intermediates'])
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, tx.init(params), params,
                               intermediates=v['intermediates'])
    return grads, state, [
        diagnostics.layer_figures(grads, state,
                                  preconditioned=p)
        for p in (updates, None, grads)]
  grads, state, (given, recomputed, same) = figures(params)
  for key in given:
    np.testing.assert_allclose(given[key].cosine, recomputed[key].cosine,
                               rtol=1e-6)
  # Against the identity the cosine is exactly 1.
  np.testing.assert_allclose(same['head'].cosine, 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match='MacState'):
    diagnostics.layer_figures(grads, ())


def test_tied_embedding_attend_layer():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(7, 4)
      return embed.attend(nn.Dense(4)(embed(tokens)))

  model = Tied()
  tokens = np.array([[1, 2, 3], [4, 5, 6]])
  params = init_params(model, tokens)
  tx = mac_optax.mac(damping=0.5)

  @jax.jit
  def run(params):
    def loss(p):
      with mac_linen.capture():
        y, v = model.apply({'params': p}, tokens, mutable=['intermediates'])
      return jnp.sum(jnp.sin(y)), v['intermediates']
    grads, inter = jax.grad(loss, has_aux=True)(params)
    updates, state = tx.update(grads, tx.init(params), params,
                               intermediates=inter)
    return (inter, diagnostics.layer_figures(grads, state),
            diagnostics.layer_figures(grads, state,
                                      preconditioned=updates))
  inter, recomputed, given = run(params)
  a = np.asarray(inter['Embed_0'][mac_optax.ATTEND_MEAN][0])
  np.testing.assert_allclose(recomputed['Embed_0'].shrink,
                             0.5 / (0.5 + (a ** 2).sum(-1)), rtol=1e-5)
  np.testing.assert_allclose(recomputed['Embed_0'].cosine,
                             given['Embed_0'].cosine, rtol=1e-5)
  assert float(given['Embed_0'].cosine) < 1.0


def test_figures_use_the_damping_and_mean_the_update_used():
  """λ comes from the state (here a schedule the diagnostics never see)."""
  layer = nn.Dense(1, use_bias=False)
  x = jnp.array([[1.0, 2.0], [1.0, 2.0]])
  params = init_params(layer, x)
  plan = mac_linen.plan(layer, {'params': params}, x)
  tx = optax.inject_hyperparams(mac_optax.mac)(
      damping=lambda step: 2.0 + step, plan=plan)
  with mac_linen.capture():
    _, v = layer.apply({'params': params}, x, mutable=['intermediates'])
  grads = {'kernel': jnp.array([[1.0], [0.0]])}
  state = tx.init(params)
  for _ in range(2):                                   # λ = 2, then 3
    _, state = tx.update(grads, state, params,
                         intermediates=v['intermediates'])
  figures = diagnostics.layer_figures(grads, state, plan)
  np.testing.assert_allclose(figures[''].shrink, [3 / (3 + 5)], rtol=1e-6)
  np.testing.assert_allclose(figures[''].mean_norm, [np.sqrt(5.0)],
                             rtol=1e-6)


class _Batched(nn.Module):

  @nn.compact
  def __call__(self, x):   # x: [heads 3, batch 2, d 5]
    return nn.DenseGeneral(4, batch_dims=(0,), name='layer')(x)


def test_batched_einsum_layer_without_a_plan_says_pass_plan():
  model = _Batched()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 5)),
                  jnp.float32)
  params = init_params(model, x)
  plan = mac_linen.plan(model, {'params': params}, x)
  with mac_linen.capture():
    _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  tx = mac_optax.mac(0.5, plan=plan)
  _, state = tx.update(params, tx.init(params), params,
                       intermediates=v['intermediates'])
  assert set(diagnostics.layer_figures(params, state, plan)) == {'layer'}
  with pytest.raises(ValueError, match="'layer'.*pass plan="):
    diagnostics.layer_figures(params, state)
