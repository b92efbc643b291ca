"""The convolution statistic's cost, against the convolution and before.

``python benchmarks/conv_statistic.py`` times, jitted, in one process, in
rotating order (``run.py``'s timing helper):

- the forward pass of a 3×3 'SAME' convolution, ``[128, 32, 32, 64]`` → 64
  channels (``nn.Conv``), MAC's mean patch of its input as the library
  computes it now (``mean_inputs.conv_statistic``), and the same statistic as
  the library computed it at ``--before REV`` (its ``conv_mean_patch``, read
  from git, so both run in this process on the same input);
- the train step of §1's ResNet under SGD-momentum, and under MAC with
  either statistic.

It prints the results as JSON and puts its section into
``benchmarks/RESULTS.md`` in place (``--no-report``: not). ``--quick``: small
shapes and 3 repeats, for a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
from mac_optax._src import mean_inputs
from mac_optax._src.conv_geometry import ConvGeometry
from benchmarks import models
from benchmarks import report
from benchmarks import run
from benchmarks import steps

# The last commit with the tap-by-tap statistic (spatial axes contracted image
# by image, then the batch summed).
BEFORE = 'd84b83a'


def previous_conv_mean_patch(rev: str):
  """``mean_inputs.conv_mean_patch`` as it was at git revision `rev`."""
  source = subprocess.run(
      ['git', 'show', f'{rev}:mac_optax/_src/mean_inputs.py'], cwd=ROOT,
      capture_output=True, text=True, check=True).stdout
  module = types.ModuleType(f'mean_inputs_at_{rev}')
  exec(compile(source, f'{rev}:mean_inputs.py', 'exec'), module.__dict__)  # pylint: disable=exec-used
  return module.conv_mean_patch


@contextlib.contextmanager
def conv_mean_patch_as(fn):
  """Traces MAC's conv statistic with `fn` inside the block (None: now's)."""
  saved = mean_inputs.conv_mean_patch
  mean_inputs.conv_mean_patch = fn or saved
  try:
    yield
  finally:
    mean_inputs.conv_mean_patch = saved


def _float64_mean_patch(x, pads):
  """Reference: batch summed first, then the 3×3 windows, in float64."""
  summed = np.pad(np.asarray(x, np.float64).sum(0), [*pads, (0, 0)])
  h, w = x.shape[1:3]
  taps = [summed[i:i + h, j:j + w].sum((0, 1))
          for i in range(3) for j in range(3)]
  return np.stack(taps).reshape(1, -1) / (x.shape[0] * h * w)


def _compiled(fn, *args, statistic=None):
  # A new function each time: jit would reuse its trace of `fn` made with
  # the other statistic.
  with conv_mean_patch_as(statistic):
    return jax.jit(lambda *a: fn(*a)).lower(*args).compile()


def _runner(compiled, args, inner):
  def go():
    for _ in range(inner):
      y = compiled(*args)
    jax.block_until_ready(y)
  return go


def bench_statistic(quick: bool, before, repeats: int, inner: int) -> dict:
  """Conv forward, statistic now and before: timings and accuracy."""
  shape, features = ((8, 8, 8, 8), 8) if quick else ((128, 32, 32, 64), 64)
  layer = nn.Conv(features, (3, 3), padding='SAME')
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape) + 0.5,
                  jnp.float32)
  params = layer.init(jax.random.PRNGKey(0), x)['params']
  geometry = ConvGeometry.of(layer)
  stat = lambda x: mean_inputs.conv_statistic(x, geometry)
  compiled = {
      'conv': _compiled(lambda p, x: layer.apply({'params': p}, x),
                        params, x),
      'now': _compiled(stat, x),
      'before': _compiled(stat, x, statistic=before),
  }
  args = {'conv': (params, x), 'now': (x,), 'before': (x,)}
  runners = {k: _runner(c, args[k], inner) for k, c in compiled.items()}
  for go in runners.values():
    go()   # warm-up
  timing = run._interleaved(runners, repeats, inner, 'conv statistic')  # pylint: disable=protected-access
  exact = _float64_mean_patch(x, [(1, 1), (1, 1)])
  scale = np.abs(exact).max()
  error = {k: float(np.abs(np.asarray(compiled[k](x), np.float64) - exact
                           ).max() / scale) for k in ('now', 'before')}
  return dict(shape=list(shape), features=features, timing=timing,
              error=error, blocks=mean_inputs.batch_blocks(shape[0]))


def bench_resnet(quick: bool, before, repeats: int, inner: int) -> dict:
  """§1's ResNet step: SGD-momentum, MAC now, MAC with the old statistic."""
  model, kind, shape, classes, bsz, desc = run.speed_models(quick)['ResNet']
  batch = models.synthetic_batch(kind, shape, bsz, classes)
  params = model.init(jax.random.PRNGKey(0), batch[0])['params']
  runners, compile_s = {}, {}
  for name, opt, statistic in (('sgd', 'sgd', None), ('mac', 'mac', None),
                               ('mac_before', 'mac', before)):
    with conv_mean_patch_as(statistic):
      trainer = steps.make_trainer(opt, model)
      state, compiled, compile_s[name] = run._compile(trainer, params, batch)  # pylint: disable=protected-access
    go, _ = run._timed_runner(compiled, state, batch, inner)  # pylint: disable=protected-access
    go()   # warm-up
    runners[name] = go
  timing = run._interleaved(runners, repeats, inner, 'ResNet step')  # pylint: disable=protected-access
  return dict(desc=desc, timing=timing, compile_s=compile_s)


def _traced(fn):
  """`fn`, and a check that raises unless `fn` was traced since the last."""
  calls = []

  def wrapped(*args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)

  def check(what):
    if not calls:
      raise RuntimeError(f'the old statistic was not traced into {what}')
    calls.clear()
  return wrapped, check


def measure(quick: bool, rev: str = BEFORE) -> dict:
  before, was_traced = _traced(previous_conv_mean_patch(rev))
  # The ResNet's steps are short and its ratio is the noisier one on shared
  # cores: more repeats.
  repeats = dict(statistic=(3, 1), resnet=(3, 1)) if quick else dict(
      statistic=(15, 3), resnet=(30, 5))
  start = run.machine()
  result = dict(
      quick=quick, before=rev, repeats=repeats, jax=jax.__version__,
      platform=jax.devices()[0].platform,
      statistic=bench_statistic(quick, before, *repeats['statistic']))
  was_traced('the statistic "before"')
  result['resnet'] = bench_resnet(quick, before, *repeats['resnet'])
  was_traced('the ResNet step "MAC, statistic before"')
  result['machine'] = dict(start, load_end=run.machine()['load'])
  return result


def _ratio(a, b):
  return f"{a['min'] / b['min']:.3f} / {a['median'] / b['median']:.3f}"


def _ms(t):
  return f"{1e3 * t['min']:.2f} / {1e3 * t['median']:.2f}"


def markdown(result: dict) -> str:
  """The RESULTS.md section of one run."""
  stat, resnet = result['statistic'], result['resnet']
  t, r = stat['timing'], resnet['timing']
  b, c = stat['shape'][0], stat['shape'][-1]
  repeats = {k: f'{r} interleaved repeats of {i} calls'
             for k, (r, i) in result['repeats'].items()}
  return '\n'.join([
      '## Convolution statistic: one pass over the image', '',
      f"Jitted on {result['platform']} (jax {result['jax']}), min / median "
      f"of {repeats['statistic']} "
      '(`python benchmarks/conv_statistic.py`). "Now": the mean patch sums '
      'the images first, within blocks of the batch that a device holds '
      f"whole (here {stat['blocks']} of {b} images), then contracts the "
      'spatial axes, the last '
      'one together with the blocks (across devices the batch is reduced as '
      f"the `{3 * 3 * c}` floats of the patch). "
      f"\"Before\": the library at `{result['before']}`, which contracted "
      'the spatial axes tap by tap, image by image, then summed the batch.',
      '',
      f"| `{stat['shape']}` → {stat['features']} channels, 3×3 'SAME' "
      '| ms (min / median) | / conv forward (min / median) '
      '| max error vs float64 (relative) |',
      '|---|---:|---:|---:|',
      f"| conv forward (`nn.Conv`) | {_ms(t['conv'])} | 1 / 1 | |",
      f"| mean patch, now | {_ms(t['now'])} | {_ratio(t['now'], t['conv'])} "
      f"| {stat['error']['now']:.1e} |",
      f"| mean patch, before | {_ms(t['before'])} | "
      f"{_ratio(t['before'], t['conv'])} | {stat['error']['before']:.1e} |",
      '',
      f"Before / now: {_ratio(t['before'], t['now'])} (min / median); batch "
      f'{b}.', '',
      f"{resnet['desc']}: whole jitted train step (MAC = "
      '`mac_sgd(momentum=0.9)`, SGD-momentum = `optax.sgd(momentum=0.9)`), '
      f"min / median of {repeats['resnet']}:",
      '',
      '| optimizer | step ms (min / median) | / SGD-momentum (min / median) '
      '| compile s |',
      '|---|---:|---:|---:|',
      *(f"| {label} | {_ms(r[k])} | {_ratio(r[k], r['sgd'])} | "
        f"{resnet['compile_s'][k]:.1f} |"
        for k, label in (('sgd', 'SGD-momentum'), ('mac', 'MAC, now'),
                         ('mac_before', 'MAC, statistic before'))),
      ''])


BEGIN = ('<!-- conv_statistic: written by benchmarks/conv_statistic.py -->')
END = '<!-- /conv_statistic -->'


def write_section(path: str, result: dict) -> None:
  """Puts the run's section into RESULTS.md, replacing an earlier one."""
  report.write_in_place(
      path, BEGIN, END, markdown(result), result['machine'],
      report.interleaved_note('milliseconds'))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--before', default=BEFORE,
                      help='git revision whose conv statistic is "before"')
  parser.add_argument('--no-report', action='store_true')
  parser.add_argument('--json', default='', help='also write the result here')
  args = parser.parse_args(argv)
  result = measure(args.quick, args.before)
  print(json.dumps({k: v for k, v in result.items() if k != 'machine'},
                   indent=1))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f)
  if not args.no_report and not args.quick:
    write_section(os.path.join(ROOT, 'benchmarks', 'RESULTS.md'), result)
  return result


if __name__ == '__main__':
  main()
