"""Metric logs of a run: JSON lines, TensorBoard events and a progress bar.

Files written into the workdir by :class:`MetricWriter` (process 0 only; the
caller passes ``enabled=jax.process_index() == 0``):

- ``metrics.jsonl``: one line per :meth:`MetricWriter.write_scalars` call,
  ``{"step": 100, "loss": 5.3, "knn_top1": 0.41}``;
- ``histograms.jsonl``: one line per :meth:`MetricWriter.write_histogram`
  call, ``{"step": 100, "name": "hard_neg_sim", "edges": [...], "counts":
  [...], "count": .., "min": .., "max": .., "mean": ..}``;
- ``config.json``: the run's config;
- ``events.out.tfevents.*``: the same scalars and histograms for TensorBoard,
  written by tensorboardX (no TensorFlow needed).

Resuming: after restoring checkpoint step ``s``, call
``writer.truncate_after(s)``; it drops JSON lines with ``step > s`` (logged
after the checkpoint by the run that died) and tells TensorBoard to discard
its events from step ``s + 1`` on, so re-logged steps are not duplicated.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
import tensorboardX
import tqdm

from hnjax import notebook
from hnjax import runlog
# Re-exported: the file names and the reader live below train/ and eval/.
from hnjax.runlog import CONFIG_FILE
from hnjax.runlog import HISTOGRAMS_FILE
from hnjax.runlog import METRICS_FILE
from hnjax.runlog import read_jsonl


def _to_python(value: Any) -> int | float:
  """A 0-d array or number as a JSON-able int or float."""
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(f'expected a scalar, got shape {value.shape}')
  value = value.reshape(())
  if np.issubdtype(value.dtype, np.integer) or value.dtype == bool:
    return int(value)
  return float(value)


class MetricWriter:
  """Writes scalars and histograms to JSON lines and TensorBoard.

  With ``enabled=False`` every method is a no-op, so all processes can run the
  same logging code.
  """

  def __init__(self, workdir: str | os.PathLike[str], *, enabled: bool = True):
    """Opens the writer.

    Args:
      workdir: run directory (created if missing).
      enabled: whether this process writes; pass
        ``jax.process_index() == 0``.
    """
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self._tb = None
    self._purge_step = None
    if enabled:
      os.makedirs(self.workdir, exist_ok=True)

  def _events(self) -> tensorboardX.SummaryWriter:
    # Opened on first use, so that a resume's truncate_after leaves one
    # events file per run segment, not an extra empty one.
    if self._tb is None:
      self._tb = tensorboardX.SummaryWriter(
          self.workdir, flush_secs=30, purge_step=self._purge_step)
    return self._tb

  def _append(self, filename: str, record: Mapping[str, Any]) -> None:
    # Opened per call and flushed on close: a crash loses at most this line.
    with open(os.path.join(self.workdir, filename), 'a') as f:
      f.write(json.dumps(record) + '\n')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends one line ``{"step": step, **scalars}`` and TB scalars.

    Args:
      step: training step.
      scalars: name -> number or 0-d array (host or device). Non-finite
        values are written as ``NaN``/``Infinity`` (Python's JSON).

    Raises:
      ValueError: if a value is not a scalar or a name is ``'step'``.
    """
    if not self.enabled:
      return
    if 'step' in scalars:
      raise ValueError("scalars must not contain the reserved name 'step'")
    record = {'step': int(step)}
    for name, value in scalars.items():
      try:
        record[name] = _to_python(value)
      except ValueError as e:
        raise ValueError(f'scalars[{name!r}]: {e}') from e
    self._append(METRICS_FILE, record)
    for name, value in record.items():
      if name != 'step':
        self._events().add_scalar(name, value, global_step=int(step))
    self._events().flush()

  def write_histogram(
      self,
      step: int,
      name: str,
      values: Any,
      *,
      bins: int | Sequence[float] = 50,
      value_range: tuple[float, float] = (-1.0, 1.0),
  ) -> None:
    """Writes the histogram of ``values`` with fixed bin edges.

    The edges depend only on ``bins`` and ``value_range``, never on the data,
    so histograms of the same name are comparable across steps (the defaults
    suit cosine similarities). Values outside the range are counted in the
    first or last bin, so ``sum(counts)`` is the number of finite values.

    Args:
      step: training step.
      name: histogram name, e.g. ``'hard_neg_sim'``.
      values: array of any shape (host or device); non-finite values are
        dropped.
      bins: number of equal-width bins over ``value_range``, or the increasing
        bin edges (``len(bins) - 1`` bins; ``value_range`` is then ignored).
      value_range: ``(low, high)`` for an int ``bins``.

    Raises:
      ValueError: on fewer than one bin, non-increasing edges, or an empty
        range.
    """
    edges = _bin_edges(bins, value_range)
    if not self.enabled:
      return
    x = np.asarray(values, np.float64).ravel()
    x = x[np.isfinite(x)]
    counts, _ = np.histogram(np.clip(x, edges[0], edges[-1]), bins=edges)
    record = {
        'step': int(step),
        'name': name,
        'edges': edges.tolist(),
        'counts': counts.tolist(),
        'count': int(x.size),
        'min': float(x.min()) if x.size else None,
        'max': float(x.max()) if x.size else None,
        'mean': float(x.mean()) if x.size else None,
    }
    self._append(HISTOGRAMS_FILE, record)
    if x.size:
      # TensorBoard buckets are (limit[i-1], limit[i]]: pass the right edges.
      self._events().add_histogram_raw(
          name,
          min=float(x.min()),
          max=float(x.max()),
          num=int(x.size),
          sum=float(x.sum()),
          sum_squares=float(np.square(x).sum()),
          bucket_limits=edges[1:].tolist(),
          bucket_counts=counts.tolist(),
          global_step=int(step),
      )
      self._events().flush()

  def write_config(self, config: Any) -> None:
    """Writes ``config.json`` (a dict or an ``ml_collections.ConfigDict``).

    Values JSON cannot hold are written as their ``str``.
    """
    if not self.enabled:
      return
    if hasattr(config, 'to_dict'):
      config = config.to_dict()
    path = os.path.join(self.workdir, CONFIG_FILE)
    with open(path + '.tmp', 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True, default=str)
      f.write('\n')
    os.replace(path + '.tmp', path)

  def truncate_after(self, step: int | None) -> None:
    """Forgets everything logged after ``step`` (call it on resume).

    Drops JSON lines with ``"step" > step``, a torn last line from a
    crash, and damaged lines (with a warning), rewriting each file
    atomically, and reopens the TensorBoard writer
    with ``purge_step=step + 1`` so TensorBoard hides the old events from that
    step on.

    Args:
      step: the restored checkpoint's step; ``None`` (a fresh start) drops
        everything.
    """
    if not self.enabled:
      return
    keep_upto = -1 if step is None else int(step)
    for filename in (METRICS_FILE, HISTOGRAMS_FILE):
      path = os.path.join(self.workdir, filename)
      if not os.path.exists(path):
        continue
      kept, damaged = [], 0
      with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
          record = runlog.parse_line(line)
          if record is None:
            # A torn last line is expected after a crash; others are not.
            damaged += bool(line.endswith('\n') and line.strip())
          elif record['step'] <= keep_upto:
            kept.append(line)
      if damaged:
        logging.warning('%s: skipped %d damaged line(s)', path, damaged)
      with open(path + '.tmp', 'w') as f:
        f.writelines(kept)
      os.replace(path + '.tmp', path)
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._purge_step = keep_upto + 1

  def flush(self) -> None:
    """Flushes TensorBoard events (JSON lines are always flushed)."""
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _bin_edges(
    bins: int | Sequence[float], value_range: tuple[float, float]
) -> np.ndarray:
  if isinstance(bins, (int, np.integer)):
    low, high = value_range
    if bins < 1:
      raise ValueError(f'bins must be >= 1, got {bins}')
    if not low < high:
      raise ValueError(f'value_range must be (low, high), got {value_range}')
    return np.linspace(low, high, int(bins) + 1)
  edges = np.asarray(bins, np.float64)
  if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
    raise ValueError(f'bins must be increasing edges, got {bins}')
  return edges


def progress_bar(
    total: int, initial: int = 0, enabled: bool = True, **kwargs
) -> tqdm.tqdm:
  """A tqdm bar over training steps, with step rate and ETA.

  In a notebook kernel it is an ipywidgets bar when ipywidgets is
  installed, else plain text (`hnjax.notebook.tqdm_class`).

  Args:
    total: last step of training.
    initial: step the run (re)starts from; the rate and ETA count only the
      steps of this session.
    enabled: whether to show it; pass ``jax.process_index() == 0``.
    **kwargs: passed to ``tqdm.tqdm`` (e.g. ``file=``, ``mininterval=``).

  Returns:
    A ``tqdm.tqdm``; call ``bar.update(n)`` after steps, ``bar.set_postfix``
    for metrics, ``bar.close()`` at the end.
  """
  options = dict(
      total=total,
      initial=initial,
      disable=not enabled,
      unit='step',
      dynamic_ncols=True,
      smoothing=0.1,
      mininterval=1.0,
  )
  options.update(kwargs)
  return notebook.tqdm_class()(**options)
