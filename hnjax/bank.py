"""Queries against a bank of negatives: log-sum-exp and hardest-k.

This is the negative side of every queue-based loss and sampler in hnjax
(`info_nce`, `hard_contrastive`, `hardest_negatives`, `mochi`). Two questions
are asked of a bank ``[K, D]`` for each query ``[D]``:

* the log-sum-exp of its scaled similarities (the InfoNCE denominator), and
* its ``num_top`` most similar entries (MoCHi's hardest negatives).

Both are answered on one device or with the bank sharded over a mesh axis,
either *dense* (one ``[G, K]`` logits matrix) or *blocked*: the log-sum-exp
scans bank blocks with an online maximum, holding ``[G, block]`` logits, and
the top-k runs over chunks of query rows against the whole bank (XLA's top-k
needs whole rows; merging per-block top-k lists measured several times
slower). The forward pass also accumulates each query's softmax expectation
of the bank rows, so the gradient with respect to the queries needs no
second pass over the bank; a pass for the bank's own gradient runs only when
that gradient is used.

Sharded layout (inside ``jax.shard_map`` over ``axis_name`` with ``n``
devices): every device holds ``B`` local queries and a ``[K / n, D]`` shard of
the bank. Queries are all-gathered (``G = n * B`` small vectors), each device
scores all ``G`` queries against its own shard, and per-query results are
reduced back to the device that owns the query: log-sum-exps with
``psum_scatter`` after a shared stop-gradient max, top-k candidates with
``all_to_all`` and a second top-k. No device ever holds the whole bank or the
``[G, K]`` logits. Gradients flow through the all-gather, so every device's
queries (and the bank, if it is differentiable) get exact gradients.
"""

import functools
import math
from typing import NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from hnjax import _checks
from hnjax import parallel

# Blocked path when a device would otherwise hold more logits than this.
# 2**22 float32 logits are 16 MiB; measured in benchmarks/negatives.py.
AUTO_BLOCK_THRESHOLD = 2**22
DEFAULT_BLOCK_SIZE = 4096
# Row chunks (for top-k) get at least this many logits (64 MiB): top-k needs
# whole rows, and with fewer rows per chunk the matmul streams the bank
# G / rows times.
ROW_CHUNK_LOGITS = 2**24
# The exact second pass of a sharded top-k when a shard may hold more
# candidates than it proposed (rare). benchmarks/queue_scaling.py turns it
# off to count the work of the usual path alone; never turn it off to train.
EXACT_SECOND_PASS = True
# Gathered floats per step of a row-chunked gather (1 MiB: cache-sized;
# gathering all rows at once measured 4x slower on CPU).
GATHER_CHUNK_FLOATS = 2**18


class BankStats(NamedTuple):
  """Per-query statistics of a bank, for the queries owned by this device.

  Attributes:
    lse: ``[S, B]`` float32, log-sum-exp over the unmasked bank entries of
      ``scale * similarity``, one row per requested scale; ``-inf`` for a
      query whose bank entries are all masked; NaN for a query whose
      similarity to any bank entry, masked or not, is non-finite (a NaN or
      inf in the query or the bank). Differentiable.
    top_similarities: ``[B, N]`` float32, the ``N`` largest unmasked raw
      similarities ``q . n`` in descending order; ``-inf`` where a query has
      fewer than ``N`` unmasked entries; NaN where ``lse`` is.
      Stop-gradient.
    top_indices: ``[B, N]`` int32 indices into the (global) bank of those
      entries; ``-1`` where there is none. Ties go to the lower index.
    recall: with an approximate selection (``recall_target``), the share
      of the exact top-k that it found, measured on a few queries per call
      (a float32 scalar, the same on every device); None for the exact one.
  """
  lse: jax.Array
  top_similarities: jax.Array
  top_indices: jax.Array
  recall: jax.Array | None = None

# Queries per call whose approximate top-k is checked against the exact one.
RECALL_SAMPLE = 8


def safe_log(x: jax.Array) -> jax.Array:
  """``log(x)`` that is ``-inf`` at 0 with a zero (not NaN) gradient there.

  NaN stays NaN: a sum that touched a NaN must not pass for an empty one.
  """
  positive = x > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, x, 1.0)),
                   jnp.where(x == 0, -jnp.inf, jnp.nan))


def logsumexp(x: jax.Array, axis: int = -1) -> jax.Array:
  """Log-sum-exp that is ``-inf`` (with zero gradient) on all ``-inf`` rows."""
  m = lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  s = jnp.sum(jnp.exp(x - m), axis=axis)
  return safe_log(s) + jnp.squeeze(m, axis)


def _resolve_block_size(block_size: int | None, g: int, k: int) -> int:
  """0 means dense; None picks dense or blocked by the logits size."""
  if block_size is None:
    return DEFAULT_BLOCK_SIZE if g * k > AUTO_BLOCK_THRESHOLD else 0
  _checks.non_negative_int('block_size', block_size)
  return 0 if block_size >= k else block_size


def _masked(x, mask, start, size):
  """Masked entries become -inf (after any scaling: 0 * -inf is NaN)."""
  if mask is None:
    return x
  m = lax.dynamic_slice_in_dim(mask, start, size, axis=1)
  return jnp.where(m, x, -jnp.inf)


def _varying_axes(x) -> set[str]:
  t = jax.typeof(x)
  mat = getattr(t, 'manual_axis_type', None)  # jax 0.10; later: t.vma
  return set(mat.varying if mat is not None else getattr(t, 'vma', ()))


def _varying_like(tree, *refs):
  """Gives loop-carry constants the manual axes their updates will vary over.

  Inside ``shard_map`` a scan carry must keep its type; a constant initial
  value is device-invariant while the block updates vary across devices.
  """
  axes = set().union(*(_varying_axes(r) for r in refs if r is not None))

  def cast(x):
    missing = tuple(sorted(axes - _varying_axes(x)))
    return lax.pcast(x, missing, to='varying') if missing else x

  return jax.tree.map(cast, tree)


def _scan_blocks(body, carry, k: int, block: int):
  """Runs ``body(carry, start, size)`` over [0, k) in blocks of ``block``."""
  num_full, rem = divmod(k, block)
  if num_full:
    carry, _ = lax.scan(
        lambda c, j: (body(c, j * block, block), None), carry,
        jnp.arange(num_full))
  if rem:
    carry = body(carry, num_full * block, rem)
  return carry


def _scales(scales):
  return jnp.asarray(scales, jnp.float32)[:, None, None]  # [S, 1, 1]


def _no_top(g):
  return jnp.zeros((g, 0), jnp.float32), jnp.zeros((g, 0), jnp.int32)


def _top_k(x, k, approx=None):
  """``lax.top_k`` kept as XLA's TopK: slicing or reshaping its outputs can
  turn it into a full sort of every row on CPU (5x slower, measured).

  ``approx = (recall_target, input_size)``: `jax.lax.approx_max_k` instead
  (TPU's fast path; other backends compute it exactly).
  """
  if approx is not None:
    target, size = approx
    v, i = lax.approx_max_k(x, k, recall_target=target,
                            reduction_input_size_override=size)
    return v, i
  # One barrier per output: XLA folds a barrier of the whole tuple into the
  # TopK instruction itself, which its TopK decomposer cannot handle.
  return tuple(lax.optimization_barrier(y) for y in lax.top_k(x, k))


def _chunk_stats(q, bank, mask, scales, num_top, expectation, ceiling=None,
                 approx=None):
  """Statistics of some queries against the whole (local) bank, densely.

  Returns lse ``[S, R]`` (None without scales), the softmax expectation of
  the bank rows ``E_s[n]`` ``[S, R, D]`` (or None) and the top-k values and
  indices ``[R, N]``; entries more similar than ``ceiling`` (if not None)
  are never in the top-k (they stay in the log-sum-exp).
  """
  k = bank.shape[0]
  sims = q @ bank.T  # [R, K]
  # A non-finite query or bank row makes non-finite similarities; masked or
  # not, the query's statistics become NaN (never a finite value).
  bad = jnp.any(~jnp.isfinite(sims), axis=-1)  # [R]
  lse = expect = None
  if scales:
    x = _masked(_scales(scales) * sims[None], mask, 0, k)
    m = lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(x - m)  # [S, R, K]
    acc = jnp.sum(p, axis=-1)
    lse = jnp.where(bad, jnp.nan, safe_log(acc) + m[..., 0])
    if expectation:
      expect = jnp.einsum('srk,kd->srd', p, bank) / jnp.where(
          acc > 0, acc, 1.0)[..., None]
  top_v, top_i = _no_top(q.shape[0])
  if num_top:
    x = _masked(lax.stop_gradient(sims), mask, 0, k)
    if ceiling is not None:
      x = jnp.where(x > ceiling, -jnp.inf, x)
    top_v, top_i = _top_k(x, num_top, approx)
    top_v = jnp.where(bad[:, None], jnp.nan, top_v)
  return lse, expect, top_v, top_i.astype(jnp.int32)


def _row_chunks(q, bank, mask, scales, num_top, expectation, rows,
                ceiling=None, approx=None):
  """`_chunk_stats` over the whole bank, ``rows`` queries at a time.

  Memory is ``rows * K`` logits. XLA's top_k costs about ``n + k log k`` per
  row, so one top_k per row over all ``K`` entries is several times cheaper
  than merging per-block top-k lists (which pays ``k log k`` per block).
  """
  g = q.shape[0]
  num, rem = divmod(g, rows)
  fn = lambda qc, mc: _chunk_stats(qc, bank, mc, scales, num_top, expectation,
                                   ceiling, approx)
  if num <= 1:
    return fn(q, mask)
  split = lambda x: x[:num * rows].reshape((num, rows) + x.shape[1:])
  out = lax.map(lambda a: fn(*a),
                (split(q), None if mask is None else split(mask)))
  lse, expect, top_v, top_i = out
  # [num, S, rows(, D)] -> [S, num * rows(, D)]; [num, rows, N] -> [G', N].
  rows_last = lambda x: None if x is None else jnp.moveaxis(x, 0, 1).reshape(
      (x.shape[1], num * rows) + x.shape[3:])
  lse, expect = rows_last(lse), rows_last(expect)
  top_v, top_i = (x.reshape(num * rows, -1) for x in (top_v, top_i))
  if rem:
    t = fn(q[num * rows:], None if mask is None else mask[num * rows:])
    cat = lambda a, b, ax: None if a is None else jnp.concatenate([a, b], ax)
    lse, expect = cat(lse, t[0], 1), cat(expect, t[1], 1)
    top_v, top_i = cat(top_v, t[2], 0), cat(top_i, t[3], 0)
  return lse, expect, top_v, top_i


def _column_stats(q, bank, mask, scales, block, expectation):
  """Online log-sum-exp (and softmax expectation) over bank blocks."""
  g, d = q.shape
  c = _scales(scales)

  def body(carry, start, size):
    m, acc, expect, bad = carry
    blk = lax.dynamic_slice_in_dim(bank, start, size)
    sims = q @ blk.T
    bad = bad | jnp.any(~jnp.isfinite(sims), axis=-1)  # see _chunk_stats
    x = _masked(c * sims[None], mask, start, size)  # [S, G, size]
    new_m = jnp.maximum(m, jnp.max(x, axis=-1))
    safe = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
    old = jnp.exp(m - safe)  # rescales what was accumulated so far
    p = jnp.exp(x - safe[..., None])
    acc = acc * old + jnp.sum(p, axis=-1)
    if expectation:
      expect = expect * old[..., None] + jnp.einsum('sgk,kd->sgd', p, blk)
    return new_m, acc, expect, bad

  num_s = len(scales)
  init = (jnp.full((num_s, g), -jnp.inf, jnp.float32),
          jnp.zeros((num_s, g), jnp.float32),
          jnp.zeros((num_s, g, d) if expectation else (0,), jnp.float32),
          jnp.zeros((g,), bool))
  init = _varying_like(init, q, bank, mask)
  m, acc, expect, bad = _scan_blocks(body, init, bank.shape[0], block)
  lse = jnp.where(bad, jnp.nan, safe_log(acc) + jnp.where(jnp.isfinite(m),
                                                           m, 0.0))
  if not expectation:
    return lse, None
  return lse, expect / jnp.where(acc > 0, acc, 1.0)[..., None]


def _forward(q, bank, mask, scales, num_top, block, expectation, ceiling,
             approx=None):
  """lse ``[S, G]``, expectation ``[S, G, D]`` or None, top-k ``[G, N]``."""
  g, k = q.shape[0], bank.shape[0]
  if not block:
    return _chunk_stats(q, bank, mask, scales, num_top, expectation, ceiling,
                        approx)
  lse = expect = None
  if scales:
    # Column blocks stay in cache: measured about 2x faster than one pass
    # over [G, K] logits, even though top-k then recomputes the logits.
    lse, expect = _column_stats(q, bank, mask, scales, block, expectation)
  top_v, top_i = _no_top(g)
  if num_top:
    rows = max(1, min(g, max(g * block, ROW_CHUNK_LOGITS) // k))
    _, _, top_v, top_i = _row_chunks(q, bank, mask, (), num_top, False, rows,
                                     ceiling, approx)
  return lse, expect, top_v, top_i


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _stats(q, bank, mask, scales, num_top, block, ceiling, approx):
  lse, _, top_v, top_i = _forward(q, bank, mask, scales, num_top, block,
                                  expectation=False, ceiling=ceiling,
                                  approx=approx)
  return lse, top_v, top_i


def _stats_fwd(q, bank, mask, scales, num_top, block, ceiling, approx):
  # The forward pass also accumulates each query's softmax expectation of
  # the bank rows, E_s[n] = sum_j p_sj n_j: the query gradient is then
  # sum_s g_s c_s E_s[n], with no second pass over the bank.
  lse, expect, top_v, top_i = _forward(q, bank, mask, scales, num_top, block,
                                       expectation=True, ceiling=ceiling,
                                       approx=approx)
  return (lse, top_v, top_i), (q, bank, mask, lse, expect)


def _stats_bwd(scales, num_top, block, ceiling, approx, res, cts):
  # The top-k outputs are selection statistics: no gradient.
  del num_top, ceiling, approx
  q, bank, mask, lse, expect = res
  if lse is None:
    return jnp.zeros_like(q), jnp.zeros_like(bank), None
  g_lse = cts[0]  # [S, G]
  c = _scales(scales)
  dq = jnp.sum(g_lse[..., None] * c * expect, axis=0)

  def dbank_body(dbank, start, size):
    """d loss / d bank rows of one block: (sum_s g_s c_s softmax_s)ᵀ q."""
    sims = q @ lax.dynamic_slice_in_dim(bank, start, size).T
    x = _masked(c * sims[None], mask, start, size)
    p = jnp.exp(x - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    w = jnp.sum(g_lse[..., None] * c * p, axis=0)  # [G, size]
    return lax.dynamic_update_slice_in_dim(dbank, w.T @ q, start, axis=0)

  # Only a differentiable bank (in-batch negatives) needs this pass; for a
  # memory queue its result is unused and XLA drops the loop.
  k = bank.shape[0]
  dbank = _scan_blocks(
      dbank_body, _varying_like(jnp.zeros_like(bank), q, bank, mask, g_lse),
      k, block or k)
  return dq, dbank, None


_stats.defvjp(_stats_fwd, _stats_bwd)


def check_bank(query, negatives, negative_mask, axis_name):
  """Validates shapes; returns (axis size n, G, local bank size)."""
  _checks.embeddings('query', query)
  _checks.embeddings('negatives', negatives)
  if query.shape[1] != negatives.shape[1]:
    raise ValueError(
        f'query and negatives must have the same dim, got {query.shape} and '
        f'{negatives.shape}')
  n = _checks.axis_size(axis_name)
  g, k_local = n * query.shape[0], negatives.shape[0]
  if negative_mask is not None:
    expected = (g, k_local)
    if jnp.shape(negative_mask) != expected:
      where = ('[global batch, local bank shard]' if axis_name else
               '[batch, bank]')
      raise ValueError(
          f'negative_mask must have shape {where} = {expected}, got '
          f'{jnp.shape(negative_mask)}')
    if jnp.result_type(negative_mask) != jnp.bool_:
      raise ValueError(
          f'negative_mask must be boolean, got {jnp.result_type(negative_mask)}')
  return n, g, k_local


def bank_stats(
    query: jax.typing.ArrayLike,
    negatives: jax.typing.ArrayLike,
    *,
    scales: Sequence[float] = (),
    num_top: int = 0,
    negative_mask: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
    block_size: int | None = None,
    skip_top: int = 0,
    max_similarity: float | None = None,
    recall_target: float | None = None,
) -> BankStats:
  """Log-sum-exps and hardest entries of a bank for each query.

  For query ``q_b`` and bank entries ``n_j`` (unmasked ones only):

  .. math::
    \\mathrm{lse}_{s,b} = \\log \\sum_j e^{c_s\\, q_b \\cdot n_j}, \\qquad
    \\mathrm{top}_b = \\operatorname{top-N}_j\\, q_b \\cdot n_j

  Computed in float32. With ``axis_name``, call inside ``jax.shard_map`` over
  that axis: ``query`` is the device's ``[B, D]`` rows, ``negatives`` its
  ``[K / n, D]`` shard, and results are for the device's own queries but over
  the whole bank (indices are global: ``shard * K / n + local index``).

  Peak extra memory per device, in float32 words, with ``G = n * B`` and
  ``S`` scales: dense ``(S + 1) * G * K / n`` logits; blocked
  ``(S + 1) * G * block_size`` for the log-sum-exp and, with ``num_top``,
  ``(S + 1) * max(G * block_size, 2**24)`` for top-k row chunks (top-k needs
  whole rows), plus ``S * G * D`` softmax expectations kept for the backward
  pass and ``2 * G * T`` top-k candidates, where sharded ``T`` is about
  ``N / n + 6 sqrt(N / n) + 4`` proposals per shard (a second pass with
  ``T = N`` runs when a shard may have held back one of a query's top
  ``N``). Never ``G * K``.

  Args:
    query: ``[B, D]`` queries (local rows when sharded).
    negatives: ``[K, D]`` bank (``[K / n, D]`` local shard when sharded).
    scales: multipliers ``c_s`` of the similarities, one log-sum-exp each
      (e.g. ``(1 / temperature,)``).
    num_top: ``N``, number of hardest entries to return per query (0: none).
    negative_mask: optional boolean ``[B, K]`` (sharded: ``[G, K / n]``, the
      device's column block of the global mask); False drops that entry for
      that query from both the log-sum-exp and the top-k.
    axis_name: mesh axis the bank and the queries are sharded over, or None.
    block_size: bank rows per block. None chooses dense or blocked by size;
      0 forces dense.
    skip_top: ``r``: the top-k skips each query's ``r`` most similar
      entries and returns ranks ``r … r + N - 1`` (a hardness range that
      leaves out the likeliest false negatives).
    max_similarity: ``c``: entries more similar than ``c`` are never in
      the top-k (None: no ceiling). Ranks count from the most similar
      entry at or below ``c``. Neither option touches the log-sum-exp.
    recall_target: None for the exact top-k; a float in ``(0, 1]`` selects
      with `jax.lax.approx_max_k` at that recall target (TPU's fast path;
      CPU and GPU compute it exactly), with no exact second pass, and
      reports the recall achieved on ``RECALL_SAMPLE`` queries.

  Returns:
    A `BankStats` with ``lse [S, B]``, ``top_similarities [B, N]``,
    ``top_indices [B, N]`` and ``recall``.
  """
  n, g, k_local = check_bank(query, negatives, negative_mask, axis_name)
  num_top = _checks.non_negative_int('num_top', num_top)
  skip_top = _checks.non_negative_int('skip_top', skip_top)
  if num_top + skip_top > n * k_local:
    asked = f'num_top={num_top}' + (f' + skip_top={skip_top}' if skip_top
                                    else '')
    raise ValueError(
        f'{asked} is larger than the bank ({n * k_local} entries)')
  if skip_top and not num_top:
    raise ValueError(f'skip_top={skip_top} needs num_top > 0')
  if max_similarity is not None:
    max_similarity = float(max_similarity)
    if not math.isfinite(max_similarity):
      raise ValueError(f'max_similarity must be finite or None, got '
                       f'{max_similarity}')
  approx = None
  if recall_target is not None:
    recall_target = float(recall_target)
    if not 0 < recall_target <= 1:
      raise ValueError(f'recall_target must be in (0, 1] or None, got '
                       f'{recall_target}')
    approx = (recall_target, n * k_local)
  scales = tuple(float(s) for s in scales)
  q = parallel.gather(jnp.asarray(query, jnp.float32), axis_name)
  bank = jnp.asarray(negatives, jnp.float32)
  wanted = num_top + skip_top  # the first skip_top are dropped below
  local_top = min(wanted, k_local)
  # Sharded: each shard first proposes only `_proposals` candidates per
  # query, enough unless a query's hardest entries crowd into one shard.
  sent = local_top if axis_name is None else min(local_top,
                                                 _proposals(wanted, n))
  block = _resolve_block_size(block_size, g, k_local)
  lse, top_v, top_i = _stats(q, bank, negative_mask, scales, sent, block,
                             max_similarity, approx)
  if lse is None:
    lse = jnp.zeros((0, g), jnp.float32)
  recall = None
  if approx is not None and sent:
    recall = _recall(q, bank, negative_mask, sent, max_similarity, top_v,
                     top_i, axis_name)
  if axis_name is None:
    top_v = lax.stop_gradient(top_v)
    stats = BankStats(lse, top_v, jnp.where(jnp.isfinite(top_v), top_i, -1),
                      recall)
  else:
    lse = _lse_to_owner(lse, n, axis_name)
    top = _top_to_owner(top_v, top_i, k_local, wanted, n, axis_name,
                        complete=sent == local_top)
    # (An approximate selection is not exact to begin with: no second pass.)
    if sent < local_top and EXACT_SECOND_PASS and approx is None:
      def exact():  # every shard sends all its local_top candidates
        _, _, v, i = _forward(lax.stop_gradient(q), lax.stop_gradient(bank),
                              negative_mask, (), local_top, block, False,
                              max_similarity)
        return _top_to_owner(v, i, k_local, wanted, n, axis_name,
                             complete=True)[:2]
      top = lax.cond(top[2], exact, lambda: top[:2])
    stats = BankStats(lse, *top[:2], recall)
  if not skip_top:
    return stats
  return BankStats(stats.lse, stats.top_similarities[:, skip_top:],
                   stats.top_indices[:, skip_top:], recall)


def _recall(q, bank, mask, k, ceiling, top_v, top_i, axis_name):
  """Share of the exact local top-k the approximate one found, on a sample.

  ``RECALL_SAMPLE`` queries spread over the global batch, against this
  device's bank shard (the only approximate step), averaged over devices.
  """
  g = q.shape[0]
  rows = jnp.arange(min(RECALL_SAMPLE, g)) * (g // min(RECALL_SAMPLE, g))
  q, top_v, top_i = (lax.stop_gradient(x[rows]) for x in (q, top_v, top_i))
  mask = None if mask is None else mask[rows]
  _, _, ev, ei = _chunk_stats(q, lax.stop_gradient(bank), mask, (), k,
                              False, ceiling)
  exact = jnp.isfinite(ev)
  found = jnp.any((ei[:, :, None] == top_i[:, None, :])
                  & jnp.isfinite(top_v)[:, None, :], axis=-1)
  recall = jnp.sum(found & exact) / jnp.maximum(jnp.sum(exact), 1)
  return recall if axis_name is None else lax.pmean(recall, axis_name)


def count_above(
    query: jax.typing.ArrayLike,
    negatives: jax.typing.ArrayLike,
    threshold: jax.typing.ArrayLike,
    *,
    negative_mask: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
    block_size: int | None = None,
) -> jax.Array:
  """How many bank entries each query finds more similar than a threshold.

  ``count_b = #{j : q_b · n_j > t_b}`` over the unmasked entries, computed
  in float32 a block of the bank at a time (never ``[G, K]`` when blocked,
  as `bank_stats`). With ``threshold = q · k`` (the positive's similarity)
  ``1 + count`` is the positive's rank among all candidates. No gradient.

  Args:
    query: ``[B, D]`` queries (local rows when sharded).
    negatives: ``[K, D]`` bank (``[K / n, D]`` local shard when sharded).
    threshold: ``[B]`` one threshold per query.
    negative_mask: optional boolean ``[B, K]`` (sharded: ``[G, K / n]``);
      False entries are never counted.
    axis_name: mesh axis the bank and the queries are sharded over, or None
      (inside ``jax.shard_map``, counts are over the whole bank).
    block_size: bank rows per block (None: automatic; 0: dense).

  Returns:
    int32 ``[B]`` counts. A non-finite query or threshold counts nothing.
  """
  n, g, k_local = check_bank(query, negatives, negative_mask, axis_name)
  if jnp.shape(threshold) != (g // n,):
    raise ValueError(f'threshold must have shape [batch] = ({g // n},), got '
                     f'{jnp.shape(threshold)}')
  q = parallel.gather(lax.stop_gradient(jnp.asarray(query, jnp.float32)),
                      axis_name)
  t = parallel.gather(lax.stop_gradient(jnp.asarray(threshold, jnp.float32)),
                      axis_name)
  bank = lax.stop_gradient(jnp.asarray(negatives, jnp.float32))
  block = _resolve_block_size(block_size, g, k_local)

  def count(start, size):
    x = q @ lax.dynamic_slice_in_dim(bank, start, size).T  # [G, size]
    x = _masked(x, negative_mask, start, size)
    return jnp.sum(x > t[:, None], axis=1, dtype=jnp.int32)

  if block == 0:
    counts = count(0, k_local)
  else:
    zero = _varying_like(jnp.zeros((g,), jnp.int32), q, bank)
    counts = _scan_blocks(lambda c, start, size: c + count(start, size), zero,
                          k_local, block)
  if axis_name is not None:  # every shard's counts of the owner's queries
    counts = lax.psum_scatter(counts, axis_name, scatter_dimension=0,
                              tiled=True)
  return counts


def _proposals(wanted: int, n: int) -> int:
  """Candidates per query each of ``n`` shards proposes for a global top-k.

  A query's ``wanted`` hardest entries fall on a shard about ``wanted / n``
  at a time (binomially); six standard deviations and a few more leave a
  full shard, which triggers the exact second pass, rare for a bank whose
  rows are spread over the shards at random (a MoCo queue).
  """
  mean = wanted / n
  return math.ceil(mean + 6.0 * math.sqrt(mean) + 4.0)


def _lse_to_owner(lse, n, axis_name):
  """Per-shard log-sum-exps of all G queries -> the owner's ``[S, B]``."""
  b = lse.shape[1] // n
  me = lax.axis_index(axis_name)
  # Shift by a shared stop-gradient max (pmax has no differentiation rule,
  # so the stop_gradient goes inside), sum the exponentials of the owner's
  # rows across shards.
  m = lax.pmax(lax.stop_gradient(lse), axis_name)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  s = lax.psum_scatter(jnp.exp(lse - m), axis_name, scatter_dimension=1,
                       tiled=True)
  m_own = lax.dynamic_slice_in_dim(m, me * b, b, axis=1)
  return safe_log(s) + m_own


def _top_to_owner(top_v, top_i, k_local, num_top, n, axis_name, complete):
  """Per-shard top-k candidates of all G queries -> the owner's top-k.

  Each shard sends every owner its candidates for the owner's queries and
  the owner keeps the best ``num_top``. Candidates arrive in shard order,
  so ties still go to the lower global index, as in the dense top-k.

  Returns ``(values [B, N], indices [B, N], redo)``: ``redo`` (the same on
  every device) is True when some shard sent fewer candidates than it has
  and its last one could still belong in some query's top-k (it is not
  below the owner's ``num_top``-th): then the result may be inexact and
  must be recomputed with every candidate. Always False if ``complete``.
  """
  g, nl = top_v.shape
  b = g // n
  if not num_top:
    return top_v[:b], top_i[:b], jnp.zeros((), bool)
  me = lax.axis_index(axis_name)
  top_v = lax.stop_gradient(top_v)
  top_i = jnp.where(jnp.isfinite(top_v), top_i + me * k_local, -1)
  v = lax.all_to_all(top_v.reshape(n, b, nl), axis_name, 0, 0)
  i = lax.all_to_all(top_i.reshape(n, b, nl), axis_name, 0, 0)
  last = v[:, :, -1].T  # [B, n]: each shard's weakest candidate sent
  v = jnp.moveaxis(v, 0, 1).reshape(b, n * nl)
  i = jnp.moveaxis(i, 0, 1).reshape(b, n * nl)
  top_v, pos = _top_k(v, num_top)
  top_i = jnp.where(jnp.isfinite(top_v), jnp.take_along_axis(i, pos, 1), -1)
  if complete:
    return top_v, top_i, jnp.zeros((), bool)
  # A shard whose last candidate was finite may hold more; they are no
  # larger than it, so they matter only if it reaches the N-th kept value
  # (-inf when fewer than N were found). NaN rows are NaN either way.
  unsure = jnp.isfinite(last) & (last >= top_v[:, -1:])
  redo = lax.pmax(jnp.any(unsure).astype(jnp.int32), axis_name) > 0
  return top_v, top_i, redo


def map_row_chunks(fn, xs, rows: int):
  """``fn(xs)`` computed ``rows`` leading rows at a time (a `lax.map`).

  ``fn`` maps a chunk of rows to the same rows of its output, so that
  ``concatenate([fn(xs[i:j]) ...]) == fn(xs)``; a last, smaller chunk takes
  the remainder. Bounds the temporaries of ``fn`` (gathers, mostly). Unlike
  ``lax.map(..., batch_size=rows)`` it accepts zero-size inputs, and ``fn``
  may use collectives over the chunk.

  Args:
    fn: function of a pytree of ``[c, ...]`` chunks, returning ``[c, ...]``.
    xs: pytree of arrays with the same leading size ``B``.
    rows: rows per chunk, ``>= 1``.

  Returns:
    The pytree ``fn(xs)``, leading size ``B``.
  """
  b = jax.tree.leaves(xs)[0].shape[0]
  rows = max(1, min(b, rows))
  n = b // rows
  chunks = jax.tree.map(
      lambda x: x[:n * rows].reshape((n, rows) + x.shape[1:]), xs)
  out = jax.tree.map(lambda y: y.reshape((n * rows,) + y.shape[2:]),
                     lax.map(fn, chunks))
  if b % rows:
    rest = fn(jax.tree.map(lambda x: x[n * rows:], xs))
    out = jax.tree.map(lambda y, z: jnp.concatenate([y, z]), out, rest)
  return out


# Slots per (device, owner) pair in a routed row exchange, as a multiple of
# the mean ``E / n`` of ``E`` requested rows: a pair that asks for more takes
# more rounds (exact either way, slower).
ROUTE_CAPACITY = 2.0


def _route(table, idx, axis_name, capacity):
  """``table[idx]`` for global indices ``idx`` ``[E]`` into a sharded table.

  Each index is sent to the device owning its row (an ``all_to_all`` of
  ``[n, C]`` local indices, ``C = ceil(capacity * E / n)`` slots per owner),
  the owner gathers its rows and sends them back the same way. A device
  that asks one owner for more than ``C`` rows gets the rest in further
  rounds, as many as the most loaded pair of the mesh needs, so the result
  is exact for any layout. Per device: ``n * C ~ capacity * E`` rows each
  way per round, whatever ``n`` is. Index ``-1`` gives a zero row.
  """
  k_local = table.shape[0]
  n = lax.axis_size(axis_name)
  e = idx.shape[0]
  owner = jnp.where(idx >= 0, idx // k_local, n)  # n: no row (sorts last)
  local = idx - owner * k_local
  order = jnp.argsort(owner, stable=True)
  counts = jnp.zeros((n + 1,), jnp.int32).at[owner].add(1)[:n]
  starts = jnp.cumsum(counts) - counts
  # Rank of each index among those its device sends to the same owner.
  rank_sorted = jnp.arange(e) - jnp.concatenate([starts, jnp.full(
      (1,), e, jnp.int32)])[owner[order]]
  rank = jnp.zeros((e,), jnp.int32).at[order].set(rank_sorted)
  local_sorted = local[order]
  c = max(1, min(e, math.ceil(capacity * e / n)))
  slots = jnp.arange(c)
  trail = (1,) * (table.ndim - 1)  # broadcasts a per-row mask over a row
  rounds = -(-lax.pmax(jnp.max(counts), axis_name) // c)

  def one_round(t, rows):
    first = t * c
    used = first + slots[None, :] < counts[:, None]  # [n, C]
    send = jnp.where(used, local_sorted[jnp.clip(
        starts[:, None] + first + slots[None, :], 0, e - 1)], -1)
    asked = lax.all_to_all(send, axis_name, 0, 0)  # [n, C] from each device
    got = jnp.where((asked >= 0).reshape(asked.shape + trail),
                    table[jnp.clip(asked, 0, k_local - 1)], 0)
    back = lax.all_to_all(got, axis_name, 0, 0)  # [n, C, ...] my rows
    slot = rank - first
    mine = (owner < n) & (slot >= 0) & (slot < c)
    row = back[jnp.clip(owner, 0, n - 1), jnp.clip(slot, 0, c - 1)]
    return jnp.where(mine.reshape((e,) + trail), row, rows)

  rows = jnp.zeros((e,) + table.shape[1:], table.dtype)
  rows = _varying_like(rows, table, idx)
  return lax.fori_loop(0, rounds, one_round, rows)


def take_rows(
    table: jax.Array,
    indices: jax.Array,
    *,
    axis_name: str | None = None,
    capacity: float | None = None,
) -> jax.Array:
  """Rows of a (sharded) table at global indices: ``out[...] = table[i[...]]``.

  With ``axis_name`` (inside ``jax.shard_map``) ``table`` is this device's
  ``[K / n, ...]`` shard of a ``[K, ...]`` table and ``indices`` are global;
  each index is routed to the device that owns its row and the row comes
  back, so a device exchanges about ``capacity * indices.size`` rows per
  round whatever the number of devices (see `ROUTE_CAPACITY`), never the
  whole table nor every device's requests. All devices must call it with
  the same ``indices`` shape. Index ``-1`` gives a row of zeros. No
  gradient (selection statistics, queue rows).

  Args:
    table: ``[K, ...]`` (``[K / n, ...]`` local shard when sharded).
    indices: int array of any shape, global indices in ``[-1, K)``.
    axis_name: mesh axis of the table shards, or None.
    capacity: slots per owner as a multiple of ``indices.size / n`` (None:
      `ROUTE_CAPACITY`). Uneven requests take extra rounds.

  Returns:
    ``indices.shape + table.shape[1:]`` rows, in ``table``'s dtype.
  """
  table = lax.stop_gradient(jnp.asarray(table))
  idx = jnp.asarray(indices, jnp.int32)
  flat = idx.reshape(-1)
  if axis_name is None or flat.size == 0:
    k = table.shape[0]
    rows = jnp.where((flat >= 0).reshape((-1,) + (1,) * (table.ndim - 1)),
                     table[jnp.clip(flat, 0, k - 1)], 0)
  else:
    rows = _route(table, flat, axis_name,
                  ROUTE_CAPACITY if capacity is None else float(capacity))
  return rows.reshape(idx.shape + table.shape[1:])

