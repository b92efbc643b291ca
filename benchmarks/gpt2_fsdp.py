"""GPT-2-small under FSDP on 8 host devices: MAC vs SGD-momentum and AdamW.

A GPT-2-small-shaped language model (vocab 50257, context 256, d=768, 12
blocks, 12 heads, MLP 3072, tied input/output embedding: 124 M parameters) is
trained for a few steps on random tokens with every parameter and every
parameter-shaped optimizer leaf split over the ``'data'`` mesh axis on its
largest axis that the device count divides (ZeRO-3 / FSDP, as in MaxText);
the global batch (one sequence per device) is split over the same axis.

Measured, per optimizer: the whole jitted step's time (min of interleaved
repeats) and compile time, as ratios to SGD-momentum; the compiled step's
memory per device (``memory_analysis()``); the optimizer state's bytes per
device on 1, 2, 4 and 8 devices (from the shardings: FSDP must shrink it as
1/devices); the share of parameters MAC preconditions.

The host device count is fixed when jax is imported, so ``benchmarks/run.py
--only gpt2`` runs this script in a subprocess; by hand::

    python benchmarks/gpt2_fsdp.py [--quick] [--json out.json]
"""

from __future__ import annotations

import os
import sys

DEVICES = 8

if __name__ == '__main__':
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count='
                             f'{DEVICES}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # GPT2_FSDP_ROOT: measure another checkout's mac_optax (e.g. the commit a
  # change started from) with this script.
  sys.path.insert(0, os.environ.get('GPT2_FSDP_ROOT', os.path.dirname(
      os.path.dirname(os.path.abspath(__file__)))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import time

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mac_optax
from benchmarks import models
from benchmarks import report
from benchmarks import steps

F32 = np.float32


class GPT2(nn.Module):
  """GPT-2: learned positions, pre-norm causal blocks, tied output layer."""
  vocab: int = 50257
  context: int = 256
  dim: int = 768
  depth: int = 12
  heads: int = 12

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.dim,
                     embedding_init=nn.initializers.normal(0.02))
    pos = self.param('pos', nn.initializers.normal(0.01),
                     (self.context, self.dim))
    x = embed(tokens) + pos[:tokens.shape[1]]
    for _ in range(self.depth):
      x = models.Block(self.dim, self.heads, causal=True)(x)
    return embed.attend(nn.LayerNorm()(x))


def config(quick: bool):
  """(model, global batch in sequences, timing repeats, description)."""
  if quick:
    return (GPT2(vocab=512, context=32, dim=64, depth=2, heads=2), DEVICES,
            2, 'GPT-2-shaped, vocab 512, context 32, d=64, 2 blocks, 2 heads')
  return (GPT2(), DEVICES, 2,
          'GPT-2-small: vocab 50257, context 256, d=768, 12 blocks, '
          '12 heads, MLP 3072, tied embedding')


def fsdp_spec(shape, n) -> P:
  """The largest axis that `n` divides goes over 'data'; else replicated."""
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if n > 1 and shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = 'data'
      return P(*spec)
  return P()


def state_shardings(state_shapes, params, param_shardings, mesh):
  """Parameter-shaped leaves (momentum, Adam's moments) like their parameter.

  A leaf is matched by its path ending in a parameter's path, with the
  parameter's shape; everything else (MAC's ``O(d_in)`` vectors, counters)
  is replicated.
  """
  by_path = {jax.tree_util.keystr(path): (sharding, leaf.shape)
             for (path, sharding), leaf in zip(
                 jax.tree_util.tree_flatten_with_path(param_shardings)[0],
                 jax.tree_util.tree_leaves(params))}

  def one(path, leaf):
    for i in range(len(path)):
      found = by_path.get(jax.tree_util.keystr(path[i:]))
      if found and found[1] == leaf.shape:
        return found[0]
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, state_shapes)


def per_device_bytes(shapes, shardings) -> int:
  """Bytes of the shard each device holds (every shard has one shape)."""
  return sum(
      int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
      for x, s in zip(jax.tree_util.tree_leaves(shapes),
                      jax.tree_util.tree_leaves(shardings)))


def mac_loss(model):
  def loss(params, batch):
    x, y = batch
    with mac_optax.linen.capture():
      logits, v = model.apply({'params': params}, x,
                              mutable=['intermediates'])
    return steps.cross_entropy(logits, y), v['intermediates']
  return loss


def optimizers(model, params, tokens):
  """name -> (GradientTransformation, captures statistics)."""
  like = mac_optax.linen.intermediates_like(model, {'params': params},
                                            tokens)
  return {
      'sgd': (optax.sgd(1.0, momentum=steps.MOMENTUM), False),
      'adamw': (optax.adamw(1.0, weight_decay=steps.ADAMW_WD), False),
      'mac': (mac_optax.mac_sgd(1.0, momentum=steps.MOMENTUM,
                                damping=steps.MAC_DAMPING,
                                stat_decay=steps.MAC_STAT_DECAY,
                                intermediates_like=like), True),
  }


def make_step(model, tx, captures):
  """The whole train step: forward (capturing for MAC), backward, update."""
  def plain_loss(params, batch):
    x, y = batch
    return steps.cross_entropy(model.apply({'params': params}, x), y), None

  loss = mac_loss(model) if captures else plain_loss

  def step(params, opt_state, batch, lr):
    (value, inter), grads = jax.value_and_grad(loss, has_aux=True)(
        params, batch)
    extra = {'intermediates': inter} if captures else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = jax.tree_util.tree_map(lambda p, u: p + lr * u, params, updates)
    return params, opt_state, value
  return step


def preconditioned_share(model, params, tokens) -> dict:
  """Parameters of the layers MAC captures statistics for, and of all."""
  like = mac_optax.linen.intermediates_like(model, {'params': params},
                                            tokens)
  modules = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]:
    keys = [k.key for k in path if hasattr(k, 'key')]
    modules.add(tuple(keys[:-1]))   # the module; the last key names the stat
  covered = 0
  for keys in modules:
    sub = params
    for key in keys:
      sub = sub[key]
    covered += sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(sub))
  total = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(params))
  return dict(preconditioned=covered, total=total, layers=len(modules),
              share=covered / total)


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return dict(argument=m.argument_size_in_bytes,
              output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
              temp=m.temp_size_in_bytes,
              total=(m.argument_size_in_bytes + m.output_size_in_bytes
                     - m.alias_size_in_bytes + m.temp_size_in_bytes))


def run(quick: bool, compile_repeats: int = 3) -> dict:
  model, batch_size, repeats, desc = config(quick)
  devices = jax.devices()
  assert len(devices) == DEVICES, devices
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model.vocab, (batch_size, model.context),
                        dtype=np.int32)
  targets = np.roll(tokens, -1, axis=1)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          tokens[:1])['params']
  share = preconditioned_share(model, shapes, tokens)

  # Optimizer-state bytes per device as the mesh grows (shardings only).
  txs = optimizers(model, shapes, tokens)
  scaling = {}
  for n in (1, 2, 4, DEVICES):
    mesh = Mesh(np.array(devices[:n]), ('data',))
    shardings = jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, fsdp_spec(s.shape, n)), shapes)
    row = {'params': per_device_bytes(shapes, shardings)}
    for name, (tx, _) in txs.items():
      state = jax.eval_shape(tx.init, shapes)
      row[name] = per_device_bytes(
          state, state_shardings(state, shapes, shardings, mesh))
    scaling[n] = row

  mesh = Mesh(np.array(devices), ('data',))
  shardings = jax.tree_util.tree_map(
      lambda s: NamedSharding(mesh, fsdp_spec(s.shape, DEVICES)), shapes)
  data = NamedSharding(mesh, P('data'))
  batch = (jax.device_put(tokens, data), jax.device_put(targets, data))
  replicated = NamedSharding(mesh, P())
  runs, results, opt_shardings = {}, {}, {}

  def compile_step(name, params, opt_state):
    """Trace, lower and compile the step anew (new function objects)."""
    tx, captures = txs[name]
    step = jax.jit(make_step(model, tx, captures),
                   out_shardings=(shardings, opt_shardings[name], replicated),
                   donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, batch, F32(1e-3)).compile()
    results[name]['compile_times'].append(time.perf_counter() - start)
    return compiled

  for name, (tx, _) in txs.items():
    params = jax.jit(model.init, out_shardings={'params': shardings})(
        jax.random.PRNGKey(0), tokens[:1])['params']
    opt_shardings[name] = state_shardings(
        jax.eval_shape(tx.init, params), shapes, shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings[name])(params)
    results[name] = dict(compile_times=[], times=[])
    compiled = compile_step(name, params, opt_state)
    params, opt_state, loss = compiled(params, opt_state, batch, F32(1e-3))
    jax.block_until_ready(loss)   # warm-up
    runs[name] = [compiled, params, opt_state]
    results[name].update(memory=_memory(compiled), first_loss=float(loss))
    print(f"{name}: compiled in {results[name]['compile_times'][0]:.1f} s, "
          f'loss {float(loss):.3f}', flush=True)
  names = list(runs)
  # Further compilations, interleaved, for the min and median.
  for r in range(1, compile_repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      compile_step(name, *runs[name][1:])
  for name in names:
    times = results[name]['compile_times']
    results[name].update(compile_s=min(times),
                         compile_median_s=float(np.median(times)))
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      compiled, params, opt_state = runs[name]
      start = time.perf_counter()
      params, opt_state, loss = compiled(params, opt_state, batch, F32(1e-3))
      jax.block_until_ready((params, opt_state, loss))
      results[name]['times'].append(time.perf_counter() - start)
      runs[name][1:] = [params, opt_state]
      results[name]['last_loss'] = float(loss)
      print(f'{name}: step {results[name]["times"][-1]:.2f} s', flush=True)
  for name in names:
    results[name]['min_s'] = min(results[name]['times'])
    results[name]['finite'] = bool(np.isfinite(results[name]['last_loss']))
  sgd = results['sgd']
  for entry in results.values():
    entry['step_ratio'] = entry['min_s'] / sgd['min_s']
    entry['compile_ratio'] = entry['compile_s'] / sgd['compile_s']
    entry['compile_median_ratio'] = (entry['compile_median_s']
                                     / sgd['compile_median_s'])
  embed = shapes['Embed_0']['embedding'].shape
  return dict(desc=desc, quick=quick, devices=DEVICES, embedding=embed,
              embedding_spec=str(fsdp_spec(embed, DEVICES)),
              batch=f'{batch_size} x {model.context} tokens',
              repeats=repeats, compile_repeats=compile_repeats,
              share=share, optimizers=results,
              state_bytes_per_device={str(k): v for k, v in scaling.items()},
              jax=jax.__version__, platform=devices[0].platform)


LABELS = {'sgd': 'SGD-momentum', 'adamw': 'AdamW', 'mac': 'MAC'}


def markdown(result: dict) -> str:
  """The RESULTS.md section of one run."""
  mib = lambda b: f'{b / 2**20:,.1f}'
  opt = result['optimizers']
  lines = [
      '## GPT-2-small under FSDP (8 host devices)', '',
      f"{result['desc']}; {result['share']['total'] / 1e6:.1f} M "
      f"parameters; global batch {result['batch']}, one sequence per "
      f"device; every parameter and parameter-shaped optimizer leaf split "
      f"over the data axis on its largest axis that 8 divides (the "
      f"embedding {' × '.join(map(str, result['embedding']))}: "
      f"{result['embedding_spec']}). {result['platform']}, jax "
      f"{result['jax']}; step: min of {result['repeats']} interleaved "
      f"repeats; compile (trace, lower, compile with new function objects): "
      f"min / median of {result['compile_repeats']} interleaved "
      'repeats (`benchmarks/gpt2_fsdp.py`, run by `benchmarks/run.py --only '
      'gpt2`).',
      '',
      '| optimizer | step s | step / SGD | compile s (min / median) | '
      'compile / SGD (min / median) | compiled MiB per device (temp) |',
      '|---|---:|---:|---:|---:|---:|']
  for name, e in opt.items():
    mem = e['memory']
    lines.append(
        f"| {LABELS[name]} | {e['min_s']:.2f} | {e['step_ratio']:.2f} | "
        f"{e['compile_s']:.1f} / {e['compile_median_s']:.1f} | "
        f"{e['compile_ratio']:.2f} / {e['compile_median_ratio']:.2f} | "
        f"{mib(mem.get('total', 0))} ({mib(mem.get('temp', 0))}) |")
  lines += ['', 'Optimizer state per device (MiB) as the same FSDP layout '
            'spans more devices; × devices / 1 device in brackets (1.00 = '
            'shrinks exactly as 1/devices):', '',
            '| devices | params | ' + ' | '.join(LABELS[n] for n in opt)
            + ' |', '|---:|---:|' + '---:|' * len(opt)]
  rows = result['state_bytes_per_device']
  for n, row in rows.items():
    cells = [f"{mib(row[name])} ({row[name] * int(n) / rows['1'][name]:.2f})"
             for name in opt]
    lines.append(f"| {n} | {mib(row['params'])} | " + ' | '.join(cells)
                 + ' |')
  share = result['share']
  lines += ['', f"MAC preconditions {share['layers']} layers holding "
            f"{share['preconditioned'] / 1e6:.1f} M of the "
            f"{share['total'] / 1e6:.1f} M parameters "
            f"({100 * share['share']:.1f} %: every attention projection, "
            'MLP layer and the tied embedding through its output use; '
            'the positions and LayerNorms are updated by SGD-momentum).',
            '']
  return '\n'.join(lines)


BEGIN = '<!-- gpt2_fsdp: written by benchmarks/run.py --only gpt2 -->'
END = '<!-- /gpt2_fsdp -->'


def write_section(path: str, result: dict, machine: dict) -> None:
  """Puts the run's section into RESULTS.md, replacing an earlier one.

  The rest of the file (generated tables and the commentary written by
  hand) is left as it is.
  """
  report.write_in_place(
      path, BEGIN, END, markdown(result), machine,
      ', so step-time ratios within about 10 % of 1 are noise here.')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--json', help='write the result here')
  parser.add_argument('--compile-repeats', type=int, default=3)
  args = parser.parse_args(argv)
  result = run(args.quick, args.compile_repeats)
  print(markdown(result))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f)


if __name__ == '__main__':
  main()
