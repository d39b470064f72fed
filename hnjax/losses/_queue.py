"""Losses of queries against a bank of negatives (MoCo-style queues).

All of them accept ``axis_name``: inside ``jax.shard_map`` over that axis the
queries are the device's rows and the bank is the device's shard; see
`hnjax.bank` for the layout and the per-device memory bound.
"""

import math

import jax
from jax import lax
import jax.numpy as jnp

from hnjax import _checks
from hnjax import numerics
from hnjax import bank as bank_lib
from hnjax.samplers.mochi import mochi_logits
from hnjax.samplers.mochi import mochi_mix


def _pair(query, positive):
  _checks.embeddings('query', query)
  _checks.floating('positive', positive)
  _checks.same_shape('query', query, 'positive', positive)
  return (jnp.asarray(query, jnp.float32), jnp.asarray(positive, jnp.float32))


def info_nce(
    query: jax.typing.ArrayLike,
    positive: jax.typing.ArrayLike,
    negatives: jax.typing.ArrayLike,
    *,
    temperature: jax.typing.ArrayLike,
    negative_mask: jax.typing.ArrayLike | None = None,
    extra_negatives: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
    block_size: int | None = None,
) -> jax.Array:
  """InfoNCE of each query against its positive and a bank of negatives.

  With ``T`` the temperature, positive ``k``, shared negatives ``n_j`` (the
  unmasked ones for this query) and per-query negatives ``h_m``:

  .. math::
    \\ell = -\\log \\frac{e^{q\\cdot k/T}}{e^{q\\cdot k/T}
      + \\sum_j e^{q\\cdot n_j/T} + \\sum_m e^{q\\cdot h_m/T}}

  This is MoCo's ``CrossEntropy([q·k | q·queue] / T, 0)`` (label 0), with
  MoCHi's synthetic negatives appended through ``extra_negatives``. Inputs
  are used as given (normalise them first) and gradients flow into every
  argument that carries one; a MoCo queue and keys are stop-gradient by
  construction (ALGORITHMS.md §8.13). Logits and log-sum-exps are float32
  whatever the input dtype; a query whose negatives are all masked still
  has a finite loss (the positive is always in the denominator).

  With ``axis_name`` (inside ``jax.shard_map``): ``query``, ``positive``,
  ``extra_negatives`` are the device's rows, ``negatives`` its ``[K / n, D]``
  bank shard, and the result equals the single-device loss over the whole
  bank, values and gradients (log-sum-exps combined across shards). Per
  device it holds ``[G, K / n]`` logits (dense) or ``[G, block_size]``
  (blocked), ``G`` the global batch; never the whole bank.

  Args:
    query: ``[B, D]`` queries.
    positive: ``[B, D]`` positive keys.
    negatives: ``[K, D]`` negatives shared by all queries (``[K / n, D]``
      local shard when sharded).
    temperature: ``T > 0`` (a float, or an array for a learnable one).
    negative_mask: optional bool ``[B, K]`` (sharded: ``[G, K / n]``), False
      removes that negative for that query.
    extra_negatives: optional ``[B, M, D]`` per-query negatives.
    axis_name: mesh axis the batch and the bank are sharded over, or None.
    block_size: bank rows per block (None: automatic; 0: dense).

  Returns:
    ``[B]`` float32 per-example losses.

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.losses import info_nce
    >>> q = jnp.array([[1., 0.]])
    >>> k = jnp.array([[1., 0.]])
    >>> queue = jnp.array([[0., 1.], [-1., 0.]])
    >>> info_nce(q, k, queue, temperature=1.0)  # log(1 + e^-1 + e^-2)
    Array([0.4076059], dtype=float32)

  References:
    van den Oord et al., "Representation Learning with Contrastive Predictive
    Coding", 2018, https://arxiv.org/abs/1807.03748;
    He et al., "Momentum Contrast for Unsupervised Visual Representation
    Learning", CVPR 2020, https://arxiv.org/abs/1911.05722
  """
  q, k = _pair(query, positive)
  _checks.positive('temperature', temperature)
  inv_t = 1.0 / numerics.valid_scale(temperature)
  l_pos = jnp.sum(q * k, axis=-1) * inv_t
  # Scaling the query (not the logits) keeps a learnable temperature
  # differentiable while the bank kernel only sees static scales.
  stats = bank_lib.bank_stats(
      q * inv_t, negatives, scales=(1.0,), negative_mask=negative_mask,
      axis_name=axis_name, block_size=block_size)
  terms = [l_pos, stats.lse[0]]
  if extra_negatives is not None:
    h = jnp.asarray(extra_negatives, jnp.float32)
    if h.ndim != 3 or h.shape[0] != q.shape[0] or h.shape[2] != q.shape[1]:
      raise ValueError(
          f'extra_negatives must have shape [B, M, D] with B, D = '
          f'{q.shape}, got {h.shape}')
    terms.append(bank_lib.logsumexp(jnp.einsum('bd,bmd->bm', q, h) * inv_t))
  loss = bank_lib.logsumexp(jnp.stack(terms, axis=-1)) - l_pos
  # (The bank's own non-finite entries make its log-sum-exp NaN.)
  rows = (q, k) if extra_negatives is None else (q, k, h)
  return numerics.nan_where(~numerics.finite_rows(*rows), loss)


def mochi_info_nce(
    key: jax.Array,
    query: jax.typing.ArrayLike,
    positive: jax.typing.ArrayLike,
    negatives: jax.typing.ArrayLike,
    *,
    temperature: float,
    num_hard: int,
    num_mix: int,
    num_query_mix: int,
    negative_mask: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
    block_size: int | None = None,
    skip_top: int = 0,
    max_similarity: float | None = None,
    recall_target: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MoCHi's loss in one pass over the bank (MoCo v2 when ``num_hard=0``).

  Equal to ``info_nce(query, positive, negatives, extra_negatives=
  mochi(key, query, negatives, ...))`` (the same synthetic negatives, the
  same values and gradients), but the log-sum-exp over the bank and the
  hardest-negative selection share one pass over the bank instead of two.
  Also returns the statistics of the MoCHi paper's analyses.

  Args:
    key: PRNG key of the mixing (the same on every device).
    query: ``[B, D]`` unit-norm queries.
    positive: ``[B, D]`` unit-norm positive keys.
    negatives: ``[K, D]`` unit-norm bank (``[K / n, D]`` shard when
      sharded).
    temperature: ``T > 0``, a Python float.
    num_hard: ``N``, hardest negatives per query; 0 for plain MoCo.
    num_mix: ``s``, type-1 synthetic negatives per query.
    num_query_mix: ``s'``, type-2 synthetic negatives per query.
    negative_mask: optional bool ``[B, K]`` (sharded: ``[G, K / n]``).
    axis_name: mesh axis for a sharded batch and bank (see `info_nce`).
    block_size: bank rows per block (None: automatic; 0: dense).
    skip_top: mix a hardness range (`samplers.mochi`): ranks ``r … r + N
      - 1`` of the negatives at or below ``max_similarity``. Either option
      costs a second pass over the bank for the selection; the loss keeps
      every real negative.
    max_similarity: never mix negatives with ``q · n > c`` (None: none).
    recall_target: None: exact hardest negatives; a float in ``(0, 1]``:
      approximate ones (`jax.lax.approx_max_k`, fast on TPU; see
      `hnjax.bank.bank_stats`).

  Returns:
    ``(loss, aux)``: ``[B]`` float32 losses and a dict of ``[B]`` arrays:
    ``hardest_similarity`` (``q·n`` of the hardest bank negative) and
    ``positive_first`` (the positive's logit beats every negative,
    synthetic ones included: the MoCHi paper's proxy-task accuracy); with
    ``recall_target`` also ``selection_recall``, the recall achieved.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from hnjax.losses import mochi_info_nce
    >>> q = jnp.array([[1., 0.]])
    >>> queue = jnp.array([[0., 1.], [-1., 0.]])
    >>> loss, aux = mochi_info_nce(jax.random.key(0), q, q, queue,
    ...                            temperature=1.0, num_hard=0, num_mix=0,
    ...                            num_query_mix=0)
    >>> loss, aux['positive_first']  # plain MoCo: log(1 + e^-1 + e^-2)
    (Array([0.4076059], dtype=float32), Array([ True], dtype=bool))
  """
  q, k = _pair(query, positive)
  _checks.positive('temperature', temperature)
  t = _checks.concrete_or_none(temperature)
  if t is None:
    raise ValueError('temperature must be a Python float here')
  num_hard = _checks.non_negative_int('num_hard', num_hard)
  stats = bank_lib.bank_stats(
      q, negatives, scales=(1.0 / t,), num_top=max(num_hard, 1),
      negative_mask=negative_mask, axis_name=axis_name,
      block_size=block_size, recall_target=recall_target)
  l_pos = jnp.sum(q * k, axis=-1) / t
  terms = [l_pos, stats.lse[0]]
  best_neg = stats.top_similarities[:, 0] / t
  if num_hard and num_mix + num_query_mix:
    mixed = stats  # the hardest set, or the asked hardness range:
    if skip_top or max_similarity is not None:
      mixed = bank_lib.bank_stats(
          lax.stop_gradient(q), lax.stop_gradient(negatives),
          num_top=num_hard, negative_mask=negative_mask, axis_name=axis_name,
          block_size=block_size, skip_top=skip_top,
          max_similarity=max_similarity, recall_target=recall_target)
    if axis_name is None:
      l_syn = mochi_logits(key, q, negatives, mixed.top_indices,
                           mixed.top_similarities, num_mix=num_mix,
                           num_query_mix=num_query_mix) / t
    else:  # The rows of a pair may live on different shards: mix them.
      h = mochi_mix(key, q, negatives, mixed.top_indices, num_mix=num_mix,
                    num_query_mix=num_query_mix, axis_name=axis_name)
      l_syn = jnp.einsum('bd,bmd->bm', q, h) / t
    terms.append(bank_lib.logsumexp(l_syn))
    best_neg = jnp.maximum(best_neg, lax.stop_gradient(l_syn).max(1))
  loss = numerics.nan_where(~numerics.finite_rows(q, k),
                            bank_lib.logsumexp(jnp.stack(terms, axis=-1))
                            - l_pos)
  aux = dict(hardest_similarity=stats.top_similarities[:, 0],
             positive_first=lax.stop_gradient(l_pos) > best_neg)
  if stats.recall is not None:
    aux['selection_recall'] = jnp.broadcast_to(stats.recall, l_pos.shape)
  return loss, aux


def hard_contrastive(
    query: jax.typing.ArrayLike,
    positive: jax.typing.ArrayLike,
    negatives: jax.typing.ArrayLike,
    *,
    temperature: float,
    beta: float,
    tau_plus: float,
    negative_mask: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
    block_size: int | None = None,
    stop_gradient_weights: bool = False,
) -> jax.Array:
  """Hard negative sampling loss (HCL), with DCL and InfoNCE as special cases.

  As in joshr17/HCL: with ``pos = e^{q·k/T}``, ``neg_j = e^{q·n_j/T}`` over
  the query's ``N`` unmasked negatives and importance weights
  ``imp_j = e^{β q·n_j/T}``,

  .. math::
    R = \\frac{\\sum_j imp_j\\, neg_j}{\\operatorname{mean}_j imp_j}, \\quad
    N_g = \\max\\Big(\\frac{R - \\tau^+ N\\, pos}{1 - \\tau^+},
                    N e^{-1/T}\\Big), \\quad
    \\ell = -\\log \\frac{pos}{pos + N_g}.

  ``beta=0`` is the debiased loss DCL (Chuang et al.); ``beta=0,
  tau_plus=0`` is InfoNCE for unit-norm inputs. Everything is computed in
  log space, so small temperatures do not overflow. As in the official code
  the importance weights carry gradient; ``stop_gradient_weights=True``
  detaches them. A query with all negatives masked gets loss 0.

  Args:
    query: ``[B, D]`` queries.
    positive: ``[B, D]`` positives.
    negatives: ``[K, D]`` negatives (``[K / n, D]`` shard when sharded).
    temperature: ``T > 0``.
    beta: concentration ``β >= 0`` of the importance weights (0: none).
    tau_plus: class prior ``τ⁺`` in ``[0, 1)``.
    negative_mask: optional bool ``[B, K]`` (sharded: ``[G, K / n]``).
    axis_name: mesh axis for a sharded batch and bank (see `info_nce`).
    block_size: bank rows per block (None: automatic; 0: dense).
    stop_gradient_weights: detach the importance weights.

  Returns:
    ``[B]`` float32 per-example losses.

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.losses import hard_contrastive, info_nce
    >>> q, k = jnp.array([[1., 0.]]), jnp.array([[0.6, 0.8]])
    >>> negs = jnp.array([[0., 1.], [-1., 0.]])
    >>> hard_contrastive(q, k, negs, temperature=0.5, beta=0., tau_plus=0.)
    Array([0.2941...], dtype=float32)
    >>> info_nce(q, k, negs, temperature=0.5)
    Array([0.2941...], dtype=float32)

  References:
    Robinson et al., "Contrastive Learning with Hard Negative Samples",
    ICLR 2021, https://arxiv.org/abs/2010.04592;
    Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020,
    https://arxiv.org/abs/2007.00224
  """
  q, k = _pair(query, positive)
  _checks.positive('temperature', temperature)
  t = _checks.concrete_or_none(temperature)
  b_ = _checks.concrete_or_none(beta)
  tp = _checks.concrete_or_none(tau_plus)
  if t is None or b_ is None or tp is None:
    raise ValueError('temperature, beta and tau_plus must be Python floats')
  if not 0.0 <= tp < 1.0:
    raise ValueError(f'tau_plus must be in [0, 1), got {tp}')
  if b_ < 0.0:
    raise ValueError(f'beta must be >= 0, got {b_}')
  l_pos = jnp.sum(q * k, axis=-1) / t
  # lse of (β+1)s/T, of βs/T, and of 0 (= log N, the unmasked count).
  scales = (b_ + 1.0, b_, 0.0) if b_ != 0.0 else (1.0, 0.0)
  stats = bank_lib.bank_stats(
      q / t, negatives, scales=scales, negative_mask=negative_mask,
      axis_name=axis_name, block_size=block_size)
  lse_imp_neg, log_n = stats.lse[0], stats.lse[-1]
  lse_imp = stats.lse[1] if b_ != 0.0 else None
  if b_ != 0.0 and stop_gradient_weights:
    # With imp_j held fixed, d lse((β+1)s) / ds_j must lose its factor β+1;
    # the value is unchanged. The normaliser mean(imp) is a constant.
    sg = lax.stop_gradient(lse_imp_neg)
    lse_imp_neg = sg + (lse_imp_neg - sg) / (b_ + 1.0)
    lse_imp = lax.stop_gradient(lse_imp)
  has_neg = ~jnp.isneginf(log_n)  # NaN (a non-finite input) stays NaN
  log_n_safe = jnp.where(has_neg, log_n, 0.0)
  if b_ != 0.0:
    log_r = (jnp.where(has_neg, lse_imp_neg, 0.0)
             - jnp.where(has_neg, lse_imp, 0.0) + log_n_safe)
  else:
    log_r = jnp.where(has_neg, lse_imp_neg, 0.0)
  if tp > 0.0:
    # log(R - τ⁺ N pos), defined only where R > τ⁺ N pos.
    d = math.log(tp) + log_n_safe + l_pos - log_r
    ok = d < 0
    log_diff = log_r + jnp.log1p(-jnp.exp(jnp.where(ok, d, -1.0)))
    log_diff = jnp.where(ok, log_diff, -jnp.inf) - math.log1p(-tp)
  else:
    log_diff = log_r
  log_ng = jnp.maximum(log_diff, log_n_safe - 1.0 / t)
  loss = jnp.logaddexp(l_pos, log_ng) - l_pos
  return numerics.nan_where(~numerics.finite_rows(q, k),
                            jnp.where(has_neg, loss, 0.0))
