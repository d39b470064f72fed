"""Alignment and uniformity of embeddings on the hypersphere.

Wang & Isola's two properties of contrastive representations: positives
should be close (alignment, lower is better) and the embeddings should spread
over the sphere (uniformity, lower is better).

References:
  Wang & Isola, Understanding Contrastive Representation Learning through
  Alignment and Uniformity on the Hypersphere, 2020.
  https://arxiv.org/abs/2005.10242
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from hnjax import numerics
from hnjax.eval import _arrays

def _prepare(x: jax.Array, normalize: bool) -> jax.Array:
  """Float32 copy of ``x``, L2-normalised if asked; runs inside jit."""
  return numerics.l2_normalize(x) if normalize else x.astype(jnp.float32)


def alignment(
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    *,
    alpha: float = 2.0,
    normalize: bool = True,
) -> float:
  """Mean distance between positive pairs.

  .. math::
    \\mathcal{L}_{align} = \\frac{1}{B}
      \\sum_i \\lVert x_i - y_i \\rVert_2^\\alpha

  Args:
    x: ``[B, D]`` embeddings (e.g. images).
    y: ``[B, D]`` their positives (e.g. the other view, or the captions).
    alpha: exponent of the distance; 2 is the paper's default.
    normalize: L2-normalise rows first (the metric is defined on the sphere).

  Returns:
    The alignment, in ``[0, 2**alpha]`` for unit vectors.

  Raises:
    ValueError: if the shapes differ, are not ``[B, D]``, or ``B == 0``.

  Examples:
    >>> from hnjax.eval import geometry
    >>> round(geometry.alignment([[1., 0.], [0., 1.]], [[1., 0.], [1., 0.]]), 6)
    1.0

  References:
    Wang & Isola, 2020. https://arxiv.org/abs/2005.10242
  """
  x, y = _arrays.to_local(x), _arrays.to_local(y)
  if x.ndim != 2 or x.shape != y.shape or x.shape[0] == 0:
    raise ValueError(
        f'x and y must both be [B, D] with B > 0, got {x.shape} and {y.shape}'
    )
  return float(_alignment(x, y, jnp.float32(alpha), normalize=normalize))


@functools.partial(jax.jit, static_argnames='normalize')
def _alignment(x, y, alpha, *, normalize):
  x, y = _prepare(x, normalize), _prepare(y, normalize)
  return jnp.mean(jnp.linalg.norm(x - y, axis=-1) ** alpha)


def uniformity(
    x: jax.typing.ArrayLike,
    *,
    t: float = 2.0,
    normalize: bool = True,
    chunk_size: int = 1024,
) -> float:
  """Log of the mean Gaussian potential over all distinct pairs.

  .. math::
    \\mathcal{L}_{uniform} = \\log \\frac{1}{N(N-1)} \\sum_{i \\ne j}
      e^{-t \\lVert x_i - x_j \\rVert_2^2}

  (the mean over ``i != j`` equals the paper's mean over ``i < j``). Rows are
  processed ``chunk_size`` at a time, so memory is ``O(chunk_size * N)``, and
  the sum is a log-sum-exp, so it does not underflow for large ``t``.

  Args:
    x: ``[N, D]`` embeddings, ``N >= 2``.
    t: the potential's scale; 2 is the paper's default.
    normalize: L2-normalise rows first.
    chunk_size: rows per chunk.

  Returns:
    The uniformity, in ``[-4 t, 0]`` for unit vectors (lower is more uniform).

  Raises:
    ValueError: if ``x`` is not ``[N, D]`` with ``N >= 2``, or on a
      non-positive ``chunk_size``.

  Examples:
    >>> from hnjax.eval import geometry
    >>> round(geometry.uniformity([[1., 0.], [-1., 0.]]), 4)  # log e^{-2*4}
    -8.0

  References:
    Wang & Isola, 2020. https://arxiv.org/abs/2005.10242
  """
  x = _arrays.to_local(x)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'x must be [N, D] with N >= 2, got {x.shape}')
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
  n = x.shape[0]
  lse = _pair_logsumexp(
      x, jnp.float32(t), chunk_size=min(chunk_size, n), normalize=normalize
  )
  return float(lse) - math.log(n * (n - 1))


@functools.partial(jax.jit, static_argnames=('chunk_size', 'normalize'))
def _pair_logsumexp(x, t, *, chunk_size, normalize):
  """log sum_{i != j} exp(-t |x_i - x_j|^2), chunked over rows i."""
  x = _prepare(x, normalize)
  n, dim = x.shape
  pad = -n % chunk_size
  sq = jnp.sum(x * x, axis=-1)  # [N]
  rows = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk_size, dim)
  starts = jnp.arange(rows.shape[0]) * chunk_size

  def chunk_lse(args):  # [chunk, D], [] -> []
    xc, start = args
    i = start + jnp.arange(chunk_size)[:, None]  # [chunk, 1] global rows
    dots = jnp.matmul(xc, x.T, precision=jax.lax.Precision.HIGHEST)
    sq_c = jnp.sum(xc * xc, axis=-1, keepdims=True)
    # Expanded |a-b|^2 can round below 0; clip.
    d2 = jnp.maximum(sq_c + sq[None, :] - 2 * dots, 0.0)  # [chunk, N]
    valid = (i != jnp.arange(n)[None, :]) & (i < n)
    return jax.nn.logsumexp(jnp.where(valid, -t * d2, -jnp.inf))

  return jax.nn.logsumexp(jax.lax.map(chunk_lse, (rows, starts)))
