"""The files a run writes into its workdir, and how to read them back.

Shared by the writer (`hnjax.train.writer`) and the readers (the plots in
`hnjax.eval.plots`, a notebook comparing runs), so that neither imports the
other:

- ``metrics.jsonl``: one JSON object per line, ``{"step": 100, "loss": 5.3}``;
- ``histograms.jsonl``: ``{"step": 100, "name": .., "edges": [..],
  "counts": [..], "count": .., "min": .., "max": .., "mean": ..}``;
- ``config.json``: the run's config.
"""

from __future__ import annotations

import json
import os
from typing import Any

METRICS_FILE = 'metrics.jsonl'
HISTOGRAMS_FILE = 'histograms.jsonl'
CONFIG_FILE = 'config.json'


def parse_line(line: str) -> dict[str, Any] | None:
  """One log line as a dict, or None for a torn, damaged or foreign line.

  A record needs an integer ``step`` (``{"step": "7"}`` is not one).
  """
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None
  if not isinstance(record, dict):
    return None
  step = record.get('step')
  ok = isinstance(step, int) and not isinstance(step, bool)
  return record if ok else None


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads a ``metrics.jsonl``/``histograms.jsonl`` file, skipping bad lines.

  Args:
    path: file path; a missing file gives ``[]``.

  Returns:
    The records in file order.
  """
  if not os.path.exists(path):
    return []
  # errors='replace': damaged bytes spoil their line only.
  with open(path, encoding='utf-8', errors='replace') as f:
    return [r for line in f if (r := parse_line(line)) is not None]


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl``."""
  return read_jsonl(os.path.join(workdir, METRICS_FILE))


def read_histograms(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of ``workdir/histograms.jsonl``."""
  return read_jsonl(os.path.join(workdir, HISTOGRAMS_FILE))
