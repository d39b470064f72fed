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
