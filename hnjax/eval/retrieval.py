"""Image–text retrieval: recall at k, blocked, as the CLIP papers report it.

Image→text (I2T): an image is retrieved at ``k`` if any of its captions is
among the ``k`` texts most similar to it. Text→image (T2I): a caption is
retrieved at ``k`` if its image is among the ``k`` most similar images.
``R1Sum = I2T R@1 + T2I R@1`` (m²-mix's headline number). All in percent.

The ``[N_img, N_txt]`` similarity matrix is never held at once: queries are
taken ``block_size`` at a time against key blocks of ``block_size``, in two
passes over the same blocks (the best positive's similarity, then how many
keys beat it), so 5k images × 25k captions fit in a few MB. Ties go to the
lower index, as everywhere in hnjax, so the ranks are deterministic.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hnjax.eval import _arrays

DEFAULT_BLOCK_SIZE = 1024


def _pad(x, multiple, value):
  pad = -x.shape[0] % multiple
  widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
  return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.jit, static_argnames='block')
def _ranks(queries, keys, query_labels, key_labels, *, block):
  """Rank of each query's best positive key among all keys.

  A key is a positive of a query when their labels are equal. The best
  positive is the most similar one (the lowest index among equals); its rank
  counts the keys more similar than it, plus the equally similar keys of
  lower index. Queries without positives get rank ``-1``.

  Args:
    queries: ``[Q, D]`` float32, ``Q`` a multiple of ``block``.
    keys: ``[K, D]`` float32, ``K`` a multiple of ``block``.
    query_labels: ``[Q]`` int32.
    key_labels: ``[K]`` int32; padded keys carry a label no query has.
    block: rows per query chunk and per key block.

  Returns:
    ``[Q]`` int32 ranks.
  """
  key_blocks = keys.reshape(-1, block, keys.shape[1])
  label_blocks = key_labels.reshape(-1, block)
  starts = jnp.arange(key_blocks.shape[0], dtype=jnp.int32) * block

  def chunk(args):
    q, q_label = args  # [b, D], [b]

    def sims(kb):  # the same product in both passes: identical bits
      return jnp.matmul(q, kb.T, precision=jax.lax.Precision.HIGHEST)

    def best(carry, xs):
      best_s, best_i = carry
      kb, kl, start = xs
      s = jnp.where(kl[None, :] == q_label[:, None], sims(kb), -jnp.inf)
      block_s = jnp.max(s, axis=1)
      block_i = start + jnp.argmax(s, axis=1).astype(jnp.int32)
      better = block_s > best_s  # strict: an earlier block wins a tie
      return (jnp.where(better, block_s, best_s),
              jnp.where(better, block_i, best_i)), None

    init = (jnp.full(q.shape[:1], -jnp.inf, jnp.float32),
            jnp.full(q.shape[:1], -1, jnp.int32))
    (ref_s, ref_i), _ = jax.lax.scan(best, init,
                                     (key_blocks, label_blocks, starts))

    def count(total, xs):
      kb, kl, start = xs
      s = sims(kb)
      idx = start + jnp.arange(block, dtype=jnp.int32)
      real = (kl >= 0)[None, :]  # padded keys are labelled -2
      ahead = (s > ref_s[:, None]) | ((s == ref_s[:, None])
                                      & (idx[None, :] < ref_i[:, None]))
      return total + jnp.sum(ahead & real, axis=1, dtype=jnp.int32), None

    total, _ = jax.lax.scan(count, jnp.zeros(q.shape[:1], jnp.int32),
                            (key_blocks, label_blocks, starts))
    return jnp.where(ref_i >= 0, total, -1)

  q_chunks = queries.reshape(-1, block, queries.shape[1])
  return jax.lax.map(chunk, (q_chunks, query_labels.reshape(-1, block)))


def ranks(queries, keys, query_labels, key_labels, *,
          block_size: int | None = None) -> np.ndarray:
  """``[Q]`` int rank of each query's best positive key (``-1``: none).

  Args:
    queries: ``[Q, D]`` embeddings.
    keys: ``[K, D]`` embeddings.
    query_labels: ``[Q]`` ints ``>= 0``; key ``k`` is a positive of query
      ``q`` when ``key_labels[k] == query_labels[q]``.
    key_labels: ``[K]`` ints ``>= 0``.
    block_size: rows per block (default 1024).

  Returns:
    NumPy int ranks: 0 when the best positive is the most similar key.
  """
  block = block_size or DEFAULT_BLOCK_SIZE
  q = jnp.asarray(queries, jnp.float32)
  k = jnp.asarray(keys, jnp.float32)
  block = min(block, max(q.shape[0], k.shape[0]))
  out = _ranks(_pad(q, block, 0.0), _pad(k, block, 0.0),
               _pad(jnp.asarray(query_labels, jnp.int32), block, -3),
               _pad(jnp.asarray(key_labels, jnp.int32), block, -2),
               block=block)
  return np.asarray(out).reshape(-1)[:q.shape[0]]


def retrieval_metrics(
    image_embeddings: jax.typing.ArrayLike,
    text_embeddings: jax.typing.ArrayLike,
    text_to_image: jax.typing.ArrayLike,
    *,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int | None = None,
) -> dict[str, float]:
  """I2T and T2I recall at ``ks`` and R1Sum, in percent.

  Similarity is the dot product (pass L2-normalised embeddings for cosine).

  Args:
    image_embeddings: ``[N_img, D]``.
    text_embeddings: ``[N_txt, D]``.
    text_to_image: ``[N_txt]`` int, the image of each caption; every image
      needs at least one caption (1 per image for m²-mix's training protocol,
      5 for the standard COCO/Flickr30k evaluation).
    ks: the cut-offs.
    block_size: rows per block of the similarity matrix (default 1024):
      memory is ``O(block_size**2)``, whatever ``N_img`` and ``N_txt``.

  Returns:
    ``{'i2t_r1': .., 'i2t_r5': .., 'i2t_r10': .., 't2i_r1': .., ...,
    'r1sum': ..}`` (``r1sum`` when 1 is in ``ks``); NaN everywhere if an
    embedding is not finite (a NaN would otherwise rank first).

  Raises:
    ValueError: on mismatched shapes, out-of-range ``text_to_image``, an
      image without captions, or a ``k`` outside ``[1, N]``.

  Examples:
    >>> from hnjax.eval import retrieval
    >>> img = jnp.eye(3)
    >>> txt = jnp.array([[1., 0., 0.], [0., 0., 1.], [0., 1., 0.]])
    >>> m = retrieval.retrieval_metrics(img, txt, [0, 1, 2], ks=(1,))
    >>> m['i2t_r1'], m['t2i_r1'], m['r1sum']  # image 0 only
    (33.33333333333333, 33.33333333333333, 66.66666666666666)
  """
  v = _arrays.to_local(image_embeddings)
  t = _arrays.to_local(text_embeddings)
  t2i = np.asarray(text_to_image)
  if v.ndim != 2 or t.ndim != 2 or v.shape[1] != t.shape[1]:
    raise ValueError('image_embeddings and text_embeddings must be [N, D] '
                     f'with the same D, got {v.shape} and {t.shape}')
  n_img, n_txt = v.shape[0], t.shape[0]
  if t2i.shape != (n_txt,) or not np.issubdtype(t2i.dtype, np.integer):
    raise ValueError(f'text_to_image must be [N_txt] = [{n_txt}] ints, got '
                     f'{t2i.dtype}{list(t2i.shape)}')
  if n_img == 0 or n_txt == 0:
    raise ValueError(f'no images ({n_img}) or no texts ({n_txt})')
  if t2i.min() < 0 or t2i.max() >= n_img:
    raise ValueError(f'text_to_image must be in [0, {n_img}), got values in '
                     f'[{t2i.min()}, {t2i.max()}]')
  captions = np.bincount(t2i, minlength=n_img)
  if (captions == 0).any():
    raise ValueError(f'{int((captions == 0).sum())} images have no caption '
                     f'(first: image {int(np.argmin(captions))})')
  for k in ks:
    if not 1 <= k <= min(n_img, n_txt):
      raise ValueError(f'k={k} must be in [1, {min(n_img, n_txt)}]')
  out = {}
  finite = bool(jnp.all(jnp.isfinite(v)) & jnp.all(jnp.isfinite(t)))
  if finite:
    i2t = ranks(v, t, np.arange(n_img), t2i, block_size=block_size)
    t2i_rank = ranks(t, v, t2i, np.arange(n_img), block_size=block_size)
  for k in ks:
    out[f'i2t_r{k}'] = 100.0 * float(np.mean(i2t < k)) if finite else np.nan
  for k in ks:
    out[f't2i_r{k}'] = (100.0 * float(np.mean(t2i_rank < k)) if finite
                        else np.nan)
  if 1 in ks:
    out['r1sum'] = out['i2t_r1'] + out['t2i_r1']
  return out


def caption_accuracy(
    image_embeddings: jax.typing.ArrayLike,
    caption_embeddings: jax.typing.ArrayLike,
    negative_embeddings: jax.typing.ArrayLike,
    eligible: jax.typing.ArrayLike | None = None,
) -> float:
  """How often an image prefers its caption to a hard negative, in percent.

  SugarCrepe's protocol: example ``i`` counts as correct when
  ``v_i . t_i > v_i . n_i`` (a tie is wrong). See
  `hnjax.data.captions.hard_negatives`.

  Args:
    image_embeddings: ``[N, D]``.
    caption_embeddings: ``[N, D]``, the true captions.
    negative_embeddings: ``[N, D]``, one negative caption per image.
    eligible: optional ``[N]`` bool, the examples that have a negative.

  Returns:
    The accuracy over the eligible examples (NaN if none, or if an
    embedding is not finite).

  Raises:
    ValueError: if the shapes differ.

  Examples:
    >>> from hnjax.eval import retrieval
    >>> v = jnp.array([[1., 0.], [0., 1.]])
    >>> retrieval.caption_accuracy(v, v, v[::-1])
    100.0
  """
  v = np.asarray(_arrays.to_local(image_embeddings), np.float64)
  t = np.asarray(_arrays.to_local(caption_embeddings), np.float64)
  n = np.asarray(_arrays.to_local(negative_embeddings), np.float64)
  if v.ndim != 2 or v.shape != t.shape or v.shape != n.shape:
    raise ValueError(f'the three embeddings must share one [N, D] shape, got '
                     f'{v.shape}, {t.shape} and {n.shape}')
  ok = np.ones(len(v), bool) if eligible is None else np.asarray(eligible,
                                                                  bool)
  if ok.shape != (len(v),):
    raise ValueError(f'eligible must be [N] = [{len(v)}], got {ok.shape}')
  if not ok.any() or not all(np.isfinite(a).all() for a in (v, t, n)):
    return float('nan')
  correct = np.sum(v * t, axis=1) > np.sum(v * n, axis=1)
  return 100.0 * float(np.mean(correct[ok]))
