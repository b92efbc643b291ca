"""Mistakes on the optimizer side: each is accepted when it can be, or raises
naming the layer, the cause and the fix (not a deep pytree or numpy error)."""

import flax.linen as nn
from flax.core import FrozenDict
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax import linen as mac_linen


class Net(nn.Module):
  width: int = 4

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(self.width, name='hidden')(x))
    return nn.Dense(2, name='out')(h)


def _captured(model, params, x, mutable=('intermediates',)):
  with mac_linen.capture():
    _, v = model.apply({'params': params}, x, mutable=list(mutable))
  return v


@pytest.fixture(name='setup', scope='module')
def _setup():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
  model = Net()
  variables = model.init(jax.random.key(0), x)
  params = variables['params']
  plan = mac_linen.plan(model, variables, x)
  inter = _captured(model, params, x)['intermediates']
  grads = jax.tree.map(lambda p: jnp.asarray(
      np.random.default_rng(1).normal(size=p.shape), p.dtype), params)
  return model, params, x, plan, inter, grads


def _reference(grads, inter, damping=1.0):
  """``(ā_aug ā_augᵀ + λI)⁻¹ Ĝ_aug · λ`` per layer, float64 (one step, β any)."""
  out = {}
  for name, layer in grads.items():
    a = np.append(np.asarray(inter[name][mac_optax.MEAN][0][0], np.float64),
                  1.0)
    g = np.vstack([np.asarray(layer['kernel'], np.float64),
                   np.asarray(layer['bias'], np.float64)[None]])
    u = damping * np.linalg.solve(np.outer(a, a) + damping * np.eye(len(a)),
                                  g)
    out[name] = {'kernel': u[:-1], 'bias': u[-1]}
  return out


@pytest.mark.parametrize('form', ['mutable result', 'FrozenDict of it',
                                  'with batch_stats', 'FrozenDict statistics'])
@pytest.mark.parametrize('use_plan', [True, False])
def test_the_whole_intermediates_collection_is_accepted(setup, form,
                                                        use_plan):
  model, params, x, plan, inter, grads = setup
  v = {'intermediates': inter}
  given = {'mutable result': v,
           'FrozenDict of it': FrozenDict(v),
           'with batch_stats': FrozenDict(v, batch_stats={}),
           'FrozenDict statistics': FrozenDict(inter)}[form]
  tx = mac_optax.mac(plan=plan if use_plan else None)
  updates, _ = tx.update(grads, tx.init(params), intermediates=given)
  want = _reference(grads, inter)
  jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-5,
                                                       atol=1e-6),
               updates, want)


def test_float0_gradient_names_the_layer_and_the_fix(setup):
  _, params, _, plan, inter, grads = setup
  integer_kernel = dict(grads, hidden={
      'kernel': np.zeros(params['hidden']['kernel'].shape, jax.dtypes.float0),
      'bias': grads['hidden']['bias']})
  for tx in (mac_optax.mac(plan=plan), mac_optax.mac()):
    with pytest.raises(ValueError, match=r"'hidden'.*float0.*optax\.masked"):
      tx.update(integer_kernel, tx.init(params), intermediates=inter)
  # A float0 leaf that is no layer's (an integer counter) passes through.
  tx = mac_optax.mac(plan=plan)
  updates, _ = tx.update(dict(grads, step=np.zeros((), jax.dtypes.float0)),
                         tx.init(params), intermediates=inter)
  assert updates['step'].dtype == jax.dtypes.float0


@pytest.mark.parametrize('masked', ['kernel', 'bias'])
@pytest.mark.parametrize('use_plan', [True, False])
def test_kernel_and_bias_masked_apart_name_the_layer(setup, masked, use_plan):
  _, params, _, plan, inter, grads = setup
  mask = jax.tree.map(lambda _: True, params)
  mask['hidden'][masked] = False
  tx = optax.masked(mac_optax.mac(plan=plan if use_plan else None), mask)
  with pytest.raises(ValueError,
                     match=f"'hidden'.*its {masked} is masked out.*same mask"):
    tx.update(grads, tx.init(params), intermediates=inter)
  # Masking the whole layer is fine: it is left alone, `out` preconditioned.
  mask['hidden'] = {'kernel': False, 'bias': False}
  tx = optax.masked(mac_optax.mac(plan=plan if use_plan else None), mask)
  updates, _ = tx.update(grads, tx.init(params), intermediates=inter)
  jax.tree.map(np.testing.assert_array_equal, updates['hidden'],
               grads['hidden'])
  want = _reference({'out': grads['out']}, inter)['out']
  np.testing.assert_allclose(updates['out']['kernel'], want['kernel'],
                             rtol=1e-5, atol=1e-6)


def test_the_bias_missing_from_the_gradients_is_named(setup):
  _, params, _, plan, inter, grads = setup
  grads = dict(grads, hidden={'kernel': grads['hidden']['kernel']})
  tx = mac_optax.mac(plan=plan)
  with pytest.raises(ValueError, match=r"no 'hidden/bias'.*\(4,\).*same model"):
    tx.update(grads, tx.init(params), intermediates=inter)


@pytest.mark.parametrize('wrap', ['apply_if_finite', 'MultiSteps',
                                  'multi_steps', 'scan'])
def test_wrappers_without_a_plan_say_pass_plan(setup, wrap):
  _, params, _, plan, inter, grads = setup
  inner = mac_optax.mac()
  if wrap == 'scan':
    def run():
      def body(state, _):
        return inner.update(grads, state, intermediates=inter)[1], None
      return jax.lax.scan(body, inner.init(params), length=2)
  else:
    tx = {'apply_if_finite': lambda: optax.apply_if_finite(inner, 3),
          'MultiSteps': lambda: optax.MultiSteps(inner, 2),
          'multi_steps': lambda: mac_optax.multi_steps(inner, 2, plan=plan),
          }[wrap]()
    def run():
      return tx.update(grads, tx.init(params), intermediates=inter)
  with pytest.raises((TypeError, ValueError), match='pass plan='):
    run()


@pytest.mark.parametrize('form', ['mutable result', 'FrozenDict of it',
                                  'FrozenDict statistics'])
def test_multi_steps_takes_the_statistics_in_any_mapping(setup, form):
  _, params, _, plan, inter, grads = setup
  given = {'mutable result': {'intermediates': inter},
           'FrozenDict of it': FrozenDict({'intermediates': inter}),
           'FrozenDict statistics': FrozenDict(inter)}[form]
  tx = mac_optax.multi_steps(mac_optax.mac(plan=plan), 1, plan=plan)
  updates, _ = tx.update(grads, tx.init(params), intermediates=given)
  jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-5,
                                                       atol=1e-6),
               updates, _reference(grads, inter))
  with pytest.raises(ValueError, match='ShapeDtypeStruct'):
    tx.update(grads, tx.init(params), intermediates=plan.intermediates_like)


def test_checkpoint_template_without_a_plan_says_pass_plan(setup, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  _, params, _, _, inter, grads = setup
  tx = mac_optax.mac()
  _, state = tx.update(grads, tx.init(params), intermediates=inter)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', {'opt': state})
    with pytest.raises(ValueError, match='pass plan='):
      checkpointer.restore(tmp_path / 'ckpt', {'opt': tx.init(params)})


@pytest.mark.parametrize('use_plan', [True, False])
def test_an_old_state_on_other_widths_names_the_layer_and_shapes(setup,
                                                                 use_plan):
  model, params, x, plan, inter, grads = setup
  wide = Net(width=7)
  wide_params = wide.init(jax.random.key(0), x)['params']
  wide_plan = mac_linen.plan(wide, {'params': wide_params}, x)
  wide_inter = _captured(wide, wide_params, x)['intermediates']
  wide_grads = jax.tree.map(jnp.ones_like, wide_params)
  old = mac_optax.mac(plan=plan if use_plan else None)
  _, old_state = old.update(grads, old.init(params), intermediates=inter)
  tx = mac_optax.mac(plan=wide_plan if use_plan else None)
  with pytest.raises(ValueError, match=r"'out'.*\(1, 4\).*\(1, 7\).*init"):
    tx.update(wide_grads, old_state, intermediates=wide_inter)


@pytest.mark.parametrize('use_plan', [True, False])
def test_shapes_given_as_the_statistics_say_so(setup, use_plan):
  _, params, _, plan, _, grads = setup
  tx = mac_optax.mac(plan=plan if use_plan else None)
  with pytest.raises(ValueError,
                     match=r"'hidden'.*ShapeDtypeStruct.*captured"):
    tx.update(grads, tx.init(params), intermediates=plan.intermediates_like)


def _exact_reference(p, layer):
  g = np.vstack([np.asarray(layer['kernel'], np.float64),
                 np.asarray(layer['bias'], np.float64)[None]])
  return np.asarray(p, np.float64) @ g


@pytest.mark.parametrize('use_plan', [True, False])
def test_exact_layers_alone_need_no_statistics(use_plan):
  x = jnp.ones((3, 5))
  model = nn.Dense(2)
  params = model.init(jax.random.key(0), x)['params']
  grads = jax.tree.map(lambda p: jnp.asarray(
      np.random.default_rng(2).normal(size=p.shape), p.dtype), params)
  rng = np.random.default_rng(3)
  m = rng.normal(size=(6, 6))
  p = np.linalg.inv(m @ m.T + np.eye(6)).astype(np.float32)
  plan = mac_linen.plan(model, {'params': params}, x) if use_plan else None
  tx = mac_optax.mac(plan=plan, exact_layers={'': p})
  updates, _ = tx.update(grads, tx.init(params), intermediates={})
  want = _exact_reference(p, grads)
  np.testing.assert_allclose(updates['kernel'], want[:-1], rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(updates['bias'], want[-1], rtol=1e-4, atol=1e-6)
  # With another layer that is not exact, a missing statistic still raises.
  two = Net()
  params2 = two.init(jax.random.key(0), x)['params']
  tx = mac_optax.mac(exact_layers={'hidden': p})
  with pytest.raises(ValueError, match='no MAC statistic at all'):
    tx.update(params2, tx.init(params2), intermediates={})
