"""What the benchmark scripts share: timing, XLA memory, the PyTorch peers.

The peers run in their own venv (``$HNJAX_TORCH_PYTHON``, default
``/work/torchvenv/bin/python``; see ``benchmarks/peers/README.md``) so that
PyTorch never becomes a dependency of hnjax.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PY = os.environ.get('HNJAX_TORCH_PYTHON', '/work/torchvenv/bin/python')


def time_ms(fn, *args, iters):
  """``(median, min)`` wall time in ms of ``fn(*args)`` after a warm-up call.

  The warm-up call compiles; every call is waited for with
  ``jax.block_until_ready``.
  """
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times)), 1e3 * float(np.min(times))


def temp_mb(fn, *args):
  """XLA's temporary buffers of jitted ``fn`` on ``args``, in MiB (or None)."""
  stats = fn.lower(*args).compile().memory_analysis()
  return None if stats is None else stats.temp_size_in_bytes / 2**20


def run_peer(module: str, call: str, *, timeout: float = 3600):
  """Runs ``benchmarks.peers.<module>`` in the PyTorch venv.

  Args:
    module: a module of ``benchmarks/peers``, imported there as ``t``.
    call: a Python expression over ``t`` whose value is JSON-serialisable,
      e.g. ``'t.time_moco(256, 4096, 128, 0.2, 3)'``.
    timeout: seconds.

  Returns:
    The expression's value, or None when the venv is missing or the peer
    failed (its stderr tail is printed).
  """
  if not os.path.exists(TORCH_PY):
    return None
  code = (f'import json, sys; sys.path.insert(0, {ROOT!r}); '
          f'from benchmarks.peers import {module} as t; '
          f'print(json.dumps({call}))')
  out = subprocess.run([TORCH_PY, '-c', code], capture_output=True,
                       text=True, check=False, timeout=timeout)
  if out.returncode:
    print(f'torch peer failed: {out.stderr[-500:]}', file=sys.stderr)
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])
