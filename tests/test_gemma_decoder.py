"""The Gemma-style einsum decoder example: a fast smoke run and the full run."""

import numpy as np
import pytest

from tests.example_scripts import load_example

TINY = ['--dim', '16', '--depth', '1', '--heads', '4', '--kv-heads', '1',
        '--head-dim', '4', '--hidden', '32', '--context', '16', '--batch', '4',
        '--eval-every', '2', '--val-windows', '4', '--no-progress']


def test_gemma_decoder_smoke(capsys, tmp_path):
  rows = load_example('gemma_decoder').main(
      ['--steps', '2', '--only', 'MAC', '--out', str(tmp_path)] + TINY)
  assert [r['optimizer'] for r in rows] == ['MAC']
  assert np.isfinite(rows[0]['val_loss']) and np.isfinite(rows[0]['train_loss'])
  out = capsys.readouterr().out
  # The coverage table: every einsum layer and the tied table preconditioned,
  # the key/value einsum with its two attention column groups.
  assert 'attention_fused' in out and 'embed_attend' in out
  assert 'layer_0/mlp/gating_einsum' in out
  assert (tmp_path / 'gemma_decoder_loss.png').stat().st_size > 0


@pytest.mark.slow
def test_gemma_decoder_full_run(tmp_path):
  rows = load_example('gemma_decoder').main(
      ['--no-progress', '--out', str(tmp_path)])
  assert [r['optimizer'] for r in rows] == ['MAC', 'SGD', 'AdamW']
  for r in rows:
    # Far below the uniform-prediction loss ln(103) ≈ 4.6 after 600 steps.
    assert r['val_loss'] < 3.0, r
