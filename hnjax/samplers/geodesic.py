"""Geodesic (spherical) mixing of unit vectors, as in m²-mix."""

import jax
import jax.numpy as jnp

from hnjax import _checks

# Below this squared norm the component of b orthogonal to a is treated as
# zero (identical or antipodal inputs): float32 unit vectors carry ~1e-7 noise.
_TINY = 1e-12


def _safe_norm(x: jax.Array) -> jax.Array:
  """Euclidean norm over the last axis with a zero (not NaN) gradient at 0."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  ok = sq > _TINY
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), 0.0)


def _orthogonal_to(a: jax.Array) -> jax.Array:
  """A unit vector orthogonal to each unit vector ``a`` (last axis)."""
  # Gram-Schmidt on the basis vector where |a| is smallest: never parallel
  # to a, so the result is well conditioned.
  e = jax.nn.one_hot(jnp.argmin(jnp.abs(a), axis=-1), a.shape[-1],
                     dtype=a.dtype)
  u = e - jnp.sum(e * a, axis=-1, keepdims=True) * a
  return u / jnp.maximum(_safe_norm(u), 1e-6)


def geodesic_mix(
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    lam: jax.typing.ArrayLike,
) -> jax.Array:
  """Spherical interpolation of unit vectors: ``lam=1`` gives a, ``lam=0`` b.

  With θ the angle between a and b, the result lies on the great circle
  through them at angle ``(1 - lam) θ`` from a:

  .. math::
    \\mathrm{mix}(a, b; \\lambda) =
      \\frac{\\sin(\\lambda\\theta)}{\\sin\\theta}\\, a +
      \\frac{\\sin((1-\\lambda)\\theta)}{\\sin\\theta}\\, b
      = \\cos((1-\\lambda)\\theta)\\, a + \\sin((1-\\lambda)\\theta)\\, u,

  where u is the unit vector of b's component orthogonal to a. hnjax uses the
  second form with θ = atan2(|b_⊥|, a·b): it needs no arccos (whose gradient
  blows up at ±1) and no division by sin θ, so it is finite, with finite
  gradients, for identical inputs (the result is a) and for antipodal ones
  (the geodesic then runs along a fixed direction orthogonal to a, so the
  result stays unit norm). This is ``sph_inter(a, b, lam)`` of the m²-mix
  code (changdaeoh/multimodal-mixup), i.e. slerp with ``t = 1 - lam``.

  Gradients flow to a, b and lam (m²-mix trains through its mixtures).

  Args:
    a: ``[..., D]`` unit vectors.
    b: ``[..., D]`` unit vectors, same shape as ``a``.
    lam: weight on ``a``; a scalar or an array broadcastable to
      ``a.shape[:-1]``.

  Returns:
    ``[..., D]`` unit vectors, in the dtype of ``a`` and ``b``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.samplers import geodesic_mix
    >>> a, b = jnp.array([1., 0.]), jnp.array([0., 1.])
    >>> geodesic_mix(a, b, 0.5).round(4)  # 45 degrees from each
    Array([0.7071, 0.7071], dtype=float32)
    >>> jnp.linalg.norm(geodesic_mix(a, -a, 0.5))  # antipodal: unit norm
    Array(1., dtype=float32)

  References:
    Oh et al., "Geodesic Multi-Modal Mixup for Robust Fine-Tuning",
    NeurIPS 2023, https://arxiv.org/abs/2203.03897
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape or a.ndim < 1:
    raise ValueError(
        f'a and b must have the same shape [..., D], got {a.shape} and '
        f'{b.shape}')
  _checks.non_empty('a', a)
  dtype = jnp.result_type(a, b)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'a and b must be floating arrays, got {dtype}')
  lam = jnp.asarray(lam, jnp.float32)
  try:
    jnp.broadcast_shapes(lam.shape, a.shape[:-1])
  except ValueError:
    raise ValueError(
        f'lam of shape {lam.shape} does not broadcast to {a.shape[:-1]}'
    ) from None
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  cos = jnp.sum(a32 * b32, axis=-1, keepdims=True)
  b_perp = b32 - cos * a32
  sin = _safe_norm(b_perp)
  theta = jnp.arctan2(sin, cos)  # in [0, pi]
  u = jnp.where(sin > 0, b_perp / jnp.where(sin > 0, sin, 1.0),
                _orthogonal_to(a32))
  phi = (1.0 - lam[..., None]) * theta
  return (jnp.cos(phi) * a32 + jnp.sin(phi) * u).astype(dtype)
