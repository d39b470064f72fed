"""Tests for hnjax.train.preemption."""

import os
import signal
import tempfile
import threading

from absl.testing import absltest
import pytest

from hnjax.train import preemption
from tests import testing

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PreemptionGuardTest(absltest.TestCase):

  def test_sigterm_sets_flag_and_handlers_are_restored(self):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with preemption.PreemptionGuard() as guard:
      self.assertFalse(guard.should_stop(1))
      signal.raise_signal(signal.SIGTERM)
      self.assertTrue(guard.stop_requested)
      self.assertTrue(guard.should_stop(2))
      self.assertTrue(guard.should_stop())
    for s, handler in before.items():
      self.assertIs(signal.getsignal(s), handler)

  def test_first_ctrl_c_is_a_flag_second_aborts(self):
    # Python's own Ctrl-C handler before the guard, whatever earlier tests in
    # this worker process left behind.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    self.addCleanup(signal.signal, signal.SIGINT, old)
    with preemption.PreemptionGuard() as guard:
      signal.raise_signal(signal.SIGINT)  # No KeyboardInterrupt.
      self.assertTrue(guard.should_stop(1))
      with self.assertRaises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)

  def test_protected_save_only_logs_every_signal(self):
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    self.addCleanup(signal.signal, signal.SIGINT, old)
    with preemption.PreemptionGuard() as guard:
      signal.raise_signal(signal.SIGTERM)
      guard.protect()  # the stop checkpoint is being written
      with self.assertLogs(level='WARNING') as logs:
        for s in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
          signal.raise_signal(s)  # no KeyboardInterrupt, no exit
      self.assertLen(logs.output, 3)
      self.assertIn('while writing the stop checkpoint', logs.output[0])
    self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)

  def test_repeated_sigterm_does_not_kill(self):
    calls = []
    old = signal.signal(signal.SIGTERM, lambda *a: calls.append(a))
    try:
      with preemption.PreemptionGuard() as guard:
        for _ in range(3):
          signal.raise_signal(signal.SIGTERM)
        self.assertTrue(guard.should_stop(1))
      self.assertEqual(calls, [])  # The outer handler never ran...
      signal.raise_signal(signal.SIGTERM)
      self.assertLen(calls, 1)  # ...and is back after the guard.
    finally:
      signal.signal(signal.SIGTERM, old)

  def test_request_stop_and_other_thread(self):
    result = {}

    def run():
      with preemption.PreemptionGuard() as guard:
        result['before'] = guard.should_stop(1)
        guard.request_stop()
        result['after'] = guard.should_stop(2)

    with self.assertLogs('absl', 'WARNING'):
      t = threading.Thread(target=run)
      t.start()
      t.join()
    self.assertEqual(result, {'before': False, 'after': True})

  def test_bad_sync_every(self):
    with self.assertRaisesRegex(ValueError, 'sync_every must be >= 1, got 0'):
      preemption.PreemptionGuard(sync_every=0)


_WORKER = """
import json, os, signal, sys
pid, port = int(sys.argv[1]), sys.argv[2]
sys.path.insert(0, {repo!r})
import jax
jax.distributed.initialize(f'127.0.0.1:{{port}}', 2, pid)
from hnjax.train import preemption

stopped_at = None
with preemption.PreemptionGuard(sync_every=4) as guard:
  for step in range(1, 20):
    if pid == 1 and step == 5:
      signal.raise_signal(signal.SIGTERM)  # Only process 1 is preempted.
    if guard.should_stop(step):
      stopped_at = step
      break
print('RESULT' + json.dumps(dict(
    stopped_at=stopped_at, local=guard.stop_requested)))
"""



@pytest.mark.slow
class MultiProcessTest(absltest.TestCase):

  def test_processes_agree_on_the_stop_step(self):
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    script = os.path.join(tmp, 'worker.py')
    with open(script, 'w') as f:
      f.write(_WORKER.format(repo=_REPO))
    port = str(testing.free_port())
    env = dict(os.environ, JAX_NUM_CPU_DEVICES='1', XLA_FLAGS='')
    results = testing.run_workers(
        script, [[str(i), port] for i in range(2)], env, timeout=120)
    # The signal arrived at step 5 on process 1; the next agreement is at 8.
    self.assertEqual(
        results,
        [{'stopped_at': 8, 'local': False}, {'stopped_at': 8, 'local': True}],
    )


if __name__ == '__main__':
  absltest.main()
