"""MoCHi: synthetic hard negatives mixed from a query's hardest negatives."""

import jax
from jax import lax
import jax.numpy as jnp

from hnjax import _checks
from hnjax import bank as bank_lib

_EPS = 1e-12


def _row_draws(key, row, num_valid, num_mix, num_query_mix):
  """Mixing positions and weights for one query, from its own key."""
  k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, row), 4)
  hi = jnp.maximum(num_valid, 1)
  pairs = jax.random.randint(k1, (num_mix, 2), 0, hi)
  alpha = jax.random.uniform(k2, (num_mix,))
  single = jax.random.randint(k3, (num_query_mix,), 0, hi)
  beta = jax.random.uniform(k4, (num_query_mix,), maxval=0.5)
  return pairs, alpha, single, beta


def mochi(
    key: jax.Array,
    query: jax.typing.ArrayLike,
    negatives: jax.typing.ArrayLike,
    *,
    num_hard: int,
    num_mix: int,
    num_query_mix: int,
    negative_mask: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
    block_size: int | None = None,
    skip_top: int = 0,
    max_similarity: float | None = None,
) -> jax.Array:
  """MoCHi synthetic hard negatives (Kalantidis et al., 2020).

  For each query q, let n_1..n_N be its ``N = num_hard`` hardest unmasked
  negatives (`hardest_negatives`). Then

  * ``num_mix`` type-1 negatives mix two of them:
    ``h = norm(α n_i + (1 - α) n_j)``, i, j ~ U{1..N} with replacement,
    α ~ U(0, 1);
  * ``num_query_mix`` type-2 negatives mix the query with one of them:
    ``h' = norm(β q + (1 - β) n_j)``, β ~ U(0, 0.5), so the negative always
    dominates. It mixes the *query*, never the positive key.

  Everything returned is stop-gradient, the q inside h' included
  (ALGORITHMS.md §8.13): append the results to the loss as extra negatives,
  e.g. ``info_nce(..., extra_negatives=mochi(...))``, and never enqueue them.

  Each query draws its randomness from ``fold_in(key, global row index)``,
  so results do not depend on how the batch is split over devices. Only the
  ``2 * num_mix + num_query_mix`` bank rows that are mixed are gathered per
  query, never the ``[B, N, D]`` hardest set. With ``axis_name`` the hardest
  set is selected over the whole sharded bank and each device fetches the
  rows its own queries mix from the devices that hold them
  (`hnjax.bank.take_rows`), so its work and traffic do not grow with the
  number of devices; peak memory per device is that of `hardest_negatives`
  plus ``B * (num_mix + num_query_mix) * D`` floats and a few MiB of
  fetched rows.

  A query with fewer than ``N`` unmasked negatives mixes only those it has;
  one with none (a fully masked row) gets all-zero vectors, which add
  ``exp(0)`` terms to a softmax: avoid fully masked rows.

  Args:
    key: a PRNG key, the same on every device.
    query: ``[B, D]`` unit-norm queries.
    negatives: ``[K, D]`` unit-norm bank (local ``[K / n, D]`` shard when
      sharded).
    num_hard: ``N``, the size of the hardest set, ``1 <= N <= K``.
    num_mix: ``s``, number of type-1 negatives per query, ``>= 0``.
    num_query_mix: ``s'``, number of type-2 negatives per query, ``>= 0``.
    negative_mask: optional bool ``[B, K]`` (sharded: ``[G, K / n]``); False
      entries are never selected (e.g. `same_id_mask`).
    axis_name: mesh axis the queries and the bank are sharded over, or None.
    block_size: bank rows per block for the selection (None: automatic).
    skip_top: mix a hardness range: skip each query's ``r`` most similar
      negatives, the hardest set is ranks ``r … r + N - 1``.
    max_similarity: negatives with ``q · n > c`` are never mixed (None:
      no ceiling). See `hardest_negatives`.

  Returns:
    ``[B, num_mix + num_query_mix, D]`` float32 unit vectors: type-1 first,
    then type-2.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from hnjax.samplers import mochi
    >>> q = jnp.array([[1., 0.]])
    >>> bank = jnp.array([[0., 1.], [0.6, 0.8], [-1., 0.]])
    >>> h = mochi(jax.random.key(0), q, bank, num_hard=1, num_mix=2,
    ...           num_query_mix=1)
    >>> h.shape
    (1, 3, 2)
    >>> jnp.allclose(h[0, :2], bank[1])  # type 1 with N=1: the hardest itself
    Array(True, dtype=bool)

  References:
    Kalantidis et al., "Hard Negative Mixing for Contrastive Learning",
    NeurIPS 2020, https://arxiv.org/abs/2010.01028
  """
  _checks.positive_int('num_hard', num_hard)
  q = lax.stop_gradient(jnp.asarray(query, jnp.float32))
  stats = bank_lib.bank_stats(
      q, lax.stop_gradient(negatives), num_top=num_hard,
      negative_mask=negative_mask, axis_name=axis_name,
      block_size=block_size, skip_top=skip_top, max_similarity=max_similarity)
  h = mochi_mix(key, q, negatives, stats.top_indices, num_mix=num_mix,
                num_query_mix=num_query_mix, axis_name=axis_name)
  # A query whose selection met a non-finite query or bank entry (NaN
  # similarities) gets NaN mixtures, not the zeros of "no valid negative".
  bad = jnp.any(jnp.isnan(stats.top_similarities), axis=1)
  return jnp.where(bad[:, None, None], jnp.nan, h)


def mochi_mix(
    key: jax.Array,
    query: jax.typing.ArrayLike,
    negatives: jax.typing.ArrayLike,
    hardest_indices: jax.typing.ArrayLike,
    *,
    num_mix: int,
    num_query_mix: int,
    axis_name: str | None = None,
) -> jax.Array:
  """MoCHi's mixing step, given each query's hardest set.

  `mochi` is `hardest_negatives` followed by this function; call it directly
  when the hardest set is already known, e.g. from the same pass over the
  bank that computes the loss (`hnjax.bank.bank_stats` with ``num_top``).

  Args:
    key: a PRNG key, the same on every device.
    query: ``[B, D]`` unit-norm queries.
    negatives: ``[K, D]`` bank (``[K / n, D]`` local shard when sharded).
    hardest_indices: ``[B, N]`` int global bank indices of each query's
      hardest negatives, ``-1`` for missing ones (as returned by
      `hardest_negatives`).
    num_mix: ``s >= 0`` type-1 negatives per query.
    num_query_mix: ``s' >= 0`` type-2 negatives per query.
    axis_name: mesh axis the queries and the bank are sharded over, or None.

  Returns:
    ``[B, num_mix + num_query_mix, D]`` float32 stop-gradient unit vectors
    (zeros for a query without any valid hardest negative).
  """
  h1, h2 = _mix_parts(key, query, negatives, hardest_indices, num_mix=num_mix,
                     num_query_mix=num_query_mix, axis_name=axis_name)
  return jnp.concatenate([h1, h2], axis=1)


def _normalize(x, valid):
  """Unit rows; all-zero rows for queries without a valid hard negative."""
  # Not numerics.l2_normalize + where: XLA rounds that form differently,
  # which would change every MoCHi run's bits.
  inv = lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True),
                              _EPS * _EPS))
  return x * jnp.where(valid[:, None, None], inv, 0.0)


def _mix_parts(key, query, negatives, hardest_indices, *, num_mix,
               num_query_mix, axis_name=None):
  """`mochi_mix` as two arrays: type 1 ``[B, s, D]`` and type 2 ``[B, s', D]``."""
  num_mix = _checks.non_negative_int('num_mix', num_mix)
  num_query_mix = _checks.non_negative_int('num_query_mix', num_query_mix)
  _checks.embeddings('query', query)
  q = lax.stop_gradient(jnp.asarray(query, jnp.float32))
  bank = lax.stop_gradient(jnp.asarray(negatives, jnp.float32))
  top = jnp.asarray(hardest_indices, jnp.int32)
  if top.ndim != 2 or top.shape[0] != q.shape[0]:
    raise ValueError(f'hardest_indices must have shape [B, N] with B = '
                     f'{q.shape[0]}, got {top.shape}')
  num_valid = jnp.sum(top >= 0, axis=1)
  valid = num_valid > 0
  b = q.shape[0]
  first_row = 0 if axis_name is None else lax.axis_index(axis_name) * b
  rows = first_row + jnp.arange(b)
  pairs, alpha, single, beta = jax.vmap(
      _row_draws, in_axes=(None, 0, 0, None, None))(
          key, rows, num_valid, num_mix, num_query_mix)
  if axis_name is None:
    # Gather only the rows that get mixed, never the [B, N, D] hardest set.
    # One batched gather: through row chunks this measured 10x slower on
    # one device (1.5 s against 0.16 s at B=256, s=1024, K=65536).
    idx1 = jnp.take_along_axis(top, pairs.reshape(b, -1), 1).reshape(
        pairs.shape)
    idx2 = jnp.take_along_axis(top, single, 1)
    take = lambda i: jnp.take(bank, jnp.maximum(i, 0), axis=0, mode='clip')
    h1 = (alpha[..., None] * take(idx1[..., 0]) +
          (1.0 - alpha[..., None]) * take(idx1[..., 1]))
    h2 = (1.0 - beta[..., None]) * take(idx2)
  else:
    h1, h2 = _mix_sharded(bank, top, pairs, alpha, single, beta, axis_name)
  h2 = h2 + beta[..., None] * q[:, None, :]
  return (lax.stop_gradient(_normalize(h1, valid)),
          lax.stop_gradient(_normalize(h2, valid)))


def _mix_sharded(bank, top, pairs, alpha, single, beta, axis_name):
  """`_mix_parts`' mixing when the hardest rows live on other devices.

  Each device fetches the rows its own queries mix from their owners
  (`bank.take_rows`): the ``N`` hardest rows of each query, or the
  ``2 s + s'`` drawn ones when fewer, a few queries at a time. The sums
  are the single-device ones, term for term (equal up to XLA's rounding
  of fused multiply-adds).
  """
  b, num = top.shape
  num_mix, num_query_mix = pairs.shape[1], single.shape[1]
  dim = bank.shape[1]

  def chunk(args):
    top_c, pairs_c, alpha_c, single_c, beta_c = args
    c = top_c.shape[0]
    if num <= 2 * num_mix + num_query_mix:  # fetch the hardest set
      wanted, pos1, pos2 = top_c, pairs_c, single_c
    else:  # fetch the drawn rows: type 1 pairs, then type 2
      wanted = jnp.concatenate([
          jnp.take_along_axis(top_c, pairs_c.reshape(c, -1), 1),
          jnp.take_along_axis(top_c, single_c, 1)], axis=1)
      pos1 = jnp.arange(2 * num_mix).reshape(1, num_mix, 2)
      pos2 = 2 * num_mix + jnp.arange(num_query_mix)[None]
      pos1 = jnp.broadcast_to(pos1, pairs_c.shape)
      pos2 = jnp.broadcast_to(pos2, single_c.shape)
    # -1 (no such negative) gives a zero row; draws never point there.
    rows = bank_lib.take_rows(bank, wanted, axis_name=axis_name)  # [c, W, D]
    take = lambda pos: jnp.take_along_axis(rows, pos[..., None], axis=1)
    h1 = (alpha_c[..., None] * take(pos1[..., 0]) +
          (1.0 - alpha_c[..., None]) * take(pos1[..., 1]))
    h2 = (1.0 - beta_c[..., None]) * take(pos2)
    return h1, h2

  per_query = min(num, 2 * num_mix + num_query_mix) + num_mix + num_query_mix
  rows = bank_lib.GATHER_CHUNK_FLOATS // max(1, per_query * dim)
  return bank_lib.map_row_chunks(
      chunk, (top, pairs, alpha, single, beta), rows)


def _map_rows(fn, xs, rows_per_query):
  """``jax.vmap(fn)(xs)`` a few query rows at a time (``xs[0]`` is [B, D])."""
  dim = xs[0].shape[1]
  rows = bank_lib.GATHER_CHUNK_FLOATS // max(1, rows_per_query * dim)
  return bank_lib.map_row_chunks(jax.vmap(fn), xs, rows)


@jax.custom_vjp
def _synthetic_logits(q, bank, top_idx, top_sims, pairs, alpha, single,
                      beta):
  return _synthetic_logits_fwd(q, bank, top_idx, top_sims, pairs, alpha,
                               single, beta)[0]


def _synthetic_logits_fwd(q, bank, top_idx, top_sims, pairs, alpha, single,
                          beta):
  def row(args):
    q_r, top_r, sims_r, pairs_r, a, single_r, b = args
    valid = jnp.any(top_r >= 0)
    take = lambda pos: jnp.take(bank, jnp.maximum(top_r[pos], 0), axis=0,
                                mode='clip')
    # Type 1, h = norm(a n_i + (1 - a) n_j): q.h from the known q.n and the
    # pair's Gram entries; the gathered rows are reduced at once.
    p0, p1 = pairs_r[:, 0], pairs_r[:, 1]
    r0, r1 = take(p0), take(p1)
    d01 = jnp.sum(r0 * r1, -1)
    d00, d11 = jnp.sum(r0 * r0, -1), jnp.sum(r1 * r1, -1)
    num1 = a * sims_r[p0] + (1.0 - a) * sims_r[p1]
    den1 = a * a * d00 + (1.0 - a) ** 2 * d11 + 2.0 * a * (1.0 - a) * d01
    # Type 2, h' = norm(b q + (1 - b) n_j): only ||n_j||^2 needs the row.
    qq = jnp.sum(q_r * q_r)
    sj = sims_r[single_r]
    rj = take(single_r)
    djj = jnp.sum(rj * rj, -1)
    num2 = b * qq + (1.0 - b) * sj
    den2 = b * b * qq + (1.0 - b) ** 2 * djj + 2.0 * b * (1.0 - b) * sj
    inv1 = jnp.where(valid, lax.rsqrt(jnp.maximum(den1, _EPS * _EPS)), 0.0)
    inv2 = jnp.where(valid, lax.rsqrt(jnp.maximum(den2, _EPS * _EPS)), 0.0)
    return jnp.concatenate([num1 * inv1, num2 * inv2]), inv1, inv2

  # Row chunks: batching all queries' gathers into [B, s, D] temporaries
  # measured 4x slower (memory traffic) and 400 MiB at B=256, s=1024.
  logits, inv1, inv2 = _map_rows(
      row, (q, top_idx, top_sims, pairs, alpha, single, beta), pairs.shape[1])
  return logits, (q, bank, top_idx, pairs, alpha, single, beta, inv1, inv2)


def _synthetic_logits_bwd(res, g):
  """d/dq with every h held constant: sum_m g_m h_m, from the N hard rows."""
  q, bank, top_idx, pairs, alpha, single, beta, inv1, inv2 = res
  s = pairs.shape[1]
  g1, g2 = g[:, :s] * inv1, g[:, s:] * inv2

  def row(args):
    q_r, top_r, pairs_r, a, single_r, b, g1_r, g2_r = args
    # Weight of each hard negative in sum_m g_m h_m.
    c = jnp.zeros(top_r.shape, jnp.float32)
    c = c.at[pairs_r[:, 0]].add(g1_r * a)
    c = c.at[pairs_r[:, 1]].add(g1_r * (1.0 - a))
    c = c.at[single_r].add(g2_r * (1.0 - b))
    hard = jnp.take(bank, jnp.maximum(top_r, 0), axis=0, mode='clip')
    return c @ hard + jnp.sum(g2_r * b) * q_r

  dq = _map_rows(row, (q, top_idx, pairs, alpha, single, beta, g1, g2),
                 top_idx.shape[1])
  return dq, None, None, None, None, None, None, None


_synthetic_logits.defvjp(_synthetic_logits_fwd, _synthetic_logits_bwd)


def mochi_logits(
    key: jax.Array,
    query: jax.typing.ArrayLike,
    negatives: jax.typing.ArrayLike,
    hardest_indices: jax.typing.ArrayLike,
    hardest_similarities: jax.typing.ArrayLike,
    *,
    num_mix: int,
    num_query_mix: int,
) -> jax.Array:
  """``q · h`` for MoCHi's synthetic negatives, without building them.

  Equal to ``einsum('bd,bmd->bm', q, mochi_mix(...))`` (the same draws from
  the same key, values and gradients with every ``h`` held constant), on one
  device. The logit of a normalised mixture is a ratio of dot products the
  bank pass already knows (``q·n``) and of the pair's Gram entries, so the
  forward pass gathers rows only to reduce them to scalars and the backward
  pass gathers the ``N`` hardest rows once, a few queries at a time, instead
  of materialising ``[B, s + s', D]`` mixtures: extra memory is about 1 MiB
  (`hnjax.losses.mochi_info_nce` uses it).

  Args:
    key: PRNG key (as for `mochi_mix`).
    query: ``[B, D]`` queries.
    negatives: ``[K, D]`` bank.
    hardest_indices: ``[B, N]`` int bank indices, ``-1`` for missing.
    hardest_similarities: ``[B, N]`` their similarities ``q·n`` (as returned
      by `hardest_negatives`).
    num_mix: ``s`` type-1 negatives per query.
    num_query_mix: ``s'`` type-2 negatives per query.

  Returns:
    ``[B, s + s']`` float32 logits (unscaled), type 1 first; 0 for a query
    without any valid hard negative.
  """
  num_mix = _checks.non_negative_int('num_mix', num_mix)
  num_query_mix = _checks.non_negative_int('num_query_mix', num_query_mix)
  _checks.embeddings('query', query)
  q = jnp.asarray(query, jnp.float32)
  bank = lax.stop_gradient(jnp.asarray(negatives, jnp.float32))
  top = jnp.asarray(hardest_indices, jnp.int32)
  sims = lax.stop_gradient(jnp.asarray(hardest_similarities, jnp.float32))
  num_valid = jnp.sum(top >= 0, axis=1)
  pairs, alpha, single, beta = jax.vmap(
      _row_draws, in_axes=(None, 0, 0, None, None))(
          key, jnp.arange(q.shape[0]), num_valid, num_mix, num_query_mix)
  sims = jnp.where(top >= 0, sims, 0.0)  # -inf past the valid ones
  return _synthetic_logits(q, bank, top, sims, pairs, alpha, single, beta)
