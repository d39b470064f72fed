"""Tests for hnjax.checkpoint."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from hnjax import checkpoint
from tests import testing

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(n):
  return jax.make_mesh((n,), ('data',), devices=jax.devices()[:n])


def _state(mesh, value):
  """A train-state-like pytree of global arrays; `value` varies the contents.

  The queue is 256 x 128 float32 (128 KiB) so that OCDBT stores it in its own
  data files instead of inlining it into the B-tree nodes (small values are
  inlined, which would make "truncate the data files" a no-op).
  """
  repl = NamedSharding(mesh, P())
  queue = np.random.RandomState(value).randn(256, 128).astype(np.float32)
  return {
      'params': {
          'w': jax.device_put(
              np.full((3, 5), value, np.float32).astype(jnp.bfloat16), repl
          ),
      },
      'queue': jax.device_put(queue, NamedSharding(mesh, P('data'))),
      'queue_ptr': jax.jit(lambda: jnp.int32(value % 7), out_shardings=repl)(),
      'rng': jax.jit(lambda: jax.random.key(value), out_shardings=repl)(),
  }


def _assert_state_equal(test, got, want):
  test.assertEqual(jax.tree.structure(got), jax.tree.structure(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    test.assertEqual(g.dtype, w.dtype)
    if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
      g, w = jax.random.key_data(g), jax.random.key_data(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _np_fingerprint(x):
  """NumPy reference of the per-leaf checksum in hnjax.checkpoint."""
  x = np.asarray(x)
  if x.dtype == bool:
    x = x.astype(np.uint8)
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}
  words = x.view(unsigned[x.dtype.itemsize]).astype(np.uint64)
  idx = np.arange(words.size, dtype=np.uint64)
  return int(np.sum(words.ravel() * (2 * idx + 1) % 2**32) % 2**32)


# Ways a committed checkpoint gets damaged (disk full, a bad copy, bit rot).


def _data_files(step_dir):
  files = glob.glob(f'{step_dir}/state/ocdbt.process_0/d/*')
  assert files, f'no data files under {step_dir}'
  return files


def _truncate_data(step_dir):
  for f in _data_files(step_dir):
    os.truncate(f, os.path.getsize(f) // 2)


def _flip_byte(step_dir):
  # Orbax restores this without an error, as wrong numbers.
  f = max(_data_files(step_dir), key=os.path.getsize)
  with open(f, 'rb') as fh:
    data = bytearray(fh.read())
  data[len(data) // 2] ^= 0x10
  with open(f, 'wb') as fh:
    fh.write(bytes(data))


def _delete_manifest(step_dir):
  os.remove(f'{step_dir}/state/manifest.ocdbt')


def _delete_state(step_dir):
  shutil.rmtree(f'{step_dir}/state')


def _truncate_meta(step_dir):
  os.truncate(f'{step_dir}/meta/metadata', 5)


class AbstractStateTest(absltest.TestCase):

  def test_keeps_shardings_of_concrete_state(self):
    mesh = _mesh(8)
    state = _state(mesh, 1)
    abstract = checkpoint.abstract_state(state)
    self.assertEqual(abstract['queue'].sharding, state['queue'].sharding)
    self.assertEqual(abstract['queue'].shape, (256, 128))
    self.assertEqual(abstract['rng'].dtype, state['rng'].dtype)

  def test_eval_shape_with_prefix_shardings(self):
    mesh = _mesh(4)
    shapes = jax.eval_shape(lambda: _state(_mesh(8), 0))
    repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    shardings = {'params': repl, 'queue': rows, 'queue_ptr': repl, 'rng': repl}
    abstract = checkpoint.abstract_state(shapes, shardings)
    self.assertEqual(abstract['params']['w'].sharding, repl)
    self.assertEqual(abstract['queue'].sharding, rows)

  def test_missing_sharding_raises(self):
    with self.assertRaisesRegex(ValueError, r"\['a'\]"):
      checkpoint.abstract_state({'a': np.zeros(3)})


class FingerprintTest(parameterized.TestCase):

  @parameterized.parameters(1, 8)
  def test_matches_numpy_and_ignores_sharding(self, n):
    mesh = _mesh(n)
    x = np.random.RandomState(0).randn(16, 6).astype(np.float32)
    tree = {
        'x': jax.device_put(x, NamedSharding(mesh, P('data'))),
        'b': jnp.array([True, False, True]),
        'h': jnp.asarray(x[:2], jnp.bfloat16),
        'k': jax.random.key(3),
    }
    got = checkpoint._fingerprint(tree)  # pylint: disable=protected-access
    self.assertEqual(got["['x']"], [_np_fingerprint(x), 'float32'])
    self.assertEqual(got["['b']"][0], _np_fingerprint([True, False, True]))
    self.assertEqual(got["['h']"][0], _np_fingerprint(np.asarray(tree['h'])))
    self.assertEqual(
        got["['k']"][0], _np_fingerprint(jax.random.key_data(tree['k']))
    )

  def test_detects_swapped_elements(self):
    x = np.arange(8, dtype=np.float32)
    y = x[[1, 0, 2, 3, 4, 5, 6, 7]]
    fp = checkpoint._fingerprint  # pylint: disable=protected-access
    self.assertNotEqual(fp(jnp.asarray(x)), fp(jnp.asarray(y)))


class CheckpointerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.enter_context(tempfile.TemporaryDirectory())
    self.mesh = _mesh(8)

  def _save_steps(self, steps, **kwargs):
    with checkpoint.Checkpointer(self.dir, **kwargs) as ckpt:
      for s in steps:
        self.assertTrue(ckpt.save(s, _state(self.mesh, s), {'step': s}))

  def test_empty_directory_restores_none(self):
    with checkpoint.Checkpointer(self.dir) as ckpt:
      self.assertIsNone(ckpt.latest_step())
      abstract = checkpoint.abstract_state(_state(self.mesh, 0))
      self.assertIsNone(ckpt.restore(abstract))

  def test_read_meta_without_restoring(self):
    self.assertIsNone(checkpoint.read_meta(os.path.join(self.dir, 'none')))
    self.assertIsNone(checkpoint.read_meta(self.dir))
    self._save_steps([2, 4])
    self.assertEqual(checkpoint.read_meta(self.dir), (4, {'step': 4}))
    # An unreadable newest meta falls back, as restore() does.
    with open(os.path.join(self.dir, '4', 'meta', 'metadata'), 'w') as f:
      f.write('{"step": ')
    self.assertEqual(checkpoint.read_meta(self.dir), (2, {'step': 2}))

  def test_round_trip_keeps_values_keys_and_shardings(self):
    state = _state(self.mesh, 3)
    meta = {'data': {'next_index': 96, 'seed': 0}, 'config': {'t': (1, 2)}}
    with checkpoint.Checkpointer(self.dir) as ckpt:
      ckpt.save(3, state, meta)
    with checkpoint.Checkpointer(self.dir) as ckpt:
      self.assertEqual(ckpt.latest_step(), 3)
      step, got, got_meta = ckpt.restore(checkpoint.abstract_state(state))
    self.assertEqual(step, 3)
    _assert_state_equal(self, got, state)
    self.assertEqual(got['queue'].sharding, state['queue'].sharding)
    self.assertEqual(got_meta['data'], meta['data'])
    self.assertEqual(got_meta['config'], {'t': [1, 2]})  # JSON: tuple->list
    # The restored key is a usable typed key.
    self.assertEqual(jax.random.normal(got['rng']).shape, ())

  @parameterized.named_parameters(('4_devices', 4), ('1_device', 1))
  def test_restore_onto_other_device_count(self, n):
    state = _state(self.mesh, 5)
    with checkpoint.Checkpointer(self.dir) as ckpt:
      ckpt.save(5, state)
    mesh = _mesh(n)
    shapes = jax.eval_shape(lambda: state)
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), shapes)
    shardings['queue'] = NamedSharding(mesh, P('data'))
    with checkpoint.Checkpointer(self.dir) as ckpt:
      _, got, _ = ckpt.restore(checkpoint.abstract_state(shapes, shardings))
    _assert_state_equal(self, got, state)
    self.assertEqual(got['queue'].sharding, shardings['queue'])
    self.assertLen(got['queue'].sharding.device_set, n)
    self.assertEqual(
        got['queue'].addressable_shards[0].data.shape, (256 // n, 128)
    )

  def test_restore_may_cast_dtype(self):
    state = {'w': jnp.arange(4.0)}
    with checkpoint.Checkpointer(self.dir) as ckpt:
      ckpt.save(1, state)
      abstract = checkpoint.abstract_state(state)
      abstract['w'] = jax.ShapeDtypeStruct(
          (4,), jnp.bfloat16, sharding=abstract['w'].sharding
      )
      _, got, _ = ckpt.restore(abstract)
    self.assertEqual(got['w'].dtype, jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(got['w'], np.float32), np.arange(4.0)
    )

  def test_keeps_only_the_newest(self):
    self._save_steps([1, 2, 3, 4, 5], max_to_keep=2)
    self.assertEqual(sorted(os.listdir(self.dir)), ['4', '5'])

  def test_interval_and_force(self):
    with checkpoint.Checkpointer(self.dir, save_interval_steps=10) as ckpt:
      state = _state(self.mesh, 0)
      self.assertFalse(ckpt.save(5, state))
      self.assertTrue(ckpt.save(10, state))
      self.assertTrue(ckpt.save(13, state, force=True))
      self.assertFalse(ckpt.save(13, state, force=True))  # Already saved.
      ckpt.wait()
      self.assertEqual(ckpt.all_steps(), [10, 13])

  def test_state_may_be_donated_after_save_returns(self):
    state = _state(self.mesh, 2)
    want = jax.tree.map(np.asarray, {'q': state['queue']})
    with checkpoint.Checkpointer(self.dir) as ckpt:
      ckpt.save(2, state)
      state['queue'].delete()  # What donation to the next step does.
      ckpt.wait()
      _, got, _ = ckpt.restore(checkpoint.abstract_state(_state(self.mesh, 0)))
    np.testing.assert_array_equal(np.asarray(got['queue']), want['q'])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, 'max_to_keep'):
      checkpoint.Checkpointer(self.dir, max_to_keep=0)
    with checkpoint.Checkpointer(self.dir) as ckpt:
      with self.assertRaisesRegex(ValueError, 'meta must be JSON'):
        ckpt.save(1, {'x': jnp.ones(2)}, {'bad': object()})
      with self.assertRaisesRegex(ValueError, 'step must be >= 0'):
        ckpt.save(-1, {'x': jnp.ones(2)})
      with self.assertRaises(FileNotFoundError):
        ckpt.restore({'x': jax.ShapeDtypeStruct((2,), jnp.float32)}, step=7)

  @parameterized.named_parameters(
      ('truncated_data', _truncate_data),
      ('deleted_manifest', _delete_manifest),
      ('deleted_state', _delete_state),
      ('truncated_meta', _truncate_meta),
      ('flipped_byte', _flip_byte),
  )
  def test_falls_back_when_newest_is_damaged(self, damage):
    self._save_steps([1, 2, 3])
    damage(os.path.join(self.dir, '3'))
    abstract = checkpoint.abstract_state(_state(self.mesh, 0))
    with checkpoint.Checkpointer(self.dir) as ckpt:
      with self.assertLogs('absl', level='WARNING') as logs:
        step, got, meta = ckpt.restore(abstract)
      self.assertEqual(step, 2)
      self.assertEqual(meta, {'step': 2})
      _assert_state_equal(self, got, _state(self.mesh, 2))
      self.assertTrue(
          any('at step 3' in line for line in logs.output), logs.output
      )
      # The damaged step is moved aside, so the resumed run can save it again.
      self.assertEqual(ckpt.all_steps(), [1, 2])
      self.assertLen(glob.glob(f'{self.dir}/3.corrupt-*'), 1)
      self.assertTrue(ckpt.save(3, _state(self.mesh, 30)))
      ckpt.wait()
      step, got, _ = ckpt.restore(abstract)
    self.assertEqual(step, 3)
    _assert_state_equal(self, got, _state(self.mesh, 30))

  def test_all_damaged_raises_and_moves_nothing(self):
    self._save_steps([1, 2])
    for s in (1, 2):
      _truncate_data(os.path.join(self.dir, str(s)))
    with checkpoint.Checkpointer(self.dir) as ckpt:
      with self.assertRaisesRegex(RuntimeError, 'step 2: .*step 1: '):
        ckpt.restore(checkpoint.abstract_state(_state(self.mesh, 0)))
    self.assertEqual(sorted(os.listdir(self.dir)), ['1', '2'])

  def test_wrong_abstract_structure_raises(self):
    self._save_steps([1])
    abstract = checkpoint.abstract_state(_state(self.mesh, 0))
    del abstract['queue_ptr']
    with checkpoint.Checkpointer(self.dir) as ckpt:
      with self.assertRaisesRegex(RuntimeError, 'tree structures do not'):
        ckpt.restore(abstract)
    self.assertEqual(sorted(os.listdir(self.dir)), ['1'])

  def test_killed_save_is_never_restored(self):
    # A child process saves step 1, starts an asynchronous save of step 2 and
    # is SIGKILLed while the files are being written.
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {_REPO!r})
        import jax, numpy as np
        from hnjax import checkpoint
        ckpt = checkpoint.Checkpointer({self.dir!r})
        ckpt.save(1, {{'w': jax.numpy.ones((4, 4))}}, {{'step': 1}})
        ckpt.wait()
        big = np.full((4096, 4096), 2.0, np.float32)  # 64 MiB: slow to write.
        ckpt.save(2, {{'w': jax.numpy.asarray(big)}}, {{'step': 2}})
        os.kill(os.getpid(), signal.SIGKILL)
    """
    )
    env = dict(os.environ, JAX_NUM_CPU_DEVICES='1', XLA_FLAGS='')
    proc = subprocess.run(
        [sys.executable, '-c', script],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr[-2000:])
    # Precondition: the kill really interrupted the write.
    self.assertEqual(
        sorted(os.listdir(self.dir)), ['1', '2.orbax-checkpoint-tmp']
    )
    with checkpoint.Checkpointer(self.dir) as ckpt:
      self.assertEqual(ckpt.latest_step(), 1)
      abstract = {
          'w': jax.ShapeDtypeStruct(
              (4, 4), jnp.float32, sharding=NamedSharding(self.mesh, P())
          )
      }
      step, got, meta = ckpt.restore(abstract)
      self.assertEqual((step, meta), (1, {'step': 1}))
      np.testing.assert_array_equal(np.asarray(got['w']), np.ones((4, 4)))
      self.assertTrue(ckpt.save(2, got))
      ckpt.wait()
    # The leftover temporary directory was cleaned up.
    self.assertEqual(sorted(os.listdir(self.dir)), ['1', '2'])


_WORKER = """
import os, sys
pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, {repo!r})
import jax
jax.distributed.initialize(f'127.0.0.1:{{port}}', 2, pid)
import glob, json
import jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from hnjax import checkpoint

mesh = jax.make_mesh((4,), ('data',))  # 2 processes x 2 devices.
repl = NamedSharding(mesh, P())

def state(v):
  queue = np.random.RandomState(v).randn(256, 128).astype(np.float32)
  local = queue[pid * 128:(pid + 1) * 128]  # This process's rows.
  return {{
      'queue': jax.make_array_from_process_local_data(
          NamedSharding(mesh, P('data')), local),
      'rng': jax.jit(lambda: jax.random.key(v), out_shardings=repl)(),
      'step': jax.make_array_from_process_local_data(repl, np.int32(v)),
  }}

out = {{}}
ckpt = checkpoint.Checkpointer(directory)
for s in (1, 2):
  ckpt.save(s, state(s), {{'step': s}})
ckpt.wait()
try:
  ckpt.save(3, {{'x': jnp.ones(3)}})  # Process-local leaf.
except ValueError as e:
  out['local_leaf_error'] = 'not a global jax.Array' in str(e)
if pid == 0:  # Damage step 2 (shared file system).
  for f in glob.glob(directory + '/2/state/ocdbt.process_*/d/*'):
    os.truncate(f, os.path.getsize(f) // 2)
multihost_utils.sync_global_devices('damaged')
# Restore replicated over only 2 of the 4 devices (one per process).
sub = jax.make_mesh((2,), ('data',), devices=jax.devices()[::2])
shapes = jax.eval_shape(lambda: state(0))
step, got, meta = ckpt.restore(
    checkpoint.abstract_state(shapes, NamedSharding(sub, P())))
ckpt.close()
out.update(step=step, meta=meta,
           queue_sum=float(np.asarray(got['queue']).sum()),
           n_devices=len(got['queue'].sharding.device_set))
print('RESULT' + json.dumps(out))
"""


@pytest.mark.slow
class MultiProcessTest(absltest.TestCase):

  def test_two_processes_save_restore_and_fall_back(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    script = os.path.join(directory, 'worker.py')
    with open(script, 'w') as f:
      f.write(_WORKER.format(repo=_REPO))
    directory = os.path.join(directory, 'ckpt')
    port = str(testing.free_port())
    env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', XLA_FLAGS='')
    results = testing.run_workers(
        script, [[str(i), port, directory] for i in range(2)], env,
        timeout=180)
    want_sum = float(
        np.random.RandomState(1).randn(256, 128).astype(np.float32).sum()
    )
    for r in results:
      self.assertTrue(r['local_leaf_error'])
      self.assertEqual((r['step'], r['meta']), (1, {'step': 1}))
      self.assertAlmostEqual(r['queue_sum'], want_sum, places=2)
      self.assertEqual(r['n_devices'], 2)
    self.assertLen(glob.glob(f'{directory}/2.corrupt-*'), 1)


if __name__ == '__main__':
  absltest.main()
