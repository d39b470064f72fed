"""Turns SIGTERM and Ctrl-C into a "stop after this step" flag.

Cluster schedulers (SLURM, Kubernetes, preemptible TPU VMs) send SIGTERM and
give the job some seconds before SIGKILL; a user presses Ctrl-C. In both cases
the training loop should finish the current step, save a checkpoint and exit,
so that re-running the command resumes exactly.

Example::

  with preemption.PreemptionGuard(sync_every=config.log_every) as guard:
    for step in range(start + 1, total + 1):
      state, metrics = train_step(state, next(batches))
      if guard.should_stop(step):
        ckpt.save(step, state, meta, force=True)
        break

A second Ctrl-C aborts at once (Python's usual ``KeyboardInterrupt``), for
when a step hangs. Repeated SIGTERMs are only logged: schedulers may send
several, and each should not kill the checkpoint being written. Once the loop
calls :meth:`PreemptionGuard.protect` (it is about to write the stop
checkpoint), every further signal, Ctrl-C included, is only logged until the
guard exits; keep the guard entered until the save is on disk.

Multi-process runs: a signal may reach only some processes, yet all must stop
at the same step or the others block in the next collective. Every
``sync_every`` steps, :meth:`PreemptionGuard.should_stop` combines the flags of
all processes (one tiny all-gather); all processes get the same answer. The
all-gather waits for the devices, so choose ``sync_every`` where the host
already waits (the logging interval), and small enough that the scheduler's
grace period covers ``sync_every`` steps plus a save.
"""

from __future__ import annotations

import signal
import threading
import types

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class PreemptionGuard:
  """Context manager: SIGTERM/SIGINT set a flag instead of killing the run.

  The previous handlers are restored on exit. Outside the main thread (where
  Python cannot install signal handlers) it logs a warning and only
  :meth:`request_stop` sets the flag.
  """

  def __init__(
      self,
      *,
      sync_every: int = 10,
      signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
  ):
    """Creates the guard; handlers are installed by ``with``.

    Args:
      sync_every: in multi-process runs, steps between agreements (see the
        module docstring); ignored with one process.
      signals: signals to catch.

    Raises:
      ValueError: if ``sync_every < 1``.
    """
    if sync_every < 1:
      raise ValueError(f'sync_every must be >= 1, got {sync_every}')
    self.sync_every = sync_every
    self._signals = tuple(signals)
    self._old_handlers: dict[int, object] = {}
    self._received: list[int] = []
    self._agreed = False
    self._protected = False

  # -- signal handling

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is not threading.main_thread():
      logging.warning(
          'PreemptionGuard entered outside the main thread: signals are not'
          ' caught.'
      )
      return self
    for sig in self._signals:
      self._old_handlers[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for sig, old in self._old_handlers.items():
      signal.signal(sig, old)
    self._old_handlers.clear()

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    name = signal.Signals(signum).name
    if self._protected:
      logging.warning('Received %s while writing the stop checkpoint; '
                      'exiting once it is written.', name)
      self._received.append(signum)
      return
    if signum == signal.SIGINT and signal.SIGINT in self._received:
      # Second Ctrl-C: behave as if we were not here.
      old = self._old_handlers.get(signum, signal.default_int_handler)
      signal.signal(signum, old)
      if callable(old):
        old(signum, frame)
      elif old == signal.SIG_DFL:
        signal.raise_signal(signum)
      return
    if self._received:
      logging.warning('Received %s; already stopping.', name)
    else:
      logging.warning(
          'Received %s: stopping after this step and saving a checkpoint'
          ' (press Ctrl-C again to abort at once).',
          name,
      )
    self._received.append(signum)

  def protect(self) -> None:
    """From now until exit, signals are only logged (a save is running)."""
    self._protected = True

  def request_stop(self) -> None:
    """Sets the flag as a signal would (e.g. for a wall-clock limit)."""
    self._received.append(0)

  @property
  def stop_requested(self) -> bool:
    """Whether *this* process received a signal or :meth:`request_stop`."""
    return bool(self._received)

  # -- the decision

  def should_stop(self, step: int | None = None) -> bool:
    """Whether the loop should save and exit after ``step``.

    Call it once per step, with the same steps on every process.

    Args:
      step: the step just finished. Required with several processes: on
        multiples of ``sync_every`` the flags of all processes are combined
        (a collective every process must join); between them the answer is
        the last agreed one. With one process it is ignored and the local
        flag is returned at once.

    Returns:
      True once a stop was requested (and, multi-process, agreed).

    Raises:
      ValueError: if ``step`` is None in a multi-process run.
    """
    if jax.process_count() == 1:
      return self.stop_requested
    if step is None:
      raise ValueError('should_stop needs step= in multi-process runs')
    if not self._agreed and step % self.sync_every == 0:
      flags = multihost_utils.process_allgather(
          np.array(self.stop_requested, np.int32)
      )
      self._agreed = bool(np.any(flags))
    return self._agreed
