"""Renders benchmarks/results.json into RESULTS.md and PNG plots."""

from __future__ import annotations

import math
import os
import re

import numpy as np

from benchmarks import peers
from benchmarks import steps

OPTS = peers.CONVERGE   # steps.OPTIMIZERS, then Muon and the compositions
LABEL = {**steps.LABELS, **peers.LABELS}
COLORS = {'sgd': 'tab:blue', 'adamw': 'tab:orange', 'mac': 'tab:green',
          'kfac': 'tab:red', 'muon': 'tab:purple', 'muon-default': 'tab:pink',
          'mac-adam': 'tab:olive', 'mac-muon': 'tab:cyan'}


def _present(models, opts=OPTS):
  """The optimizers of `opts` that have an entry in some model's `opt`."""
  return tuple(o for o in opts if any(o in e['opt'] for e in models))


def _ms(x):
  return f'{1e3 * x:.2f}'


def _mib(b):
  return f'{b / 2**20:.2f}'


def _err(entry):
  return f'**fails**: `{entry["error"]}`'


# --------------------------------------------------------------------------


def _speed(out, lines, summary):
  sp = out.get('speed')
  if not sp:
    return
  opts = _present(sp['models'].values())
  lines += ['## 1. Step time (whole jitted train step)', '',
            f'Forward (with `capture()` for MAC), backward, optimizer update '
            f'and parameter update in one `jax.jit` (state donated). Each '
            f'repeat times {sp["inner"]} consecutive steps per optimizer; the '
            f'optimizers are interleaved in rotating order within one process '
            f'({sp["repeats"]} repeats), so machine-load drifts hit all of '
            f'them alike. Per-step ms, min / median over repeats; ratios are '
            f'to SGD-momentum (min/min, median/median). kfac-jax updates its '
            f'inverses every {steps.KFAC_INVERSE_EVERY} steps (its default), '
            f'so its time is an amortized average.', '',
            '| model | params | ' + ' | '.join(
                f'{LABEL[o]} ms (min / med)' for o in opts) + ' | ' +
            ' | '.join(f'{LABEL[o]} / SGD (min / med)' for o in opts[1:]) +
            ' |', '|' + '---|' * (2 + 2 * len(opts) - 1)]
  shapes = []
  for m, e in sp['models'].items():
    cells, ratios = [], []
    base = e['opt'].get('sgd', {})
    for o in opts:
      r = e['opt'].get(o, {})
      if 'error' in r:
        cells.append('fails (see below)')
      elif 'min' in r:
        cells.append(f'{_ms(r["min"])} / {_ms(r["median"])}')
      else:
        cells.append('–')
    for o in opts[1:]:
      r = e['opt'].get(o, {})
      if 'min' in r and 'min' in base:
        ratios.append(f'{r["min"] / base["min"]:.2f}× / '
                      f'{r["median"] / base["median"]:.2f}×')
      else:
        ratios.append('–')
    lines.append(f'| {m} | {e["params"]:,} | ' + ' | '.join(cells + ratios)
                 + ' |')
    shapes.append(f'- **{m}**: {e["desc"]} ({e["params"]:,} parameters).')
    mac, adamw = e['opt'].get('mac', {}), e['opt'].get('adamw', {})
    if 'min' in mac and 'min' in base:
      ratio = mac['min'] / base['min']
      summary.append(
          f'{m}: MAC {ratio:.2f}× SGD-momentum (min), '
          f'{mac["median"] / base["median"]:.2f}× (median)' +
          (f', {mac["min"] / adamw["min"]:.2f}× AdamW' if 'min' in adamw
           else ''))
  lines += ['', 'Shapes:', ''] + shapes + ['']
  errors = [(m, o, e['opt'][o]['error']) for m, e in sp['models'].items()
            for o in opts if 'error' in e['opt'].get(o, {})]
  if errors:
    lines += ['Optimizers that could not run (error text as raised):', '']
    lines += [f'- {LABEL[o]} on {m}: `{t}`' for m, o, t in errors]
    lines.append('')
  lines += ['Targets: MAC ≤ 1.05× SGD-momentum and MAC ≤ AdamW, '
            'on min times:', '']
  for m, e in sp['models'].items():
    mac, base, adamw = (e['opt'].get(k, {}) for k in ('mac', 'sgd', 'adamw'))
    if 'min' in mac and 'min' in base and 'min' in adamw:
      r1, r2 = mac['min'] / base['min'], mac['min'] / adamw['min']
      lines.append(f'- {m}: {r1:.3f}× SGD → '
                   f'{"met" if r1 <= 1.05 else "**missed**"}; '
                   f'{r2:.3f}× AdamW → {"met" if r2 <= 1.0 else "**missed**"}')
  lines.append('')
  lines += ['Compile time (s, ahead-of-time `lower().compile()`): ' + '; '.join(
      f'{m}: ' + ', '.join(
          f'{LABEL[o]} {e["opt"][o]["compile_s"]:.1f}'
          for o in opts if 'compile_s' in e['opt'].get(o, {}))
      for m, e in sp['models'].items()), '']


def _memory(out, lines, summary):
  mem = out.get('memory')
  if not mem:
    return
  lines += ['## 2. Memory', '',
            'Optimizer-state bytes: every array leaf of the optimizer state '
            '(kfac-jax: its optax state plus the `OptaxPreconditionState` '
            'with factors and cached inverses). Compiled: '
            '`compiled.memory_analysis()` of the train step (XLA:CPU): `temp` '
            'is the scratch memory of the step, `total` = arguments + outputs '
            '− aliased (donated) + temp, an upper bound of the peak live '
            'bytes.', '',
            '| model | optimizer | state MiB | state / SGD | step temp MiB | '
            'step total MiB |', '|---|---|---|---|---|---|']
  for m, e in mem['models'].items():
    base = e['opt'].get('sgd', {}).get('state_bytes')
    for o in OPTS:
      r = e['opt'].get(o, {})
      if not r:
        continue
      if 'error' in r:
        lines.append(f'| {m} | {LABEL[o]} | {_err(r)} | | | |')
        continue
      c = r.get('compiled', {})
      rel = f'{r["state_bytes"] / base:.2f}×' if base else '–'
      lines.append(f'| {m} | {LABEL[o]} | {_mib(r["state_bytes"])} | {rel} | '
                   f'{_mib(c.get("temp", 0))} | {_mib(c.get("total", 0))} |')
  lines += ['', 'MAC state bound: MAC state ≤ SGD-momentum state + '
            'Σ_layers (G·d_in + 1) floats + 1 scalar. Per captured layer MAC '
            'keeps the `[G, d_in]` mean-input EMA (G column groups, `G = 1` '
            'except grouped convolutions) and an int32 count of the '
            'statistics folded in (the "+1"); the transform as a whole keeps '
            'one int32 step counter (the "+ 1 scalar", which drives '
            '`cov_every`/`inv_every`). The bound is computed from the capture '
            'shapes, independently of the optimizer state; "exact" means the '
            'measured difference equals it byte for byte.', '',
            '| model | layers | MAC − SGD bytes | Σ(G·d_in + 1) bytes | '
            '+ step counter | bound bytes | within? |',
            '|---|---|---|---|---|---|---|']
  for m, e in mem['models'].items():
    mac, sgd = e['opt'].get('mac', {}), e['opt'].get('sgd', {})
    if 'state_bytes' not in mac or 'state_bytes' not in sgd:
      continue
    extra = mac['state_bytes'] - sgd['state_bytes']
    layers_b = 4 * e['bound']['floats']
    scalars_b = 4 * e['bound'].get('scalars', 1)
    bound = layers_b + scalars_b
    if extra == bound:
      note = 'yes (exact)'
    elif extra < bound:
      note = 'yes'
    else:
      note = f'**no**, by {extra - bound:,} B'
    lines.append(f'| {m} | {e["bound"]["layers"]} | {extra:,} | '
                 f'{layers_b:,} | {scalars_b} | {bound:,} | {note} |')
    summary.append(f'{m}: MAC state {mac["state_bytes"] / sgd["state_bytes"]:.3f}'
                   f'× SGD-momentum' + (
                       f', kfac-jax {e["opt"]["kfac"]["state_bytes"] / sgd["state_bytes"]:.1f}×'
                       if 'state_bytes' in e['opt'].get('kfac', {}) else ''))
  lines.append('')


def _scaling(out, lines, summary, outdir, plt):
  sc = out.get('scaling')
  if not sc:
    return
  lines += ['## 3. Scaling with layer width', '',
            f'MLP `d → d → d → 10` (two d×d layers), batch {sc["batch"]}, '
            f'random inputs; per-step time (min over repeats, {sc["inner"]} '
            f'steps each, interleaved) and overhead over SGD-momentum. '
            f'kfac-jax inverts its factors every {steps.KFAC_INVERSE_EVERY} '
            'steps (amortized in the average).', '',
            '| d | SGD ms | MAC ms | kfac-jax ms | MAC / SGD | kfac-jax / SGD |'
            ' MAC overhead ms | kfac-jax overhead ms |',
            '|---|---|---|---|---|---|---|---|']
  xs, mac_r, kfac_r, kfac_x = [], [], [], []
  for d in sc['widths']:
    row = sc['rows'].get(str(d), sc['rows'].get(d, {}))
    def cell(o):
      r = row.get(o, {})
      if 'min' in r:
        return _ms(r['min'])
      if 'error' in r:
        return f'fails: `{r["error"][:80]}`'
      if 'skipped' in r:
        return 'not run (budget)'
      return '–'
    base = row.get('sgd', {}).get('min')
    ratio = lambda o: (f'{row[o]["min"] / base:.2f}×'
                       if base and 'min' in row.get(o, {}) else '–')
    over = lambda o: (f'{1e3 * (row[o]["min"] - base):.2f}'
                      if base and 'min' in row.get(o, {}) else '–')
    lines.append(f'| {d} | {cell("sgd")} | {cell("mac")} | {cell("kfac")} | '
                 f'{ratio("mac")} | {ratio("kfac")} | {over("mac")} | '
                 f'{over("kfac")} |')
    if base and 'min' in row.get('mac', {}):
      xs.append(d)
      mac_r.append(row['mac']['min'] / base)
    if base and 'min' in row.get('kfac', {}):
      kfac_x.append(d)
      kfac_r.append(row['kfac']['min'] / base)
  if sc.get('skipped'):
    lines += [''] + [f'- {LABEL[o]}: {t}' for o, t in sc['skipped'].items()]
  lines.append('')
  if xs:
    summary.append(f'width {xs[-1]}: MAC {mac_r[-1]:.2f}× SGD' + (
        f'; kfac-jax {kfac_r[-1]:.2f}× SGD at width {kfac_x[-1]}'
        if kfac_r else ''))
  if plt and xs:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(xs, mac_r, 'o-', color=COLORS['mac'], label='MAC')
    if kfac_r:
      ax.plot(kfac_x, kfac_r, 's-', color=COLORS['kfac'], label='kfac-jax')
    ax.axhline(1.0, color='gray', lw=0.8, ls='--', label='SGD-momentum')
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('layer width d')
    ax.set_ylabel('step time / SGD-momentum step time')
    ax.set_title('Step-time overhead vs width (MLP, CPU)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, 'scaling.png'), dpi=80)
    plt.close(fig)
    lines += ['![scaling](scaling.png)', '']


def _capture(out, lines, summary):
  cp = out.get('capture')
  if not cp:
    return
  lines += ['## 4. Capture overhead (forward pass only)', '',
            f'Jitted `model.apply` with and without `mac_optax.linen.capture()`'
            f' (`mutable=["intermediates"]`), same parameters and batch as §1, '
            f'{cp["inner"]} calls per repeat, {cp["repeats"]} interleaved '
            'repeats.', '',
            '| model | plain ms (min / med) | capture ms (min / med) | '
            'ratio (min / med) |', '|---|---|---|---|']
  for m, r in cp['models'].items():
    p, c = r['plain'], r['capture']
    lines.append(f'| {m} | {_ms(p["min"])} / {_ms(p["median"])} | '
                 f'{_ms(c["min"])} / {_ms(c["median"])} | '
                 f'{c["min"] / p["min"]:.2f}× / '
                 f'{c["median"] / p["median"]:.2f}× |')
    summary.append(f'{m}: capture {c["min"] / p["min"]:.2f}× plain forward')
  lines.append('')


def _peers_speed_memory(other, lines, summary, tag):
  """Muon's step time and memory next to MAC's (issue 15)."""
  sp, mem = other.get('speed'), other.get('memory', {}).get('models', {})
  opts = _present(sp['models'].values(), peers.SPEED)
  opts = tuple(o for o in opts if o != 'kfac')
  lines += ['Step time and optimizer state of every optimizer of this run, '
            'the same method as §1/§2 (ratios to SGD-momentum, min / median '
            'over the interleaved repeats; state = every array leaf of the '
            'optimizer state). Muon: `optax.contrib.muon` as in §5b '
            '(`benchmarks/peers.py`); "default dims" leaves conv and '
            'multi-axis kernels to its Adam branch.', '',
            '| model | ' + ' | '.join(f'{LABEL[o]} / SGD' for o in opts[1:])
            + ' | MAC / Muon | ' + ' | '.join(
                f'{LABEL[o]} state / SGD' for o in opts[1:]) + ' |',
            '|' + '---|' * (2 * len(opts))]
  for m, e in sp['models'].items():
    b = e['opt'].get('sgd', {})
    rat = lambda r, b=b: (f'{r["min"] / b["min"]:.2f}× / '
                          f'{r["median"] / b["median"]:.2f}×'
                          if 'min' in r and 'min' in b else '–')
    mac, mu = e['opt'].get('mac', {}), e['opt'].get('muon', {})
    mo = mem.get(m, {}).get('opt', {})
    base = mo.get('sgd', {}).get('state_bytes')
    state = [(f'{mo[o]["state_bytes"] / base:.2f}×'
              if base and 'state_bytes' in mo.get(o, {}) else '–')
             for o in opts[1:]]
    lines.append(f'| {m} | ' + ' | '.join(rat(e['opt'].get(o, {}))
                                          for o in opts[1:]) + ' | ' +
                 (f'{mac["min"] / mu["min"]:.2f}×' if 'min' in mac and
                  'min' in mu else '–') + ' | ' + ' | '.join(state) + ' |')
    if 'min' in mu and 'min' in b:
      summary.append(f'{tag} {m}: Muon {mu["min"] / b["min"]:.2f}× SGD, '
                     f'MAC {mac["min"] / b["min"]:.2f}× SGD (min)')
  errors = [(m, o, e['opt'][o]['error']) for m, e in sp['models'].items()
            for o in opts if 'error' in e['opt'].get(o, {})]
  lines.append('')
  if errors:
    lines += [f'- {LABEL[o]} on {m}: `{t}`' for m, o, t in errors] + ['']


SCALING_PEERS = ('adamw', 'mac', 'kfac', 'muon')


def _peers_scaling(other, lines, summary, tag, outdir, plt):
  """§3b: the width scaling of a tag run, with AdamW and Muon."""
  sc = other['scaling']
  run = other.get('machine_runs', {}).get('scaling', {})
  v = run.get('versions', {})
  opts = [o for o in SCALING_PEERS
          if any('min' in r.get(o, {}) for r in sc['rows'].values())]
  lines += [f'## 3b. Scaling with layer width, with AdamW and Muon (`{tag}` '
            'run)', '',
            'The protocol of §3 (same MLP, batch, repeats and interleaving; '
            'ratios to SGD-momentum timed in the same process), run in: '
            + ', '.join(f'{k} {val}' for k, val in v.items()
                        if k in ('jax', 'jaxlib', 'flax', 'optax'))
            + f'; {run.get("date")}, {run.get("seconds", 0):.0f} s, load '
            f'{run.get("load")} → {run.get("load_end")}. Muon as in §4c '
            '(Newton-Schulz on each d×d kernel).', '',
            '| d | SGD ms | ' + ' | '.join(f'{LABEL[o]} ms' for o in opts)
            + ' | ' + ' | '.join(f'{LABEL[o]} / SGD' for o in opts) + ' |',
            '|---|---|' + '---|' * (2 * len(opts))]
  curves = {o: ([], []) for o in opts}
  for d in sc['widths']:
    row = sc['rows'].get(str(d), sc['rows'].get(d, {}))
    base = row.get('sgd', {}).get('min')
    cells, ratios = [], []
    for o in opts:
      r = row.get(o, {})
      if 'min' in r:
        cells.append(_ms(r['min']))
        ratios.append(f'{r["min"] / base:.2f}×' if base else '–')
        if base:
          curves[o][0].append(d)
          curves[o][1].append(r['min'] / base)
      else:
        cells.append('not run' if 'skipped' in r else
                     'fails' if 'error' in r else '–')
        ratios.append('–')
    lines.append(f'| {d} | {_ms(base) if base else "–"} | '
                 + ' | '.join(cells) + ' | ' + ' | '.join(ratios) + ' |')
  if sc.get('skipped'):
    lines += [''] + [f'- {LABEL[o]}: {t}' for o, t in sc['skipped'].items()]
  lines.append('')
  summary.append(f'{tag} scaling: ' + '; '.join(
      f'{LABEL[o]} {ys[-1]:.2f}× SGD at width {xs[-1]}'
      for o, (xs, ys) in curves.items() if xs))
  if plt and any(xs for xs, _ in curves.values()):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for o, (xs, ys) in curves.items():
      if xs:
        ax.plot(xs, ys, 'o-', color=COLORS[o], label=LABEL[o])
    ax.axhline(1.0, color='gray', lw=0.8, ls='--', label='SGD-momentum')
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('layer width d')
    ax.set_ylabel('step time / SGD-momentum step time')
    ax.set_title(f'Step-time overhead vs width (MLP, CPU, {tag})')
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, f'scaling_{tag}.png'), dpi=80)
    plt.close(fig)
    lines += [f'![scaling {tag}](scaling_{tag}.png)', '']


def _other_envs(outdir, lines, summary, converged=None, plt=None):
  """Speed and capture ratios of `results_TAG.json` files (other envs).

  Tag files with a convergence section are appended to `converged`, for
  their §5b after §5.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  for path in sorted(glob.glob(os.path.join(outdir, 'results_*.json'))):
    tag = os.path.basename(path)[len('results_'):-len('.json')]
    with open(path) as f:
      other = json.load(f)
    if other.get('quick'):
      continue
    runs = other.get('machine_runs', {})
    first = next(iter(runs.values()), {})
    v = first.get('versions', {})
    if other.get('converge') is not None and converged is not None:
      converged.append((tag, other))
    if other.get('scaling'):
      _peers_scaling(other, lines, summary, tag, outdir, plt)
    if 'muon' in json.dumps(list(other.get('speed', {}).get('models', {})
                                 .get('MLP', {}).get('opt', {}))):
      lines += [f'## 4c. Step time and memory with Muon (`{tag}` run)', '',
                'Run in: ' + ', '.join(
                    f'{k} {val}' for k, val in v.items()
                    if k in ('jax', 'jaxlib', 'flax', 'optax', 'kfac_jax'))
                + '. ' + '; '.join(
                    f'{n}: {r.get("date")}, load {r.get("load")} → '
                    f'{r.get("load_end")}' for n, r in runs.items()
                    if n == 'speed') + '.', '']
      _peers_speed_memory(other, lines, summary, tag)
      continue
    if not other.get('speed') and not other.get('capture'):
      continue
    lines += [f'## 4b. Step time and capture overhead under `{tag}`', '',
              'The same sections, same shapes and method, run in another '
              'environment: ' + ', '.join(f'{k} {val}' for k, val in v.items()
                                         if k in ('jax', 'jaxlib', 'flax',
                                                  'optax', 'kfac_jax')) +
              '. ' + '; '.join(f'{n}: {r.get("date")}, load {r.get("load")} '
                               f'→ {r.get("load_end")}'
                               for n, r in runs.items()
                               if n in ('speed', 'capture')) + '.', '']
    sp = other.get('speed')
    if sp:
      lines += ['| model | SGD-momentum ms (min / med) | AdamW / SGD (min / '
                'med) | MAC / SGD (min / med) | MAC / AdamW (min) | '
                'kfac-jax |', '|---|---|---|---|---|---|']
      for m, e in sp['models'].items():
        b, a, c, k = (e['opt'].get(o, {}) for o in steps.OPTIMIZERS)
        if 'min' not in b:
          continue
        rat = lambda r: (f'{r["min"] / b["min"]:.2f}× / '
                         f'{r["median"] / b["median"]:.2f}×'
                         if 'min' in r else '–')
        kf = (f'`{k["error"][:90]}`' if 'error' in k else rat(k))
        lines.append(f'| {m} | {_ms(b["min"])} / {_ms(b["median"])} | '
                     f'{rat(a)} | {rat(c)} | '
                     + (f'{c["min"] / a["min"]:.2f}×' if 'min' in c and
                        'min' in a else '–') + f' | {kf} |')
        if 'min' in c:
          summary.append(f'{tag} {m}: MAC {c["min"] / b["min"]:.2f}× SGD '
                         f'(min)')
      lines.append('')
    cp = other.get('capture')
    if cp:
      lines += ['Capture overhead (forward only): ' + '; '.join(
          f'{m}: {r["capture"]["min"] / r["plain"]["min"]:.2f}× (min), '
          f'{r["capture"]["median"] / r["plain"]["median"]:.2f}× (median)'
          for m, r in cp['models'].items()), '']


def _final(curve, metric):
  if 'error' in curve or not curve['step']:
    return float('nan')
  return curve['acc'][-1] if metric == 'accuracy' else curve['loss'][-1]


def _score(vals, metric):
  vals = [v if math.isfinite(v) else (-1 if metric == 'accuracy' else 1e9)
          for v in vals]
  m = float(np.mean(vals))
  return m if metric == 'accuracy' else -m


def _pm(vals, fmt='{:.3f}'):
  vals = np.asarray(vals, float)
  if not np.all(np.isfinite(vals)):
    bad = int((~np.isfinite(vals)).sum())
    good = vals[np.isfinite(vals)]
    return (f'diverged in {bad}/{len(vals)}' + (
        f' (others {fmt.format(good.mean())})' if len(good) else ''))
  return f'{fmt.format(vals.mean())} ± {fmt.format(vals.std())}'


def lr_score(curves, metric):
  """One learning rate's score (higher is better): mean final metric."""
  return _score([_final(c, metric) for c in curves], metric)


def _first_hit(curve, metric, target):
  """(step, seconds) of the first evaluation reaching `target`, or None."""
  values = curve['acc'] if metric == 'accuracy' else curve['loss']
  for s, t, v in zip(curve['step'], curve['time'], values):
    if math.isfinite(v) and ((v >= target) if metric == 'accuracy'
                             else (v <= target)):
      return s, t
  return None


def _to_target(t, best, lines):
  """Time-to-target table: target = the worst optimizer's final value."""
  metric = t['metric']
  finals = {o: np.mean([_final(c, metric) for c in curves])
            for o, (_, curves) in best.items() if curves}
  finals = {o: v for o, v in finals.items() if math.isfinite(v)}
  if not finals:
    return None, {}
  worst = (min if metric == 'accuracy' else max)(finals, key=finals.get)
  target = float(finals[worst])
  word = 'test accuracy ≥' if metric == 'accuracy' else 'validation loss ≤'
  lines += [f'Time to target: the first evaluation (every '
            f'{t.get("eval_every", "?")} steps) at which a run reaches '
            f'{word} {target:.3f}, the final value of the worst optimizer '
            f'here ({LABEL[worst]}, mean over seeds at its best lr); steps '
            'and training seconds (train steps only) are mean ± std over '
            'the seeds that reach it, at each optimizer\'s best lr.', '',
            '| optimizer | seeds reaching | steps to target | s to target | '
            'ms per step |', '|---|---|---|---|---|']
  hits = {}
  for o, (_, curves) in best.items():
    got = [h for h in (_first_hit(c, metric, target) for c in curves) if h]
    per_step = [c['time'][-1] / c['step'][-1] for c in curves if c['step']]
    ms = f'{1e3 * np.mean(per_step):.1f}' if per_step else '–'
    if got:
      hits[o] = (float(np.mean([h[0] for h in got])),
                 float(np.mean([h[1] for h in got])))
      lines.append(f'| {LABEL[o]} | {len(got)}/{len(curves)} | '
                   f'{_pm([h[0] for h in got], "{:.0f}")} | '
                   f'{_pm([h[1] for h in got], "{:.2f}")} | {ms} |')
    else:
      lines.append(f'| {LABEL[o]} | 0/{len(curves)} | – | – | {ms} |')
  lines.append('')
  return target, hits


def _converge(out, lines, summary, outdir, plt, appendix, *,
              title='## 5. Convergence on real data', plot_prefix='converge_',
              issue15=False):
  """The convergence section; `issue15` adds grid extension, time to target.

  Without `issue15` the text is what it was before issue 15 (a section that
  was not rerun renders unchanged).
  """
  cv = out.get('converge')
  if not cv:
    return
  lines += [title, '',
            f'Every optimizer: the same model, data, batch, number of steps '
            f'and cosine learning-rate decay to 0; a learning-rate grid of '
            f'the same size and spacing for each (×⅓, ×1, ×3 around its usual '
            f'default; MAC and SGD-momentum share theirs) and seeds '
            f'{cv["seeds"]} (initialisation and batch order). The best '
            f'learning rate of each optimizer is the one with the best mean '
            f'final test metric; the full grid is in the appendix. Time to '
            f'target: training wall-clock (train steps only, evaluation '
            f'excluded, compile excluded) until the first evaluation (' +
            (f'every {cv["eval_every"]} steps' if not issue15 else
             'at a per-task interval, stated with its time-to-target '
             'table') +
            f') that reaches the target, mean over the '
            f'seeds that reach it. Momentum 0.9 for SGD, MAC and kfac-jax; '
            f'AdamW weight decay {steps.ADAMW_WD}; MAC λ={steps.MAC_DAMPING}, '
            f'β={steps.MAC_STAT_DECAY}; kfac-jax damping {steps.KFAC_DAMPING},'
            f' inverses every {steps.KFAC_INVERSE_EVERY} steps.', '']
  if issue15:
    lines += [
        'Beyond §5\'s optimizers: Muon (`optax.contrib.muon`, '
        f'`consistent_rms={peers.MUON_RMS}`, weight decay '
        f'{steps.ADAMW_WD} on every parameter as AdamW; conv and multi-axis '
        'kernels as matrices via `MuonDimensionNumbers`), Muon (default '
        'dims: those kernels go to its Adam branch), MAC→Adam (`chain(mac(),'
        ' scale_by_adam(), add_decayed_weights, …)`) and MAC→Muon '
        '(`chain(mac(), muon(…))`); see `benchmarks/peers.py`. No '
        'optimizer clips gradients. Grids start at 3 points (×3 apart) per '
        'optimizer; while the best lr is an end point the grid grows by one '
        '×3 step beyond it (at most twice), the same rule for every '
        'optimizer; "lrs run" lists the grid each one ended with, and '
        '**edge** marks a best lr still at an end after that.', '']
    mr = out.get('machine_runs', {}).get('converge', {})
    if mr:
      lines += [
          f'This run: {mr.get("date")}, {mr.get("seconds", 0) / 60:.0f} min '
          f'wall for the whole section (compiles, grids, seeds, '
          f'evaluations), `/proc/loadavg` {mr.get("load")} → '
          f'{mr.get("load_end")} on {mr.get("nproc", "?")} cores; ' +
          ', '.join(f'{k} {val}' for k, val in mr.get('versions', {}).items()
                    if k in ('jax', 'jaxlib', 'flax', 'optax', 'kfac_jax')) +
          '. Budgets were cut to fit that wall time on this shared CPU: the '
          'steps, batch and examples of each task are stated under it.', '']
  grid_lines = ['| task | optimizer | lr | final metric (mean ± std) | '
                'final test loss | reached target | train s |',
                '|---|---|---|---|---|---|---|']
  for tname, t in cv['tasks'].items():
    if 'error' in t:
      lines += [f'### {tname}', '', f'Not run: `{t["error"]}`', '']
      continue
    metric = t['metric']
    mname = 'test accuracy' if metric == 'accuracy' else 'validation loss'
    lines += [f'### {tname}', '',
              f'{t["desc"]}; {t["params"]:,} parameters; {t["train"]} train / '
              f'{t["test"]} test examples; {t["steps"]} steps of batch '
              f'{t["batch"]}; target {mname} '
              f'{"≥" if metric == "accuracy" else "≤"} {t["target"]}.', '',
              f'| optimizer | best lr | final {mname} | final test loss | '
              f'reached target | steps to target | s to target | train s '
              f'(all steps) |' + (' lrs run |' if issue15 else ''),
              '|---|---|---|---|---|---|---|---|' + ('---|' if issue15
                                                     else '')]
    best_curves = {}
    for o in OPTS:
      r = t['opt'].get(o)
      if r is None:
        continue
      if 'error' in r:
        lines.append(f'| {LABEL[o]} | {_err(r)} | | | | | | |')
        grid_lines.append(f'| {tname} | {LABEL[o]} | – | {_err(r)} | | | |')
        continue
      if 'skipped' in r:
        lines.append(f'| {LABEL[o]} | {r["skipped"]} | | | | | | |')
        grid_lines.append(f'| {tname} | {LABEL[o]} | – | {r["skipped"]} | '
                          '| | |')
        continue
      scored = []
      for lr, curves in r['runs'].items():
        ok = [c for c in curves if 'error' not in c]
        finals = [_final(c, metric) for c in curves]
        losses = [c['loss'][-1] if 'error' not in c and c['loss']
                  else float('nan') for c in curves]
        hits = [c['hit'] for c in ok if c['hit'][0] is not None]
        secs = [c['time'][-1] for c in ok if c['time']]
        errs = [c['error'] for c in curves if 'error' in c]
        scored.append((_score(finals, metric), lr, curves, finals, losses,
                       hits, secs, errs))
        grid_lines.append(
            f'| {tname} | {LABEL[o]} | {lr} | {_pm(finals)} | '
            f'{_pm(losses)} | {len(hits)}/{len(curves)} | '
            f'{np.mean(secs) if secs else float("nan"):.1f} |' +
            (f' errors: `{errs[0]}`' if errs else ''))
      scored.sort(key=lambda s: s[0], reverse=True)
      _, lr, curves, finals, losses, hits, secs, _ = scored[0]
      best_curves[o] = (lr, [c for c in curves if 'error' not in c])
      steps_hit = (f'{np.mean([h[0] for h in hits]):.0f}' if hits else '–')
      time_hit = (f'{np.mean([h[1] for h in hits]):.2f}' if hits else '–')
      grid_cell = ''
      if issue15:
        lrs = sorted(float(x) for x in r['runs'])
        edge = len(lrs) > 1 and float(lr) in (lrs[0], lrs[-1])
        grid_cell = (' ' + ', '.join(f'{x:g}' for x in lrs) +
                     (' **edge**' if edge else '') + ' |')
      lines.append(f'| {LABEL[o]} | {lr} | {_pm(finals)} | {_pm(losses)} | '
                   f'{len(hits)}/{len(curves)} | {steps_hit} | {time_hit} | '
                   f'{np.mean(secs) if secs else float("nan"):.1f} |'
                   + grid_cell)
      best_final = np.mean(finals)
      summary_key = f'{tname} {LABEL[o]}'
      summary.append(f'{summary_key}: {mname} {_pm(finals)} (lr {lr})'
                     if o in ('mac', 'sgd', 'adamw', 'kfac', 'muon') else '')
      del best_final
    lines.append('')
    hits = {}
    if issue15:
      _, hits = _to_target(t, best_curves, lines)
    if plt and best_curves:
      fname = f'{plot_prefix}{tname.replace("-", "_").lower()}.png'
      fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
      for o, (lr, curves) in best_curves.items():
        if not curves:
          continue
        n = min(len(c['step']) for c in curves)
        if n == 0:
          continue
        ys = np.array([c['loss'][:n] for c in curves], float)
        ts = np.array([c['time'][:n] for c in curves], float).mean(0)
        st = np.array(curves[0]['step'][:n])
        mean, std = ys.mean(0), ys.std(0)
        for ax, x in ((axes[0], st), (axes[1], ts)):
          ax.plot(x, mean, color=COLORS[o], label=f'{LABEL[o]} (lr {lr})')
          ax.fill_between(x, mean - std, mean + std, color=COLORS[o],
                          alpha=0.2)
        if o in hits:   # time to target: mean step / seconds, on the curve
          for ax, x, at in ((axes[0], st, hits[o][0]),
                            (axes[1], ts, hits[o][1])):
            ax.plot([at], [np.interp(at, x, mean)], marker='*', ms=11,
                    color=COLORS[o], markeredgecolor='black', ls='none')
      axes[0].set_xlabel('step')
      axes[1].set_xlabel('training wall-clock (s)')
      for ax in axes:
        ax.set_ylabel('test loss')
        ax.set_yscale('log')
        ax.grid(alpha=0.3)
      axes[0].legend(fontsize=8)
      fig.suptitle(f'{tname}: test loss, best lr, mean ± std over seeds' +
                   ('; ★ = time to target' if hits else ''))
      fig.tight_layout()
      fig.savefig(os.path.join(outdir, fname), dpi=80)
      plt.close(fig)
      lines += [f'![{tname}]({fname})', '']
  appendix += [('## Appendix: the whole learning-rate grid' if not issue15
                else f'## Appendix: the whole learning-rate grid of '
                f'{title.lstrip("# ")}'), ''] + grid_lines


def write(out: dict, outdir: str):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except Exception:  # pylint: disable=broad-except
    plt = None
  lines, appendix = [], []
  summaries = {k: [] for k in ('speed', 'memory', 'scaling', 'capture',
                               'converge')}
  _speed(out, lines, summaries['speed'])
  _memory(out, lines, summaries['memory'])
  _scaling(out, lines, summaries['scaling'], outdir, plt)
  _capture(out, lines, summaries['capture'])
  summaries['other environments'] = []
  converged = []
  _other_envs(outdir, lines, summaries['other environments'], converged,
              plt)
  _converge(out, lines, summaries['converge'], outdir, plt, appendix)
  for tag, other in converged:
    summaries[f'converge ({tag})'] = []
    _converge(other, lines, summaries[f'converge ({tag})'], outdir, plt,
              appendix, plot_prefix=f'converge_{tag}_', issue15=True,
              title=f'## 5b. Convergence with Muon and compositions '
              f'(`{tag}` run)')

  runs = out.get('machine_runs', {})
  first = next(iter(runs.values()), {})
  v = first.get('versions', {})
  head = ['# Benchmarks: MAC vs SGD-momentum, AdamW and kfac-jax', '',
          '_Generated by `benchmarks/run.py'
          + (' --quick' if out.get('quick') else '') +
          '`; do not edit by hand (commentary lives in '
          '`benchmarks/notes.md`)._', '']
  if out.get('quick'):
    head += ['**This is a `--quick` run: small shapes, one seed, one learning '
             'rate. Not the published numbers.**', '']
  head += ['## Machine', '',
           f'- CPU: {first.get("cpu", "?")}, `nproc` = '
           f'{first.get("nproc", "?")}; JAX devices: '
           f'{", ".join(first.get("devices", []))}. No GPU/TPU was available '
           'to this session (the device tool reported none), so every '
           'number is XLA:CPU.',
           '- Versions: ' + ', '.join(f'{k} {val}' for k, val in v.items()),
           '- Sections (date, seconds, `/proc/loadavg` at start → end):']
  for name, r in runs.items():
    head.append(f'  - {name}: {r.get("date")}, {r.get("seconds", 0):.0f} s, '
                f'load {r.get("load")} → {r.get("load_end")}')
  head += ['', 'Load averages above `nproc` mean that other jobs shared the '
           'cores during that section. Interleaving the optimizers in one '
           'process keeps the *ratios* comparable; absolute milliseconds and '
           'wall-clock times are inflated and noisy under load.', '']
  notes = os.path.join(outdir, 'notes.md')
  if os.path.exists(notes) and not out.get('quick'):  # notes: the full run
    with open(notes) as f:
      head += [f.read().strip(), '']
  head += ['## Summary (generated)', '']
  for k, vals in summaries.items():
    vals = [x for x in vals if x]
    if vals:
      head.append(f'- **{k}**: ' + '; '.join(vals))
  head.append('')
  path = os.path.join(outdir, 'RESULTS.md')
  text = '\n'.join(head + lines + appendix) + '\n'
  # Sections that their own run writes in place (`run.py --only gpt2`,
  # `--only einsum`) are not in results.json: carry them over unchanged.
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      old = f.read()
    for block in re.finditer(r'<!-- ([\w-]+): written by [^\n]*? -->\n.*?'
                             r'<!-- /\1 -->', old, re.S):
      text = text.rstrip('\n') + '\n\n' + block.group(0) + '\n'
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


def interleaved_note(unit: str) -> str:
  """The machine line's ending for ratios of interleaved repeats."""
  return (f'; interleaving keeps the ratios comparable, the {unit} are '
          'inflated by the load.')


def write_in_place(path: str, begin: str, end: str, body: str, machine: dict,
                   load_note: str) -> None:
  """Writes a run's own section into RESULTS.md, replacing an earlier one.

  The section is ``body`` and a machine line between the ``begin``/``end``
  markers; the rest of the file (generated tables, commentary written by
  hand, other such sections) is left as it is. :func:`write` carries these
  sections over when it regenerates the file.
  """
  versions = ', '.join(f'{k} {v}' for k, v in machine['versions'].items()
                       if 'unavailable' not in str(v))
  block = '\n'.join([
      begin, body,
      f"Machine: {machine['cpu']}, {machine['nproc']} cores, "
      f"{machine['date']}; {versions}. The cores were shared: load average "
      f"{machine['load'].split()[0]} at the start, "
      f"{machine.get('load_end', '?').split()[0]} at the end{load_note}",
      end])
  with open(path) as f:
    text = f.read()
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    text = head + block + rest.split(end, 1)[1]
  else:
    text = text.rstrip('\n') + '\n\n' + block + '\n'
  with open(path, 'w') as f:
    f.write(text)
