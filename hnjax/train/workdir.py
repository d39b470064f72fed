"""A run's claim on its workdir: usable, locked, and resumed only as itself.

Three checks the runner makes before it writes anything:

- `check_usable`: the workdir is a directory (or can be created) and can be
  written;
- `Lock`: one run per workdir. Process 0 holds an ``fcntl`` lock on
  ``workdir/.lock`` for the whole run (the other processes of a multi-host
  run do not lock); a second run stops naming the holder. The lock file
  records ``pid``, ``host`` and start time and is removed on exit; one left
  by a run that died (same host, process gone) is taken over with a warning;
- `check_resume`: the config of the newest checkpoint equals the new one
  except for fields that are safe to change (`SAFE_FIELDS`: evaluation,
  logging and checkpoint intervals, reader workers, the data location) or
  that the user allowed explicitly (``allow``); otherwise one error names
  every changed field with its old and new value.

Every failure is a `WorkdirError` with a one-line message; the launchers
print it and exit with status 2.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile
from typing import Any, Iterable, Mapping

from absl import logging

LOCK_FILE = '.lock'

# Fields whose change cannot alter the state, the data order or the method:
# a resume simply applies them. Dotted prefixes.
SAFE_FIELDS = ('eval', 'log_every_steps', 'hist_every_steps', 'ckpt',
               'data.num_workers', 'data.data_dir', 'init_from',
               'hardness_diagnostics')  # logged statistics only


class WorkdirError(Exception):
  """The workdir cannot be used by this run; the message is one line."""


def check_usable(workdir: str) -> None:
  """Raises WorkdirError unless ``workdir`` is (or can be) a writable dir.

  Creates nothing: a missing workdir is checked through its nearest existing
  parent.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'workdir={workdir!r} is a file, not a directory')
  probe = workdir
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    raise WorkdirError(f'workdir={workdir!r} cannot be created: {probe!r} is '
                       'a file')
  try:  # os.access says yes to root on a read-only mount; really try.
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as e:
    raise WorkdirError(f'workdir={workdir!r} is not writable: '
                       f'{e.strerror or e} ({probe})') from e


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _describe(holder: Mapping[str, Any]) -> str:
  return (f'pid {holder.get("pid")} on host {holder.get("host")!r} (started '
          f'{holder.get("started")})')


class Lock:
  """One run per workdir: an exclusive lock held while the run lives.

  Use as a context manager; ``enabled=False`` (processes other than 0) does
  nothing.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled = enabled
    self._fd = None

  def acquire(self) -> None:
    """Takes the lock, creating the workdir if needed.

    Raises:
      WorkdirError: another live run holds it (named in the message).
    """
    if not self.enabled or self._fd is not None:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    me = dict(pid=os.getpid(), host=socket.gethostname(),
              started=datetime.datetime.now().isoformat(timespec='seconds'))
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = self._read(fd)
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          raise
        raise WorkdirError(
            f'workdir {os.path.dirname(self.path)!r} is in use by another run'
            f' ({_describe(holder)}); wait for it to finish or choose another'
            ' --workdir') from None
      # The holder may have removed the file between our open and flock:
      # then we locked a deleted inode; start again.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    holder = self._read(fd)
    if holder:
      # The file outlived its run (a kill -9, a crash). flock is released
      # when a process dies, so on this host the holder is gone; on another
      # host (a shared file system may not share flock) it may be alive.
      if holder.get('host') != me['host']:
        os.close(fd)
        raise WorkdirError(
            f'workdir {os.path.dirname(self.path)!r} is locked by '
            f'{_describe(holder)}; if that run is no longer running, delete '
            f'{self.path}')
      state = ('still running but not holding the lock'
               if _pid_alive(int(holder.get('pid', -1))) else 'not running')
      logging.warning('taking over the lock of %s in %s: that process is %s',
                      _describe(holder), os.path.dirname(self.path), state)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + '\n').encode(), 0)
    os.fsync(fd)
    self._fd = fd

  @staticmethod
  def _read(fd) -> dict[str, Any]:
    try:
      text = os.pread(fd, 4096, 0).decode('utf-8', 'replace').strip()
      return json.loads(text) if text else {}
    except (OSError, ValueError):
      return {'pid': '?', 'host': '?', 'started': '?'}

  def release(self) -> None:
    """Removes the lock file and releases the lock (idempotent)."""
    if self._fd is None:
      return
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> Lock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (JSON values as leaves)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _covered(field: str, prefixes: Iterable[str]) -> bool:
  return any(field == p or field.startswith(p + '.') for p in prefixes)


_ABSENT = '<absent>'


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]
                   ) -> list[tuple[str, Any, Any]]:
  """``[(field, old, new)]`` for every dotted field that differs, sorted."""
  a, b = flatten(old), flatten(new)
  return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT))
          for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) !=
          b.get(k, _ABSENT)]


def check_resume(saved: Mapping[str, Any] | None, config: Mapping[str, Any],
                 *, workdir: str, step: int, allow: Iterable[str] = ()
                 ) -> list[tuple[str, Any, Any]]:
  """Compares the config saved with checkpoint ``step`` to the new one.

  Args:
    saved: the saved config (JSON), or None for a checkpoint without one.
    config: the new config, JSON-normalised the same way.
    workdir: for the message.
    step: the checkpoint's step, for the message.
    allow: dotted fields (or prefixes) the user allows to change.

  Returns:
    The changes that apply (safe or allowed), for logging.

  Raises:
    WorkdirError: naming every other changed field, its old and new value.
  """
  if saved is None:
    logging.warning('checkpoint %d in %s records no config; not compared',
                    step, workdir)
    return []
  allow = tuple(allow)
  changes = config_changes(saved, config)
  bad = [c for c in changes if not _covered(c[0], SAFE_FIELDS + allow)]
  if bad:
    listed = ', '.join(f'{k} {o!r} -> {n!r}' for k, o, n in bad)
    raise WorkdirError(
        f'workdir {workdir!r} holds a run with another config (checkpoint '
        f'step {step}): {listed}. Use a new --workdir, or resume anyway with '
        f'--allow_changes={",".join(k for k, _, _ in bad)}')
  for k, o, n in changes:
    logging.warning('resuming with %s changed: %r -> %r', k, o, n)
  return changes
