"""Data-parallel MAC training over every device, with orbax checkpoints.

A small linen CNN on scikit-learn's 1797 8×8 digits (75/25 split) trained with
``mac_optax.mac_sgd`` under ``jax.jit`` on a one-axis ``jax.sharding.Mesh``
over all devices: each global batch is sharded over the ``'data'`` axis, the
parameters and the optimizer state are replicated. MAC's mean inputs are then
means over the *global* batch with no code for it (``jit`` inserts the
all-reduce), so every device preconditions with the same statistics.

On a CPU-only machine the script asks XLA for 8 host devices
(``--xla_force_host_platform_device_count=8``, set before jax is imported);
on GPUs/TPUs it uses the real devices unchanged.

Checkpoints (params and the whole optimizer state, a plain pytree) are saved
with orbax every ``--save-every`` steps; a run finding a checkpoint in
``--ckpt-dir`` resumes from it and produces bit-identical results to an
uninterrupted run (the batch order is a function of the step).

Run::

    python examples/data_parallel.py                       # 300 steps
    python examples/data_parallel.py --stop-after 150      # "preempted" ...
    python examples/data_parallel.py                       # ... resumes at 150
    python examples/data_parallel.py --fresh               # ignore checkpoints

Several processes (TPU pod, GPU cluster, SLURM): start the same command in
every process with ``--distributed``. It calls ``jax.distributed.initialize``
with ``--coordinator-address`` / ``--num-processes`` / ``--process-id``, each
defaulting to the environment variable ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``; where all three are unset, JAX
detects them itself (SLURM, Cloud TPU, Open MPI, ...). The mesh spans the
devices of every process; each process feeds its own contiguous slice of the
global batch (``jax.make_array_from_process_local_data``), and XLA all-reduces
gradients and MAC's mean inputs across processes. Every process writes its
shards of a checkpoint and reads them back, so ``--ckpt-dir`` must be one
directory that all processes see (a shared file system or a bucket).

Two processes on one machine, two CPU devices each (collectives over gloo),
the way ``tests/test_multiprocess.py`` runs it::

    for i in 0 1; do
      XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
      python examples/data_parallel.py --distributed --process-id $i \
        --num-processes 2 --coordinator-address 127.0.0.1:12345 --fresh &
    done; wait

On a SLURM cluster (one task per host, JAX reads SLURM's variables)::

    srun python examples/data_parallel.py --distributed \
        --ckpt-dir /shared/ckpt
"""

from __future__ import annotations

import os

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS',
                                                                 ''):
  # Only the CPU ("host") platform reads this; GPUs/TPUs are unaffected.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import pathlib
import shutil
import time
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import mac_optax
from mac_optax import linen as mac_linen
from digits_cnn import CNN   # the model of the digits demo
from digits_data import batch_indices
from digits_data import load_data


def make_train_step(model: nn.Module, tx: optax.GradientTransformation):
  """The plain single-device step; ``jit`` partitions it over the mesh."""

  def loss_fn(params, x, y):
    with mac_linen.capture():
      logits, v = model.apply({'params': params}, x,
                              mutable=['intermediates'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, v['intermediates']

  @jax.jit
  def train_step(params, opt_state, x, y):
    (loss, inter), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   intermediates=inter)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def global_batch(sharding: NamedSharding, *arrays: np.ndarray):
  """Each process contributes its contiguous slice of the global batch."""
  out = []
  for array in arrays:
    local = np.split(array, jax.process_count())[jax.process_index()]
    out.append(jax.make_array_from_process_local_data(sharding, local))
  return out


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return None if value is None else int(value)


def initialize_distributed(args: argparse.Namespace) -> None:
  """Joins the other processes; must run before anything touches a device."""
  # CPU processes exchange collectives over gloo (the default from jax 0.10
  # on, not before); accelerators ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=args.coordinator_address,
                             num_processes=args.num_processes,
                             process_id=args.process_id)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch-size', type=int, default=128,
                      help='global batch size (a multiple of the devices)')
  parser.add_argument('--lr', type=float, default=0.1)
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--damping', type=float, default=1.0, help='MAC λ')
  parser.add_argument('--stat-decay', type=float, default=0.95, help='MAC β')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--ckpt-dir', default='/tmp/mac_optax_data_parallel')
  parser.add_argument('--save-every', type=int, default=50)
  parser.add_argument('--stop-after', type=int, default=None,
                      help='stop (as if preempted) after this global step')
  parser.add_argument('--fresh', action='store_true',
                      help='delete existing checkpoints first')
  parser.add_argument('--distributed', action='store_true',
                      help='call jax.distributed.initialize() (multi-process)')
  parser.add_argument(
      '--coordinator-address', default=os.environ.get('JAX_COORDINATOR_ADDRESS'),
      help='host:port of process 0 (default $JAX_COORDINATOR_ADDRESS, else '
      'detected by JAX)')
  parser.add_argument(
      '--num-processes', type=int, default=_env_int('JAX_NUM_PROCESSES'),
      help='default $JAX_NUM_PROCESSES, else detected by JAX')
  parser.add_argument(
      '--process-id', type=int, default=_env_int('JAX_PROCESS_ID'),
      help='default $JAX_PROCESS_ID, else detected by JAX')
  parser.add_argument('--no-progress', action='store_true')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.distributed:
    initialize_distributed(args)
  devices = jax.devices()
  if args.batch_size % len(devices):
    raise ValueError(f'--batch-size {args.batch_size} is not a multiple of '
                     f'the {len(devices)} devices')
  mesh = Mesh(np.array(devices), ('data',))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))

  x_train, x_test, y_train, y_test = load_data(args.seed)
  batches = batch_indices(len(x_train), args.batch_size, args.steps,
                          args.seed)
  model = CNN()
  params = jax.jit(model.init)(jax.random.key(args.seed),
                               x_train[:1])['params']
  plan = mac_linen.plan(model, {'params': params}, x_train[:1])
  tx = mac_optax.mac_sgd(
      optax.cosine_decay_schedule(args.lr, args.steps),
      momentum=args.momentum, damping=args.damping,
      stat_decay=args.stat_decay, plan=plan)
  # Full state in init (from the plan): one compilation, and a template
  # for restoring checkpoints.
  train_state = jax.jit(
      lambda p: {'params': p, 'opt_state': tx.init(p)},
      out_shardings=replicated)(params)

  ckpt_dir = pathlib.Path(args.ckpt_dir).absolute()
  if args.fresh and ckpt_dir.exists() and jax.process_index() == 0:
    shutil.rmtree(ckpt_dir)
  # No process may look for checkpoints before the old ones are gone.
  multihost_utils.sync_global_devices('data_parallel: fresh ckpt dir')
  manager = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  start = manager.latest_step() or 0
  if start:
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        train_state)
    train_state = manager.restore(start, args=ocp.args.StandardRestore(
        abstract))
  stop = min(args.steps, args.stop_after or args.steps)

  print(f'{len(devices)} {devices[0].platform} devices, mesh '
        f'{dict(mesh.shape)}, {jax.process_count()} process(es); global batch '
        f'{args.batch_size}; steps {start} → {stop} of {args.steps}'
        + (f' (resumed from {ckpt_dir}/{start})' if start else ''))
  if jax.process_index() == 0:
    print(plan)
  train_step = make_train_step(model, tx)
  params, opt_state = train_state['params'], train_state['opt_state']
  losses = []
  began = time.perf_counter()
  bar = tqdm(range(start, stop), desc='MAC', dynamic_ncols=True,
             disable=args.no_progress or jax.process_index() != 0)
  for step in bar:
    x, y = global_batch(batch_sharding, x_train[batches[step]],
                        y_train[batches[step]])
    params, opt_state, loss = train_step(params, opt_state, x, y)
    losses.append(loss)
    if (step + 1) % args.save_every == 0 or step + 1 == stop:
      manager.save(step + 1, args=ocp.args.StandardSave(
          {'params': params, 'opt_state': opt_state}))
    if step % 25 == 0:
      bar.set_postfix(loss=f'{float(loss):.4f}')
  manager.wait_until_finished()
  seconds = time.perf_counter() - began

  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(
      params, np.concatenate([x_train, x_test]))
  correct = np.asarray(jnp.argmax(logits, -1)) == np.concatenate(
      [y_train, y_test])
  losses = np.asarray(jax.device_get(losses))
  result = {
      'devices': len(devices),
      'resumed_from': start,
      'steps': stop,
      'train_loss': float(losses[-10:].mean()) if len(losses) else float('nan'),
      'train_acc': float(correct[:len(x_train)].mean()),
      'test_acc': float(correct[len(x_train):].mean()),
      'seconds': seconds,
  }
  print()
  print('| devices | resumed from | step | train loss (last 10) | train acc '
        '| test acc | seconds |')
  print('|---:|---:|---:|---:|---:|---:|---:|')
  print(f"| {result['devices']} | {start} | {stop} | "
        f"{result['train_loss']:.4f} | {result['train_acc']:.4f} | "
        f"{result['test_acc']:.4f} | {seconds:.1f} |")
  result['params'] = params
  return result


if __name__ == '__main__':
  main()
