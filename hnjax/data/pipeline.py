"""Deterministic, resumable, multi-host input pipelines on grain.

Training order. Epoch ``e`` visits the ``n`` examples in the order of a
permutation seeded by ``(seed, e)``; global step ``t`` is step
``s = t % S`` of epoch ``e = t // S``, with ``S = n // G`` steps per epoch
(the last ``n % G`` examples of each epoch's order are dropped). Its global
batch is positions ``[s * G, (s + 1) * G)`` of that permutation, and process
``p`` of ``P`` reads only rows ``[p * G / P, (p + 1) * G / P)`` of it. A global
batch is therefore a function of ``(seed, t)`` alone: 1 process and 2
processes see the same global batches.

Batch composition. ``order`` replaces the permutation by any function of
the epoch (`hnjax.data.batching`'s samplers: batches of near neighbours,
clusters or topics); step ``s`` of epoch ``e`` is then positions ``[s * G,
(s + 1) * G)`` of ``order(e)``, which must hold at least ``S * G`` rows.

Resuming. The grain iterator's state is ``{'next_index': t}``, ``t`` being
the next global step; it is JSON-able and works with
``grain.checkpoint.CheckpointSave``/``CheckpointRestore``. Building the
iterator with ``start_step=t`` gives the same batches as restoring that
state.

Batches are dicts of numpy arrays, ``b = G / P`` rows per process: ``image``
uint8 ``[b, H, W, C]`` (raw: augmentation happens on device), ``label`` int32
``[b]``, ``index`` int32 ``[b]`` (position in the source, for same-instance
masks) and the source's other numeric fields (int64 cast to int32, float64 to
float32). Strings are left out unless asked for by ``fields``.

Reading runs in grain prefetch threads; ``num_workers > 0`` adds grain worker
processes, worth it only when decoding is heavy (ImageNet JPEGs).
"""

import functools

import grain
import numpy as np

# Far beyond any run; grain needs a finite length.
_FOREVER = 2**62


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = (
        jax.process_index() if process_index is None else (process_index)
    )
    process_count = (
        jax.process_count() if process_count is None else (process_count)
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index must be in [0, {process_count}), got '
        f'{process_index}'
    )
  return process_index, process_count


def _local_batch_size(global_batch_size, process_count):
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size must be a positive multiple of process_count='
        f'{process_count}, got {global_batch_size}'
    )
  return global_batch_size // process_count


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_examples, seed, epoch):
  """Order of the examples in one epoch.

  Args:
    num_examples: dataset size ``n``.
    seed: pipeline seed.
    epoch: epoch number.

  Returns:
    int64 ``[n]``, a permutation of ``range(n)`` that depends only on the
    arguments (read-only; cached).
  """
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def steps_per_epoch(num_examples, global_batch_size):
  """Training steps per epoch, ``n // G`` (the remainder is dropped).

  Args:
    num_examples: dataset size ``n``.
    global_batch_size: ``G``.

  Returns:
    The number of full global batches in one epoch (at least 1).
  """
  if global_batch_size <= 0 or num_examples < global_batch_size:
    raise ValueError(
        f'global_batch_size={global_batch_size} must be in '
        f'[1, {num_examples}] (the examples of the source)'
    )
  return num_examples // global_batch_size


def train_rows(
    step,
    *,
    num_examples,
    global_batch_size,
    seed,
    process_index=0,
    process_count=1,
    order=None,
):
  """Source rows of one process's slice of the global batch of ``step``.

  Args:
    step: global step ``t``.
    num_examples: dataset size ``n``.
    global_batch_size: ``G``, a multiple of ``process_count``.
    seed: pipeline seed.
    process_index: ``p``.
    process_count: ``P``.
    order: ``epoch -> int [>= S * G]`` rows of that epoch, batch after
      batch (called at every step: cache it, as `batching.EpochOrder`
      does); default ``epoch_permutation(n, seed, epoch)``.

  Returns:
    int64 ``[G / P]`` row positions in the source.
  """
  local = _local_batch_size(global_batch_size, process_count)
  per_epoch = steps_per_epoch(num_examples, global_batch_size)
  epoch, s = divmod(int(step), per_epoch)
  start = s * global_batch_size + process_index * local
  if order is None:
    return epoch_permutation(num_examples, seed, epoch)[start : start + local]
  rows = np.asarray(order(epoch))
  if rows.ndim != 1 or len(rows) < per_epoch * global_batch_size:
    raise ValueError(
        f'order({epoch}) must give at least {per_epoch * global_batch_size} '
        f'rows ({per_epoch} batches of {global_batch_size}), got shape '
        f'{rows.shape}')
  return rows[start : start + local].astype(np.int64)


def _to_batch(raw, fields):
  """Keeps numeric fields (or ``fields``) and narrows 64-bit types."""
  out = {}
  for k, v in raw.items():
    if fields is None and v.dtype.kind not in 'biuf':
      continue
    if v.dtype == np.int64:
      v = v.astype(np.int32)
    elif v.dtype == np.float64:
      v = v.astype(np.float32)
    out[k] = v
  return out


class _TrainBatch:
  """Global step -> this process's batch (picklable for grain workers)."""

  def __init__(self, source, fields, **rows_kwargs):
    self.source, self.fields, self.rows_kwargs = source, fields, rows_kwargs

  def __call__(self, step):
    rows = train_rows(step, num_examples=len(self.source), **self.rows_kwargs)
    return _to_batch(self.source.get_batch(rows, self.fields), self.fields)


class _EvalBatch:
  """Eval batch number -> this process's padded batch with a ``mask``."""

  def __init__(
      self, source, fields, global_batch_size, process_index, local_batch_size
  ):
    self.source, self.fields = source, fields
    self.g, self.p, self.b = global_batch_size, process_index, local_batch_size

  def __call__(self, i):
    rows = i * self.g + self.p * self.b + np.arange(self.b)
    mask = rows < len(self.source)
    # Padding rows re-read row 0, then are zeroed: shapes stay static.
    batch = _to_batch(
        self.source.get_batch(np.where(mask, rows, 0), self.fields), self.fields
    )
    for v in batch.values():
      if v.dtype.kind in 'biuf':
        v[~mask] = 0
    batch['mask'] = mask
    return batch


def _to_iterator(ds, num_threads, prefetch, num_workers):
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  )
  if num_workers:
    # grain reads an absl flag in its workers; outside `app.run` nobody has
    # parsed flags, which grain 0.2.18 turns into UnparsedFlagAccessError.
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers)
    )
  return iter(it_ds)


def train_dataset(
    source,
    *,
    global_batch_size,
    seed,
    num_steps=None,
    process_index=None,
    process_count=None,
    fields=None,
    order=None,
):
  """The training batches as a grain ``MapDataset`` indexed by global step.

  Args:
    source: random-access source with ``get_batch(rows, fields)``
      (``sources.Source``).
    global_batch_size: ``G``, examples per step over all processes.
    seed: shuffling seed.
    num_steps: length of the dataset; default effectively infinite.
    process_index: ``p``; default ``jax.process_index()``.
    process_count: ``P``; default ``jax.process_count()``.
    fields: names of the fields to keep; default all numeric ones.
    order: ``epoch -> rows`` (see `train_rows`; picklable with grain
      workers); default the seeded permutation.

  Returns:
    ``grain.MapDataset`` whose element ``t`` is process ``p``'s batch of step
    ``t`` (see the module docstring).
  """
  p, n_proc = _process(process_index, process_count)
  _local_batch_size(global_batch_size, n_proc)
  train_rows(
      0,
      num_examples=len(source),
      global_batch_size=global_batch_size,
      seed=seed,
      process_index=p,
      process_count=n_proc,
      order=order,
  )  # validates
  read = _TrainBatch(
      source,
      fields,
      global_batch_size=global_batch_size,
      seed=seed,
      process_index=p,
      process_count=n_proc,
      order=order,
  )
  return grain.MapDataset.range(0, num_steps or _FOREVER).map(read)


def train_iterator(
    source,
    *,
    global_batch_size,
    seed,
    start_step=0,
    num_steps=None,
    process_index=None,
    process_count=None,
    fields=None,
    order=None,
    num_threads=2,
    prefetch=4,
    num_workers=0,
):
  """Checkpointable iterator over this process's training batches.

  Args:
    source: as in ``train_dataset``.
    global_batch_size: ``G``.
    seed: shuffling seed.
    start_step: first global step to yield (for resuming without a saved
      iterator state).
    num_steps: total steps (the iterator stops before ``num_steps``);
      default effectively infinite.
    process_index: ``p``; default ``jax.process_index()``.
    process_count: ``P``; default ``jax.process_count()``.
    fields: as in ``train_dataset``.
    order: as in ``train_dataset``.
    num_threads: grain reader threads.
    prefetch: batches read ahead.
    num_workers: grain worker processes (0: none).

  Returns:
    A ``grain.DatasetIterator`` of dicts: ``image`` uint8 ``[b, H, W, C]``,
    ``label`` int32 ``[b]``, ``index`` int32 ``[b]``, ... where ``b = G / P``
    is the per-process batch size.
    ``get_state()`` is ``{'next_index': next global step}`` (plus worker
    bookkeeping when ``num_workers > 0``).
  """
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  ds = train_dataset(
      source,
      global_batch_size=global_batch_size,
      seed=seed,
      num_steps=num_steps,
      process_index=process_index,
      process_count=process_count,
      fields=fields,
      order=order,
  )
  if num_workers and start_step:
    # Worker iterators cannot jump; start the dataset at `start_step`.
    ds = ds.slice(slice(start_step, None))
    start_step = 0
  it = _to_iterator(ds, num_threads, prefetch, num_workers)
  if start_step:
    grain.experimental.set_next_index(it, start_step)
  return it


def eval_iterator(
    source,
    *,
    global_batch_size,
    process_index=None,
    process_count=None,
    fields=None,
    num_threads=2,
    prefetch=4,
):
  """Iterator over a whole split in order, last batch padded.

  Global eval batch ``i`` holds rows ``[i * G, (i + 1) * G)``; process ``p``
  gets rows ``[i * G + p * b, i * G + (p + 1) * b)``, ``b = G / P``. Rows past
  the end are zeros with ``mask`` False, so every batch has ``b`` rows.

  Args:
    source: as in ``train_dataset``.
    global_batch_size: ``G``.
    process_index: ``p``; default ``jax.process_index()``.
    process_count: ``P``; default ``jax.process_count()``.
    fields: as in ``train_dataset``.
    num_threads: grain reader threads.
    prefetch: batches read ahead.

  Returns:
    An iterator of ``ceil(n / G)`` dicts like the training batches plus
    ``mask`` bool ``[b]``.
  """
  p, n_proc = _process(process_index, process_count)
  local = _local_batch_size(global_batch_size, n_proc)
  num_batches = -(-len(source) // global_batch_size)
  read = _EvalBatch(source, fields, global_batch_size, p, local)
  ds = grain.MapDataset.range(0, num_batches).map(read)
  return _to_iterator(ds, num_threads, prefetch, 0)
