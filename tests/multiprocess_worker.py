"""One process of the 2-process test (run by tests/multiprocess_test.py).

Usage: python -m tests.multiprocess_worker PORT PROCESS_ID WORKDIR

Joins a 2-process job over gloo on 127.0.0.1 with 4 CPU devices per process,
restores the queue checkpoint the parent saved on 1 process x 8 devices,
computes the sharded MoCHi + InfoNCE loss and its gradients, enqueues, saves
the queue again, and writes what it computed to WORKDIR/worker.npz.
"""

import os
import sys

os.environ['JAX_NUM_CPU_DEVICES'] = '4'
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'

import jax  # pylint: disable=g-import-not-at-top
from jax.experimental import multihost_utils
import numpy as np

from hnjax import checkpoint
from hnjax import parallel
from tests import multiprocess_common as common


def main(port: str, process_id: str, workdir: str):
  parallel.initialize(f'127.0.0.1:{port}', 2, int(process_id))
  assert jax.process_count() == 2 and jax.device_count() == 8
  mesh = parallel.make_mesh()
  data = common.make_data()
  p = jax.process_index()
  # Each process feeds only its half of the global batch.
  local = {k: v[p * 8:(p + 1) * 8] for k, v in data.items()
           if k in ('q', 'k', 'ids')}
  batch = parallel.global_batch(local, mesh)

  with checkpoint.Checkpointer(os.path.join(workdir, 'ckpt_1x8')) as ckpt:
    _, queue, _ = ckpt.restore(
        checkpoint.abstract_state(common.queue_template(mesh)))
  loss, grads = common.loss_and_grads(mesh, queue, batch)
  queue = common.enqueue(mesh, queue, batch)
  with checkpoint.Checkpointer(os.path.join(workdir, 'ckpt_2x4')) as ckpt:
    ckpt.save(2, queue, {'writer': '2x4'}, force=True)
    ckpt.wait()

  gather = lambda x: np.asarray(multihost_utils.process_allgather(x,
                                                                  tiled=True))
  out = dict(loss=gather(loss), grad_q=gather(grads[0]),
             grad_k=gather(grads[1]), keys=gather(queue.keys),
             ids=gather(queue.ids), ptr=gather(queue.ptr))
  if p == 0:
    np.savez(os.path.join(workdir, 'worker.npz'), **out)
  multihost_utils.sync_global_devices('done')


if __name__ == '__main__':
  main(*sys.argv[1:4])
