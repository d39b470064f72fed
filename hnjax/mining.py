"""Hard negatives mined from a corpus (static STAR-style or dynamic ADORE).

`mine_hard_negatives` gives each query the corpus rows most similar to it
that are not its positive, with sentence-transformers' false-negative
filters (``mine_hard_negatives`` of ``sentence_transformers.util``), exactly
and in bounded memory: queries in chunks, the corpus in blocks, never a
``[Q, C]`` score matrix. Inside ``jax.shard_map`` the corpus may be sharded
over devices (each holds a contiguous block of rows); every device then
returns the same global result.

Ranks count the candidates of a query (every corpus row but its positive)
by descending score, ties to the lower corpus index. The survivors of a
query are the candidates with

* rank in ``[range_min, range_max)``,
* score ``<= u``, ``u = min(max_score, p - absolute_margin,
  p * (1 - relative_margin))`` over the options given (``p`` the
  positive's score; removal is strict, ``score > u``),
* score ``>= min_score``.

Because every removal by score above ``u`` takes the top of the ranking,
the survivors are the candidates of rank ``[max(range_min, #{s > u}),
min(range_max, #{s >= min_score}))``: one pass counts, one keeps a
running top-k of the candidates at or below ``u``.
"""

import math

import jax
from jax import lax
import jax.numpy as jnp

from hnjax import _checks
from hnjax import bank as bank_lib

# Defaults: 1024 queries x 16384 corpus rows of float32 scores (64 MiB).
QUERY_CHUNK = 1024
BLOCK_SIZE = 16384
STRATEGIES = ('top', 'random')


def _hash(seed, q, c):
  """uint32 priority of (query, corpus row): murmur3's finaliser of both."""
  x = (q.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)) ^ (
      c.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)) ^ seed
  x ^= x >> 16
  x *= jnp.uint32(0x85EBCA6B)
  x ^= x >> 13
  x *= jnp.uint32(0xC2B2AE35)
  x ^= x >> 16
  return x


def _merge_top(vals, idx, new_vals, new_idx, k):
  """Best k of two ``[R, *]`` lists; on ties the earlier list (lower index)."""
  v = jnp.concatenate([vals, new_vals], axis=1)
  i = jnp.concatenate([idx, new_idx], axis=1)
  v, pos = lax.top_k(v, k)
  return v, jnp.take_along_axis(i, pos, axis=1)


def _gather_lists(vals, idx, k, axis_name):
  """Merges every shard's ``[R, k]`` list (shard order: lower index first)."""
  if axis_name is None:
    return vals, idx
  v = lax.all_gather(vals, axis_name, axis=1, tiled=True)  # [R, n * k]
  i = lax.all_gather(idx, axis_name, axis=1, tiled=True)
  v, pos = lax.top_k(v, k)
  return v, jnp.take_along_axis(i, pos, axis=1)


def mine_hard_negatives(
    query_embeddings: jax.typing.ArrayLike,
    corpus_embeddings: jax.typing.ArrayLike,
    positive_indices: jax.typing.ArrayLike,
    *,
    num_negatives: int = 3,
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    sampling_strategy: str = 'top',
    key: jax.Array | None = None,
    block_size: int | None = None,
    query_chunk: int | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Each query's hard negatives from a corpus, with false-negative filters.

  Scores are dot products (normalise the embeddings for cosine scores), in
  float32. With ``sampling_strategy='top'`` a query gets its
  ``num_negatives`` best survivors (see the module docstring); with
  ``'random'`` a uniform sample of its survivors without replacement,
  drawn from a hash of ``(key, query row, corpus index)``: deterministic in
  ``key`` and independent of chunking, blocking and sharding. Nothing is
  differentiable (a selection).

  Memory: ``query_chunk * block_size`` scores plus running lists of
  ``range_min + num_negatives`` (``'top'``) or ``max(range_min +
  num_negatives, range_max)`` entries per query; never ``[Q, C]``.

  Args:
    query_embeddings: ``[Q, D]`` queries (all of them on every device when
      sharded).
    corpus_embeddings: ``[C, D]`` corpus (``[C / n, D]``: this device's
      contiguous block when sharded).
    positive_indices: ``[Q]`` int global corpus index of each query's
      positive (never returned as its negative); ``-1``: none.
    num_negatives: negatives per query, ``>= 1``.
    range_min: skip each query's ``range_min`` most similar candidates.
    range_max: consider only its ``range_max`` most similar (None: all).
    max_score: drop candidates scoring above it.
    min_score: drop candidates scoring below it.
    absolute_margin: drop candidates with ``score > positive - margin``.
    relative_margin: drop candidates with ``score > positive * (1 -
      margin)``.
    sampling_strategy: ``'top'`` or ``'random'``.
    key: PRNG key of ``'random'`` (required there).
    block_size: corpus rows per block (None: `BLOCK_SIZE`).
    query_chunk: queries per chunk (None: `QUERY_CHUNK`).
    axis_name: mesh axis the corpus is sharded over, or None.

  Returns:
    ``(indices, scores)``: ``[Q, num_negatives]`` int32 global corpus
    indices in descending score (``-1`` where fewer candidates survive) and
    their float32 scores (``-inf`` there). A query whose scores touch a
    non-finite query or corpus entry gets ``-1`` and NaN throughout.

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.mining import mine_hard_negatives
    >>> q = jnp.array([[1., 0.]])
    >>> corpus = jnp.array([[1., 0.], [.9, .1], [.5, .5], [0., 1.]])
    >>> idx, s = mine_hard_negatives(q, corpus, jnp.array([0]),
    ...                              num_negatives=2, absolute_margin=0.2)
    >>> idx  # row 1 (0.9) is within 0.2 of the positive's 1.0: dropped
    Array([[2, 3]], dtype=int32)
  """
  _checks.embeddings('query_embeddings', query_embeddings)
  _checks.embeddings('corpus_embeddings', corpus_embeddings)
  q = lax.stop_gradient(jnp.asarray(query_embeddings, jnp.float32))
  corpus = lax.stop_gradient(jnp.asarray(corpus_embeddings, jnp.float32))
  if q.shape[1] != corpus.shape[1]:
    raise ValueError(f'query_embeddings and corpus_embeddings must have the '
                     f'same dim, got {q.shape} and {corpus.shape}')
  pos = jnp.asarray(positive_indices)
  if pos.shape != q.shape[:1] or not jnp.issubdtype(pos.dtype, jnp.integer):
    raise ValueError(f'positive_indices must be an int array of shape '
                     f'[{q.shape[0]}], got {pos.dtype}{list(pos.shape)}')
  pos = pos.astype(jnp.int32)
  num = _checks.positive_int('num_negatives', num_negatives)
  range_min = _checks.non_negative_int('range_min', range_min)
  n = _checks.axis_size(axis_name)
  c_local = corpus.shape[0]
  total = n * c_local
  if range_max is not None:
    range_max = _checks.positive_int('range_max', range_max)
    if range_max <= range_min:
      raise ValueError(f'range_max={range_max} must be larger than '
                       f'range_min={range_min}')
  _checks.one_of('sampling_strategy', sampling_strategy, STRATEGIES)
  if sampling_strategy == 'random' and key is None:
    raise ValueError("sampling_strategy='random' needs a key")
  for name, m in (('absolute_margin', absolute_margin),
                  ('relative_margin', relative_margin)):
    if m is not None and not (math.isfinite(m) and m >= 0):
      raise ValueError(f'{name} must be a finite number >= 0 or None, got '
                       f'{m}')
  block = min(c_local, block_size or BLOCK_SIZE)
  _checks.positive_int('block_size', block)
  chunk = min(q.shape[0], query_chunk or QUERY_CHUNK)
  _checks.positive_int('query_chunk', chunk)
  # The running list: enough for the skipped, the returned and, for a
  # random draw inside range_max, every candidate in range.
  width = range_min + num
  if sampling_strategy == 'random' and range_max is not None:
    width = max(width, range_max)
  width = max(num, min(width, total))
  first = 0 if axis_name is None else lax.axis_index(axis_name) * c_local
  seed = (jnp.uint32(0) if key is None else
          jax.random.bits(key, (), jnp.uint32))

  # The positive's score, from the device that holds its row.
  own = (pos >= first) & (pos < first + c_local)
  rows = corpus[jnp.clip(pos - first, 0, c_local - 1)]
  pos_score = jnp.where(own, jnp.sum(q * rows, axis=1), 0.0)
  if axis_name is not None:
    pos_score = lax.psum(pos_score, axis_name)
  upper = jnp.full(pos.shape, jnp.inf, jnp.float32)
  if max_score is not None:
    upper = jnp.minimum(upper, float(max_score))
  if absolute_margin is not None:
    upper = jnp.minimum(upper, pos_score - float(absolute_margin))
  if relative_margin is not None:
    upper = jnp.minimum(upper, pos_score * (1.0 - float(relative_margin)))
  upper = jnp.where(pos >= 0, upper, jnp.inf if max_score is None
                    else float(max_score))
  lower = -jnp.inf if min_score is None else float(min_score)

  def chunk_fn(args):
    qc, pc, uc, rows_c = args  # [R, D], [R], [R], [R] global query rows
    r = qc.shape[0]

    def scores(start, size):
      s = qc @ lax.dynamic_slice_in_dim(corpus, start, size).T  # [R, size]
      bad = jnp.any(~jnp.isfinite(s), axis=1)  # a NaN/inf query or row
      cols = first + start + jnp.arange(size, dtype=jnp.int32)
      s = jnp.where(cols[None] == pc[:, None], -jnp.inf, s)  # not a positive
      return s, jnp.broadcast_to(cols, s.shape), bad

    def pass_a(carry, start, size):
      above, top_v, top_i, bad = carry
      s, cols, bad_b = scores(start, size)
      bad = bad | bad_b
      above = above + jnp.sum(s > uc[:, None], axis=1, dtype=jnp.int32)
      cand = jnp.where(s <= uc[:, None], s, -jnp.inf)
      k = min(width, size)
      bv, pos_b = lax.top_k(cand, k)
      bi = jnp.take_along_axis(cols, pos_b, axis=1)
      top_v, top_i = _merge_top(top_v, top_i, bv, bi, width)
      return above, top_v, top_i, bad

    init = (jnp.zeros((r,), jnp.int32),
            jnp.full((r, width), -jnp.inf, jnp.float32),
            jnp.full((r, width), -1, jnp.int32),
            jnp.zeros((r,), bool))
    init = bank_lib._varying_like(init, qc, corpus)  # pylint: disable=protected-access
    above, top_v, top_i, bad = bank_lib._scan_blocks(  # pylint: disable=protected-access
        pass_a, init, c_local, block)
    if axis_name is not None:
      above = lax.psum(above, axis_name)
      bad = lax.pmax(bad.astype(jnp.int32), axis_name) > 0
    top_v, top_i = _gather_lists(top_v, top_i, width, axis_name)
    top_i = jnp.where(jnp.isfinite(top_v), top_i, -1)
    # Positions in the list of candidates at or below u: skip those whose
    # overall rank is below range_min, keep ranks below range_max and
    # scores at or above min_score.
    skip = jnp.maximum(range_min - above, 0)  # [R]
    p = jnp.arange(width)[None]
    ok = (p >= skip[:, None]) & (top_i >= 0) & (top_v >= lower)
    if range_max is not None:
      ok &= above[:, None] + p < range_max
    if sampling_strategy == 'top' or range_max is not None:
      if sampling_strategy == 'top':
        prio = jnp.where(ok, -p, -width - 1)  # the first valid ones
      else:
        h = _hash(seed, rows_c[:, None], top_i)
        prio = jnp.where(ok, (h >> 1).astype(jnp.int32), -1)
      _, sel = lax.top_k(prio, num)
      sel_ok = jnp.take_along_axis(ok, sel, axis=1)
      v = jnp.where(sel_ok, jnp.take_along_axis(top_v, sel, axis=1), -jnp.inf)
      i = jnp.where(sel_ok, jnp.take_along_axis(top_i, sel, axis=1), -1)
    else:
      v, i = _random_all(qc, pc, uc, rows_c, skip, top_v, top_i)
    # Descending score; ties (and the -1 slots) stay in index order.
    order = jnp.argsort(-jnp.where(i >= 0, v, -jnp.inf), axis=1,
                        stable=True)
    i = jnp.take_along_axis(i, order, axis=1)
    v = jnp.take_along_axis(v, order, axis=1)
    # A query whose scores met a NaN or inf gets NaN, never a finite list.
    return (jnp.where(bad[:, None], -1, i),
            jnp.where(bad[:, None], jnp.nan, v))

  def _random_all(qc, pc, uc, rows_c, skip, top_v, top_i):
    """Uniform draw among all survivors (no range_max): a second pass."""
    r = qc.shape[0]
    # The last skipped candidate (rank range_min - 1 among those <= u):
    # anything at or above it, in (score, -index) order, is skipped.
    last = jnp.maximum(skip - 1, 0)[:, None]
    bound_v = jnp.where(skip > 0, jnp.take_along_axis(top_v, last, 1)[:, 0],
                        jnp.inf)
    bound_i = jnp.where(skip > 0, jnp.take_along_axis(top_i, last, 1)[:, 0],
                        -1)

    def pass_b(carry, start, size):
      best_p, best_i = carry
      s = qc @ lax.dynamic_slice_in_dim(corpus, start, size).T
      cols = first + start + jnp.arange(size, dtype=jnp.int32)
      cols = jnp.broadcast_to(cols, s.shape)
      skipped = (s > bound_v[:, None]) | (
          (s == bound_v[:, None]) & (cols <= bound_i[:, None]))
      ok = ((cols != pc[:, None]) & (s <= uc[:, None]) & (s >= lower)
            & ~skipped)
      h = (_hash(seed, rows_c[:, None], cols) >> 1).astype(jnp.int32)
      prio = jnp.where(ok, h, -1)
      bp, pos_b = lax.top_k(prio, min(num, size))
      bi = jnp.where(bp >= 0, jnp.take_along_axis(cols, pos_b, axis=1), -1)
      return _merge_top(best_p, best_i, bp, bi, num)

    init = (jnp.full((r, num), -1, jnp.int32),
            jnp.full((r, num), -1, jnp.int32))
    init = bank_lib._varying_like(init, qc, corpus)  # pylint: disable=protected-access
    best_p, best_i = bank_lib._scan_blocks(pass_b, init, c_local, block)  # pylint: disable=protected-access
    best_p, best_i = _gather_lists(best_p, best_i, num, axis_name)
    best_i = jnp.where(best_p >= 0, best_i, -1)
    v = _scores_of(qc, best_i)
    return jnp.where(best_i >= 0, v, -jnp.inf), best_i

  def _scores_of(qc, idx):
    """q · corpus[idx] for global indices, from their owners."""
    rows = bank_lib.take_rows(corpus, idx, axis_name=axis_name)  # [R, k, D]
    return jnp.einsum('rd,rkd->rk', qc, rows)

  query_rows = jnp.arange(q.shape[0], dtype=jnp.int32)
  idx, val = bank_lib.map_row_chunks(chunk_fn, (q, pos, upper, query_rows),
                                     chunk)
  return idx, val


