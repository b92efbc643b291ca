"""MAC vs SGD-momentum, AdamW and kfac-jax: speed, memory, scaling, convergence.

One entry point::

    /work/venv-kfac/bin/python benchmarks/run.py          # full run
    /work/venv-kfac/bin/python benchmarks/run.py --quick  # a few minutes

Run it in the environment of ``benchmarks/requirements-kfac.txt`` (jax 0.9.1,
kfac-jax 0.0.8) so that all four optimizers run in one process; in another
environment kfac-jax's import error is reported as its result. Results go to
``benchmarks/results.json`` (merged per section, so ``--only`` re-runs one
section), ``benchmarks/RESULTS.md`` and ``benchmarks/*.png``. ``--tag NAME``
writes ``results_NAME.json`` instead (e.g. speed and capture under the newest
jax, where kfac-jax cannot run); RESULTS.md shows those tables too.

Sections (``--only`` takes a comma list):
  speed    whole jitted train step, interleaved, ratios to SGD-momentum
  memory   optimizer-state bytes, compiled memory (``memory_analysis()``)
  scaling  step-time overhead over SGD-momentum vs MLP width d (with
           AdamW and Muon, Muon capped at d=2048; under the newest jax
           ``--tag peers --only scaling`` writes the report's §3b)
  capture  forward pass with and without ``mac_optax.linen.capture()``
  converge real data, LR grid × 3 seeds, mean ± std
           (with Muon and the MAC→Adam / MAC→Muon compositions of
           ``benchmarks/peers.py``; under the newest jax, where kfac-jax
           cannot run, ``--tag peers --only converge,speed`` writes the
           report's §4c and §5b)
  gpt2     GPT-2-small (124 M) under FSDP on 8 host devices, MAC vs
           SGD-momentum and AdamW (``benchmarks/gpt2_fsdp.py``, in a
           subprocess; about 15 minutes on 2 cores, so not in the default
           list); its section of RESULTS.md is replaced in place
  einsum   the einsum decoder of ``examples/gemma_decoder.py``: forward
           with / without capture, MAC / SGD-momentum / AdamW step time
           (``benchmarks/einsum_decoder.py``; not in the default list); its
           section of RESULTS.md is replaced in place
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mac_optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import models  # pylint: disable=wrong-import-position
from benchmarks import peers  # pylint: disable=wrong-import-position
from benchmarks import einsum_decoder  # pylint: disable=wrong-import-position
from benchmarks import gpt2_fsdp  # pylint: disable=wrong-import-position
from benchmarks import report  # pylint: disable=wrong-import-position
from benchmarks import steps  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_JSON = os.path.join(HERE, 'results.json')
F32 = np.float32


# --------------------------------------------------------------------------
# Model configurations (shapes stated in RESULTS.md).


def speed_models(quick: bool):
  """name -> (model, input kind, input shape, classes, batch, description)."""
  if quick:
    return {
        'MLP': (models.MLP((128, 128)), 'x', (64,), 10, 32,
                'MLP 64→128→128→10, batch 32'),
        'ResNet': (models.ResNet((8, 16, 16)), 'x', (16, 16, 3), 10, 8,
                   'ResNet stem+3 blocks (8,16,16 ch), 16×16×3, batch 8'),
        'ViT': (models.ViT(patch=4, dim=32, depth=1, heads=2), 'x',
                (16, 16, 3), 10, 8, 'ViT d=32 depth 1, 16 tokens, batch 8'),
        'GPT': (models.GPT(96, 32, 32, 1, 2), 'tokens', (32,), 96, 8,
                'GPT d=32 depth 1, context 32, batch 8'),
    }
  return {
      'MLP': (models.MLP((512, 512)), 'x', (784,), 10, 128,
              'MLP 784→512→512→10, batch 128'),
      'ResNet': (models.ResNet((16, 32, 64)), 'x', (32, 32, 3), 10, 32,
                 'ResNet: 3×3 stem + 3 residual blocks (16/32/64 ch, '
                 'GroupNorm), 32×32×3, batch 32'),
      'ViT': (models.ViT(patch=4, dim=128, depth=2, heads=4), 'x',
              (32, 32, 3), 10, 16,
              'ViT: 4×4 patches of 32×32×3 (64 tokens), d=128, 2 blocks, '
              '4 heads, MLP 512, batch 16'),
      'GPT': (models.GPT(96, 128, 128, 2, 4), 'tokens', (128,), 96, 8,
              'GPT: vocab 96, context 128, d=128, 2 causal blocks, 4 heads, '
              'MLP 512, batch 8'),
  }


def _trainer(name, model, plan=None):
  """`steps.make_trainer`, or `peers.make_trainer` for Muon/compositions."""
  kw = {} if plan is None else dict(plan=plan)
  if name in peers.NAMES:
    return peers.make_trainer(name, model, **kw)
  return steps.make_trainer(name, model, **kw)


def _fresh(tree):
  return jax.tree_util.tree_map(jnp.copy, tree)


def _block(tree):
  jax.tree_util.tree_map(lambda x: x.block_until_ready(), tree)


def _compile(trainer, params, batch):
  """Init + ahead-of-time compile; returns (state, compiled, compile_s)."""
  state = trainer.init(_fresh(params), batch)
  t0 = time.perf_counter()
  compiled = trainer.step.lower(state, batch, F32(0.01)).compile()
  return state, compiled, time.perf_counter() - t0


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  peak = getattr(m, 'peak_memory_in_bytes', 0) or 0
  total = (m.argument_size_in_bytes + m.output_size_in_bytes
           - m.alias_size_in_bytes + m.temp_size_in_bytes)
  return dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
              alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
              peak_reported=peak, total=total)


def _mac_state_bound(model, params, batch) -> dict:
  """Σ over captured layers of (G·d_in + 1) floats, from the capture shapes.

  The ``+ 1`` per layer is its statistics counter; MAC's state also holds one
  global step counter (a scalar), reported separately (``scalars``).
  """
  def captured(p):
    with mac_optax.linen.capture():
      _, v = model.apply({'params': p}, batch[0], mutable=['intermediates'])
    return v['intermediates']
  shapes = jax.eval_shape(captured, params)
  total, layers = 0, 0
  for leaf in jax.tree_util.tree_leaves(shapes):
    stack = int(np.prod(leaf.shape[:-2])) if leaf.ndim > 2 else 1
    total += stack * (leaf.shape[-2] * leaf.shape[-1] + 1)
    layers += stack
  return dict(floats=total, layers=layers, scalars=1)


def _interleaved(fns: dict, repeats: int, inner: int, desc: str) -> dict:
  """Times each fn() (which runs `inner` steps) in rotating order."""
  times = {k: [] for k in fns}
  names = list(fns)
  for r in tqdm(range(repeats), desc=desc, leave=False):
    order = names[r % len(names):] + names[:r % len(names)]
    for k in order:
      t0 = time.perf_counter()
      fns[k]()
      times[k].append((time.perf_counter() - t0) / inner)
  return {k: dict(min=float(np.min(v)), median=float(np.median(v)),
                  all=[float(x) for x in v]) for k, v in times.items()}


def _timed_runner(compiled, state, batch, inner):
  box = {'state': state}

  def run():
    s = box['state']
    for _ in range(inner):
      s, loss = compiled(s, batch, F32(0.01))
    _block(loss)
    box['state'] = s
  return run, box


# --------------------------------------------------------------------------
# 1 + 2: speed and memory (same compiled steps).


def bench_speed_memory(quick: bool, out: dict):
  # `inner` is a multiple of kfac's inverse period: its inverses amortized.
  repeats, inner = (3, 5) if quick else (15, 5)
  speed, memory = {}, {}
  for mname, (model, kind, shape, classes, bsz, desc) in tqdm(
      speed_models(quick).items(), desc='speed+memory'):
    batch = models.synthetic_batch(kind, shape, bsz, classes)
    params = model.init(jax.random.PRNGKey(0), batch[0])['params']
    entry = dict(desc=desc, params=models.count_params(params),
                 param_bytes=steps.tree_bytes(params), opt={})
    mem = dict(opt={}, bound=_mac_state_bound(model, params, batch))
    runners = {}
    for name in peers.SPEED:
      try:
        trainer = _trainer(name, model)
        state, compiled, compile_s = _compile(trainer, params, batch)
        mem['opt'][name] = dict(
            state_bytes=steps.tree_bytes(trainer.opt_state_of(state)),
            compiled=_memory(compiled), compile_s=compile_s)
        run, box = _timed_runner(compiled, state, batch, inner)
        run()  # warm-up (first call, kfac's first inverse)
        runners[name] = run
        entry['opt'][name] = dict(compile_s=compile_s)
      except Exception as err:  # pylint: disable=broad-except
        entry['opt'][name] = dict(error=steps.short_error(err))
        mem['opt'][name] = dict(error=steps.short_error(err))
    timing = _interleaved(runners, repeats, inner, mname)
    for name, t in timing.items():
      entry['opt'][name].update(t)
    speed[mname], memory[mname] = entry, mem
  out['speed'] = dict(repeats=repeats, inner=inner, models=speed)
  out['memory'] = dict(models=memory)


# --------------------------------------------------------------------------
# 3: scaling with width.


def _missing_kfac() -> str:
  """'' where kfac-jax imports, else why its scaling rows are not run."""
  try:
    import kfac_jax  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except Exception as err:  # pylint: disable=broad-except
    return f'kfac-jax does not import here ({steps.short_error(err, 120)})'
  return ''


def bench_scaling(quick: bool, out: dict, widths=None):
  if widths is None:
    widths = [128, 256, 512] if quick else [128, 256, 512, 1024, 2048, 4096]
  repeats, inner = (3, 5) if quick else (5, 5)
  bsz = 64
  budget_s = 4.0  # skip larger widths of an optimizer once a step exceeds it
  names = ['sgd', 'adamw', 'mac', 'kfac', 'muon']
  # Muon's Newton-Schulz iterations are O(d³) per matrix: 2.3 s a step at
  # d=2048 on 2 cores (measured under jax 0.10.2), so d=4096 (~8× that, and
  # 4 timed rounds of 5 steps) is not run.
  max_width = {'muon': 2048}
  skipped = {}
  why = _missing_kfac()
  if why:
    names.remove('kfac')
    skipped['kfac'] = why
  rows = {}
  for d in tqdm(widths, desc='scaling'):
    model = models.MLP((d, d), classes=10)
    batch = models.synthetic_batch('x', (d,), bsz, 10)
    params = model.init(jax.random.PRNGKey(0), batch[0])['params']
    row = {}
    runners = {}
    for name in names:
      if name in max_width and d > max_width[name]:
        skipped.setdefault(name, f'width capped at d={max_width[name]} '
                           '(O(d³) Newton-Schulz step); larger d not run')
      if name in skipped:
        row[name] = dict(skipped=skipped[name])
        continue
      try:
        trainer = _trainer(name, model)
        state, compiled, _ = _compile(trainer, params, batch)
        run, _ = _timed_runner(compiled, state, batch, inner)
        t0 = time.perf_counter()
        run()
        first = (time.perf_counter() - t0) / inner
        runners[name] = run
        if first > budget_s:
          skipped[name] = (f'step took {first:.1f} s at d={d} (> {budget_s} s '
                           'budget on this shared CPU); larger d not run')
      except Exception as err:  # pylint: disable=broad-except
        row[name] = dict(error=steps.short_error(err))
    timing = _interleaved(runners, repeats if d < 2048 else 3, inner,
                          f'd={d}')
    row.update(timing)
    rows[d] = row
  out['scaling'] = dict(widths=widths, batch=bsz, inner=inner,
                        repeats=repeats, rows=rows, skipped=skipped)


# --------------------------------------------------------------------------
# 4: capture overhead.


def bench_capture(quick: bool, out: dict):
  repeats, inner = (3, 3) if quick else (15, 10)
  rows = {}
  for mname, (model, kind, shape, classes, bsz, _) in tqdm(
      speed_models(quick).items(), desc='capture'):
    batch = models.synthetic_batch(kind, shape, bsz, classes)
    params = model.init(jax.random.PRNGKey(0), batch[0])['params']

    @jax.jit
    def plain(p, x):
      return model.apply({'params': p}, x)

    @jax.jit
    def captured(p, x):
      with mac_optax.linen.capture():
        return model.apply({'params': p}, x, mutable=['intermediates'])

    def runner(fn):
      def run():
        for _ in range(inner):
          y = fn(params, batch[0])
        _block(y)
      return run
    fns = {'plain': runner(plain), 'capture': runner(captured)}
    for f in fns.values():
      f()
    rows[mname] = _interleaved(fns, repeats, inner, mname)
  out['capture'] = dict(repeats=repeats, inner=inner, models=rows)


# --------------------------------------------------------------------------
# 5: convergence on real data.


def convergence_tasks(quick: bool):
  # Full run (issue 15): budgets at which the tasks do not saturate, cut to
  # fit 8 optimizers × (3 lrs + grid extensions) × 3 seeds into ~45 minutes
  # of a shared 2-core CPU: 40 steps (≈ 1.8 epochs) on digits for the CNN,
  # 100 for the ViT, 200 on MNIST-1D, 200 for the GPT. (Until issue 15:
  # 200/200/400/300 steps, where the digits CNN saturated at 0.99.)
  # `eval_every` is per task, so that time to target is resolved.
  steps_n = 60 if quick else 200
  cnn_n = 20 if quick else 40
  vit_n = 20 if quick else 100
  gpt_n = 20 if quick else 200
  gpt_ctx = 32 if quick else 64
  tasks = {
      'digits-CNN': dict(data='digits', model=models.SmallCNN(),
                         metric='accuracy', target=0.95, steps=cnn_n,
                         batch=64, eval_every=5, desc='SmallCNN (conv 32, '
                         'conv 64, avgpool, dense 128) on sklearn digits'),
      'digits-ViT': dict(data='digits',
                         model=models.ViT(patch=2, dim=64, depth=2, heads=4),
                         metric='accuracy', target=0.90, steps=vit_n,
                         batch=64, eval_every=10, desc='ViT 2×2 patches (16 '
                         'tokens), d=64, 2 blocks, 4 heads, on sklearn digits'),
      'pydoc-GPT': dict(data='pydoc', model=models.GPT(96, gpt_ctx, 64, 2, 4),
                        metric='loss', target=2.3, steps=gpt_n, batch=32,
                        eval_every=20,
                        desc=f'char GPT d=64, 2 blocks, 4 heads, context '
                        f'{gpt_ctx}, on pydoc_data.topics'),
  }
  # The einsum decoder of examples/gemma_decoder.py (a tiny config) on the
  # GPT's data; MAC needs its layer plan. Not Muon (default dims), whose
  # Adam branch takes every multi-axis einsum kernel, nor kfac-jax.
  dec, _, _, _ = einsum_decoder.config(True)
  tasks['pydoc-einsum-decoder'] = dict(
      data='pydoc', model=dec, plan=einsum_decoder.plan_of(dec, gpt_ctx),
      opts=('sgd', 'adamw', 'mac', 'muon', 'mac-adam', 'mac-muon'),
      metric='loss', target=2.8, steps=20 if quick else 150, batch=32,
      eval_every=25, desc=f'einsum decoder of examples/gemma_decoder.py, d=32, '
      f'1 block, 4 query / 2 key-value heads of 8, gated MLP 64, context '
      f'{gpt_ctx}, on pydoc_data.topics')
  try:
    models.mnist1d(0)
    tasks['MNIST-1D'] = dict(data='mnist1d', model=models.Conv1DNet(),
                             metric='accuracy', target=0.60, steps=steps_n,
                             batch=64, eval_every=20, desc='1-D CNN (2 '
                             'strided convs, dense 128) on MNIST-1D '
                             '(4000/1000)')
  except Exception as err:  # pylint: disable=broad-except
    tasks['MNIST-1D'] = dict(error=steps.short_error(err))
  return tasks, gpt_ctx


LR_GRIDS = {  # same size and spacing (×1/3, ×1, ×3 of a usual default)
    'sgd': [0.03, 0.1, 0.3],
    'mac': [0.03, 0.1, 0.3],
    'adamw': [0.001, 0.003, 0.01],
    'kfac': [0.003, 0.01, 0.03],
    # consistent_rms=0.2 puts Muon's updates at AdamW's RMS; centred a step
    # above AdamW's default. Compositions take their base optimizer's grid.
    'muon': [0.003, 0.01, 0.03],
    'muon-default': [0.003, 0.01, 0.03],
    'mac-adam': [0.001, 0.003, 0.01],
    'mac-muon': [0.003, 0.01, 0.03],
}
# While the best lr (mean final metric over seeds) is an end point of the
# grid, the grid grows by one ×3 step beyond it, at most this many times.
MAX_EXTEND = 2


def _evaluate(model, params, data, bsz=500):
  losses, correct, n = [], 0, 0
  for i in range(0, len(data.x_test), bsz):
    x = jnp.asarray(data.x_test[i:i + bsz])
    y = jnp.asarray(data.y_test[i:i + bsz])
    logits = _eval_logits(model, params, x)
    losses.append(float(steps.cross_entropy(logits, y)) * len(x))
    correct += int((logits.argmax(-1) == y).sum()) if not data.sequence else 0
    n += len(x)
  return sum(losses) / n, correct / n


_EVAL_CACHE = {}


def _eval_logits(model, params, x):
  key = id(model)
  if key not in _EVAL_CACHE:
    _EVAL_CACHE[key] = jax.jit(lambda p, x: model.apply({'params': p}, x))
  return _EVAL_CACHE[key](params, x)


def _train_run(task, data, compiled, trainer, lr, seed, eval_every):
  model = task['model']
  rng = np.random.default_rng(seed)
  x0 = jnp.asarray(data.x_train[:task['batch']])
  params = model.init(jax.random.PRNGKey(seed), x0)['params']
  state = trainer.init(params, (x0, jnp.asarray(
      data.y_train[:task['batch']])))
  n = len(data.x_train)
  curve = dict(step=[], time=[], loss=[], acc=[], train_loss=[])
  clock, losses = 0.0, []
  total = task['steps']
  for t in range(total):
    idx = rng.integers(0, n, task['batch'])
    batch = (jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx]))
    lr_t = F32(lr * 0.5 * (1 + math.cos(math.pi * t / total)))
    t0 = time.perf_counter()
    state, loss = compiled(state, batch, lr_t)
    if (t + 1) % eval_every == 0 or t + 1 == total:
      loss.block_until_ready()
    clock += time.perf_counter() - t0
    losses.append(loss)
    if (t + 1) % eval_every == 0 or t + 1 == total:
      test_loss, acc = _evaluate(model, state[0], data)
      curve['step'].append(t + 1)
      curve['time'].append(clock)
      curve['loss'].append(test_loss)
      curve['acc'].append(acc)
      curve['train_loss'].append(float(jnp.mean(jnp.stack(losses))))
      losses = []
      if not math.isfinite(test_loss):
        break
  return curve


def _time_to_target(curve, metric, target):
  values = curve['acc'] if metric == 'accuracy' else curve['loss']
  for s, t, v in zip(curve['step'], curve['time'], values):
    if (v >= target) if metric == 'accuracy' else (v <= target):
      return s, t
  return None, None


# An optimizer whose whole grid (lrs × seeds × steps) is projected, from its
# measured step time, to take longer than this on the shared CPU is not run
# on that task; the result records the measured step time and projection.
GRID_BUDGET_S = 300.0


def _projected_grid_s(compiled, trainer, task, data, runs):
  """Seconds the grid would take, from 3 timed steps after a warm-up."""
  x0 = jnp.asarray(data.x_train[:task['batch']])
  y0 = jnp.asarray(data.y_train[:task['batch']])
  params = task['model'].init(jax.random.PRNGKey(0), x0)['params']
  state = trainer.init(params, (x0, y0))
  state, loss = compiled(state, (x0, y0), F32(0.0))
  loss.block_until_ready()
  t0 = time.perf_counter()
  for _ in range(3):
    state, loss = compiled(state, (x0, y0), F32(0.0))
  loss.block_until_ready()
  step_s = (time.perf_counter() - t0) / 3
  return step_s, step_s * task['steps'] * runs


def _extend_grid(grid, runs, metric):
  """`grid` grown by one ×3 step past its best end point, or None."""
  scores = {lr: report.lr_score(runs[str(lr)], metric) for lr in grid}
  best = max(grid, key=lambda lr: scores[lr])
  if len(grid) > 1 and best == grid[-1]:
    return grid + [float(f'{grid[-1] * 3:.3g}')]
  if len(grid) > 1 and best == grid[0]:
    return [float(f'{grid[0] / 3:.3g}')] + grid
  return None


# Optimizers of the convergence section (a test narrows it).
CONVERGE_OPTS = peers.CONVERGE


def bench_convergence(quick: bool, out: dict, only_tasks=None):
  """All tasks, or `only_tasks` merged into the section `out` holds."""
  tasks, gpt_ctx = convergence_tasks(quick)
  if only_tasks:
    tasks = {k: v for k, v in tasks.items() if k in only_tasks}
  seeds = [0] if quick else [0, 1, 2]
  grids = ({k: [v[1]] for k, v in LR_GRIDS.items()} if quick else LR_GRIDS)
  default_eval_every = 10 if quick else 20
  results = {}
  datasets = {}
  for tname, task in tasks.items():
    if 'error' in task:
      results[tname] = dict(error=task['error'])
      continue
    if task['data'] == 'digits':
      data = datasets.setdefault('digits', models.digits(0))
    elif task['data'] == 'mnist1d':
      data = datasets.setdefault('mnist1d', models.mnist1d(0))
    else:
      data, _ = models.pydoc_text(gpt_ctx)
    eval_every = min(task.get('eval_every', default_eval_every),
                     task['steps'])
    entry = dict(desc=task['desc'], metric=task['metric'],
                 target=task['target'], steps=task['steps'],
                 batch=task['batch'], train=len(data.x_train),
                 test=len(data.x_test), eval_every=eval_every, opt={})
    model = task['model']
    x0 = jnp.asarray(data.x_train[:task['batch']])
    y0 = jnp.asarray(data.y_train[:task['batch']])
    params0 = model.init(jax.random.PRNGKey(0), x0)['params']
    entry['params'] = models.count_params(params0)
    for name in [o for o in CONVERGE_OPTS if o in task.get('opts', (o,))]:
      try:
        trainer = _trainer(name, model, task.get('plan'))
        _, compiled, _ = _compile(trainer, params0, (x0, y0))
      except Exception as err:  # pylint: disable=broad-except
        entry['opt'][name] = dict(error=steps.short_error(err))
        continue
      step_s, projected = _projected_grid_s(
          compiled, trainer, task, data, len(grids[name]) * len(seeds))
      if projected > GRID_BUDGET_S:
        entry['opt'][name] = dict(skipped=(
            f'not run: its step took {1e3 * step_s:.0f} ms here, so '
            f'{len(grids[name])} lrs × {len(seeds)} seeds × {task["steps"]} '
            f'steps would take ~{projected / 60:.0f} min (> '
            f'{GRID_BUDGET_S / 60:.0f} min budget per optimizer and task on '
            'this shared 2-core CPU)'), step_s=step_s)
        tqdm.write(f'converge: {tname} {name} skipped ({projected:.0f} s)')
        continue
      runs = {}
      grid = list(grids[name])
      for extension in range(MAX_EXTEND + 1):
        for lr in tqdm([g for g in grid if str(g) not in runs],
                       desc=f'{tname} {name}', leave=False):
          curves = []
          for seed in seeds:
            try:
              curves.append(_train_run(task, data, compiled, trainer, lr,
                                       seed, eval_every))
            except Exception as err:  # pylint: disable=broad-except
              curves.append(dict(error=steps.short_error(err)))
          runs[str(lr)] = [dict(c, hit=_time_to_target(
              c, task['metric'], task['target'])) if 'error' not in c else c
                           for c in curves]
        grown = _extend_grid(grid, runs, task['metric'])
        if grown is None or extension == MAX_EXTEND or len(grid) == 1:
          break
        grid = grown
      entry['opt'][name] = dict(runs=runs, grid=grid)
    results[tname] = entry
    tqdm.write(f'converge: {tname} done')
  if only_tasks and out.get('converge'):
    out['converge']['tasks'].update(results)
    return
  out['converge'] = dict(seeds=seeds, grids=grids, eval_every=default_eval_every,
                         tasks=results)


# --------------------------------------------------------------------------


def machine() -> dict:
  def sh(cmd):
    try:
      return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except Exception:  # pylint: disable=broad-except
      return ''
  versions = {'python': platform.python_version(), 'jax': jax.__version__}
  for mod in ('jaxlib', 'flax', 'optax', 'chex', 'kfac_jax', 'numpy'):
    try:
      versions[mod] = __import__(mod).__version__
    except Exception as err:  # pylint: disable=broad-except
      versions[mod] = f'unavailable ({type(err).__name__})'
  return dict(
      cpu=sh("lscpu | grep -E 'Model name' | sed 's/.*: *//'"),
      nproc=sh('nproc'), lscpu=sh('lscpu | head -20'),
      load=sh('cat /proc/loadavg'), versions=versions,
      devices=[str(d) for d in jax.devices()],
      date=datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'))


# --------------------------------------------------------------------------
# 6: GPT-2-small under FSDP.


def bench_gpt2(quick: bool, out: dict):
  """Runs benchmarks/gpt2_fsdp.py: 8 host devices need a fresh process."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'gpt2.json')
    subprocess.run(
        [sys.executable, os.path.join(HERE, 'gpt2_fsdp.py'), '--json', path]
        + (['--quick'] if quick else []),
        env=dict(os.environ, JAX_PLATFORMS='cpu'), check=True)
    with open(path) as f:
      out['gpt2'] = json.load(f)


# --------------------------------------------------------------------------
# 7: the einsum decoder (examples/gemma_decoder.py).


def bench_einsum(quick: bool, out: dict):
  """Capture overhead and step-time ratios, as the capture/speed sections."""
  # 30 repeats (15 in the speed section): the min needs a quiet moment of
  # the shared cores, and this model's steps are short.
  repeats, inner = (3, 2) if quick else (30, 5)
  model, bsz, context, desc = einsum_decoder.config(quick)
  plan = einsum_decoder.plan_of(model, context)
  batch = models.synthetic_batch('tokens', (context,), bsz, einsum_decoder.VOCAB)
  params = model.init(jax.random.PRNGKey(0), batch[0])['params']
  plain = jax.jit(lambda p, x: model.apply({'params': p}, x))

  @jax.jit
  def captured(p, x):
    with mac_optax.linen.capture():
      return model.apply({'params': p}, x, mutable=['intermediates'])

  def forward(fn):
    def run():
      for _ in range(inner):
        y = fn(params, batch[0])
      _block(y)
    return run
  fns = {'plain': forward(plain), 'capture': forward(captured)}
  for f in fns.values():
    f()
  entry = dict(desc=desc, params=models.count_params(params),
               fraction=plan.fraction, repeats=repeats, inner=inner,
               jax=jax.__version__, platform=jax.devices()[0].platform,
               forward=_interleaved(fns, repeats, inner, 'einsum forward'),
               step={})
  runners = {}
  for name in ('sgd', 'adamw', 'mac'):
    try:
      trainer = steps.make_trainer(name, model, plan=plan)
      state, compiled, _ = _compile(trainer, params, batch)
      run, _ = _timed_runner(compiled, state, batch, inner)
      run()  # warm-up
      runners[name] = run
    except Exception as err:  # pylint: disable=broad-except
      entry['step'][name] = dict(error=steps.short_error(err))
  for name, t in _interleaved(runners, repeats, inner, 'einsum step').items():
    entry['step'][name] = t
  out['einsum'] = entry


SECTIONS = {'speed': bench_speed_memory, 'scaling': bench_scaling,
            'capture': bench_capture, 'converge': bench_convergence,
            'gpt2': bench_gpt2, 'einsum': bench_einsum}
# Sections that replace their own part of RESULTS.md; running only these
# leaves the rest of the file as it is.
IN_PLACE = {'gpt2', 'einsum'}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='small shapes, few repeats (a few minutes)')
  parser.add_argument('--only', default='speed,scaling,capture,converge',
                      help='comma list of sections (memory is part of speed)')
  parser.add_argument('--no-report', action='store_true')
  parser.add_argument('--tag', default='',
                      help='write results_TAG.json instead (another '
                      'environment, e.g. the newest jax without kfac-jax); '
                      'RESULTS.md shows its speed and capture tables beside '
                      'the main ones')
  parser.add_argument('--tasks', default='',
                      help='comma list of convergence tasks to run (merged '
                      'into the section already in the results file)')
  args = parser.parse_args(argv)
  if args.tasks:
    SECTIONS['converge'] = lambda quick, out: bench_convergence(
        quick, out, only_tasks=args.tasks.split(','))
  results_json = (os.path.join(HERE, f'results_{args.tag}.json') if args.tag
                  else RESULTS_JSON)
  out = {}
  if os.path.exists(results_json):
    with open(results_json) as f:
      out = json.load(f)
    if out.get('quick') != args.quick:
      out = {}
  out['quick'] = args.quick
  out.setdefault('machine_runs', {})
  for section in args.only.split(','):
    section = section.strip()
    start = machine()
    t0 = time.perf_counter()
    SECTIONS[section](args.quick, out)
    end_load = machine()['load']
    key = (f'{section} ({args.tasks})' if section == 'converge'
           and args.tasks else section)
    out['machine_runs'][key] = dict(start, load_end=end_load,
                                    seconds=time.perf_counter() - t0)
    with open(results_json, 'w') as f:
      json.dump(out, f)
    tqdm.write(f'{section}: {time.perf_counter() - t0:.0f} s')
  if (not args.no_report and os.path.exists(RESULTS_JSON)
      and not {s.strip() for s in args.only.split(',')} <= IN_PLACE):
    with open(RESULTS_JSON) as f:
      report.write(json.load(f), HERE)
  if not args.no_report and 'gpt2' in out and not out['gpt2']['quick']:
    gpt2_fsdp.write_section(os.path.join(HERE, 'RESULTS.md'), out['gpt2'],
                            out['machine_runs']['gpt2'])
  if not args.no_report and 'einsum' in out and not out['quick']:
    einsum_decoder.write_section(os.path.join(HERE, 'RESULTS.md'),
                                 out['einsum'], out['machine_runs']['einsum'])


if __name__ == '__main__':
  main()
