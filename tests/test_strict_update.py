"""Every way MAC used to silently not happen now raises, naming the fix."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax import linen as mac_linen
from mac_optax import nnx as mac_nnx


class Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name='out')(nn.relu(nn.Dense(4, name='hidden')(x)))


@pytest.fixture(name='setup', scope='module')
def _setup():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
  model = Net()
  variables = model.init(jax.random.key(0), x)
  plan = mac_linen.plan(model, variables, x)
  return model, variables['params'], x, plan


def _captured(model, params, x, **kwargs):
  with mac_linen.capture(**kwargs):
    _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  return v['intermediates']


@pytest.mark.parametrize('use_plan', [True, False])
def test_capture_not_entered(setup, use_plan):
  model, params, x, plan = setup
  _, v = model.apply({'params': params}, x, mutable=['intermediates'])
  tx = mac_optax.mac(plan=plan if use_plan else None)
  with pytest.raises(ValueError, match='no MAC statistic at all') as e:
    tx.update(params, tx.init(params), params,
              intermediates=v.get('intermediates', {}))
  assert 'capture()' in str(e.value) and 'plan=' in str(e.value)


def test_mutable_without_intermediates(setup):
  model, params, x, plan = setup
  with mac_linen.capture():
    _, v = model.apply({'params': params}, x, mutable=['batch_stats'])
  tx = mac_optax.mac(plan=plan)
  with pytest.raises(ValueError, match="mutable=\\['intermediates'\\]"):
    tx.update(params, tx.init(params), params,
              intermediates=v.get('intermediates', {}))


def test_forward_jitted_before_the_capture_was_entered(setup):
  model, params, x, plan = setup
  forward = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, mutable=['intermediates'])[1])
  forward(params, x)                       # traced outside the capture
  with mac_linen.capture():
    v = forward(params, x)                 # the cached trace sows nothing
  tx = mac_optax.mac(plan=plan)
  with pytest.raises(ValueError, match='traced before the capture'):
    tx.update(params, tx.init(params), params,
              intermediates=v.get('intermediates', {}))


def test_planned_layer_without_statistic_names_it_unless_optional(setup):
  model, params, x, plan = setup
  inter = dict(_captured(model, params, x))
  del inter['out']
  grads = jax.tree.map(jnp.ones_like, params)
  tx = mac_optax.mac(plan=plan)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['out'\].*optional_layers"):
    tx.update(grads, state, params, intermediates=inter)
  # Declared optional: nothing folded for it, its last â still applies.
  tx = mac_optax.mac(plan=plan, optional_layers=['out'])
  full = _captured(model, params, x)
  _, state = tx.update(grads, tx.init(params), params, intermediates=full)
  updates, state2 = tx.update(grads, state, params, intermediates=inter)
  assert int(state2.layers['out'].count) == 1
  assert int(state2.layers['hidden'].count) == 2
  np.testing.assert_array_equal(state2.layers['out'].used,
                                state.layers['out'].used)
  a = np.append(np.asarray(state.layers['out'].used[0], np.float64), 1.0)
  g = np.ones((5, 2))
  expected = np.linalg.solve(np.outer(a, a) + np.eye(5), g)   # λ = 1
  np.testing.assert_allclose(updates['out']['kernel'], expected[:4],
                             rtol=1e-5)
  with pytest.raises(ValueError, match='not in the plan'):
    mac_optax.mac(plan=plan, optional_layers=['nope'])


def test_statistics_of_another_model_are_refused(setup):
  model, params, x, plan = setup
  inter = dict(_captured(model, params, x))
  inter['extra'] = {mac_optax.MEAN: (jnp.ones((1, 5)),)}
  grads = dict(params, extra={'kernel': jnp.ones((5, 2))})
  tx = mac_optax.mac(plan=plan)
  with pytest.raises(ValueError, match=r"plan does not know: \['extra"):
    tx.update(grads, tx.init(params), params, intermediates=inter)


def test_statistic_of_wrong_shape_names_layer_and_shapes(setup):
  model, params, x, plan = setup
  inter = dict(_captured(model, params, x))
  inter['hidden'] = {mac_optax.MEAN: (jnp.ones((2, 5)),)}
  tx = mac_optax.mac(plan=plan)
  with pytest.raises(ValueError, match=r"'hidden'.*\(2, 5\).*\(1, 5\)"):
    tx.update(params, tx.init(params), params, intermediates=inter)


def test_complex_gradients_and_non_float_stat_dtype_are_refused(setup):
  model, params, x, plan = setup
  inter = _captured(model, params, x)
  grads = jax.tree.map(lambda p: p.astype(jnp.complex64), params)
  tx = mac_optax.mac(plan=plan)
  with pytest.raises(ValueError, match="'hidden'.*complex"):
    tx.update(grads, tx.init(params), params, intermediates=inter)
  with pytest.raises(ValueError, match='stat_dtype must be a real floating'):
    mac_optax.mac(stat_dtype=jnp.int32)
  with pytest.raises(ValueError, match='stat_dtype must be a real floating'):
    mac_optax.mac(stat_dtype=jnp.complex64)


def test_masked_out_layers_need_no_statistics(setup):
  model, params, x, plan = setup
  grads = jax.tree.map(jnp.ones_like, params)
  frozen = optax.masked(mac_optax.mac(plan=plan),
                        jax.tree.map(lambda _: False, params))
  updates, _ = frozen.update(grads, frozen.init(params), params,
                             intermediates={})
  jax.tree.map(np.testing.assert_array_equal, updates, grads)
  # Only `out` trained by MAC: the statistic of `hidden` is not needed.
  labels = {'hidden': jax.tree.map(lambda _: 'sgd', params['hidden']),
            'out': jax.tree.map(lambda _: 'mac', params['out'])}
  tx = optax.multi_transform(
      {'mac': mac_optax.mac(plan=plan), 'sgd': optax.identity()}, labels)
  inter = {'out': _captured(model, params, x)['out']}
  updates, _ = tx.update(grads, tx.init(params), params, intermediates=inter)
  np.testing.assert_array_equal(updates['hidden']['kernel'],
                                grads['hidden']['kernel'])
  assert not np.allclose(updates['out']['kernel'], grads['out']['kernel'])


class TwiceCalled(nn.Module):
  """A fused projection used for two attention calls on the same input."""

  @nn.compact
  def __call__(self, x):
    proj = nn.Dense(3 * x.shape[-1], name='proj')
    for _ in range(2):
      proj(x)
      p = jax.nn.softmax(jnp.zeros(x.shape[:1] + (1,) + x.shape[1:2] * 2))
      mac_linen.sow_attention(proj, x, probs=p)
    return proj(x)


def test_sow_attention_records_exactly_what_it_is_given():
  x = jnp.ones((2, 3, 4))
  model = TwiceCalled()
  params = model.init(jax.random.key(0), x)['params']
  _, plain = model.apply({'params': params}, x, mutable=['intermediates'])
  captured = _captured(model, params, x)
  assert len(plain['intermediates']['proj'][mac_optax.ATTENTION_MEAN]) == 2
  assert len(captured['proj'][mac_optax.ATTENTION_MEAN]) == 2
  assert len(captured['proj'][mac_optax.MEAN]) == 1   # recorded, not used
  plan = mac_linen.plan(model, {'params': params}, x)
  assert plan['proj'].statistic == mac_optax.ATTENTION_MEAN


def _no_module_attention(query, key, value, **kwargs):
  del kwargs
  return nn.dot_product_attention(query, key, value)


def test_attention_fn_of_its_own_still_gives_the_value_its_mixed_mean():
  x = jax.random.normal(jax.random.key(1), (2, 3, 4))
  layer = nn.MultiHeadDotProductAttention(2, attention_fn=_no_module_attention)
  params = layer.init(jax.random.key(0), x)['params']
  # The probabilities are in the program, whatever function computes them.
  mixed = _captured(layer, params, x)
  assert mac_linen.plan(layer, {'params': params}, x)['value'].kind == (
      'attention_value')
  plain = _captured(layer, params, x, attention='plain')
  assert set(plain) == {'query', 'key', 'value', 'out'}
  assert mixed['value'][mac_optax.MEAN][0].shape == (2, 4)   # per head
  assert np.abs(mixed['value'][mac_optax.MEAN][0]
                - plain['value'][mac_optax.MEAN][0]).max() > 1e-3
  rngs = nnx.Rngs(0)
  module = nnx.MultiHeadAttention(2, 4, 4, attention_fn=_no_module_attention,
                                  decode=False, rngs=rngs)
  assert mac_nnx.plan(module, x)['value'].kind == 'attention_value'


def test_overflowing_activations_still_precondition_correctly():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)) * 1e19 + 3e19,
                  jnp.float32)
  model = nn.Dense(2)
  variables = model.init(jax.random.key(0), x)
  plan = mac_linen.plan(model, variables, x)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), variables['params'])
  tx = mac_optax.mac(0.3, plan=plan)
  inter = _captured(model, variables['params'], x)
  updates, state = jax.jit(lambda g, s: tx.update(
      g, s, intermediates=inter))(grads, tx.init(variables['params']))
  a = np.asarray(x, np.float64).mean(0)
  assert np.all(np.isfinite(np.asarray(updates['kernel'])))
  # ‖ā‖² ≈ 3e39 overflows float32; float64 holds it. (An explicit inverse of
  # ā āᵀ + λI is singular to float64 here, so the reference is the closed
  # form in float64.)
  a_aug, g = np.append(a, 1.0), np.full((4, 2), 0.5)
  u = g - np.outer(a_aug, a_aug @ g) / (0.3 + a_aug @ a_aug)
  kernel, bias = u[:3], u[3]
  np.testing.assert_allclose(updates['kernel'], kernel, rtol=1e-4,
                             atol=1e-30)
  np.testing.assert_allclose(updates['bias'], bias, rtol=1e-4, atol=1e-30)
  np.testing.assert_allclose(state.layers[''].used[0], a, rtol=1e-5)


@pytest.mark.parametrize('use_plan', [True, False])
def test_gradients_of_the_whole_variables_dict_are_refused(setup, use_plan):
  model, params, x, plan = setup
  inter = _captured(model, params, x)
  grads = {'params': jax.tree.map(jnp.ones_like, params)}
  tx = mac_optax.mac(plan=plan if use_plan else None)
  with pytest.raises(ValueError,
                     match=r"under 'params'.*variables\['params'\]"):
    tx.update(grads, tx.init(grads), intermediates=inter)
  # Everything masked out of that same tree is still nothing to do.
  frozen = optax.masked(tx, jax.tree.map(lambda _: False, grads))
  updates, _ = frozen.update(grads, frozen.init(grads), intermediates=inter)
  jax.tree.map(np.testing.assert_array_equal, updates, grads)


class Inserted(nn.Module):
  """`Net` with a layer inserted before the others (auto-named modules)."""
  extra: bool = False

  @nn.compact
  def __call__(self, x):
    if self.extra:
      x = nn.Dense(x.shape[-1])(x)
    return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))


def test_quick_start_fixes_its_layers_after_the_first_step(setup):
  model, params, x, _ = setup
  grads = jax.tree.map(jnp.ones_like, params)
  tx = mac_optax.mac()
  full = _captured(model, params, x)
  _, state = tx.update(grads, tx.init(params), intermediates=full)
  assert set(state.layers) == {'hidden', 'out'}
  # A layer of the state whose statistic is missing is no longer passed raw.
  partial = {'hidden': full['hidden']}
  with pytest.raises(ValueError, match=r"\['out'\].*no statistic.*plan="):
    tx.update(grads, state, intermediates=partial)
  # The same layer masked out (no gradient either) is left alone.
  masked = optax.masked(tx, {'hidden': {'kernel': True, 'bias': True},
                             'out': {'kernel': False, 'bias': False}})
  inner = masked.init(params)._replace(inner_state=state)
  updates, _ = masked.update(grads, inner, intermediates=partial)
  np.testing.assert_array_equal(updates['out']['kernel'],
                                grads['out']['kernel'])
  # A layer inserted before the others: `Dense_0`'s average must not go on
  # with another layer's input.
  old = Inserted()
  old_params = old.init(jax.random.key(0), x)['params']
  old_grads = jax.tree.map(jnp.ones_like, old_params)
  _, state = tx.update(old_grads, tx.init(old_params),
                       intermediates=_captured(old, old_params, x))
  new = Inserted(extra=True)
  new_params = new.init(jax.random.key(0), x)['params']
  with pytest.raises(ValueError, match=r"Dense_2.*not in the state.*plan="):
    tx.update(jax.tree.map(jnp.ones_like, new_params), state,
              intermediates=_captured(new, new_params, x))


def _prose(root):
  """``(where, text)`` of the README, the docs pages and every docstring."""
  import ast
  for path in [root / 'README.md'] + sorted((root / 'docs').glob('*.md')):
    yield path.relative_to(root), path.read_text()
  for path in sorted((root / 'mac_optax').rglob('*.py')):
    if path.name == 'accumulation.py':
      continue   # multi_steps' own module: every line of it is about it
    tree = ast.parse(path.read_text())
    for node in [tree] + list(ast.walk(tree)):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
          yield path.relative_to(root), doc


def test_every_mention_of_optax_multisteps_points_to_multi_steps():
  """``optax.MultiSteps(mac)`` keeps only the last micro-batch's statistic
  (tests/test_accumulation.py shows it): wherever the docs or docstrings
  name it, they say so and point to ``mac_optax.multi_steps``."""
  import pathlib
  import re
  mentions = 0
  root = pathlib.Path(__file__).resolve().parent.parent
  for where, text in _prose(root):
    for paragraph in re.split(r'\n\s*\n', text):
      if not re.search(r'MultiSteps\b(?!State|MacState)', paragraph) or (
          re.search(r'optax\.MultiSteps\(', paragraph)):   # code
        continue
      mentions += 1
      shown = f'{where}: {paragraph.strip()[:200]!r}'
      assert 'multi_steps' in paragraph, shown
      assert re.search(r'last micro-(batch|step)', paragraph), shown
  assert mentions >= 3
