"""How hard, and how false, are a query's hardest negatives?

Two per-query statistics that tell whether hard-negative mining is mining
the right thing, for any bank with labels (a MoCo queue stores the labels of
its keys; the embedded datasets have them):

* the **false-negative share**: of the ``N`` negatives most similar to the
  query, the fraction with the query's own label. Mixing or up-weighting
  them pushes apart what belongs together; a hardness range (``skip_top``,
  ``max_similarity``) is meant to lower it for the negatives actually used;
* the **positive rank** among all candidates: ``1 +`` the number of
  negatives more similar to the query than its positive (1: the positive
  comes first, the MoCo pretext task solved for this query).

Both are stop-gradient, exact, blocked over the bank like `hnjax.bank`, and
sharded like it: inside ``jax.shard_map`` each device passes its queries and
its bank shard and gets its queries' statistics over the whole bank.
"""

import jax
from jax import lax
import jax.numpy as jnp

from hnjax import _checks
from hnjax import bank as bank_lib
from hnjax import numerics


def _share(indices, labels, query_labels, axis_name):
  """Fraction of the selected rows (index >= 0) with the query's label;
  ``labels`` is the local bank shard's (``indices`` are global)."""
  # Each label comes from the device that owns its row (routed, so the
  # traffic does not grow with the number of devices).
  found = bank_lib.take_rows(labels, indices, axis_name=axis_name)
  valid = indices >= 0  # -1: fewer candidates than asked
  same = valid & (found >= 0) & (found == query_labels[:, None])
  num = jnp.sum(valid, axis=1)
  share = jnp.sum(same, axis=1) / jnp.maximum(num, 1)
  # Unknown query label, or nothing selected: no share to report.
  return jnp.where((query_labels >= 0) & (num > 0), share, jnp.nan)


def hardness_diagnostics(
    query: jax.typing.ArrayLike,
    positive: jax.typing.ArrayLike,
    negatives: jax.typing.ArrayLike,
    query_labels: jax.typing.ArrayLike,
    negative_labels: jax.typing.ArrayLike,
    *,
    num_hard: int,
    negative_mask: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
    block_size: int | None = None,
    skip_top: int = 0,
    max_similarity: float | None = None,
) -> dict[str, jax.Array]:
  """False-negative share of the hardest negatives and the positive's rank.

  Args:
    query: ``[B, D]`` queries (local rows when sharded).
    positive: ``[B, D]`` their positives.
    negatives: ``[K, D]`` bank (``[K / n, D]`` local shard when sharded).
    query_labels: int ``[B]`` labels of the queries (-1: unknown, the
      query's shares are NaN).
    negative_labels: int ``[K]`` labels of the bank rows (``[K / n]`` local
      shard); -1 (unknown, e.g. a queue's initial random keys) never counts
      as a false negative.
    num_hard: ``N >= 1``, the hardest negatives looked at.
    negative_mask: optional bool ``[B, K]`` (sharded: ``[G, K / n]``);
      masked entries are neither among the hardest nor counted in the rank.
    axis_name: mesh axis of a sharded batch and bank, or None.
    block_size: bank rows per block (None: automatic; 0: dense).
    skip_top: with ``max_similarity``: also report the share of the range
      that `hnjax.samplers.mochi` would mix (ranks ``r … r + N - 1``).
    max_similarity: ceiling of that range (None: none).

  Returns:
    A dict of float32 ``[B]``: ``false_negative_share`` (of the ``N``
    hardest), ``positive_rank`` (``1 + #{j : q·n_j > q·k}``, in ``[1, K +
    1]``), and, when a range is asked, ``selected_false_negative_share``.
    Rows with a non-finite query or positive, or whose similarities
    touched a non-finite bank row, are NaN.
  """
  num_hard = _checks.positive_int('num_hard', num_hard)
  _checks.embeddings('query', query)
  _checks.same_shape('query', query, 'positive', positive)
  q = lax.stop_gradient(jnp.asarray(query, jnp.float32))
  k = lax.stop_gradient(jnp.asarray(positive, jnp.float32))
  query_labels = jnp.asarray(query_labels, jnp.int32)
  negative_labels = jnp.asarray(negative_labels, jnp.int32)
  if query_labels.shape != q.shape[:1]:
    raise ValueError(f'query_labels must have shape [batch] = {q.shape[:1]}, '
                     f'got {query_labels.shape}')
  if negative_labels.shape != jnp.shape(negatives)[:1]:
    raise ValueError(
        f'negative_labels must have shape [bank] = {jnp.shape(negatives)[:1]}'
        f', got {negative_labels.shape}')
  common = dict(negative_mask=negative_mask, axis_name=axis_name,
                block_size=block_size)
  hardest = bank_lib.bank_stats(q, negatives, num_top=num_hard, **common)
  out = dict(false_negative_share=_share(
      hardest.top_indices, negative_labels, query_labels, axis_name))
  if skip_top or max_similarity is not None:
    mixed = bank_lib.bank_stats(q, negatives, num_top=num_hard,
                                skip_top=skip_top,
                                max_similarity=max_similarity, **common)
    out['selected_false_negative_share'] = _share(
        mixed.top_indices, negative_labels, query_labels, axis_name)
  above = bank_lib.count_above(q, negatives, jnp.sum(q * k, axis=-1),
                               **common)
  out['positive_rank'] = 1.0 + above.astype(jnp.float32)
  # A query whose similarities touched a NaN or inf bank row has NaN
  # hardest similarities (`bank_stats`); its counts would be finite and
  # wrong.
  bad = (~numerics.finite_rows(q, k)
         | jnp.isnan(hardest.top_similarities).any(axis=1))
  return {name: jnp.where(bad, jnp.nan, v) for name, v in out.items()}
