"""Multi-process training checks, run by tests/test_multiprocess.py.

Every process of a :func:`tests.multiprocess.launch` runs this script: it joins
the launch, runs the named checks in order and writes, per check, the
gathered global result to ``$MULTIPROCESS_OUT/<check>.<process id>.npz``. The
test compares those files with the same training run in one process. A check
that raises ends the process at once with its traceback, so the launcher
reports it instead of waiting on the peer stuck in the next collective.

The training functions take the placement as an argument and run unchanged in
one process (``mesh=None``), which is how the test computes the reference.

Run by hand (two shells)::

    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 \
    JAX_PROCESS_ID=0 MULTIPROCESS_OUT=/tmp/mp JAX_PLATFORMS=cpu \
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python tests/multiprocess_checks.py data_parallel mesh_2d checkpoint
    # ... and the same with JAX_PROCESS_ID=1
"""

from __future__ import annotations

import os
import pathlib
import sys
import traceback
from typing import Any, Optional

if __name__ == '__main__':
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  from tests import multiprocess  # pylint: disable=g-import-not-at-top
  multiprocess.initialize()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests import distributed_checks
from tests import small_mlp

GLOBAL_BATCH = 16
STEPS = 4


def flat(tree) -> dict[str, np.ndarray]:
  """``{key path: array}`` of a pytree of host arrays."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------
# Placement: the same code for one process and for several.


def put(tree, shardings):
  """Places host arrays, equal on every process, on (global) shardings."""
  def one(leaf, sharding):
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(leaf.shape, sharding,
                                        lambda index: leaf[index])
  return jax.tree_util.tree_map(one, tree, shardings)


def local_batch(sharding: NamedSharding, array: np.ndarray) -> jax.Array:
  """The global batch from this process's contiguous slice of it."""
  local = np.split(array, jax.process_count())[jax.process_index()]
  return jax.make_array_from_process_local_data(sharding, local,
                                                array.shape)


def gather(tree):
  """The global value of every leaf, on every process, as numpy."""
  return jax.tree_util.tree_map(
      np.asarray, multihost_utils.process_allgather(tree, tiled=True))


# --------------------------------------------------------------------------
# Data-parallel MLP (tests/small_mlp.py) and its checkpoint round trip.




def data_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ('data',))


class MlpRun:
  """MAC training of the MLP, data-parallel over `mesh` or on one device."""

  def __init__(self, mesh: Optional[Mesh] = None):
    self.tx, params, self.xs, self.ys = small_mlp.checkpoint_run(
        STEPS, GLOBAL_BATCH)
    self.mesh = mesh
    self.step = small_mlp.train_step(self.tx)
    if mesh is None:
      self.params, self.state = params, self.tx.init(params)
    else:
      replicated = NamedSharding(mesh, P())
      self.params = put(params, jax.tree_util.tree_map(lambda _: replicated,
                                                       params))
      self.state = jax.jit(self.tx.init, out_shardings=replicated)(
          self.params)

  def batch(self, t):
    if self.mesh is None:
      return self.xs[t], self.ys[t]
    sharding = NamedSharding(self.mesh, P('data'))
    return local_batch(sharding, self.xs[t]), local_batch(sharding,
                                                          self.ys[t])

  def run(self, start: int, stop: int):
    for t in range(start, stop):
      self.params, self.state = self.step(self.params, self.state,
                                          *self.batch(t))
    return self.params, self.state


def check_data_parallel(out: pathlib.Path):
  """2 processes × 2 devices, batch split over a global ('data',) mesh."""
  mesh = data_mesh()
  assert mesh.devices.size == 2 * jax.local_device_count() == 4, mesh
  return gather(MlpRun(mesh).run(0, STEPS))


def check_checkpoint(out: pathlib.Path):
  """Both processes save, both restore, and the resumed run is bit-identical.

  Returns the resumed run's result; raises if it differs from the
  uninterrupted run in any bit.
  """
  import orbax.checkpoint as ocp
  straight = gather(MlpRun(data_mesh()).run(0, STEPS))

  run = MlpRun(data_mesh())
  run.run(0, STEPS // 2)
  saved = {'params': run.params, 'opt_state': run.state}
  path = out / 'ckpt'
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, saved)
  checkpointer.wait_until_finished()
  # A fresh run restores into its own (sharded) template.
  run = MlpRun(data_mesh())
  template = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      {'params': run.params, 'opt_state': run.state})
  restored = checkpointer.restore(path, template)
  assert (jax.tree_util.tree_structure(restored)
          == jax.tree_util.tree_structure(saved))
  for (key, a), b in zip(flat(gather(restored)).items(),
                         flat(gather(saved)).values()):
    assert a.dtype == b.dtype and np.array_equal(a, b), f'restored {key}'
  run.params, run.state = restored['params'], restored['opt_state']
  resumed = gather(run.run(STEPS // 2, STEPS))
  for (key, a), b in zip(flat(resumed).items(), flat(straight).values()):
    assert np.array_equal(a, b), f'resumed run differs: {key}'
  return resumed


# --------------------------------------------------------------------------
# A (data, model) mesh: tensor parallelism inside a process, data parallelism
# across processes (tests/distributed_checks.py's conv net and layout).


def model_mesh() -> Mesh:
  """Rows are processes: the 'model' axis never leaves a process."""
  devices = np.array(jax.devices()).reshape(jax.process_count(), -1)
  for row in devices:
    assert len({d.process_index for d in row}) == 1, devices
  return Mesh(devices, ('data', 'model'))


def check_mesh_2d(out: pathlib.Path):
  """The conv net on a (data=2 processes, model=2 devices) mesh."""
  dc = distributed_checks
  x, y = dc._data()  # pylint: disable=protected-access
  params = dc._params(x)  # pylint: disable=protected-access
  tx = dc._optimizer(params, x)  # pylint: disable=protected-access
  mesh = model_mesh()
  shardings = jax.tree_util.tree_map(
      lambda s: NamedSharding(mesh, s), dc.MODEL_SPECS,
      is_leaf=lambda s: isinstance(s, P))
  params = put(params, shardings)
  batch = NamedSharding(mesh, P('data'))
  x, y = local_batch(batch, x), local_batch(batch, y)
  state = jax.jit(tx.init)(params)
  step = jax.jit(dc.train_step(tx))
  for _ in range(dc.STEPS):
    params, state = step(params, state, x, y)
  for leaf, want in zip(jax.tree_util.tree_leaves(params),
                        jax.tree_util.tree_leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), leaf.sharding
  mean = state[0].layers['Dense_1'].mean   # kernel [16, 3] split on d_in
  assert mean.sharding.is_equivalent_to(
      NamedSharding(mesh, P(None, 'model')), mean.ndim), mean.sharding
  return gather((params, state))


CHECKS = {name[len('check_'):]: fn for name, fn in globals().items()
          if name.startswith('check_')}


def main(names):
  out = pathlib.Path(os.environ['MULTIPROCESS_OUT'])
  for name in names:
    try:
      result: Any = CHECKS[name](out)
    except Exception:  # pylint: disable=broad-except
      print(f'check {name} failed in process {jax.process_index()}:',
            flush=True)
      traceback.print_exc()
      sys.stderr.flush()
      # Exit now: a normal exit would first wait in jax.distributed's
      # shutdown barrier for the peer, which is blocked in a collective.
      os._exit(1)  # pylint: disable=protected-access
    np.savez(out / f'{name}.{jax.process_index()}.npz', **flat(result))
    print(f'check {name} done in process {jax.process_index()}', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
