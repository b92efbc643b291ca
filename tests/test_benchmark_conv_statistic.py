"""benchmarks/conv_statistic.py: its old-statistic loader and its section."""

import shutil
import subprocess

import numpy as np
import pytest

from benchmarks import conv_statistic
from mac_optax._src import mean_inputs


def test_statistic_from_git_is_swapped_in_and_out():
  head_is_there = shutil.which('git') and not subprocess.run(
      ['git', 'cat-file', '-e', 'HEAD:mac_optax/_src/mean_inputs.py'],
      cwd=conv_statistic.ROOT, capture_output=True, check=False).returncode
  if not head_is_there:
    pytest.skip('no git checkout')
  at_head = conv_statistic.previous_conv_mean_patch('HEAD')
  assert at_head is not mean_inputs.conv_mean_patch
  now = mean_inputs.conv_mean_patch
  x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32)
  kwargs = dict(strides=(1, 2), padding=[(1, 1), (0, 1)],
                input_dilation=(1, 1), kernel_dilation=(1, 1))
  with conv_statistic.conv_mean_patch_as(at_head):
    assert mean_inputs.conv_mean_patch is at_head
    swapped = mean_inputs.conv_mean_patch(x, (3, 2), **kwargs)
  assert mean_inputs.conv_mean_patch is now
  np.testing.assert_allclose(swapped, now(x, (3, 2), **kwargs), rtol=1e-6)


def _timing(ms):
  return dict(min=ms / 1e3, median=ms / 1e3)


def _result(now_ms):
  return dict(
      quick=False, before='abc1234', jax='x', platform='cpu',
      repeats=dict(statistic=(3, 2), resnet=(5, 2)),
      statistic=dict(shape=[128, 32, 32, 64], features=64, blocks=1,
                     timing=dict(conv=_timing(100.0), now=_timing(now_ms),
                                 before=_timing(20.0)),
                     error=dict(now=1e-7, before=2e-7)),
      resnet=dict(desc='ResNet d', compile_s=dict(sgd=1, mac=2, mac_before=2),
                  timing=dict(sgd=_timing(10.0), mac=_timing(10.5),
                              mac_before=_timing(11.0))),
      machine=dict(versions={'jax': 'x', 'kfac_jax': 'unavailable (E)'},
                   cpu='c', nproc='2', date='d', load='1 2 3',
                   load_end='4 5'))


def test_section_is_written_in_place(tmp_path):
  path = tmp_path / 'RESULTS.md'
  path.write_text('# head\n\nbefore\n')
  conv_statistic.write_section(str(path), _result(5.0))
  path.write_text(path.read_text() + '\nafter\n')
  conv_statistic.write_section(str(path), _result(4.0))
  text = path.read_text()
  assert text.count(conv_statistic.BEGIN) == 1
  assert text.startswith('# head\n\nbefore\n') and text.endswith('after\n')
  # The second run's numbers replaced the first's.
  assert '| mean patch, now | 4.00 / 4.00 | 0.040 / 0.040 | 1.0e-07 |' in text
  assert 'Before / now: 5.000 / 5.000' in text
  assert '| MAC, now | 10.50 / 10.50 | 1.050 / 1.050 | 2.0 |' in text
  assert '0.050 / 0.050' not in text
  assert 'min / median of 5 interleaved repeats of 2 calls:' in text
  assert 'unavailable' not in text
