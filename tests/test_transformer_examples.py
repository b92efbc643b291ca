"""Smoke tests of the transformer examples (a few steps each, slow)."""

import numpy as np
import pytest

from tests.example_scripts import load_example


@pytest.mark.slow
def test_vit_digits_runs(tmp_path, capsys):
  rows = load_example('vit_digits').main([
      '--epochs', '1', '--seeds', '1', '--no-progress', '--out',
      str(tmp_path)])
  assert [r['optimizer'] for r in rows] == ['MAC', 'AdamW', 'SGD']
  for r in rows:
    assert np.isfinite(r['train_loss']) and 0.0 <= r['test_acc'] <= 1.0
  assert (tmp_path / 'vit_digits_loss.png').stat().st_size > 0
  assert 'test acc' in capsys.readouterr().out


@pytest.mark.slow
def test_char_gpt_runs(tmp_path, capsys):
  rows = load_example('char_gpt').main([
      '--steps', '5', '--eval-every', '5', '--val-windows', '8',
      '--sample-length', '8', '--no-progress', '--out', str(tmp_path)])
  assert [r['optimizer'] for r in rows] == ['MAC', 'MAC + lookup', 'SGD',
                                            'AdamW']
  for r in rows:
    assert np.isfinite(r['train_loss']) and np.isfinite(r['val_loss'])
  assert (tmp_path / 'char_gpt_loss.png').stat().st_size > 0
  out = capsys.readouterr().out
  assert 'val loss' in out and '--- sample (MAC + lookup) ---' in out
