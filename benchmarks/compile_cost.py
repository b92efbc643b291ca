"""Compile time and step overhead of MAC's update against SGD-momentum.

For the step-time benchmark models (``run.speed_models``), a 48-block small
decoder (d=64) written unrolled and with ``nn.scan``, and GPT-2-small (one
device): the whole jitted train step of SGD-momentum and of MAC
(``mac_sgd(1.0, 0.9)``, statistics from ``mac_optax.with_statistics``),

- StableHLO ops of the train step, and of MAC's update alone per layer
  (``jax.jit(tx.update).lower(...)``);
- kernels of the compiled step (XLA:CPU fusions, dots and copies);
- compile time: trace + lower + compile, each repeat with new function
  objects (jax's trace cache would hide tracing), optimizers interleaved,
  min and median;
- step time: interleaved repeats, min and median.

``--before DIR`` runs the same measurements against another checkout (e.g.
the commit this work started from) in a subprocess per model, alternating
with this checkout's, so "before" and "after" see the same machine load; each
subprocess reports its ratios to its own SGD-momentum.

``python benchmarks/compile_cost.py [--quick] [--before DIR]`` prints the
section and writes it into ``benchmarks/RESULTS.md`` in place.

``--scan-depths 8 48`` instead measures how compile time grows with depth for
a decoder scanned over its blocks, written with ``nn.scan`` (statistics from
``with_statistics``) and with ``nnx.scan`` (statistics from
``mac_optax.nnx.capture``): compile seconds of SGD-momentum and MAC at each
depth, interleaved, min of the repeats (printed, not written).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == '__main__':
  sys.path.insert(0, os.environ.get('COMPILE_COST_ROOT', os.path.dirname(HERE)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
from flax import nnx
import jax
import numpy as np
import optax

import mac_optax
from benchmarks import models
from benchmarks import steps

RESULTS = os.path.join(HERE, 'RESULTS.md')
BEGIN = '<!-- compile_cost: written by benchmarks/compile_cost.py -->'
END = '<!-- /compile_cost -->'
F32 = np.float32
_OP = re.compile(r'= "?(stablehlo\.[a-z_]+|chlo\.[a-z_]+)')
_KERNEL = re.compile(r' (fusion|dot|copy|custom-call|reduce|reduce-window)\(')


_FUNC = re.compile(r'func\.func (?:public |private )?@("[^"]+"|[\w.$-]+)\(')
_CALL = re.compile(r'call @("[^"]+"|[\w.$-]+)\(')


def inlined_ops(stablehlo: str) -> int:
  """StableHLO ops of `main` with every private function call expanded.

  jax lowers a function jitted inside the step (MAC's per-layer update) as
  one private function called once per layer; XLA inlines the calls before
  optimizing, so this is the op count the compiler works on.
  """
  own, callees, name = {}, {}, None
  for line in stablehlo.splitlines():
    found = _FUNC.search(line)
    if found:
      name = found.group(1)
      own[name], callees[name] = 0, []
    elif name is not None:
      own[name] += len(_OP.findall(line))
      callees[name] += _CALL.findall(line)
  memo = {}

  def total(fn):
    if fn not in memo:
      memo[fn] = own[fn] + sum(total(c) for c in callees[fn])
    return memo[fn]
  return total('main')


class _ScanBody(nn.Module):
  dim: int
  heads: int

  @nn.compact
  def __call__(self, x, _):
    return models.Block(self.dim, self.heads, causal=True)(x), None


class Decoder(nn.Module):
  """Token embedding, ``depth`` causal pre-norm blocks, dense head."""
  vocab: int = 96
  dim: int = 64
  depth: int = 48
  heads: int = 2
  scan: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.dim)(tokens)
    if self.scan:
      blocks = nn.scan(_ScanBody, variable_axes={'params': 0},
                       split_rngs={'params': True}, length=self.depth)
      x, _ = blocks(self.dim, self.heads)(x, None)
    else:
      for _ in range(self.depth):
        x = models.Block(self.dim, self.heads, causal=True)(x)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


class NnxBlock(nnx.Module):
  """``models.Block`` in NNX: pre-norm causal attention and MLP."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, dim, decode=False,
                                            rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    h = self.norm1(x)
    x = x + self.attention(h, mask=nnx.make_causal_mask(x[..., 0]))
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class NnxDecoder(nnx.Module):
  """:class:`Decoder` with ``scan=True``, in NNX (``nnx.vmap`` + ``nnx.scan``)."""

  def __init__(self, depth: int, rngs: nnx.Rngs, vocab: int = 96,
               dim: int = 64, heads: int = 2):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return NnxBlock(dim, heads, rngs)

    self.blocks = blocks(rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(self.norm(body(self.embed(tokens), self.blocks)))


def _scan_step(framework: str, depth: int, name: str, batch):
  """(fresh jitted step, its arguments) of one scanned decoder."""
  tokens = batch[0]
  if framework == 'nn.scan':
    model = Decoder(depth=depth, scan=True)
    params = model.init(jax.random.PRNGKey(0), tokens)['params']
    step, tx = _trainer(name, _forward(model), params, batch)
  else:
    model = NnxDecoder(depth, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    module = lambda p: nnx.merge(graphdef, p, rest)
    step, tx = _trainer(
        name, lambda p, x: module(p)(x), params, batch,
        captured=(mac_optax.nnx.plan(model, tokens),
                  lambda p, x: mac_optax.nnx.capture(module(p))(x)))
  return step, ((params, tx.init(params)), batch, F32(0.01))


def scan_depths(depths, repeats: int) -> dict:
  """Compile seconds (min) per framework, depth and optimizer, interleaved."""
  batch = models.synthetic_batch('tokens', (32,), 8, 96)
  out = {}
  for framework in ('nn.scan', 'nnx.scan'):
    times = {(d, k): [] for d in depths for k in ('sgd', 'mac')}
    for r in range(repeats):
      for d, k in (list(times) if r % 2 == 0 else list(times)[::-1]):
        step, args = _scan_step(framework, d, k, batch)
        t0 = time.perf_counter()
        step.lower(*args).compile()
        times[d, k].append(time.perf_counter() - t0)
    out[framework] = {f'{k} depth {d}': float(np.min(v))
                      for (d, k), v in times.items()}
  return out


def bench_models(quick: bool) -> dict:
  """name -> (model, input kind, shape, classes, batch, description)."""
  from benchmarks import run  # pylint: disable=import-outside-toplevel
  out = dict(run.speed_models(quick))
  depth = int(os.environ.get("COMPILE_COST_DEPTH", 8 if quick else 48))
  for scan in (False, True):
    out[f'Decoder-{depth}' + (' scan' if scan else '')] = (
        Decoder(depth=depth, scan=scan), 'tokens', (32,), 96, 8,
        f'decoder d=64, {depth} blocks '
        f'{"in nn.scan" if scan else "unrolled"}, 2 heads, context 32, '
        'batch 8')
  if not quick:
    from benchmarks import gpt2_fsdp  # pylint: disable=import-outside-toplevel
    out['GPT-2-small'] = (gpt2_fsdp.GPT2(), 'tokens', (256,), 50257, 1,
                          'GPT-2-small (124 M), one device, 1 × 256 tokens')
  return out


def _forward(model):
  """``fn(params, x)`` of a Linen model, a new function object every call."""
  return lambda p, x: model.apply({'params': p}, x)


def _trainer(name, fn, params, batch, captured=None):
  """(fresh jitted step, tx) of ``fn(params, x)``, new function objects.

  MAC's statistics come from ``mac_optax.with_statistics`` with the plan of
  ``fn``, or from ``captured = (plan, capture)`` with ``capture(params, x)``
  returning ``(fn's output, statistics)`` (NNX: ``mac_optax.nnx.capture``).
  """
  if name == 'sgd':
    tx = optax.sgd(1.0, momentum=steps.MOMENTUM)
    loss_fn = lambda p, b: (steps.cross_entropy(fn(p, b[0]), b[1]), None)
    update = lambda g, s, p, stats: tx.update(g, s, p)
  else:
    if captured is None:
      plan = mac_optax.plan(fn, params, batch[0])
      captured = (plan, mac_optax.with_statistics(fn, plan))
    plan, capture = captured
    tx = mac_optax.mac_sgd(1.0, steps.MOMENTUM, damping=steps.MAC_DAMPING,
                           stat_decay=steps.MAC_STAT_DECAY, plan=plan)

    def loss_fn(p, b):
      logits, stats = capture(p, b[0])
      return steps.cross_entropy(logits, b[1]), stats
    update = lambda g, s, p, stats: tx.update(g, s, p, intermediates=stats)

  def step(state, b, lr):
    p, opt_state = state
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
    updates, opt_state = update(grads, opt_state, p, stats)
    return (steps._apply_updates(p, updates, lr), opt_state), loss  # pylint: disable=protected-access
  return jax.jit(step, donate_argnums=0), tx


def _update_ops(model, params, batch) -> dict:
  """StableHLO ops of MAC's update alone (no chain), and its layers."""
  fn = _forward(model)
  plan = mac_optax.plan(fn, params, batch[0])
  tx = mac_optax.mac(steps.MAC_DAMPING, steps.MAC_STAT_DECAY, plan=plan)
  _, stats = jax.eval_shape(mac_optax.with_statistics(fn, plan), params,
                            batch[0])
  lowered = jax.jit(lambda g, s, st: tx.update(g, s, intermediates=st)).lower(
      params, jax.eval_shape(tx.init, params), stats)
  return dict(layers=len(plan.layers), ops=inlined_ops(lowered.as_text()))


def measure(name: str, quick: bool, compile_repeats: int, repeats: int,
            inner: int) -> dict:
  """One model: op counts, compile and step time of SGD-momentum and MAC."""
  from benchmarks import run  # pylint: disable=import-outside-toplevel
  model, kind, shape, classes, batch_size, desc = bench_models(quick)[name]
  batch = models.synthetic_batch(kind, shape, batch_size, classes)
  params = model.init(jax.random.PRNGKey(0), batch[0])['params']
  names = ('sgd', 'mac')
  compile_s = {k: [] for k in names}
  compile_cpu = {k: [] for k in names}
  info, compiled = {}, {}
  for r in range(compile_repeats):
    for k in names[r % 2:] + names[:r % 2]:
      step, tx = _trainer(k, _forward(model), params, batch)
      state = (run._fresh(params), tx.init(params))  # pylint: disable=protected-access
      t0, c0 = time.perf_counter(), time.process_time()
      lowered = step.lower(state, batch, F32(0.01))
      compiled[k] = lowered.compile()
      compile_s[k].append(time.perf_counter() - t0)
      compile_cpu[k].append(time.process_time() - c0)
      if k not in info:
        text = compiled[k].as_text()
        info[k] = dict(ops=inlined_ops(lowered.as_text()),
                       kernels=len(_KERNEL.findall(
                           text[text.index('ENTRY'):])))
  runners = {}
  for k in names:
    _, tx = _trainer(k, _forward(model), params, batch)
    state = (run._fresh(params), tx.init(params))  # pylint: disable=protected-access
    runners[k], _ = run._timed_runner(compiled[k], state, batch, inner)  # pylint: disable=protected-access
    runners[k]()   # warm
  timed = run._interleaved(runners, repeats, inner, name)  # pylint: disable=protected-access
  stat = lambda v: dict(min=float(np.min(v)), median=float(np.median(v)))
  return dict(desc=desc, update=_update_ops(model, params, batch),
              step_info=info,
              compile={k: stat(v) for k, v in compile_s.items()},
              compile_cpu={k: stat(v) for k, v in compile_cpu.items()},
              step={k: dict(min=v['min'], median=v['median'])
                    for k, v in timed.items()})


def _worker(root: str, name: str, args) -> dict:
  """`measure` in a fresh process importing mac_optax from `root`."""
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', name,
         '--compile-repeats', str(args.compile_repeats), '--repeats',
         str(args.repeats), '--inner', str(args.inner)] + (
             ['--quick'] if args.quick else [])
  env = dict(os.environ, COMPILE_COST_ROOT=root, JAX_PLATFORMS='cpu')
  out = subprocess.run(cmd, env=env, check=True, capture_output=True,
                       text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def markdown(result: dict) -> str:
  ratio = lambda e, part, q: e[part]['mac'][q] / e[part]['sgd'][q]
  versions = [v for v in ('before', 'after') if v in result['runs']]
  lines = [
      "## Compile time and step overhead of MAC's update", '',
      'Whole jitted train step (forward, backward, update), SGD-momentum vs '
      'MAC (`mac_sgd(1.0, 0.9)`, statistics from '
      '`mac_optax.with_statistics`). Compile = trace + lower + compile with '
      f"new function objects, {result['compile_repeats']} interleaved "
      f"repeats; step = {result['repeats']} interleaved repeats of "
      f"{result['inner']} steps; both as MAC / SGD-momentum, min / median. "
      '"before" is the checkout this work started from, "after" this one, '
      'each model measured in alternating fresh processes '
      '(`python benchmarks/compile_cost.py --before DIR`). "update ops / '
      'layer": StableHLO ops of `jax.jit(mac(...).update)` divided by the '
      'layers, and "step ops" those of the whole step, each with the '
      'functions it calls expanded (XLA inlines them); "kernels": fusions, dots and copies of the compiled step '
      '(XLA:CPU); "compile CPU time": `time.process_time()` of the same '
      'compilations, less sensitive to the other jobs on the cores than '
      'wall time.', '',
      '| model | version | update ops / layer | step ops MAC / SGD | '
      'kernels MAC / SGD | compile (× SGD, min / median) | compile CPU '
      'time (× SGD, min) | step (× SGD, min / median) | SGD compile s / '
      'step ms (min) |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|']
  for name in result['models']:
    for v in versions:
      e = result['runs'][v].get(name)
      if e is None:
        continue
      if 'error' in e:
        lines.append(f"| {name} | {v} | fails: `{e['error'][:120]}` |"
                     ' | | | | |')
        continue
      u, info = e['update'], e['step_info']
      lines.append(
          f"| {name} | {v} | {u['ops'] / max(u['layers'], 1):.0f} "
          f"({u['layers']} layers) | {info['mac']['ops']} / "
          f"{info['sgd']['ops']} | {info['mac']['kernels']} / "
          f"{info['sgd']['kernels']} | "
          f"{ratio(e, 'compile', 'min'):.2f} / "
          f"{ratio(e, 'compile', 'median'):.2f} | "
          f"{ratio(e, 'compile_cpu', 'min'):.2f} | "
          f"{ratio(e, 'step', 'min'):.3f} / {ratio(e, 'step', 'median'):.3f}"
          f" | {e['compile']['sgd']['min']:.2f} / "
          f"{1e3 * e['step']['sgd']['min']:.2f} |")
  lines.append('')
  lines += [f"- **{n}**: {result['descs'][n]}" for n in result['models']]
  return '\n'.join(lines + [''])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--no-write', action='store_true')
  parser.add_argument('--before', help='checkout to compare against')
  parser.add_argument('--only', nargs='*', help='model names')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--scan-depths', nargs='*', type=int,
                      help='measure compile time at these depths')
  parser.add_argument('--compile-repeats', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--inner', type=int, default=3)
  parser.add_argument('--json', help='also write the result here')
  parser.add_argument('--from-json', nargs='*', help=(
      'render earlier --json results instead of measuring (later files '
      'replace the models they hold), with the machine line of the first'))
  args = parser.parse_args(argv)
  if args.scan_depths:
    result = scan_depths(args.scan_depths, args.compile_repeats)
    for framework, entries in result.items():
      print(framework, ', '.join(f'{k}: {v:.2f} s'
                                 for k, v in entries.items()))
    return result
  if args.worker:
    print(json.dumps(measure(args.worker, args.quick, args.compile_repeats,
                             args.repeats, args.inner)))
    return None
  from benchmarks import report  # pylint: disable=import-outside-toplevel
  from benchmarks import run  # pylint: disable=import-outside-toplevel
  if args.from_json:
    result = None
    for path in args.from_json:
      with open(path) as f:
        part = json.load(f)
      if result is None:
        result = part
        continue
      for v, entries in part['runs'].items():
        result['runs'].setdefault(v, {}).update(entries)
      result['descs'].update(part['descs'])
    text = markdown(result)
    print(text)
    if not args.no_write:
      report.write_in_place(
          RESULTS, BEGIN, END, text, result.get('machine') or run.machine(),
          report.interleaved_note('seconds'))
    return result
  machine = run.machine()
  names = args.only or list(bench_models(args.quick))
  roots = {'after': os.path.dirname(HERE)}
  if args.before:
    roots = {'before': os.path.abspath(args.before), **roots}
  runs = {v: {} for v in roots}
  descs = {}
  for i, name in enumerate(names):
    order = list(roots) if i % 2 == 0 else list(roots)[::-1]
    for v in order:
      try:
        runs[v][name] = _worker(roots[v], name, args)
        descs[name] = runs[v][name]['desc']
      except subprocess.CalledProcessError as e:
        runs[v][name] = dict(error=(e.stderr or '').strip().splitlines()[-1]
                             if e.stderr else str(e))
      print(f'{name} {v}: done', file=sys.stderr, flush=True)
  result = dict(models=names, runs=runs, descs=descs,
                compile_repeats=args.compile_repeats, repeats=args.repeats,
                inner=args.inner)
  machine['load_end'] = run.machine()['load']
  result['machine'] = machine
  text = markdown(result)
  print(text)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f)
  if not args.no_write:
    report.write_in_place(
        RESULTS, BEGIN, END, text, machine,
        report.interleaved_note('seconds'))
  return result


if __name__ == '__main__':
  main()
