"""The layer plan: what it lists for a ViT and a GPT, and what it refuses."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import mac_optax

from mac_optax import linen as mac_linen
from mac_optax import nnx as mac_nnx

D, H = 8, 2


class ViTBlock(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(H, name='attn')(
        nn.LayerNorm(name='ln1')(x))
    h = nn.gelu(nn.Dense(2 * D, name='fc1')(nn.LayerNorm(name='ln2')(x)))
    return x + nn.Dense(D, name='fc2')(h)


class ViT(nn.Module):

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(D, (4, 4), strides=(4, 4), name='patch')(images)
    x = x.reshape(x.shape[0], -1, D)
    pos = self.param('pos', nn.initializers.normal(0.02), x.shape[1:])
    x = ViTBlock(name='block')(x + pos)
    return nn.Dense(3, name='head')(nn.LayerNorm(name='ln')(x).mean(1))


class GPTBlock(nn.Module):

  @nn.compact
  def __call__(self, x):
    B, N, _ = x.shape
    c_attn = nn.Dense(3 * D, name='c_attn')
    q, k, v = (t.reshape(B, N, H, -1)
               for t in jnp.split(c_attn(nn.LayerNorm(name='ln')(x)), 3, -1))
    s = jnp.einsum('bihd,bjhd->bhij', q, k) / np.sqrt(D // H)
    p = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((N, N), bool)), s, -1e9))
    mac_linen.sow_attention(c_attn, x, probs=p)
    y = jnp.einsum('bhij,bjhd->bihd', p, v).reshape(B, N, D)
    return x + nn.Dense(D, name='c_proj')(y)


class GPT(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(11, D, name='wte')
    x = embed(tokens) + nn.Embed(6, D, name='wpe')(jnp.arange(tokens.shape[1]))
    return embed.attend(GPTBlock(name='h0')(x))


def _vit():
  images = jnp.ones((2, 8, 8, 1))
  model = ViT()
  return model, model.init(jax.random.key(0), images), images


def _gpt():
  tokens = jnp.zeros((2, 6), jnp.int32)
  model = GPT()
  return model, model.init(jax.random.key(0), tokens), tokens


def test_vit_coverage_table_lists_every_layer_and_every_passed_parameter():
  model, variables, images = _vit()
  plan = mac_linen.plan(model, variables, images)
  kinds = {layer.key: layer.kind for layer in plan.layers}
  assert kinds == {
      'patch': 'conv', 'head': 'dense', 'block/fc1': 'dense',
      'block/fc2': 'dense', 'block/attn/query': 'dense',
      'block/attn/key': 'dense', 'block/attn/value': 'attention_value',
      'block/attn/out': 'dense'}
  assert plan['patch'].layout.d_in == 16 and plan['patch'].layout.roles(
  ) == 'iiio'
  assert plan['block/attn/query'].layout.roles() == 'ioo'  # D -> (H, D/H)
  assert plan['block/attn/out'].layout.roles() == 'iio'    # (H, D/H) -> D
  passed = {p.path: p.reason for p in plan.passed}
  assert passed['pos'].startswith('reaches no dot_general')
  assert passed['block/ln1/scale'].startswith('normalization parameter')
  assert len(passed) == 1 + 3 * 2   # pos and three LayerNorms
  total = sum(x.size for x in jax.tree_util.tree_leaves(variables['params']))
  assert plan.total_params == total
  assert plan.fraction == pytest.approx(
      1 - (4 * D + 3 * 2 * D) / total)   # pos (4 patches) and 3 LayerNorms
  table = str(plan)
  assert 'block/attn/value  attention_value' in table
  assert 'pos (4, 8)' in table and 'passed through unchanged' in table


def test_gpt_coverage_table_with_fused_qkv_tied_table_and_lookups():
  model, variables, tokens = _gpt()
  plan = mac_linen.plan(model, variables, tokens)
  kinds = {layer.key: layer.kind for layer in plan.layers}
  assert kinds == {'wte': 'embed_attend', 'h0/c_attn': 'attention_fused',
                   'h0/c_proj': 'dense'}
  assert plan['h0/c_attn'].layout.groups == 3     # q, k, v column groups
  passed = {p.path: p.reason for p in plan.passed}
  assert passed['wpe/embedding'].startswith('embedding lookup')
  looked_up = mac_linen.plan(model, variables, tokens, embed_lookup=True)
  assert set(looked_up.keys) == set(plan.keys) | {'wte@lookup', 'wpe@lookup'}
  assert looked_up['wte@lookup'].layout.roles() == 'io'   # (vocab, D)
  assert looked_up['wte'].layout.roles() == 'oi'          # attend: (V, D)
  # The tied table counts once in the share of parameters.
  assert looked_up.preconditioned_params == (
      plan.preconditioned_params + 6 * D)


def test_linen_and_nnx_plans_agree_on_layouts():
  x = jnp.ones((3, 5))
  linen_model = nn.Sequential([nn.Dense(4), nn.LayerNorm(), nn.Dense(2)])
  variables = linen_model.init(jax.random.key(0), x)
  linen_plan = mac_linen.plan(linen_model, variables, x)

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.fc1 = nnx.Linear(5, 4, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)
      self.fc2 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.fc2(self.norm(self.fc1(x)))

  nnx_plan = mac_nnx.plan(Net(nnx.Rngs(0)), x)
  layouts = lambda p: [(l.kind, l.layout) for l in p.layers]
  assert layouts(linen_plan) == layouts(nnx_plan)
  assert [p.reason for p in nnx_plan.passed] == [
      'normalization parameter (LayerNorm)'] * 2
  assert linen_plan.fraction == pytest.approx(nnx_plan.fraction)


class Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(4)(x)), None


class Scanned(nn.Module):
  variable_axes: tuple

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={a: 0 for a in self.variable_axes},
                    split_rngs={'params': True}, length=3)
    return stack()(x, None)[0]


def test_scan_stacks_statistics_with_or_without_an_intermediates_axis():
  x = jax.random.normal(jax.random.key(1), (2, 4))
  sown = {}
  for axes in (('params', 'intermediates'), ('params',)):
    model = Scanned(axes)
    variables = model.init(jax.random.key(0), x)
    plan = mac_linen.plan(model, variables, x)
    assert plan['ScanBlock_0/Dense_0'].layout.stat_shape == (3, 1, 4)
    with mac_linen.capture():
      _, v = model.apply(variables, x, mutable=['intermediates'])
    (sown[axes],) = v['intermediates']['ScanBlock_0']['Dense_0'][
        mac_optax.MEAN]
  # Layer l's statistic is the mean of its input, the previous output.
  params = variables['params']['ScanBlock_0']['Dense_0']
  h, expected = np.asarray(x, np.float64), []
  for l in range(3):
    expected.append(h.mean(0))
    h = np.maximum(h @ np.asarray(params['kernel'][l], np.float64)
                   + np.asarray(params['bias'][l], np.float64), 0.0)
  for stat in sown.values():
    np.testing.assert_allclose(stat[:, 0], np.stack(expected), rtol=1e-5,
                               atol=1e-6)


class Custom(nn.Module):
  """A layer of its own code, no Flax layer class: found in the program."""

  @nn.compact
  def __call__(self, x):
    return x @ self.param('kernel', nn.initializers.ones, (x.shape[-1], 3))


def test_a_layer_of_its_own_code_is_planned_like_a_dense():
  x = jnp.ones((2, 4))
  model = nn.Sequential([Custom(), nn.Dense(2)])
  plan = mac_linen.plan(model, model.init(jax.random.key(0), x), x)
  assert plan.keys == ('layers_0', 'layers_1')
  assert plan['layers_0'].kind == 'dense' and not plan['layers_0'].has_bias
  assert plan['layers_0'].statistic == mac_optax.MEAN
  assert plan.passed == ()


def test_statistic_without_parameter_is_refused():
  class Stray(nn.Module):

    @nn.compact
    def __call__(self, x):
      mac_linen.sow_mean(self, mac_linen.input_mean(x))   # owns no kernel
      return nn.Dense(2)(x)

  x = jnp.ones((2, 4))
  model = Stray()
  with pytest.raises(ValueError, match="sown at '' but there is no parameter"):
    mac_linen.plan(model, model.init(jax.random.key(0), x), x)


def test_optax_transform_and_plan_import_without_flax():
  import subprocess
  import sys
  import textwrap  # pylint: disable=g-import-not-at-top,multiple-imports
  code = textwrap.dedent("""
      import sys
      sys.modules['flax'] = None          # any flax import now fails
      import jax.numpy as jnp, mac_optax
      params = {'d': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}
      inter = {'d': {mac_optax.MEAN: (jnp.ones((1, 3)),)}}
      tx = mac_optax.mac(intermediates_like=inter)
      updates, _ = tx.update(params, tx.init(params), params,
                             intermediates=inter)
      assert abs(float(updates['d']['bias'][0]) + 0.6) < 1e-6   # 0 - 3/5
      assert 'flax' not in [m.split('.')[0] for m in sys.modules
                            if sys.modules[m] is not None]
  """)
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


class _NoLayer(nn.Module):
  """Parameters used elementwise only: no layer for MAC."""

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm()(x) * self.param('gate', nn.initializers.ones,
                                          (x.shape[-1],))


class _NnxNoLayer(nnx.Module):

  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(4, rngs=rngs)

  def __call__(self, x):
    return self.norm(x)


def test_a_capture_plan_without_a_layer_raises_with_every_reason():
  x = jnp.ones((2, 4))
  model = _NoLayer()
  with pytest.raises(ValueError, match='no layer found') as e:
    mac_linen.plan(model, model.init(jax.random.key(0), x), x)
  assert 'gate' in str(e.value) and 'LayerNorm_0/scale' in str(e.value)
  with pytest.raises(ValueError, match='no layer found') as e:
    mac_nnx.plan(_NnxNoLayer(nnx.Rngs(0)), x)
  assert 'norm/scale' in str(e.value)
