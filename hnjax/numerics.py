"""Small numerical helpers shared by losses, samplers, trainers and evals."""

import jax
from jax import lax
import jax.numpy as jnp

# Survives bfloat16 inputs (they are upcast first) and all-zero rows.
NORM_EPS = 1e-6


def l2_normalize(x: jax.typing.ArrayLike, *, axis: int = -1,
                 eps: float = NORM_EPS) -> jax.Array:
  """Float32 unit vectors along ``axis``: ``x / max(|x|, eps)``.

  Computed as ``x * rsqrt(max(sum(x²), eps²))`` in float32 whatever the
  input dtype, so an all-zero row stays zero (no NaN, zero gradient) and
  bfloat16 activations are normalised at full precision.

  Args:
    x: ``[..., D]`` array.
    axis: the axis to normalise.
    eps: lower bound on the norm.

  Returns:
    float32 array with the shape of ``x``.

  Examples:
    >>> from hnjax.numerics import l2_normalize
    >>> l2_normalize(jnp.array([[3., 4.], [0., 0.]]))
    Array([[0.6, 0.8],
           [0. , 0. ]], dtype=float32)
  """
  x = jnp.asarray(x).astype(jnp.float32)
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * lax.rsqrt(jnp.maximum(sq, eps * eps))


def finite_rows(*arrays: jax.typing.ArrayLike) -> jax.Array:
  """``[N]`` bool: row ``i`` of every array (``[N, ...]``) is all finite."""
  ok = None
  for a in arrays:
    a = jnp.asarray(a)
    row = jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)
    ok = row if ok is None else ok & row
  return ok


def nan_where(bad: jax.typing.ArrayLike, x: jax.Array) -> jax.Array:
  """``x`` with NaN where ``bad`` (broadcast): non-finite in, NaN out."""
  return jnp.where(bad, jnp.nan, x)


def valid_scale(value: jax.typing.ArrayLike) -> jax.Array:
  """A traced temperature or scale, NaN unless finite and > 0.

  Python values are checked at trace time (`hnjax._checks.positive`); a
  traced one cannot be, so an impossible value makes the loss NaN (which a
  trainer's non-finite stop catches) instead of a silent finite number.
  """
  v = jnp.asarray(value, jnp.float32)
  return jnp.where(jnp.isfinite(v) & (v > 0), v, jnp.nan)
