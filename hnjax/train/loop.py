"""Pieces of a training run shared by the trainers.

Config checks that fail before anything is compiled or written, the state
fingerprint, host-side metric handling, and feature extraction for the
kNN monitor and the linear probe.
"""

import hashlib
from typing import Any, Callable, Iterable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from hnjax import parallel


class ConfigError(ValueError):
  """A config field has an impossible value. The message names both."""


def require(ok: bool, field: str, value: Any, why: str) -> None:
  """Raises ConfigError(``'field=value: why'``) unless ``ok``."""
  if not ok:
    raise ConfigError(f'{field}={value!r}: {why}')


def positive(config: Any, *fields: str) -> None:
  """Every named (dotted) field must be > 0."""
  for field in fields:
    value = config
    for part in field.split('.'):
      value = value[part]
    require(isinstance(value, (int, float)) and value > 0, field, value,
            'must be > 0')


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as numpy on every process (gathers across hosts)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def fingerprint(tree: Any) -> str:
  """SHA-256 of every leaf's bytes, in tree order: equal states, equal hex.

  Used to check that a resumed run ends bit-identical to an uninterrupted
  one. Typed PRNG keys are hashed through their key data.
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    arr = np.ascontiguousarray(to_host(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def check_finite(value: float, step: int, last_good: int | None) -> None:
  """Stops a run whose loss went NaN or infinite, naming the step."""
  if not np.isfinite(value):
    where = (f'the last good checkpoint is step {last_good}' if last_good
             else 'no checkpoint was saved')
    raise FloatingPointError(
        f'non-finite loss {value} at step {step}; {where} (it was not '
        f'overwritten). Lower the learning rate or check the data.')


def extract_features(
    encode: Callable[[Any], jax.Array],
    batches: Iterable[dict[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of a whole split (eval iterator, padded batches).

  Args:
    encode: jitted ``global batch dict -> [G, F]`` features.
    batches: ``hnjax.data.eval_iterator`` batches (process-local).
    mesh: the mesh the global batches are built on.

  Returns:
    ``(features [n, F], labels [n])`` as numpy on every process, padding
    removed.
  """
  feats, labels = [], []
  for local in batches:
    batch = parallel.global_batch(local, mesh)
    f = to_host(encode(batch))
    keep = to_host(batch['mask'])
    feats.append(f[keep])
    labels.append(to_host(batch['label'])[keep])
  return np.concatenate(feats), np.concatenate(labels)
