"""A model scanned over its blocks compiles to a MAC step whose size does not grow with depth.

For ``nn.scan`` / ``nnx.scan`` models MAC's update handles each stacked kernel
once (one ``[depth, G, d_in]`` statistic), so the whole train step (forward,
backward, statistics, update) lowers to the same program at every depth, as
SGD-momentum's does: compile time independent of depth. Measured by the
StableHLO ops of the lowered step with every called function expanded (what
XLA compiles), through each way of capturing statistics.
"""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import optax
import pytest

import mac_optax
from benchmarks import compile_cost

D = 8


class _LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    h = nn.gelu(nn.Dense(2 * D)(nn.LayerNorm()(x)))
    return x + nn.Dense(D)(h), None


class _LinenScanned(nn.Module):
  depth: int

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D)(x)
    blocks = nn.scan(_LinenBlock, variable_axes={'params': 0},
                     split_rngs={'params': True}, length=self.depth)
    x, _ = blocks()(x, None)
    return nn.Dense(3)(x)


class _NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.up = nnx.Linear(D, 2 * D, rngs=rngs)
    self.down = nnx.Linear(2 * D, D, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(self.norm(x))))


class _NnxScanned(nnx.Module):

  def __init__(self, depth, rngs):
    self.stem = nnx.Linear(5, D, rngs=rngs)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return _NnxBlock(rngs)

    self.blocks = blocks(rngs)
    self.head = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, x):

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(self.stem(x), self.blocks))


X = jnp.ones((4, 5))


def _step_ops(loss_fn, params, tx) -> int:
  """StableHLO ops of one jitted MAC step (grad, update, apply)."""

  def step(params, opt_state):
    grads, stats = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   intermediates=stats)
    return optax.apply_updates(params, updates), opt_state

  lowered = jax.jit(step).lower(params, tx.init(params))
  return compile_cost.inlined_ops(lowered.as_text())


def _linen_ops(depth: int, route: str) -> int:
  model = _LinenScanned(depth)
  params = model.init(jax.random.key(0), X)['params']
  if route == 'program':
    fn = lambda p, x: model.apply({'params': p}, x)
    plan = mac_optax.plan(fn, params, X)
    with_stats = mac_optax.with_statistics(fn, plan)

    def loss_fn(p):
      out, stats = with_stats(p, X)
      return jnp.sum(out ** 2), stats
  else:
    plan = mac_optax.linen.plan(model, {'params': params}, X)

    def loss_fn(p):
      with mac_optax.linen.capture():
        out, v = model.apply({'params': p}, X, mutable=['intermediates'])
      return jnp.sum(out ** 2), v['intermediates']
  stacked = [layer for layer in plan.layers
             if layer.layout.stat_shape[:1] == (depth,)]
  assert len(stacked) == 2, plan   # the block's two Dense, stacked
  return _step_ops(loss_fn, params, mac_optax.mac_sgd(0.1, 0.9, plan=plan))


def _nnx_ops(depth: int) -> int:
  model = _NnxScanned(depth, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  plan = mac_optax.nnx.plan(model, X)
  assert plan['blocks/up'].layout.stat_shape == (depth, 1, D)

  def loss_fn(p):
    out, inter = mac_optax.nnx.capture(nnx.merge(graphdef, p, rest))(X)
    return jnp.sum(out ** 2), inter
  return _step_ops(loss_fn, params, mac_optax.mac_sgd(0.1, 0.9, plan=plan))


@pytest.mark.parametrize('route', ['linen', 'program'])
def test_linen_scan_step_is_the_same_program_at_every_depth(route):
  assert _linen_ops(2, route) == _linen_ops(5, route)


def test_nnx_scan_step_is_the_same_program_at_every_depth():
  assert _nnx_ops(2) == _nnx_ops(5)
