"""Brings possibly sharded, possibly multi-process arrays to one device."""

from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np


def to_local(x: Any) -> jax.Array | np.ndarray:
  """Returns the whole global value of ``x`` on this process.

  Eval functions work on one device: a global array sharded over the mesh
  (possibly across processes) is gathered here, so every process computes the
  same result. Host arrays are returned unchanged.

  Args:
    x: ``jax.Array`` (any sharding), NumPy array or array-like.

  Returns:
    A single-device ``jax.Array`` or a NumPy array with the global value.
  """
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if not x.is_fully_addressable:
    return multihost_utils.process_allgather(x, tiled=True)
  if len(x.sharding.device_set) > 1:
    # A bare Device here would keep the Explicit-mesh type ("f32[40@data,16]")
    # on jax 0.10.2; a SingleDeviceSharding drops it.
    return jax.device_put(
        x, jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    )
  return x
