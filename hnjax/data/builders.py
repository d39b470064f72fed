"""Local tfds builders of the embedded datasets, prepared on first use.

The builders (``shapes32``, ``digits``, ``diabetes``) generate their examples locally, use
numpy-only features (``tfds.features.Tensor``, ``Scalar``, ``ClassLabel``,
``Text``) and are written as ArrayRecord, so preparing them needs neither a
download nor TensorFlow and ``as_data_source`` gives random access.

Preparation is safe when several processes on one machine start at once: it
runs under an exclusive ``fcntl`` lock on a file in the data dir, and the
process that gets the lock second finds the dataset prepared. tfds itself
writes into a randomly named ``incomplete.*`` directory and renames it to
``<name>/<config>/<version>`` only on success, so a crash never leaves a
half-written dataset where a reader would find it.

A prepared dataset records the size and CRC-32 of each of its files
(``hnjax_checksums.json``); each process checks them once, on first use. A
damaged or truncated file (a flipped byte would otherwise fail only when its
record is read, steps into a run) is named in a warning and the dataset is
prepared again.
"""

import contextlib
import fcntl
import json
import os
import shutil
import zlib

from absl import logging
import tensorflow_datasets as tfds

from hnjax.data import diabetes
from hnjax.data import digits
from hnjax.data import shapes

DATA_DIR_ENV = 'HNJAX_DATA_DIR'
_DEFAULT_DATA_DIR = '~/.cache/hnjax/tensorflow_datasets'

# Dataset name (as given to `get_source`) -> (builder class, config name).
EMBEDDED = {
    'shapes32': (shapes.Shapes32, 'default'),
    'shapes32/small': (shapes.Shapes32, 'small'),
    'digits': (digits.Digits, None),
    'diabetes': (diabetes.Diabetes, None),
}


def default_data_dir():
  """Returns ``$HNJAX_DATA_DIR`` or ``~/.cache/hnjax/tensorflow_datasets``."""
  return os.path.expanduser(os.environ.get(DATA_DIR_ENV, _DEFAULT_DATA_DIR))


@contextlib.contextmanager
def file_lock(path):
  """Holds an exclusive ``fcntl`` lock on ``path`` while in the context.

  Args:
    path: lock file, created if missing and never deleted (deleting it
      would let a late process lock a different inode).

  Yields:
    None, with the lock held.
  """
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


CHECKSUM_FILE = 'hnjax_checksums.json'
_verified = set()  # (data_dir, name) checked by this process


def _file_sums(directory):
  """``{file: [size, crc32]}`` of the files of a prepared dataset."""
  sums = {}
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name == CHECKSUM_FILE or not os.path.isfile(path):
      continue
    crc = 0
    with open(path, 'rb') as f:
      while chunk := f.read(1 << 22):
        crc = zlib.crc32(chunk, crc)
    sums[name] = [os.path.getsize(path), crc]
  return sums


def _write_sums(directory):
  try:
    with open(os.path.join(directory, CHECKSUM_FILE), 'w') as f:
      json.dump(_file_sums(directory), f)
  except OSError:  # a read-only shared copy: nothing to record
    pass


def _damaged_file(directory):
  """The first file that differs from its recorded checksum, else None.

  A dataset prepared before checksums existed gets them recorded now.
  """
  path = os.path.join(directory, CHECKSUM_FILE)
  if not os.path.exists(path):
    _write_sums(directory)
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return CHECKSUM_FILE
  now = _file_sums(directory)
  for name, sums in saved.items():
    if now.get(name) != sums:
      return name
  return None


def _make_builder(name, data_dir):
  cls, config = EMBEDDED[name]
  kwargs = {'config': config} if config else {}
  return cls(data_dir=data_dir, **kwargs)


def prepare(name, *, data_dir=None):
  """Prepares an embedded dataset if needed and returns its builder.

  Args:
    name: one of ``EMBEDDED`` (``'shapes32'``, ``'shapes32/small'``,
      ``'digits'``, ``'diabetes'``).
    data_dir: tfds data dir; defaults to ``default_data_dir()``.

  Returns:
    A prepared ``tfds.core.DatasetBuilder``; ``builder.as_data_source(split)``
    gives random access to a split.
  """
  if name not in EMBEDDED:
    raise ValueError(
        f'name must be an embedded dataset {sorted(EMBEDDED)}, got {name!r}'
    )
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  builder = _make_builder(name, data_dir)
  key = (data_dir, name)
  if builder.is_prepared() and (  # fast path, no lock
      key in _verified or _damaged_file(builder.data_dir) is None):
    _verified.add(key)
    return builder
  os.makedirs(data_dir, exist_ok=True)
  lock = os.path.join(data_dir, f".{name.replace('/', '-')}.lock")
  with file_lock(lock):
    # Another process may have prepared it while we waited for the lock; a
    # fresh builder re-reads the directory.
    builder = _make_builder(name, data_dir)
    if builder.is_prepared():
      bad = _damaged_file(builder.data_dir)
      if bad is not None:
        logging.warning('%s is damaged (its size or checksum changed); '
                        'preparing %s again', os.path.join(
                            builder.data_dir, bad), name)
        shutil.rmtree(builder.data_dir)
        builder = _make_builder(name, data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare(
          file_format='array_record',
          download_config=tfds.download.DownloadConfig(
              try_download_gcs=False,
              compute_stats=tfds.download.ComputeStatsMode.SKIP,
          ),
      )
      _write_sums(builder.data_dir)
      builder = _make_builder(name, data_dir)
  _verified.add(key)
  return builder
