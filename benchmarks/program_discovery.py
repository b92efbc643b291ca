"""Layers from the program: what finding them costs, and the step it builds.

Two measurements, same process, interleaved repeats (min and median):

1. **Plan cost.** ``mac_optax.plan(fn, params, tokens)`` of GPT-2-small
   (124 M parameters, abstract: no array is allocated) against one abstract
   trace of the same forward pass (``jax.eval_shape``) and against
   ``mac_optax.linen.plan`` (the capture's plan, also one abstract pass).
2. **The training step.** For the step-time benchmark models, the jitted
   train step of SGD-momentum, MAC with the linen capture, and MAC with
   ``mac_optax.with_statistics`` (the same ``mac_sgd`` chain): compile time
   and step time as ratios to SGD-momentum.

``python benchmarks/program_discovery.py [--quick]`` prints the section and
writes it into ``benchmarks/RESULTS.md`` in place.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

import mac_optax
from benchmarks import gpt2_fsdp
from benchmarks import models
from benchmarks import report
from benchmarks import run
from benchmarks import steps

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'RESULTS.md')
BEGIN = ('<!-- program_discovery: written by benchmarks/program_discovery.py '
         '-->')
END = '<!-- /program_discovery -->'
F32 = np.float32


def _min_median(times):
  return dict(min=float(np.min(times)), median=float(np.median(times)))


def plan_cost(quick: bool, repeats: int) -> dict:
  model, _, _, desc = gpt2_fsdp.config(quick)
  tokens = jax.ShapeDtypeStruct((1, model.context), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  params = variables['params']
  # A new function each time: jax caches the trace of a function it saw.
  fresh = lambda: (lambda p, t: model.apply({'params': p}, t))
  work = {
      'eval_shape': lambda: jax.eval_shape(fresh(), params, tokens),
      'program_plan': lambda: mac_optax.plan(fresh(), params, tokens),
      'linen_plan': lambda: mac_optax.linen.plan(model, variables, tokens),
  }
  times = {k: [] for k in work}
  for r in range(repeats):
    names = list(work)
    for k in names[r % 3:] + names[:r % 3]:
      t0 = time.perf_counter()
      work[k]()
      times[k].append(time.perf_counter() - t0)
  plan = mac_optax.plan(fresh(), params, tokens)
  return dict(desc=desc, fraction=plan.fraction, layers=len(plan.layers),
              params=plan.total_params,
              **{k: _min_median(v) for k, v in times.items()})


def program_trainer(model, params, batch) -> steps.Trainer:
  """`mac_sgd` as in `steps.make_trainer('mac')`, statistics from the program."""
  fn = lambda p, x: model.apply({'params': p}, x)
  plan = mac_optax.plan(fn, params, batch[0])
  tx = mac_optax.mac_sgd(1.0, steps.MOMENTUM, damping=steps.MAC_DAMPING,
                         stat_decay=steps.MAC_STAT_DECAY, plan=plan)
  with_stats = mac_optax.with_statistics(fn, plan)

  def loss_fn(p, batch):
    logits, stats = with_stats(p, batch[0])
    return steps.cross_entropy(logits, batch[1]), stats

  def step(state, batch, lr):
    p, opt_state = state
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
    updates, opt_state = tx.update(grads, opt_state, p, intermediates=stats)
    return (steps._apply_updates(p, updates, lr), opt_state), loss  # pylint: disable=protected-access

  return steps.Trainer('mac_program', lambda p, b: (p, tx.init(p)),
                       jax.jit(step, donate_argnums=0), lambda s: s[1])


def step_cost(quick: bool, repeats: int, inner: int) -> dict:
  out = {}
  for name, (model, kind, shape, classes, batch_size, desc) in (
      run.speed_models(quick).items()):
    batch = models.synthetic_batch(kind, shape, batch_size, classes)
    params = model.init(jax.random.PRNGKey(0), batch[0])['params']
    trainers = {'sgd': steps.make_trainer('sgd', model),
                'mac_capture': steps.make_trainer('mac', model),
                'mac_program': program_trainer(model, params, batch)}
    compiled, compile_s, runners = {}, {}, {}
    for k, trainer in trainers.items():
      state, compiled[k], compile_s[k] = run._compile(  # pylint: disable=protected-access
          trainer, params, batch)
      runners[k], _ = run._timed_runner(compiled[k], state, batch, inner)  # pylint: disable=protected-access
      runners[k]()   # warm
    timed = run._interleaved(runners, repeats, inner, name)  # pylint: disable=protected-access
    out[name] = dict(desc=desc, compile=compile_s, step=timed)
  return out


def markdown(result: dict) -> str:
  plan = result['plan']
  ms = lambda s: f'{1e3 * s:.1f}'
  lines = [
      '## Layers from the program: plan cost and step', '',
      f"Plan of {plan['desc']} ({plan['params']:,} parameters; "
      f"`mac_optax.plan` finds {plan['layers']} layers, "
      f"{100 * plan['fraction']:.1f} % of the parameters), abstract "
      f"(no array allocated); min / median of {result['plan_repeats']} "
      'interleaved repeats (`python benchmarks/program_discovery.py`):', '',
      '| | s (min / median) | / `jax.eval_shape` of the forward (min) |',
      '|---|---:|---:|']
  base = plan['eval_shape']['min']
  for key, label in (('eval_shape', '`jax.eval_shape(forward)`'),
                     ('program_plan', '`mac_optax.plan(forward, ...)`'),
                     ('linen_plan', '`mac_optax.linen.plan(model, ...)`')):
    e = plan[key]
    lines.append(f"| {label} | {e['min']:.2f} / {e['median']:.2f} | "
                 f"{e['min'] / base:.2f} |")
  lines += [
      '', 'Whole jitted train step, MAC (`mac_sgd(1.0, 0.9)`) with the '
      'statistics from the linen capture or from '
      '`mac_optax.with_statistics`, against SGD-momentum; compile time of '
      'one ahead-of-time compilation and step time (min / median of '
      f"{result['repeats']} interleaved repeats of {result['inner']} steps), "
      'as ratios to SGD-momentum:', '',
      '| model | compile capture / program (× SGD) | step capture (× SGD, '
      'min / median) | step program (× SGD, min / median) |',
      '|---|---:|---:|---:|']
  for name, e in result['steps'].items():
    c, s = e['compile'], e['step']
    ratio = lambda k, q: s[k][q] / s['sgd'][q]
    lines.append(
        f"| {name} | {c['mac_capture'] / c['sgd']:.2f} / "
        f"{c['mac_program'] / c['sgd']:.2f} | "
        f"{ratio('mac_capture', 'min'):.2f} / "
        f"{ratio('mac_capture', 'median'):.2f} | "
        f"{ratio('mac_program', 'min'):.2f} / "
        f"{ratio('mac_program', 'median'):.2f} |")
  lines.append('')
  lines.append('SGD-momentum step (ms, min): ' + ', '.join(
      f"{n} {ms(e['step']['sgd']['min'])}" for n, e in
      result['steps'].items()) + '.')
  return '\n'.join(lines + [''])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--no-write', action='store_true')
  args = parser.parse_args(argv)
  machine = run.machine()
  plan_repeats = 2 if args.quick else 5
  repeats, inner = (3, 2) if args.quick else (15, 5)
  result = dict(plan=plan_cost(args.quick, plan_repeats),
                plan_repeats=plan_repeats,
                steps=step_cost(args.quick, repeats, inner),
                repeats=repeats, inner=inner)
  machine['load_end'] = run.machine()['load']
  text = markdown(result)
  print(text)
  if not args.no_write:
    report.write_in_place(
        RESULTS, BEGIN, END, text, machine,
        report.interleaved_note('seconds'))
  return result


if __name__ == '__main__':
  main()
