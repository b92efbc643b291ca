"""Compiled memory of a transformer training step with and without capture.

Compares ``jax.jit(step).lower(...).compile().memory_analysis()`` of one
training step of a small causal GPT (``examples/transformer_models.py``):

* ``sgd``: plain gradient, no capture, SGD-momentum (the baseline);
* ``mac``: ``mac_optax.linen.capture()`` (value factor from the reduced
  probabilities) and ``mac_optax.mac_sgd``;
* ``mac_product_of_means``: the same with ``attention='product_of_means'``;
* ``naive``: what the spec warns against: every attention layer sows its
  ``[B, H, N, N]`` probabilities (``sow_weights=True``) and the mixed mean
  is formed from them after the backward pass.

``--remat`` wraps every block in ``nn.remat`` (the probabilities are then
recomputed in the backward pass instead of being kept for it).

Usage: ``python benchmarks/attention_memory.py [--batch 16 --context 128]
[--remat]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))

import mac_optax  # pylint: disable=g-import-not-at-top
from transformer_models import GPT  # pylint: disable=g-import-not-at-top


def _sow_all_weights(next_fun, args, kwargs, context):
  """Calls every attention layer with ``sow_weights=True``."""
  if (isinstance(context.module, nn.MultiHeadDotProductAttention)
      and context.method_name == '__call__'):
    kwargs = dict(kwargs, sow_weights=True)
  return next_fun(*args, **kwargs)


def _naive_value_means(inter, tokens_embedded):
  """Mixed means formed from the full sown probabilities (after backward)."""
  del tokens_embedded
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(inter)[0]:
    if 'attention_weights' in jax.tree_util.keystr(path):
      out.append(mac_optax.attention.key_weights(leaf).sum())
  return sum(out)


def make_steps(model, tokens):
  params = model.init(jax.random.PRNGKey(0), tokens)['params']

  def loss_fn(params, capture_kwargs=None, naive=False):
    def apply():
      out, v = model.apply({'params': params}, tokens,
                           mutable=['intermediates'])
      return out, v.get('intermediates', {})
    if naive:
      with nn.intercept_methods(_sow_all_weights):
        with mac_optax.linen.capture(attention='plain'):
          logits, inter = apply()
    elif capture_kwargs is None:
      logits, inter = model.apply({'params': params}, tokens), {}
    else:
      with mac_optax.linen.capture(**capture_kwargs):
        logits, inter = apply()
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], tokens[:, 1:]).mean()
    return loss, inter

  def sgd_step(params, opt_state):
    grads, _ = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = sgd.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def mac_step(params, opt_state, capture_kwargs):
    grads, inter = jax.grad(loss_fn, has_aux=True)(params, capture_kwargs)
    updates, opt_state = mac.update(grads, opt_state, params,
                                    intermediates=inter)
    return optax.apply_updates(params, updates), opt_state

  def naive_step(params, opt_state):
    grads, inter = jax.grad(loss_fn, has_aux=True)(params, None, True)
    # Reduce the probabilities only now, as an update() that received them
    # would: they stay alive through the backward pass.
    extra = _naive_value_means(inter, None)
    updates, opt_state = mac.update(grads, opt_state, params,
                                    intermediates=inter)
    updates = jax.tree_util.tree_map(lambda u: u + 0 * extra, updates)
    return optax.apply_updates(params, updates), opt_state

  sgd = optax.sgd(0.1, momentum=0.9)
  mac = mac_optax.mac_sgd(0.1, momentum=0.9, intermediates_like=(
      mac_optax.linen.intermediates_like(model, {'params': params}, tokens)))
  def grad_fn(capture_kwargs, naive=False):
    def fn(params):
      return jax.grad(loss_fn, has_aux=True)(params, capture_kwargs, naive)
    return fn

  grads = {
      'sgd': grad_fn(None),
      'mac': grad_fn({}),
      'mac_product_of_means': grad_fn({'attention': 'product_of_means'}),
      'naive': grad_fn(None, True),
  }
  steps = {
      'sgd': (sgd_step, sgd.init(params)),
      'mac': (lambda p, s: mac_step(p, s, {}), mac.init(params)),
      'mac_product_of_means': (
          lambda p, s: mac_step(p, s, {'attention': 'product_of_means'}),
          mac.init(params)),
      'naive': (naive_step, mac.init(params)),
  }
  return params, steps, grads


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--context', type=int, default=128)
  parser.add_argument('--dim', type=int, default=64)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--depth', type=int, default=4)
  parser.add_argument('--remat', action='store_true')
  args = parser.parse_args()
  model = GPT(vocab=96, context=args.context, dim=args.dim, heads=args.heads,
              depth=args.depth, remat=args.remat)
  tokens = jnp.zeros((args.batch, args.context), jnp.int32)
  params, steps, grads = make_steps(model, tokens)
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  probs = args.batch * args.heads * args.context ** 2 * 4 * args.depth
  print(f'GPT: depth {args.depth}, dim {args.dim}, heads {args.heads}, '
        f'batch {args.batch}, context {args.context}, remat {args.remat}, '
        f'{n_params} params; '
        f'[B,H,N,N] float32 of all layers: {probs / 2**20:.1f} MiB')
  print('Whole step (grad + update + apply), jitted (MiB):')
  print(f"{'step':<22}{'temp':>9}{'output':>9}{'args':>9}{'temp+out':>10}"
        f"{'/ sgd':>7}")
  base = None
  for name, (step, state) in steps.items():
    mem = jax.jit(step).lower(params, state).compile().memory_analysis()
    temp = mem.temp_size_in_bytes / 2**20
    out = mem.output_size_in_bytes / 2**20
    base = base or temp + out
    print(f'{name:<22}{temp:>9.2f}{out:>9.2f}'
          f'{mem.argument_size_in_bytes / 2**20:>9.2f}{temp + out:>10.2f}'
          f'{(temp + out) / base:>7.2f}')
  print('Gradient function returning (grads, intermediates), jitted '
        '(the statistics leave it; MiB):')
  print(f"{'grad fn':<22}{'temp':>9}{'output':>9}{'temp+out':>10}"
        f"{'/ sgd':>7}{'stats KiB':>11}")
  base = None
  for name, fn in grads.items():
    mem = jax.jit(fn).lower(params).compile().memory_analysis()
    temp = mem.temp_size_in_bytes / 2**20
    out = mem.output_size_in_bytes / 2**20
    base = base or temp + out
    _, inter = jax.eval_shape(fn, params)
    stats = sum(x.size * x.dtype.itemsize
                for x in jax.tree_util.tree_leaves(inter)) / 2**10
    print(f'{name:<22}{temp:>9.2f}{out:>9.2f}{temp + out:>10.2f}'
          f'{(temp + out) / base:>7.2f}{stats:>11.1f}')


if __name__ == '__main__':
  main()
