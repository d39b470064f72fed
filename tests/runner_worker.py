"""A tiny run of the shared runner in its own process, for runner_test.

``python tests/runner_worker.py WORKDIR MODE``; prints ``RESULT<json>`` (the
summary) and exits 0, or exits with the error's class name on stderr.

Modes (faults injected by patching, deterministically):

- ``plain``: no fault;
- ``sigterm_during_save``: SIGTERM arrives right after the checkpoint of
  step 3, and again (twice) while the stop checkpoint is being written;
- ``disk_full``: the checkpoint of step 6 fails as on a full disk.
"""

import errno
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax import checkpoint
from hnjax.train import supremix
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from tests import testing


def _sigterm_during_save():
  save, wait = checkpoint.Checkpointer.save, checkpoint.Checkpointer.wait
  saved = []

  def patched_save(self, step, *args, **kwargs):
    out = save(self, step, *args, **kwargs)
    saved.append(step)
    if len(saved) == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # "preempted" after step 3
    return out

  def patched_wait(self):
    if len(saved) == 2:  # the stop checkpoint is being written
      saved.append('signalled')
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)
    return wait(self)

  checkpoint.Checkpointer.save = patched_save
  checkpoint.Checkpointer.wait = patched_wait


def _disk_full():
  handler = json_checkpoint_handler.JsonCheckpointHandler
  original = handler._save_fn  # pylint: disable=protected-access

  async def failing(self, x, directory):
    if os.path.basename(os.path.dirname(str(directory))).startswith('6.'):
      raise OSError(errno.ENOSPC, 'No space left on device', str(directory))
    return await original(self, x, directory)

  handler._save_fn = failing  # pylint: disable=protected-access


def main():
  workdir, mode = sys.argv[1:3]
  {'plain': lambda: None, 'sigterm_during_save': _sigterm_during_save,
   'disk_full': _disk_full}[mode]()
  try:
    summary = supremix.train_and_evaluate(testing.tiny_config(), workdir)
  except Exception as e:  # pylint: disable=broad-except
    print(f'{type(e).__name__}: {e}', file=sys.stderr, flush=True)
    os._exit(1)  # as the launchers: not waiting for a failed save's threads
  print('RESULT' + json.dumps(summary), flush=True)


if __name__ == '__main__':
  main()
