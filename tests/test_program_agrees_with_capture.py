"""The program's layers agree with the Flax capture's on Flax's own layers.

Two independent ways of finding a layer — Flax's module classes (the linen
capture) and the traced program (`mac_optax.plan`) — must give the same axis
roles and the same statistics for Dense, Conv, DenseGeneral, a tied
embedding's output layer (``Embed.attend``) and the query, key and output
projections of Flax's attention. (The value projection
differs by design: the program keeps one mixed mean per head where the
capture averages them.)
"""

import jax
import numpy as np

import mac_optax
from benchmarks import gpt2_fsdp
from benchmarks import models
from tests import program_reference as ref


def _both(model, x):
  variables = model.init(jax.random.PRNGKey(0), x)
  params = variables['params']
  fn = lambda p, x: model.apply({'params': p}, x)
  program = mac_optax.plan(fn, params, x)
  capture = mac_optax.linen.plan(model, variables, x)
  _, stats = jax.jit(mac_optax.with_statistics(fn, program))(params, x)
  with mac_optax.linen.capture():
    _, v = model.apply(variables, x, mutable=['intermediates'])
  sown = mac_optax._src.statistics.sown_statistics(v['intermediates'])  # pylint: disable=protected-access
  return program, capture, stats, sown


def _check_agree(model, x, skip=()):
  program, capture, stats, sown = _both(model, x)
  checked = 0
  for layer in capture.layers:
    if layer.kind in skip:
      continue
    twin = program['/'.join(layer.kernel_leaf)]
    assert twin.layout == layer.layout, layer.path
    calls = sown[(tuple(layer.path.split('/')), layer.statistic)]
    ref.assert_close(stats[twin.key], np.mean(np.stack(calls), 0))
    checked += 1
  assert checked >= 3
  assert program.fraction >= capture.fraction
  return program


def test_resnet_layers_agree():
  _check_agree(models.ResNet((8, 8, 16)), jax.random.normal(
      jax.random.PRNGKey(1), (2, 8, 8, 3)))


def test_vit_layers_agree():
  _check_agree(models.ViT(patch=4, dim=16, depth=1, heads=2),
               jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3)),
               skip=('attention_value', 'attention_fused'))


def test_gpt_layers_agree():
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, 16)
  program = _check_agree(
      gpt2_fsdp.GPT2(vocab=16, context=8, dim=16, depth=1, heads=2), tokens,
      skip=('attention_value', 'attention_fused'))
  assert program['Embed_0/embedding'].layout.roles() == 'oi'   # attend
