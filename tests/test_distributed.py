"""pmap, sharded jit, shard_map, FSDP and compiled HLOs, on 8 host devices.

The device count of XLA's host platform is fixed when jax is first imported,
and pytest has imported it by now; so all checks run once, in one
subprocess that sets ``--xla_force_host_platform_device_count=8`` first
(``tests/distributed_checks.py``), and each test below asserts its own result.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
CHECKS = [
    'eight_devices',
    'pmap_matches_single_device',
    'mesh_matches_single_device',
    'mesh_shardings',
    'no_kernel_all_gather',
    'detector_sees_a_kernel_all_gather',
    'einsum_batched_axis_sharded_no_kernel_all_gather',
    'einsum_detector_sees_a_kernel_all_gather',
    'shard_map_matches_jit',
    'fsdp_matches_single_device',
    'fsdp_mac_adds_only_vector_collectives',
    'fsdp_detector_sees_a_dense_preconditioner',
    'explicit_mesh_columns',
    'explicit_mesh_tensor_parallel',
    'explicit_mesh_data_parallel',
    'explicit_mesh_fsdp',
    'explicit_mesh_projection_as_dot',
    'explicit_mesh_multi_steps',
    'explicit_mesh_adds_only_vector_collectives',
]


@pytest.fixture(scope='module')
def results():
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
      [str(HERE.parent)] + env.get('PYTHONPATH', '').split(os.pathsep))
  proc = subprocess.run(
      [sys.executable, str(HERE / 'distributed_checks.py'), *CHECKS],
      capture_output=True, text=True, env=env, timeout=900, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULTS ')]
  if proc.returncode or not lines:
    pytest.fail(f'distributed checks crashed (rc={proc.returncode}):\n'
                f'{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULTS '):])


@pytest.mark.parametrize('name', CHECKS)
def test_multi_device(results, name):
  result = results[name]
  if result.get('skip'):
    pytest.skip(result['skip'])
  assert result['ok'], result['detail']
  print(f"{name}: {result['detail']}")
