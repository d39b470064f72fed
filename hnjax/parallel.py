"""Meshes, global arrays and collectives: one code path from 1 CPU to a pod.

hnjax runs data parallel over one mesh axis, ``'data'``. Model code is
written for the *global* batch under ``jax.jit`` with ``NamedSharding``;
where collectives are the algorithm (the sharded queue, global top-k,
in-batch negatives from all devices) the losses run inside ``jax.shard_map``
over that axis and take ``axis_name='data'``.

Multi-host (TPU pods, multi-node GPU, or several CPU processes): call
`initialize` before any other JAX call, then build the mesh over all
devices; each process feeds its own slice of the global batch through
`global_batch`, and replicated values (keys, scalars) are created as global
arrays by a jitted init with output shardings (`hnjax.train.state.create`),
which multi-process checkpointing requires; `to_host` brings any global
array back to numpy on every process.
"""

import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = 'data'
# Environment variable that turns on jax.distributed.initialize().
DISTRIBUTED_ENV = 'HNJAX_DISTRIBUTED'


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    enabled: bool | None = None,
) -> bool:
  """Joins a multi-process JAX job, when asked to.

  ``jax.distributed.initialize`` must run before any other JAX call and only
  in multi-process runs (never in a single-process Colab). It runs when
  ``enabled`` is True, or when ``enabled`` is None and either the arguments
  are given or the environment variable ``HNJAX_DISTRIBUTED=1`` is set. On
  Cloud TPU and SLURM the arguments are detected automatically; on other
  clusters set ``HNJAX_COORDINATOR`` (``host:port``), ``HNJAX_NUM_PROCESSES``
  and ``HNJAX_PROCESS_ID`` or pass them.

  Args:
    coordinator_address: ``host:port`` of process 0.
    num_processes: total number of processes.
    process_id: this process's index.
    enabled: force on or off; None decides from the arguments and the
      environment.

  Returns:
    Whether ``jax.distributed.initialize`` was called.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get('HNJAX_COORDINATOR')
  if num_processes is None and 'HNJAX_NUM_PROCESSES' in env:
    num_processes = int(env['HNJAX_NUM_PROCESSES'])
  if process_id is None and 'HNJAX_PROCESS_ID' in env:
    process_id = int(env['HNJAX_PROCESS_ID'])
  if enabled is None:
    enabled = (env.get(DISTRIBUTED_ENV, '0') not in ('', '0') or
               coordinator_address is not None)
  if not enabled:
    return False
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info('process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def make_mesh(
    num_devices: int | None = None,
    *,
    axis_name: str = DATA,
    devices: Any = None,
) -> Mesh:
  """A 1-D data-parallel mesh over all (or the first ``num_devices``) devices.

  The axis type is ``Auto``: flax modules written for the global batch then
  propagate shardings without annotations (``jax.make_mesh`` now defaults to
  ``Explicit``, where e.g. ``q @ queue.T`` on two sharded operands is a type
  error). Collectives are written explicitly inside ``shard_map``.

  Args:
    num_devices: how many devices to use (default: all).
    axis_name: the mesh axis name.
    devices: explicit device list (overrides ``num_devices``).

  Returns:
    A ``jax.sharding.Mesh`` with one axis.
  """
  if devices is None:
    devices = jax.devices()
    if num_devices is not None:
      if not 0 < num_devices <= len(devices):
        raise ValueError(f'num_devices={num_devices} but {len(devices)} '
                         f'devices are available')
      devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (axis_name,), axis_types=(AxisType.Auto,))


def data_sharding(mesh: Mesh, axis_name: str = DATA) -> NamedSharding:
  """Sharding of a global batch: leading axis split over ``axis_name``."""
  return NamedSharding(mesh, P(axis_name))


def global_batch(local: Any, mesh: Mesh, axis_name: str = DATA) -> Any:
  """Global arrays from each process's slice of the batch.

  Process ``p`` of ``P`` passes rows ``[p * G / P, (p + 1) * G / P)`` of the
  global batch; on one process that is the whole batch.

  Args:
    local: pytree of numpy arrays with leading dimension ``G / P``.
    mesh: the mesh.
    axis_name: the data axis.

  Returns:
    The same pytree of global ``jax.Array`` of leading dimension ``G``,
    sharded over ``axis_name``.
  """
  sharding = data_sharding(mesh, axis_name)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local)


def to_host(x: Any) -> np.ndarray:
  """The global value of an array as numpy on every process.

  Arrays spread over several processes are all-gathered across hosts (a
  collective every process must join); others are copied to the host.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def gather(x: jax.Array, axis_name: str | None, *,
           gradient: str = 'all') -> jax.Array:
  """All-gathers ``[B, ...]`` rows from every device into ``[G, ...]``.

  Call inside ``jax.shard_map``; with ``axis_name=None`` (one device, no
  mesh) it returns ``x``. How gradients flow back decides whether the loss
  built on the result is exact:

  * ``'all'``: ``all_gather`` is differentiable, its transpose is
    ``psum_scatter``: every device's rows receive the gradient of every
    device's loss. Summing per-device losses then gives exactly the
    single-device gradient (what hnjax's sharded losses use; open_clip's
    ``gather_with_grad``).
  * ``'local'``: other devices' rows are constants, this device's rows keep
    their gradient (open_clip's default without ``gather_with_grad``; the
    gradient misses the terms other devices compute).
  * ``'none'``: everything is stop-gradient (MoCo's key gathering).

  Args:
    x: ``[B, ...]`` local rows.
    axis_name: the mesh axis, or None.
    gradient: ``'all'``, ``'local'`` or ``'none'``.

  Returns:
    ``[G, ...]`` rows of all devices in device order.
  """
  if gradient not in ('all', 'local', 'none'):
    raise ValueError(f"gradient must be 'all', 'local' or 'none', got "
                     f'{gradient!r}')
  if axis_name is None:
    return x
  if gradient == 'all':
    return lax.all_gather(x, axis_name, tiled=True)
  full = lax.all_gather(lax.stop_gradient(x), axis_name, tiled=True)
  if gradient == 'none':
    return full
  b = x.shape[0]
  start = lax.axis_index(axis_name) * b
  return lax.dynamic_update_slice_in_dim(full, x, start, axis=0)


def local_rows(b: int, axis_name: str | None) -> jax.Array:
  """Global row indices ``[B]`` of this device's rows (arange off-mesh)."""
  first = 0 if axis_name is None else lax.axis_index(axis_name) * b
  return first + jnp.arange(b)
