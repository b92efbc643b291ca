"""SMAC against a dense reference: explicit pre-activation gradients and inverses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax import linen as mac_linen
from mac_optax import smac
from tests.test_first_layer import _naive_patches
from tests.test_first_layer import init_params
from tests.test_nnx_capture import TiedLMLinen

DAMPING, DAMPING_Z, BETA = 0.7, 0.05, 0.8


class Net(nn.Module):
  """Conv → relu → pool → DenseGeneral with two output axes.

  With ``full=True`` every layer output is perturbed at full size (Flax's
  ``perturb``), so the reference gets the per-row pre-activation gradients.
  """
  full: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(3, (2, 2), padding='VALID', name='conv')(x)
    if self.full:
      y = self.perturb('conv_out', y)
    h = nn.tanh(y).mean(axis=(1, 2))
    self.sow('raw', 'head_in', h)
    z = nn.DenseGeneral((2, 2), name='head')(h)
    if self.full:
      z = self.perturb('head_out', z)
    return z


def _loss_of(logits, y):
  return jnp.mean((logits.reshape(logits.shape[0], -1) - y) ** 2)


_RNG = np.random.default_rng(0)
BATCHES = [(_RNG.normal(size=(6, 4, 4, 2)).astype(np.float32),
            _RNG.normal(size=(6, 4)).astype(np.float32)) for _ in range(6)]


@jax.jit
def _reference_gradients(params, x, y):
  """Per-row cotangents via full-size perturbations; raw layer inputs."""
  net = Net(full=True)
  pert = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype),
      jax.eval_shape(net.init, jax.random.PRNGKey(0), x)['perturbations'])

  def loss(p, q):
    out, v = net.apply({'params': p, 'perturbations': q}, x, mutable=['raw'])
    return _loss_of(out, y), v['raw']['head_in'][0]
  return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, pert)


def _reference_statistics(params, x, y):
  (grads, cot), head_in = _reference_gradients(params, x, y)
  g_conv = np.asarray(cot['conv_out'], np.float64).reshape(-1, 3)
  g_head = np.asarray(cot['head_out'], np.float64).reshape(-1, 4)
  grad_sq = {'conv': (g_conv ** 2).mean(0), 'head': (g_head ** 2).mean(0)}
  means = {
      'conv': np.append(_naive_patches(x, (2, 2), (1, 1), ((0, 0), (0, 0)),
                                       1)[:, 0].mean(0), 1.0),
      'head': np.append(np.asarray(head_in, np.float64).mean(0), 1.0),
  }
  return grads, grad_sq, means


def test_probe_gradient_is_mean_squared_preactivation_gradient():
  x, y = BATCHES[0]
  net = Net()
  params = init_params(net, x, seed=1)
  probes = smac.probes_like(net, {'params': params}, x)
  assert jax.tree.map(jnp.shape, probes) == {
      'conv': {smac.GRAD_SQ: (3,)}, 'head': {smac.GRAD_SQ: (2, 2)}}

  @jax.jit
  def grads_of(p, q):
    def loss(p, q):
      with smac.capture():
        out, _ = net.apply({'params': p, smac.PROBES: q}, x, mutable=['raw'])
      return _loss_of(out, y)
    return jax.grad(loss, argnums=(0, 1))(p, q)
  grads, grad_sq = grads_of(params, probes)
  ref_grads, ref_sq, _ = _reference_statistics(params, x, y)
  np.testing.assert_allclose(grad_sq['conv'][smac.GRAD_SQ], ref_sq['conv'],
                             rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(
      np.ravel(grad_sq['head'][smac.GRAD_SQ]), ref_sq['head'], rtol=1e-5,
      atol=1e-12)
  # The probes do not change the parameter gradients.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               grads, ref_grads)
  # Without probes in the variables, the capture is a no-op.
  def forward(captured):
    def run(p):
      return net.apply({'params': p}, x, mutable=['raw'])[0]
    if captured:
      with smac.capture():
        return jax.jit(run)(params)
    return jax.jit(run)(params)
  np.testing.assert_allclose(forward(True), forward(False))


@pytest.mark.parametrize('cov_every,inv_every', [(1, 1), (2, 5)])
def test_smac_update_matches_dense_reference(cov_every, inv_every):
  net = Net()
  params = init_params(net, BATCHES[0][0], seed=2)
  probes = smac.probes_like(net, {'params': params}, BATCHES[0][0])
  tx = optax.chain(
      smac.scale_by_grad_sq(DAMPING_Z, BETA, cov_every=cov_every,
                            inv_every=inv_every, probes_like=probes),
      mac_optax.mac(DAMPING, BETA, cov_every=cov_every, inv_every=inv_every,
                    intermediates_like=mac_linen.intermediates_like(
                        net, {'params': params}, BATCHES[0][0])))

  @jax.jit
  def update(state, x, y):
    def loss(p, q):
      with mac_linen.capture(), smac.capture():
        out, v = net.apply({'params': p, smac.PROBES: q}, x,
                           mutable=['intermediates', 'raw'])
      return _loss_of(out, y), v['intermediates']
    (grads, grad_sq), inter = jax.grad(loss, argnums=(0, 1), has_aux=True)(
        params, probes)
    return tx.update(grads, state, params, intermediates=inter,
                     grad_sq=grad_sq)

  state = tx.init(params)
  ema = {k: (0.0, 0.0) for k in ('conv', 'head')}   # (grad_sq, mean) EMAs
  folds = 0
  used = {}
  for t, (x, y) in enumerate(BATCHES):
    updates, state = update(state, x, y)
    grads, grad_sq, means = _reference_statistics(params, x, y)
    if t % cov_every == 0:
      folds += 1
      ema = {k: (BETA * ema[k][0] + (1 - BETA) * grad_sq[k],
                 BETA * ema[k][1] + (1 - BETA) * means[k][:-1]) for k in ema}
    if t % inv_every == 0:
      for k in ema:
        z_hat = ema[k][0] / (1 - BETA ** folds)
        a_hat = np.append(ema[k][1] / (1 - BETA ** folds), 1.0)
        a_inv = DAMPING * np.linalg.inv(np.outer(a_hat, a_hat)
                                        + DAMPING * np.eye(a_hat.size))
        used[k] = (a_inv, np.diag(1.0 / (z_hat + DAMPING_Z)))
    for k in ('conv', 'head'):
      kernel = np.asarray(grads[k]['kernel'], np.float64)
      d_in = kernel.shape[0] if k == 'head' else kernel.size // 3
      g_aug = np.concatenate([kernel.reshape(d_in, -1),
                              np.asarray(grads[k]['bias']).reshape(1, -1)], 0)
      a_inv, z = used[k]
      u = a_inv @ g_aug @ z
      np.testing.assert_allclose(updates[k]['kernel'],
                                 u[:-1].reshape(kernel.shape), rtol=2e-4,
                                 atol=1e-7, err_msg=f'{k} step {t}')
      np.testing.assert_allclose(updates[k]['bias'],
                                 u[-1].reshape(grads[k]['bias'].shape),
                                 rtol=2e-4, atol=1e-7, err_msg=f'{k} step {t}')
  assert int(state[0].layers['head'].count) == folds


def test_smac_bad_inputs():
  tx = smac.scale_by_grad_sq()
  params = {'dense': {'kernel': jnp.ones((3, 4))}}
  state = tx.init(params)
  with pytest.raises(ValueError, match='grad_sq'):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="'dense'.*output axes"):
    tx.update(params, state, params,
              grad_sq={'dense': {smac.GRAD_SQ: jnp.ones((3,))}})
  with pytest.raises(ValueError, match="'other'.*kernel"):
    tx.update(params, state, params,
              grad_sq={'other': {smac.GRAD_SQ: jnp.ones((4,))}})
  with pytest.raises(ValueError, match='inv_every'):
    smac.scale_by_grad_sq(inv_every=0)


H, SCALES = 2, (1.0, 30.0)   # head 1's loss weight: its E[g²] is ~900x


class Heads(nn.Module):
  """A batched DenseGeneral (one kernel per head) and a batched Einsum.

  With ``full=True`` the outputs are perturbed at full size for the
  reference's per-row cotangents.
  """
  full: bool = False

  @nn.compact
  def __call__(self, x):                                # x: [H, B, T, 3]
    y = nn.DenseGeneral(4, batch_dims=(0,), name='heads')(x)   # [H, B, T, 4]
    if self.full:
      y = self.perturb('heads_out', y)
    z = nn.Einsum((H, 4, 2), 'hbtf,hfo->bhto', name='mix')(jnp.tanh(y))
    if self.full:
      z = self.perturb('mix_out', z)
    return z * jnp.asarray(SCALES)[None, :, None, None]


def test_batched_layers_get_one_scale_per_head_and_output():
  x = jnp.asarray(_RNG.normal(size=(H, 5, 3, 3)), jnp.float32)
  target = jnp.asarray(_RNG.normal(size=(5, H, 3, 2)), jnp.float32)
  net = Heads()
  params = init_params(net, x, seed=3)
  probes = smac.probes_like(net, {'params': params}, x)
  assert jax.tree.map(jnp.shape, probes) == {
      'heads': {smac.GRAD_SQ: (H, 1, 4)}, 'mix': {smac.GRAD_SQ: (H, 1, 2)}}
  loss_of = lambda out: jnp.mean((out - target) ** 2)

  def loss(p, q):
    with smac.capture():
      return loss_of(net.apply({'params': p, smac.PROBES: q}, x))
  grads, grad_sq = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, probes)

  full = Heads(full=True)
  pert = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      full.init, jax.random.PRNGKey(0), x)['perturbations'])
  cot = jax.grad(lambda q: loss_of(full.apply(
      {'params': params, 'perturbations': q}, x)))(pert)
  g_heads = np.asarray(cot['heads_out'], np.float64)     # [H, B, T, 4]
  g_mix = np.asarray(cot['mix_out'], np.float64)         # [B, H, T, 2]
  ref = {'heads': (g_heads ** 2).mean(axis=(1, 2)),
         'mix': (g_mix ** 2).mean(axis=(0, 2))}
  assert ref['mix'][1].mean() / ref['mix'][0].mean() > 100
  for k in ref:
    np.testing.assert_allclose(grad_sq[k][smac.GRAD_SQ][:, 0], ref[k],
                               rtol=1e-5, atol=1e-14)
  # One step of the factor alone: the debiased EMA is the statistic itself.
  tx = smac.scale_by_grad_sq(DAMPING_Z, BETA)
  updates, _ = tx.update(grads, tx.init(params), grad_sq=grad_sq)
  for k in ref:
    scale = 1.0 / (ref[k] + DAMPING_Z)                   # [H, out]
    np.testing.assert_allclose(
        updates[k]['kernel'],
        np.asarray(grads[k]['kernel'], np.float64) * scale[:, None, :],
        rtol=1e-5)
    np.testing.assert_allclose(
        updates[k]['bias'], np.asarray(grads[k]['bias'], np.float64) * scale,
        rtol=1e-5)


def test_einsum_bias_in_another_order_than_the_kernel_raises():
  layer = nn.Einsum((3, 4, 2), 'btd,dkh->bthk', name='layer')
  x = jnp.ones((2, 5, 3))
  params = layer.init(jax.random.PRNGKey(0), x)['params']
  with pytest.raises(ValueError, match='smac: einsum layer.*bias whose axes '
                     'are in another order'):
    smac.probes_like(layer, {'params': params}, x)


def test_unscaled_layers_names_what_smac_leaves_to_mac_alone():
  tokens = jnp.array([[1, 2, 3]])
  model = TiedLMLinen()
  params = init_params(model, tokens)
  plan = mac_linen.plan(model, {'params': params}, tokens)
  probes = smac.probes_like(model, {'params': params}, tokens)
  assert set(plan.keys) == {'hidden', 'embed'}
  assert smac.unscaled_layers(plan, probes) == ('embed',)
  x = BATCHES[0][0]
  net = Net()
  net_params = init_params(net, x)
  assert smac.unscaled_layers(
      mac_linen.plan(net, {'params': net_params}, x),
      smac.probes_like(net, {'params': net_params}, x)) == ()


def test_probes_keep_the_attention_mixed_value_statistic():
  class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(2, name='attn')(x)

  model = Attention()
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  variables = model.init(jax.random.key(1), x)
  probes = smac.probes_like(model, variables, x)
  with mac_linen.capture():
    _, alone = model.apply(variables, x, mutable=['intermediates'])
  # The probe on the value projection's output is an identity with its own
  # backward rule: the program follows the output through it.
  with mac_linen.capture(), smac.capture():
    _, probed = model.apply({**variables, 'mac_probes': probes}, x,
                            mutable=['intermediates'])
  (a,) = alone['intermediates']['attn']['value'][mac_optax.MEAN]
  (b,) = probed['intermediates']['attn']['value'][mac_optax.MEAN]
  assert a.shape == (2, 8)                      # per head: mixed
  np.testing.assert_array_equal(a, b)
