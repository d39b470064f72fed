"""Test helpers shared by the suite (no reference implementations here)."""

import json
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
  """Random unit vectors along the last axis, float32."""
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """Central finite differences of a float64 NumPy scalar function."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  it = np.nditer(x, flags=['multi_index'])
  for _ in it:
    i = it.multi_index
    xp, xm = x.copy(), x.copy()
    xp[i] += eps
    xm[i] -= eps
    g[i] = (f(xp) - f(xm)) / (2 * eps)
  return g


def all_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def free_port() -> int:
  """A free TCP port on 127.0.0.1 (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_workers(script: str, args: list[list[str]], env: dict[str, str],
                timeout: float) -> list[dict]:
  """Runs ``script`` once per argument list, all at once (one per process).

  Each worker prints ``RESULT<json>`` as its last such line. Returns those
  dicts in order; raises AssertionError with the stderr tail of a worker
  that failed.
  """
  procs = [
      subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, script, *a], env=env, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True)
      for a in args
  ]
  results = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=timeout)
    if p.returncode:
      raise AssertionError(f'worker exited {p.returncode}: {stderr[-3000:]}')
    line = [l for l in stdout.splitlines() if l.startswith('RESULT')][-1]
    results.append(json.loads(line[len('RESULT'):]))
  return results
