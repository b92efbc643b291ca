"""The einsum decoder of ``examples/gemma_decoder.py``: its model and section.

``benchmarks/run.py --only einsum`` times, on this model, the jitted forward
pass with and without ``mac_optax.linen.capture()`` and the whole train step
of MAC, SGD-momentum (the same chain without the preconditioner) and AdamW,
interleaved (``run.py``'s timing helpers), and puts the section written by
:func:`write_section` into ``benchmarks/RESULTS.md`` in place.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

import mac_optax
from benchmarks import report

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'examples')
VOCAB = 96   # as the GPT of the step-time section; tokens are synthetic


def config(quick: bool):
  """(model, batch size, context, description) of the timed decoder."""
  sys.path.insert(0, EXAMPLES)
  import gemma_decoder  # pylint: disable=g-import-not-at-top
  if quick:
    return (gemma_decoder.Decoder(VOCAB, dim=32, depth=1, heads=4,
                                  kv_heads=2, head_dim=8, hidden=64), 8, 32,
            'einsum decoder d=32, depth 1, context 32, batch 8')
  # The example's defaults (python3 examples/gemma_decoder.py).
  return (gemma_decoder.Decoder(VOCAB), 32, 64,
          'Gemma-style einsum decoder of `examples/gemma_decoder.py` at its '
          f'defaults: vocab {VOCAB} (synthetic tokens), context 64, d=64, 2 '
          'blocks, 4 query heads and 2 key/value heads of 16, gated MLP 128, '
          'RMSNorm, rotary, tied embedding; batch 32')


def plan_of(model, context: int):
  """MAC's layer plan for ``model`` (einsum statistics need one)."""
  example = jnp.zeros((1, context), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          example)['params']
  return mac_optax.linen.plan(model, {'params': shapes}, example)


LABELS = {'sgd': 'SGD-momentum', 'adamw': 'AdamW', 'mac': 'MAC'}


def markdown(result: dict) -> str:
  """The RESULTS.md section of one run."""
  ms = lambda s: f'{1e3 * s:.2f}'
  # Min and median ratios: under load one lucky repeat can move the min.
  ratio = lambda a, b: (f"{a['min'] / b['min']:.2f} / "
                        f"{a['median'] / b['median']:.2f}")
  fwd, opt = result['forward'], result['step']
  plain, captured = fwd['plain'], fwd['capture']
  lines = [
      '## Einsum decoder: capture overhead and step time', '',
      f"{result['desc']}; {result['params']:,} parameters, "
      f"{100 * result['fraction']:.1f} % of them preconditioned by MAC "
      '(every einsum layer and the tied embedding; the RMSNorm gains are '
      f"updated by SGD-momentum). {result['platform']}, jax "
      f"{result['jax']}; min (and median) of {result['repeats']} interleaved "
      f"repeats of {result['inner']} calls (`benchmarks/run.py --only "
      'einsum`).', '',
      'Forward pass, jitted `model.apply` with and without '
      '`mac_optax.linen.capture()`:', '',
      '| forward | ms (min / median) | / plain (min / median) |',
      '|---|---:|---:|',
      f"| plain | {ms(plain['min'])} / {ms(plain['median'])} | 1.00 / 1.00 |",
      f"| with capture | {ms(captured['min'])} / {ms(captured['median'])} | "
      f'{ratio(captured, plain)} |', '',
      'Whole jitted train step (forward, backward, update; MAC = '
      '`mac_sgd(momentum=0.9)`, SGD-momentum = `optax.sgd(momentum=0.9)`, '
      'the same chain without the preconditioner):', '',
      '| optimizer | step ms (min / median) | / SGD-momentum (min / median) |',
      '|---|---:|---:|']
  for name, e in opt.items():
    if 'error' in e:
      lines.append(f"| {LABELS[name]} | **fails**: `{e['error']}` | |")
      continue
    lines.append(f"| {LABELS[name]} | {ms(e['min'])} / {ms(e['median'])} | "
                 f"{ratio(e, opt['sgd'])} |")
  return '\n'.join(lines + [''])


BEGIN = '<!-- einsum_decoder: written by benchmarks/run.py --only einsum -->'
END = '<!-- /einsum_decoder -->'


def write_section(path: str, result: dict, machine: dict) -> None:
  """Puts the run's section into RESULTS.md, replacing an earlier one.

  The rest of the file is left as it is.
  """
  report.write_in_place(
      path, BEGIN, END, markdown(result), machine,
      report.interleaved_note('milliseconds'))
