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


def modality_gap(
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    *,
    normalize: bool = True,
) -> float:
  """Distance between the centroids of two modalities' embeddings.

  .. math:: \\lVert \\bar{x} - \\bar{y} \\rVert_2

  CLIP's image and text embeddings occupy two separate cones of the sphere
  (Liang et al., 2022); m²-mix's mixtures live in the gap between them.

  Args:
    x: ``[N, D]`` embeddings of one modality (e.g. images).
    y: ``[M, D]`` embeddings of the other (e.g. captions).
    normalize: L2-normalise rows first.

  Returns:
    The gap, in ``[0, 2]`` for unit vectors.

  Raises:
    ValueError: if either is not ``[N, D]`` with ``N > 0`` or the ``D``
      differ.

  Examples:
    >>> from hnjax.eval import geometry
    >>> geometry.modality_gap([[1., 0.], [1., 0.]], [[0., 1.]])  # sqrt(2)
    1.4142135381698608

  References:
    Liang et al., "Mind the Gap: Understanding the Modality Gap in
    Multi-modal Contrastive Representation Learning", NeurIPS 2022,
    https://arxiv.org/abs/2203.02053
  """
  x, y = _arrays.to_local(x), _arrays.to_local(y)
  if (x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]
      or not x.shape[0] or not y.shape[0]):
    raise ValueError(f'x and y must be [N, D] with N > 0 and the same D, got '
                     f'{x.shape} and {y.shape}')
  return float(_gap(x, y, normalize=normalize))


@functools.partial(jax.jit, static_argnames='normalize')
def _gap(x, y, *, normalize):
  x, y = _prepare(x, normalize), _prepare(y, normalize)
  return jnp.linalg.norm(jnp.mean(x, axis=0) - jnp.mean(y, axis=0))


def relative_alignment(
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    *,
    normalize: bool = True,
    chunk_size: int = 1024,
) -> float:
  """m²-mix's "alignment": how much closer a pair is than the nearest other.

  .. math:: \\frac{1}{B} \\sum_i \\Big( \\lVert x_i - y_i \\rVert^2 -
      \\min_{j \\ne i} \\lVert x_i - y_j \\rVert^2 \\Big)

  The code-parity metric of the m²-mix repository (``rel_lalign_torch(text,
  image)``: pass ``x=text, y=image``); lower is better, negative when every
  pair is closer than any mismatch. (Its "uniformity" is
  ``uniformity(concatenate([image, image]))``: image-only, duplicates
  included.) Memory is ``O(chunk_size * B)``.

  Args:
    x: ``[B, D]`` embeddings (text in the paper's code).
    y: ``[B, D]`` their pairs (images), ``B >= 2``.
    normalize: L2-normalise rows first.
    chunk_size: rows per chunk.

  Returns:
    The relative alignment, in ``[-4, 4]`` for unit vectors.

  Raises:
    ValueError: if the shapes differ or are not ``[B, D]`` with ``B >= 2``.

  Examples:
    >>> from hnjax.eval import geometry
    >>> x = [[1., 0.], [0., 1.]]
    >>> geometry.relative_alignment(x, x)  # 0 - |x_i - y_j|^2 = -2
    -2.0
  """
  x, y = _arrays.to_local(x), _arrays.to_local(y)
  if x.ndim != 2 or x.shape != y.shape or x.shape[0] < 2:
    raise ValueError(
        f'x and y must both be [B, D] with B >= 2, got {x.shape} and {y.shape}')
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
  return float(_relative_alignment(
      x, y, chunk_size=min(chunk_size, x.shape[0]), normalize=normalize))


@functools.partial(jax.jit, static_argnames=('chunk_size', 'normalize'))
def _relative_alignment(x, y, *, chunk_size, normalize):
  x, y = _prepare(x, normalize), _prepare(y, normalize)
  n, dim = x.shape
  pad = -n % chunk_size
  rows = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk_size, dim)
  starts = jnp.arange(rows.shape[0]) * chunk_size
  sq_y = jnp.sum(y * y, axis=-1)

  def chunk(args):  # [chunk, D], [] -> [chunk] nearest mismatch distance^2
    xc, start = args
    i = start + jnp.arange(chunk_size)[:, None]
    dots = jnp.matmul(xc, y.T, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.maximum(jnp.sum(xc * xc, -1, keepdims=True) + sq_y[None, :]
                     - 2 * dots, 0.0)
    return jnp.min(jnp.where(i != jnp.arange(n)[None, :], d2, jnp.inf), 1)

  nearest = jax.lax.map(chunk, (rows, starts)).reshape(-1)[:n]
  own = jnp.sum((x - y) ** 2, axis=-1)
  return jnp.mean(own - nearest)
