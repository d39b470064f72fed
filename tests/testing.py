"""Test helpers shared by the suite (no reference implementations here)."""

import json
import os
import socket
import subprocess
import sys
import tempfile

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher_env() -> dict[str, str]:
  """Environment of a launcher subprocess: 1 CPU device, shared test data."""
  # Resume semantics, not speed: skip XLA's slow optimisation passes.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_NUM_CPU_DEVICES='1',
             JAX_DISABLE_MOST_OPTIMIZATIONS='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  # Same data for every test process, prepared once.
  env.setdefault('HNJAX_DATA_DIR', os.path.join(tempfile.gettempdir(),
                                                'hnjax_test_data'))
  return env


def launch(module: str, workdir: str, *args: str, wait: bool = True):
  """Runs ``python -m <module> --workdir=... args``.

  Returns ``(returncode, stdout, stderr)``, or the running Popen when
  ``wait`` is False.
  """
  cmd = [sys.executable, '-m', module, f'--workdir={workdir}', *args]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(),  # pylint: disable=consider-using-with
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


def summary(out: str) -> dict[str, str]:
  """The ``key=value`` pairs of a launcher's summary line."""
  line = [l for l in out.splitlines() if 'state_fingerprint=' in l][-1]
  return dict(kv.split('=', 1) for kv in line.split())


def set_fields(config, overrides: dict) -> None:
  """Sets dotted config fields: ``{'optim.learning_rate': 0.1}``."""
  for k, v in overrides.items():
    *parents, leaf = k.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = v


def tiny_config(**overrides):
  """A run of the shared runner that takes seconds: an MLP on diabetes.

  12 steps of the L1 baseline, a checkpoint every 3 steps, logs every step,
  the kNN probe only at the end.
  """
  from configs import supremix  # pylint: disable=g-import-not-at-top
  c = supremix.get_config('smoke,method=l1,data=diabetes')
  c.batch_size = 32
  c.num_steps = 12
  c.ckpt.every_steps = 3
  c.log_every_steps = 1
  c.eval.every_steps = 0
  c.eval.baselines = False
  c.eval.final = 'knn_mae'
  set_fields(c, overrides)
  return c
