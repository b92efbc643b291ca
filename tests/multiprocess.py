"""Runs a script as several JAX processes on this machine, like a small pod.

JAX's CPU backend runs multi-controller programs on one machine: each process
calls ``jax.distributed.initialize`` with the same coordinator address, owns
its own host devices (``--xla_force_host_platform_device_count``), and the
processes exchange collectives over gloo. That is the code path of a TPU pod or
a GPU cluster: every process sees the global devices, addresses only its own,
and feeds its own slice of the global batch.

:func:`launch` starts the processes on a free localhost port and returns their
output; a process that fails, or a launch that outlives its timeout, raises
:class:`LaunchError` carrying the output of every process (the failing one
first) once all of them are killed, so a test fails and never hangs. The
processes learn their role from environment variables (:func:`initialize`
reads them), as processes under SLURM or a TPU runtime do.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Read by `jax.distributed.initialize` itself (the address) and by
# `initialize` below / `examples/data_parallel.py` (count and id).
COORDINATOR_ENV = 'JAX_COORDINATOR_ADDRESS'
NUM_PROCESSES_ENV = 'JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'JAX_PROCESS_ID'
# Where a worker writes its results: one folder shared by all processes.
OUT_ENV = 'MULTIPROCESS_OUT'

# After one process fails, the others are stuck in a collective or in
# jax.distributed's barriers: give them this long to finish before killing.
GRACE_S = 1.0


class LaunchError(AssertionError):
  """A process failed or the launch timed out; the message has all outputs."""


@dataclasses.dataclass
class Result:
  """What one process printed and returned."""
  process_id: int
  returncode: Optional[int]
  output: str


def free_port() -> int:
  """A TCP port nobody listens on now (the coordinator binds it shortly)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _kill(proc: subprocess.Popen) -> None:
  """Kills the process group this launcher started for `proc`."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.wait()


def launch(argv: Sequence[str], *, num_processes: int = 2,
           devices_per_process: int = 2, timeout_s: float = 120.0,
           out_dir: Optional[os.PathLike] = None,
           env: Optional[dict[str, str]] = None) -> list[Result]:
  """Runs ``python argv...`` as `num_processes` JAX processes; all must pass.

  Args:
    argv: the script and its arguments (``sys.executable`` is prepended).
    num_processes: processes to start, ids ``0 .. num_processes - 1``.
    devices_per_process: CPU devices of each process.
    timeout_s: wall-clock limit for the whole launch.
    out_dir: passed to the processes as ``$MULTIPROCESS_OUT``.
    env: extra environment variables for every process.

  Returns:
    The processes' results, by process id.

  Raises:
    LaunchError: a process exited non-zero, or the launch timed out; the
      message holds the failing process's output first, then the others'.
  """
  address = f'127.0.0.1:{free_port()}'
  base = dict(os.environ)
  base.update(env or {})
  base['JAX_PLATFORMS'] = 'cpu'
  # One thread pool per process would oversubscribe a small machine.
  base['XLA_FLAGS'] = (
      base.get('XLA_FLAGS', '') +
      f' --xla_force_host_platform_device_count={devices_per_process}')
  base['PYTHONPATH'] = os.pathsep.join(
      [str(ROOT)] + [p for p in base.get('PYTHONPATH', '').split(os.pathsep)
                     if p])
  base[COORDINATOR_ENV] = address
  base[NUM_PROCESSES_ENV] = str(num_processes)
  if out_dir is not None:
    base[OUT_ENV] = str(out_dir)

  with tempfile.TemporaryDirectory() as logs:
    procs, files = [], []
    for i in range(num_processes):
      log = open(pathlib.Path(logs) / f'{i}.log', 'w+')  # pylint: disable=consider-using-with
      files.append(log)
      procs.append(subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, *map(str, argv)], cwd=ROOT,
          env={**base, PROCESS_ID_ENV: str(i)}, stdout=log,
          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout_s
    failed, reason = None, None
    try:
      while any(p.poll() is None for p in procs):
        bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if bad and failed is None:
          failed, reason = bad[0], f'exited with {procs[bad[0]].returncode}'
          deadline = min(deadline, time.monotonic() + GRACE_S)
        if time.monotonic() > deadline:
          if failed is None:
            failed = next(i for i, p in enumerate(procs) if p.poll() is None)
            reason = f'timed out after {timeout_s:.0f} s'
          break
        time.sleep(0.05)
      if failed is None:
        bad = [i for i, p in enumerate(procs) if p.returncode != 0]
        if bad:
          failed, reason = bad[0], f'exited with {procs[bad[0]].returncode}'
    finally:
      for proc in procs:
        _kill(proc)
    results = []
    for i, log in enumerate(files):
      log.seek(0)
      results.append(Result(i, procs[i].returncode, log.read()))
      log.close()

  if failed is not None:
    order = [failed] + [i for i in range(num_processes) if i != failed]
    text = '\n'.join(
        f'----- process {i} (rc={results[i].returncode}) -----\n'
        f'{_tail(results[i].output)}' for i in order)
    raise LaunchError(f'process {failed} of {num_processes} {reason} '
                      f'({" ".join(map(str, argv))}):\n{text}')
  return results


def _tail(text: str, chars: int = 6000) -> str:
  return text if len(text) <= chars else '...\n' + text[-chars:]


def initialize() -> None:
  """Joins the launch this process belongs to (call before any jax use)."""
  import jax  # pylint: disable=g-import-not-at-top
  # gloo is the default on recent jax; older releases had no CPU collectives
  # across processes by default.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=os.environ[COORDINATOR_ENV],
      num_processes=int(os.environ[NUM_PROCESSES_ENV]),
      process_id=int(os.environ[PROCESS_ID_ENV]),
      # A dead peer should end the run quickly, not after minutes.
      initialization_timeout=60, heartbeat_timeout_seconds=10,
      shutdown_timeout_seconds=10)
