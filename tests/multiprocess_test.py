"""2 processes x 4 devices (gloo on 127.0.0.1) == 1 process x 8 devices.

The parent (8 fake devices) saves a queue checkpoint; two worker processes
restore it on their 2 x 4 devices, compute the sharded MoCHi + InfoNCE loss
and gradients, enqueue and save; the parent compares everything with its own
1 x 8 computation and restores the 2 x 4 checkpoint on 8 and on 4 devices.
"""

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np
import pytest

from hnjax import checkpoint
from hnjax import parallel
from hnjax import queue as queue_lib
from tests import multiprocess_common as common
from tests import testing

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
class MultiProcessTest(absltest.TestCase):

  def test_two_processes_equal_one(self):
    workdir = tempfile.mkdtemp()
    mesh = parallel.make_mesh(8)
    data = common.make_data()
    queue = queue_lib.make_enqueue(mesh)(
        common.queue_template(mesh), data['first_keys'], data['first_ids'],
        data['first_ids'])
    with checkpoint.Checkpointer(os.path.join(workdir, 'ckpt_1x8')) as ckpt:
      ckpt.save(1, queue, {'writer': '1x8'}, force=True)
      ckpt.wait()
    batch = parallel.global_batch(
        {k: data[k] for k in ('q', 'k', 'ids')}, mesh)
    loss, grads = common.loss_and_grads(mesh, queue, batch)
    expected = common.enqueue(mesh, queue, batch)

    port = testing.free_port()
    env = dict(os.environ, PYTHONPATH=_ROOT)
    env.pop('JAX_NUM_CPU_DEVICES', None)
    env.pop('XLA_FLAGS', None)
    procs = [
        subprocess.Popen(
            [sys.executable, '-m', 'tests.multiprocess_worker', str(port),
             str(i), workdir], cwd=_ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for p in procs:
      try:
        outputs.append(p.communicate(timeout=400)[0])
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        self.fail('worker timed out')
    for p, out in zip(procs, outputs):
      self.assertEqual(p.returncode, 0, out[-3000:])

    got = np.load(os.path.join(workdir, 'worker.npz'))
    np.testing.assert_allclose(got['loss'], loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got['grad_q'], grads[0], atol=1e-6)
    np.testing.assert_allclose(got['grad_k'], grads[1], atol=1e-6)
    np.testing.assert_array_equal(got['ids'], expected.ids)
    np.testing.assert_allclose(got['keys'], expected.keys, atol=1e-7)
    self.assertEqual(int(np.ravel(got['ptr'])[0]), int(expected.ptr))

    # The 2 x 4 checkpoint restores on 8 devices and on 4.
    for n in (8, 4):
      m = parallel.make_mesh(n)
      with checkpoint.Checkpointer(os.path.join(workdir, 'ckpt_2x4')) as ckpt:
        step, restored, meta = ckpt.restore(
            checkpoint.abstract_state(common.queue_template(m)))
      self.assertEqual((step, meta['writer']), (2, '2x4'))
      self.assertLen(restored.keys.sharding.device_set, n)
      np.testing.assert_array_equal(restored.ids, expected.ids)
      np.testing.assert_array_equal(restored.keys, got['keys'])


if __name__ == '__main__':
  absltest.main()
