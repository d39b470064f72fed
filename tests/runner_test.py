"""What the shared runner guarantees about a workdir, whatever the family.

Config-changed resumes, one run per workdir, signals during the stop save,
a failed save, damaged logs, unusable workdirs. In-process runs use the
seconds-long `testing.tiny_config` (an MLP on diabetes); faults that kill or
signal a process run in `runner_worker.py`.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest
import pytest

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hnjax import checkpoint
from hnjax import data as data_lib
from hnjax import parallel
from hnjax import runlog
from hnjax.data import paired
from hnjax.train import preemption
from hnjax.train import runner
from hnjax.train import state as state_lib
from hnjax.train import supremix
from hnjax.train import workdir as workdir_lib
from tests import testing

WORKER = os.path.join(os.path.dirname(__file__), 'runner_worker.py')


def _train(workdir, allow_changes=(), **overrides):
  return supremix.train_and_evaluate(testing.tiny_config(**overrides),
                                     workdir, allow_changes=allow_changes)


def _snapshot(workdir):
  """Every file of a workdir with its bytes (what 'nothing written' keeps)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      path = os.path.join(root, f)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, workdir)] = fh.read()
  return out


def _worker(workdir, mode):
  env = dict(testing.launcher_env())
  proc = subprocess.run([sys.executable, WORKER, workdir, mode], env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  result = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')]
  return proc, json.loads(result[-1][6:]) if result else None


class ResumeGuardTest(absltest.TestCase):
  """Case 2: a changed config never silently mixes two runs' states."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = tempfile.mkdtemp()
    cls.ref = _train(os.path.join(cls.base, 'ref'))  # 12 steps, untouched

  def _copy(self):
    workdir = os.path.join(tempfile.mkdtemp(), 'run')
    shutil.copytree(os.path.join(self.base, 'ref'), workdir)
    return workdir

  def test_changed_fields_stop_with_one_line_and_write_nothing(self):
    workdir = self._copy()
    before = _snapshot(workdir)
    with self.assertRaises(workdir_lib.WorkdirError) as cm:
      _train(workdir, seed=1, batch_size=16, method='supcon')
    message = str(cm.exception)
    self.assertNotIn('\n', message)
    for part in ("seed 0 -> 1", "batch_size 32 -> 16",
                 "method 'l1' -> 'supcon'", 'new --workdir',
                 '--allow_changes=batch_size,method,seed'):
      self.assertIn(part, message)
    self.assertEqual(_snapshot(workdir), before)  # config.json untouched

  def test_safe_fields_simply_apply(self):
    workdir = self._copy()
    with self.assertLogs(level='WARNING') as logs:
      summary = _train(workdir, **{'eval.final': 'knn_mae',
                                   'log_every_steps': 5,
                                   'ckpt.max_to_keep': 2,
                                   'data.num_workers': 0})
    self.assertEqual(summary['state_fingerprint'],
                     self.ref['state_fingerprint'])
    self.assertTrue(any('log_every_steps' in l for l in logs.output))
    with open(os.path.join(workdir, runlog.CONFIG_FILE)) as f:
      self.assertEqual(json.load(f)['log_every_steps'], 5)

  def test_allowed_change_resumes_and_shape_change_is_one_line(self):
    workdir = self._copy()
    with self.assertRaisesRegex(workdir_lib.WorkdirError, 'num_steps 12 -> 15'):
      _train(workdir, num_steps=15)
    self.assertEqual(_train(workdir, ('num_steps',), num_steps=15)['step'], 15)
    # Allowed, but the state no longer fits: one line, nothing written.
    before = _snapshot(workdir)
    with self.assertRaises(workdir_lib.WorkdirError) as cm:
      _train(workdir, ('method',), num_steps=15, method='rnc')
    self.assertNotIn('\n', str(cm.exception))
    self.assertIn('could be restored', str(cm.exception))
    self.assertEqual(_snapshot(workdir), before)

  def test_damaged_log_lines_are_skipped_on_resume(self):
    # Case 8: these lines used to block the resume.
    workdir = self._copy()
    path = os.path.join(workdir, runlog.METRICS_FILE)
    with open(path, 'ab') as f:
      f.write(b'\xff\xfe garbage\n{"step": "7", "loss": 1}\n')
    with open(os.path.join(workdir, runlog.HISTOGRAMS_FILE), 'ab') as f:
      f.write(b'{"step": 3, "na\xffme": 1}\n[1, 2]\n')
    self.assertLen(runlog.read_metrics(workdir), 13)  # the reader skips them
    with self.assertLogs(level='WARNING') as logs:
      _train(workdir)
    self.assertTrue(any('damaged' in l for l in logs.output), logs.output)
    steps = [r['step'] for r in runlog.read_metrics(workdir)]
    self.assertEqual(steps, sorted(steps))


class LockTest(absltest.TestCase):
  """Case 3: one run per workdir."""

  def test_second_run_names_the_holder(self):
    workdir = tempfile.mkdtemp()
    with workdir_lib.Lock(workdir):
      with self.assertRaises(workdir_lib.WorkdirError) as cm:
        _train(workdir)
    self.assertIn(f'pid {os.getpid()} on host {socket.gethostname()!r}',
                  str(cm.exception))
    self.assertEqual(os.listdir(workdir), [])  # and the lock is gone

  def test_stale_lock_is_taken_over_with_a_warning(self):
    workdir = tempfile.mkdtemp()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])  # pylint: disable=consider-using-with
    dead.wait()
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE), 'w') as f:
      json.dump(dict(pid=dead.pid, host=socket.gethostname(),
                     started='earlier'), f)
    with self.assertLogs(level='WARNING') as logs:
      self.assertEqual(_train(workdir, num_steps=3)['step'], 3)
    self.assertTrue(any(f'pid {dead.pid}' in l and 'not running' in l
                        for l in logs.output), logs.output)
    self.assertFalse(os.path.exists(os.path.join(workdir,
                                                 workdir_lib.LOCK_FILE)))

  def test_lock_from_another_host_is_not_taken(self):
    workdir = tempfile.mkdtemp()
    path = os.path.join(workdir, workdir_lib.LOCK_FILE)
    with open(path, 'w') as f:
      json.dump(dict(pid=1, host='tpu-vm-7', started='earlier'), f)
    with self.assertRaisesRegex(workdir_lib.WorkdirError,
                                f"'tpu-vm-7'.*delete {path}"):
      _train(workdir)


class WorkdirTest(absltest.TestCase):
  """Case 9: unusable workdirs are one line, with nothing written."""

  def test_file_and_unwritable(self):
    f = tempfile.mkstemp()[1]
    with self.assertRaisesRegex(workdir_lib.WorkdirError, 'is a file'):
      _train(f)
    with self.assertRaisesRegex(workdir_lib.WorkdirError, 'cannot be created'):
      _train(os.path.join(f, 'sub'))
    # Root may write anywhere, so fake what a read-only mount says.
    denied = OSError(errno.EROFS, 'Read-only file system')
    workdir = os.path.join(tempfile.mkdtemp(), 'new')
    with mock.patch.object(tempfile, 'TemporaryFile', side_effect=denied):
      with self.assertRaisesRegex(workdir_lib.WorkdirError,
                                  'is not writable: Read-only file system'):
        _train(workdir)
    self.assertFalse(os.path.exists(workdir))


_TINY = ['--config=configs/supremix.py:smoke,method=l1,data=diabetes',
         '--config.eval.baselines=False', '--config.eval.final=knn_mae',
         '--config.ckpt.every_steps=5']


def _one_line_error(test, code, err):
  test.assertEqual(code, 2, err[-3000:])
  lines = [l for l in err.splitlines() if l.strip()]
  test.assertLen(lines, 1, err[-3000:])
  test.assertTrue(lines[0].startswith('hnjax: error: '), lines[0])
  return lines[0]


@pytest.mark.slow
class LauncherTest(absltest.TestCase):
  """The launchers print these as one line and exit 2."""

  def test_two_runs_on_one_workdir(self):
    # Case 3: the second run used to interleave metrics.jsonl with the
    # first, crash in Orbax's temporary directory or hang.
    workdir = tempfile.mkdtemp()
    first = testing.launch('launch.supremix', workdir, *_TINY,
                           '--config.num_steps=120', wait=False)
    lock = os.path.join(workdir, workdir_lib.LOCK_FILE)
    metrics = os.path.join(workdir, runlog.METRICS_FILE)
    deadline = time.time() + 300
    while not (os.path.exists(lock) and os.path.exists(metrics)):
      if first.poll() is not None:
        self.fail(first.communicate()[1][-3000:])
      self.assertLess(time.time(), deadline)
      time.sleep(0.2)
    first.send_signal(signal.SIGSTOP)  # alive, holding the lock, for now
    code, out, err = testing.launch('launch.supremix', workdir, *_TINY,
                                    '--config.num_steps=120')
    line = _one_line_error(self, code, err)
    self.assertIn(f'in use by another run (pid {first.pid} on host', line)
    self.assertNotIn('state_fingerprint', out)
    # kill -9 leaves the lock file: the next run takes it over.
    first.kill()
    first.communicate()
    code, out, err = testing.launch('launch.supremix', workdir, *_TINY,
                                    '--config.num_steps=120')
    self.assertEqual(code, 0, err[-3000:])
    self.assertIn(f'taking over the lock of pid {first.pid}', err)
    self.assertEqual(testing.summary(out)['step'], '120')
    self.assertFalse(os.path.exists(lock))

  def test_user_mistakes(self):
    root = tempfile.mkdtemp()
    afile = os.path.join(root, 'afile')
    open(afile, 'w').close()  # pylint: disable=consider-using-with
    done = os.path.join(root, 'done')
    code, _, err = testing.launch('launch.supremix', done, *_TINY,
                                  '--config.num_steps=5')
    self.assertEqual(code, 0, err[-3000:])
    before = _snapshot(done)
    for workdir, args, expected in [
        (os.path.join(root, 'new'), ['--config=configs/nope.py'],
         "cannot load the config file: [Errno 2] No such file or directory: "
         "'configs/nope.py'"),
        (afile, _TINY, 'is a file, not a directory'),
        (done, _TINY + ['--config.num_steps=5', '--config.seed=3'],
         'seed 0 -> 3'),
    ]:
      code, out, err = testing.launch('launch.supremix', workdir, *args)
      self.assertIn(expected, _one_line_error(self, code, err))
      self.assertNotIn('state_fingerprint', out)
    self.assertFalse(os.path.exists(os.path.join(root, 'new')))
    self.assertEqual(_snapshot(done), before)
    code, out, err = testing.launch(
        'launch.supremix', done, *_TINY, '--config.num_steps=5',
        '--config.seed=3', '--allow_changes=seed')
    self.assertEqual(code, 0, err[-3000:])


@pytest.mark.slow
class ProcessTest(absltest.TestCase):
  """Faults that need their own process."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    proc, cls.ref = _worker(tempfile.mkdtemp(), 'plain')
    assert proc.returncode == 0, proc.stderr[-3000:]

  def test_second_sigterm_during_the_stop_save_is_only_logged(self):
    # Case 4: the second SIGTERM used to kill the run (exit -15) and lose
    # the stop checkpoint.
    workdir = tempfile.mkdtemp()
    proc, summary = _worker(workdir, 'sigterm_during_save')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertTrue(summary['interrupted'])
    self.assertEqual(proc.stderr.count('while writing the stop checkpoint'),
                     2)
    with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')) as c:
      self.assertEqual(c.latest_step(), summary['step'])
    proc, resumed = _worker(workdir, 'plain')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(resumed['state_fingerprint'],
                     self.ref['state_fingerprint'])

  def test_failed_save_stops_naming_step_and_error(self):
    # Case 7: a full disk used to end in 500 lines and a misleading
    # ImportError.
    workdir = tempfile.mkdtemp()
    proc, _ = _worker(workdir, 'disk_full')
    self.assertEqual(proc.returncode, 1)
    self.assertIn('SaveError: the checkpoint of step 6 could not be written to'
                  f' {workdir}/checkpoints: [Errno 28] No space left on '
                  'device', proc.stderr)
    # It stopped at the next save (step 9) at the latest, and step 3 is
    # intact.
    self.assertLessEqual(
        max(r['step'] for r in runlog.read_metrics(workdir)), 9)
    proc, resumed = _worker(workdir, 'plain')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(resumed['state_fingerprint'],
                     self.ref['state_fingerprint'])


if __name__ == '__main__':
  absltest.main()



@flax.struct.dataclass
class _CountState:
  step: jax.Array
  total: jax.Array  # the sum of every value read so far
  table: jax.Array  # what the source reads: row i -> table[i]


class RefreshTest(absltest.TestCase):
  """`Pieces.refresh`: before the first step and every N steps; the batches
  after it read the refreshed state; a resumed run reads the same."""

  N = 40  # rows; batches of 8: 5 steps per epoch

  def _family(self, calls):
    def refresh(state):
      calls.append(int(state.step))
      # A table that depends on the state, as mined negatives do.
      return state.replace(table=jnp.arange(self.N) * 100 + state.step)

    def step(state, batch):
      return state.replace(step=state.step + 1,
                           total=state.total + jnp.sum(batch['x'])), {
                               'loss': jnp.float32(0.0)}

    def build(setup):
      def init():
        zero = jnp.zeros((), jnp.int32)
        return _CountState(step=zero, total=zero,
                           table=jnp.zeros((self.N,), jnp.int32))
      return runner.Pieces(
          init_state=lambda: state_lib.create(init, setup.mesh),
          step=lambda variant: step,
          evaluate=lambda state, final, plot_dir: {
              'total': int(parallel.to_host(state.total))},
          learning_rate=lambda s: 0.0, refresh=refresh, refresh_every=3,
          train_data=lambda state: (paired.ArraySource(
              x=parallel.to_host(state.table)), None))

    return runner.Family(
        name='count', validate=lambda config, num_devices: None,
        open_data=lambda config: runner.Data(
            train=paired.ArraySource(x=np.zeros(self.N, np.int32)),
            fields=('x',)), build=build)

  def _expected(self, config):
    total, table = 0, None
    for t in range(config.num_steps):
      if t % 3 == 0:  # refreshed before step t + 1 (t = 0: the fresh run)
        table = np.arange(self.N) * 100 + t
      rows = data_lib.train_rows(t, num_examples=self.N,
                                 global_batch_size=8, seed=config.seed)
      total += int(table[rows].sum())
    return total

  def test_refreshes_and_resumes(self):
    config = testing.tiny_config(batch_size=8, num_steps=10)
    want = self._expected(config)
    calls = []
    out = runner.train_and_evaluate(self._family(calls), config,
                                    os.path.join(tempfile.mkdtemp(), 'a'))
    self.assertEqual(calls, [0, 3, 6, 9])
    self.assertEqual(out['total'], want)
    # Stopped after step 4 (between refreshes) or 6 (just refreshed, saved
    # with the refreshed table), then resumed: the same reads.
    for stop_at in (4, 6):
      calls = []
      workdir = os.path.join(tempfile.mkdtemp(), 'b')
      with mock.patch.object(preemption.PreemptionGuard, 'should_stop',
                             lambda self, step, at=stop_at: step == at):
        out = runner.train_and_evaluate(self._family(calls), config, workdir)
      self.assertTrue(out['interrupted'])
      out = runner.train_and_evaluate(self._family(calls), config, workdir)
      self.assertEqual(out['total'], want, f'stopped at {stop_at}')
      # A resumed run does not refresh before its first step.
      self.assertEqual(calls, [0, 3, 6, 9])
