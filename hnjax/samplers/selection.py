"""Hard-negative selection and false-negative masks.

Masks follow one convention everywhere in hnjax: ``True`` keeps a negative,
``False`` removes it for that query.
"""

import jax
from jax import lax
import jax.numpy as jnp

from hnjax import _checks
from hnjax import bank as bank_lib


def hardest_negatives(
    query: jax.typing.ArrayLike,
    negatives: jax.typing.ArrayLike,
    num: int,
    *,
    negative_mask: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
    block_size: int | None = None,
    skip_top: int = 0,
    max_similarity: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The ``num`` most similar unmasked negatives of each query.

  With ``skip_top = r`` and ``max_similarity = c`` it returns a hardness
  range instead: negatives more similar than ``c`` are dropped, then the
  ``r`` most similar of the rest, and the next ``num`` (ranks ``r … r + num
  - 1``) are returned: hard, but less likely to be false negatives than
  the very hardest.

  Similarities are raw dot products ``q · n`` in float32 (callers normalise).
  Selection is a statistic, not a training signal: both outputs are
  stop-gradient (MoCHi, ALGORITHMS.md §3.1 step 2).

  With ``axis_name`` (inside ``jax.shard_map``), ``negatives`` is this
  device's ``[K / n, D]`` shard and the selection is global: each shard
  proposes its local top-``num``, the owner of each query keeps the best
  ``num`` (a two-stage top-k), and indices are global bank indices
  ``shard * K / n + local index``. Peak memory per device: the
  ``[G, K / n]`` logits (dense) or ``[G, block_size]`` (blocked), plus
  ``2 * G * num`` candidates, with ``G`` the global batch.

  Args:
    query: ``[B, D]`` queries.
    negatives: ``[K, D]`` bank (local shard ``[K / n, D]`` when sharded).
    num: number ``N`` of negatives per query, ``1 <= N <= K``.
    negative_mask: optional bool ``[B, K]`` (sharded: ``[G, K / n]``);
      False entries are never selected.
    axis_name: mesh axis the queries and the bank are sharded over, or None.
    block_size: bank rows per block (None: automatic; 0: dense).
    skip_top: ``r >= 0``, the most similar negatives to skip
      (``num + r <= K``).
    max_similarity: ``c``, drop negatives with ``q · n > c`` (None: none).

  Returns:
    ``(similarities, indices)``: ``[B, N]`` float32 in descending order and
    ``[B, N]`` int32 bank indices. Ties go to the lower index. Where a query
    has fewer than ``N`` unmasked negatives the remaining slots hold
    similarity ``-inf`` and index ``-1``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.samplers import hardest_negatives
    >>> q = jnp.array([[1., 0.]])
    >>> bank = jnp.array([[0., 1.], [.8, .6], [-1., 0.], [.6, .8]])
    >>> sims, idx = hardest_negatives(q, bank, 2)
    >>> sims, idx
    (Array([[0.8, 0.6]], dtype=float32), Array([[1, 3]], dtype=int32))
  """
  _checks.positive_int('num', num)
  stats = bank_lib.bank_stats(
      query, negatives, num_top=num, negative_mask=negative_mask,
      axis_name=axis_name, block_size=block_size, skip_top=skip_top,
      max_similarity=max_similarity)
  return stats.top_similarities, stats.top_indices


def _ids(name, x):
  x = jnp.asarray(x)
  if x.ndim != 1 or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f'{name} must be a 1-D integer array, got {x.dtype}'
                     f'{list(x.shape)}')
  _checks.non_empty(name, x)
  return x


def same_id_mask(
    query_ids: jax.typing.ArrayLike,
    bank_ids: jax.typing.ArrayLike,
) -> jax.Array:
  """Removes a query's own instance from its negatives.

  In a MoCo queue an earlier key of the same image survives while
  ``K > N_train - B`` and MoCHi's top-k would preferentially pick it
  (ALGORITHMS.md §8.1). Negative ids mean "unknown" (e.g. the random keys a
  queue starts with) and never match.

  Args:
    query_ids: ``[B]`` int dataset index of each query.
    bank_ids: ``[K]`` int dataset index of each bank entry.

  Returns:
    ``[B, K]`` bool, True where the entry may be used as a negative.

  Examples:
    >>> from hnjax.samplers import same_id_mask
    >>> same_id_mask(jnp.array([3, 5]), jnp.array([5, -1, 3]))
    Array([[ True,  True, False],
           [False,  True,  True]], dtype=bool)
  """
  q = _ids('query_ids', query_ids)[:, None]
  b = _ids('bank_ids', bank_ids)[None, :]
  return (q != b) | (q < 0) | (b < 0)


def same_label_mask(
    query_labels: jax.typing.ArrayLike,
    bank_labels: jax.typing.ArrayLike,
) -> jax.Array:
  """Removes same-class negatives (the "class oracle" of the MoCHi paper).

  Negative labels mean "unknown" and never match.

  Args:
    query_labels: ``[B]`` int class of each query.
    bank_labels: ``[K]`` int class of each bank entry.

  Returns:
    ``[B, K]`` bool, True where the entry may be used as a negative.

  Examples:
    >>> from hnjax.samplers import same_label_mask
    >>> same_label_mask(jnp.array([0, 1]), jnp.array([1, 1, -1]))
    Array([[ True,  True,  True],
           [False, False,  True]], dtype=bool)
  """
  q = _ids('query_labels', query_labels)[:, None]
  b = _ids('bank_labels', bank_labels)[None, :]
  return (q != b) | (q < 0) | (b < 0)


def guide_margin_mask(
    guide_query_bank: jax.typing.ArrayLike,
    guide_query_positive: jax.typing.ArrayLike,
    *,
    margin: float = 0.0,
    mode: str = 'absolute',
) -> jax.Array:
  """GISTEmbed's guided false-negative filter.

  A frozen guide model scores every candidate. Candidates the guide finds
  more similar to the query than (a margin below) the true positive are
  likely false negatives and are removed:

  * ``'absolute'``: remove if ``g(q, n) > g(q, p) - margin``;
  * ``'relative'``: remove if ``g(q, n) > g(q, p) * (1 - margin)``.

  The comparison is strict, as in sentence-transformers: a candidate tied
  with the positive at ``margin=0`` survives. For in-batch candidate blocks
  whose diagonal is the query itself or its positive, set the diagonal
  yourself (ALGORITHMS.md §8.10). Inputs are guide scores: they carry no
  gradient into the mask.

  Args:
    guide_query_bank: ``[B, K]`` guide similarities of queries and candidates.
    guide_query_positive: ``[B]`` guide similarity of each query and its
      positive.
    margin: ``>= 0``.
    mode: ``'absolute'`` or ``'relative'``.

  Returns:
    ``[B, K]`` bool, True where the candidate may be used as a negative.

  Examples:
    >>> from hnjax.samplers import guide_margin_mask
    >>> g = jnp.array([[0.9, 0.5, 0.75]])
    >>> guide_margin_mask(g, jnp.array([0.8]), margin=0.1)  # drop > 0.7
    Array([[False,  True, False]], dtype=bool)

  References:
    Solatorio, "GISTEmbed: Guided In-sample Selection of Training Negatives
    for Text Embedding Fine-tuning", 2024, https://arxiv.org/abs/2402.16829
  """
  _checks.one_of('mode', mode, ('absolute', 'relative'))
  m = _checks.concrete_or_none(margin)
  if m is not None and m < 0:
    raise ValueError(f'margin must be >= 0, got {m}')
  _checks.rank('guide_query_bank', guide_query_bank, 2, '[B, K]')
  _checks.non_empty('guide_query_bank', guide_query_bank)
  g = lax.stop_gradient(jnp.asarray(guide_query_bank, jnp.float32))
  gp = lax.stop_gradient(jnp.asarray(guide_query_positive, jnp.float32))
  if gp.shape != g.shape[:1]:
    raise ValueError(
        f'guide_query_positive must have shape [B] = {g.shape[:1]}, got '
        f'{gp.shape}')
  threshold = gp - margin if mode == 'absolute' else gp * (1.0 - margin)
  return ~(g > threshold[:, None])


def hard_top_k_mask(similarities: jax.typing.ArrayLike, k: int) -> jax.Array:
  """Keeps only the ``k`` hardest negatives of each row.

  Wang & Liu's explicit hard contrastive loss puts only the negatives most
  similar to the anchor into the denominator; pass this mask as the
  ``negative_mask`` of `hnjax.losses.info_nce` (or ``where`` of any
  softmax). Ties go to the lower index.

  Args:
    similarities: ``[B, K]`` similarities of each anchor to its negatives.
    k: negatives kept per row, ``1 <= k <= K``.

  Returns:
    ``[B, K]`` bool with exactly ``k`` True entries per row.

  Examples:
    >>> from hnjax.samplers import hard_top_k_mask
    >>> hard_top_k_mask(jnp.array([[0.1, 0.9, 0.5, 0.7]]), 2)
    Array([[False,  True, False,  True]], dtype=bool)

  References:
    Wang & Liu, "Understanding the Behaviour of Contrastive Loss", CVPR 2021,
    https://arxiv.org/abs/2012.09740
  """
  _checks.rank('similarities', similarities, 2, '[B, K]')
  _checks.non_empty('similarities', similarities)
  s = lax.stop_gradient(jnp.asarray(similarities, jnp.float32))
  _checks.positive_int('k', k)
  if k > s.shape[1]:
    raise ValueError(f'k={k} is larger than the number of negatives '
                     f'{s.shape[1]}')
  _, idx = lax.top_k(s, k)
  rows = jnp.arange(s.shape[0])[:, None]
  return jnp.zeros(s.shape, bool).at[rows, idx].set(True)
