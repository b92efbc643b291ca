"""Two JAX processes × two CPU devices: the code path of a pod, on one machine.

The checks run in the processes started by :func:`tests.multiprocess.launch`
(``tests/multiprocess_checks.py``, once for all of them); each test compares
what both processes computed with the same training in this one process.
"""

import pathlib
import re

import jax
import numpy as np
import pytest

from tests import distributed_checks
from tests import multiprocess
from tests import multiprocess_checks
from tests.example_scripts import load_example

HERE = pathlib.Path(__file__).resolve().parent
EXAMPLE = HERE.parent / 'examples' / 'data_parallel.py'
CHECKS = ['data_parallel', 'mesh_2d', 'checkpoint']
PROCESSES = 2


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """``{check: [flat result of process 0, of process 1]}``."""
  out = tmp_path_factory.mktemp('multiprocess')
  multiprocess.launch([HERE / 'multiprocess_checks.py', *CHECKS],
                      num_processes=PROCESSES, out_dir=out, timeout_s=180)
  return {name: [dict(np.load(out / f'{name}.{i}.npz'))
                 for i in range(PROCESSES)] for name in CHECKS}


def _assert_close(got: dict, want: dict, what: str):
  assert got.keys() == want.keys(), (sorted(got), sorted(want))
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=2e-6,
                               err_msg=f'{what}: {key}')


@pytest.fixture(scope='module')
def one_process_mlp():
  run = multiprocess_checks.MlpRun(mesh=None)
  return multiprocess_checks.flat(
      jax.device_get(run.run(0, multiprocess_checks.STEPS)))


def test_data_parallel_across_processes_equals_one_process(results,
                                                           one_process_mlp):
  for i, got in enumerate(results['data_parallel']):
    _assert_close(got, one_process_mlp, f'process {i} vs one process')


def test_processes_hold_identical_replicas(results):
  first, second = results['data_parallel']
  for key, value in first.items():
    np.testing.assert_array_equal(second[key], value, err_msg=key)


def test_model_axis_inside_process_data_axis_across_equals_one_device(
    results):
  want = multiprocess_checks.flat(
      jax.device_get(distributed_checks._single_device()))  # pylint: disable=protected-access
  for i, got in enumerate(results['mesh_2d']):
    _assert_close(got, want, f'process {i} (data=2, model=2) vs one device')


def test_checkpoint_saved_and_restored_by_both_processes_resumes_bit_identically(
    results, one_process_mlp):
  # The worker asserts resumed == uninterrupted bit for bit; the resumed run
  # is also the data-parallel run's result to the bit, and one process's.
  for i, got in enumerate(results['checkpoint']):
    for key, value in results['data_parallel'][i].items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)
    _assert_close(got, one_process_mlp, f'process {i} resumed vs one process')


# --------------------------------------------------------------------------
# The launcher itself: a failure anywhere fails the test, and nothing hangs.

_WORKER = '''
import os, sys, time
if os.environ['JAX_PROCESS_ID'] == '{fails}':
  print('process {fails} breaks down', flush=True)
  sys.exit(3)
time.sleep(600)  # as if waiting forever in a collective
'''


def test_launcher_fails_with_the_failing_process_output_and_kills_the_rest():
  with pytest.raises(multiprocess.LaunchError) as error:
    multiprocess.launch(['-c', _WORKER.format(fails=1)], timeout_s=300)
  message = str(error.value)
  # Reported as process 1's failure (not as a timeout), its output first.
  assert message.startswith('process 1 of 2 exited with 3'), message
  assert message.index('process 1 breaks down') < message.index(
      '----- process 0'), message


def test_launcher_times_out_instead_of_hanging():
  with pytest.raises(multiprocess.LaunchError, match='timed out after 1 s'):
    multiprocess.launch(['-c', _WORKER.format(fails=-1)], timeout_s=1)


# --------------------------------------------------------------------------
# examples/data_parallel.py --distributed, as a cluster would run it.

_ROW = re.compile(r'^\| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) '
                  r'\| ([\d.]+) \|', re.M)


def _run_example(tmp_path, *args):
  outputs = multiprocess.launch(
      [EXAMPLE, '--distributed', '--steps', '4', '--batch-size', '16',
       '--save-every', '2', '--no-progress', '--ckpt-dir', tmp_path, *args],
      num_processes=PROCESSES, timeout_s=180)
  rows = []
  for result in outputs:
    assert '4 cpu devices' in result.output, result.output
    assert f'{PROCESSES} process(es)' in result.output, result.output
    rows.append(_ROW.findall(result.output))
  # Every process reports the same global loss and accuracies.
  assert len(rows[0]) == 1 and rows[0] == rows[1], rows
  return rows[0][0]


def _checkpoints(path):
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


def test_data_parallel_example_trains_and_checkpoints_across_processes(
    tmp_path):
  devices, start, stop, loss, *_ = _run_example(tmp_path)
  assert (devices, start, stop) == ('4', '0', '4')
  assert np.isfinite(float(loss))
  assert _checkpoints(tmp_path) == [2, 4]


@pytest.mark.slow  # a second launch of the example (~15 s on 2 cores)
def test_data_parallel_example_resumes_across_processes(tmp_path):
  devices, start, stop, *_ = _run_example(tmp_path, '--stop-after', '2')
  assert (devices, start, stop) == ('4', '0', '2')
  devices, start, stop, *_ = _run_example(tmp_path)
  assert (devices, start, stop) == ('4', '2', '4')  # restored by both
  assert _checkpoints(tmp_path) == [2, 4]


def test_data_parallel_example_reads_the_cluster_from_flags_or_environment(
    monkeypatch):
  example = load_example('data_parallel')
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '16')
  monkeypatch.setenv('JAX_PROCESS_ID', '5')
  args = example.parse_args(['--distributed'])
  assert (args.coordinator_address, args.num_processes,
          args.process_id) == ('10.0.0.1:1234', 16, 5)
  args = example.parse_args(['--distributed', '--process-id', '7'])
  assert args.process_id == 7
  monkeypatch.delenv('JAX_PROCESS_ID')
  monkeypatch.delenv('JAX_NUM_PROCESSES')
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS')
  args = example.parse_args(['--distributed'])
  # Left to JAX's own detection (SLURM, TPU, ...).
  assert (args.coordinator_address, args.num_processes,
          args.process_id) == (None, None, None)
