"""Supervised contrastive losses over a batch of labelled views.

``N`` is the number of views in the batch (``2B`` for two views of ``B``
samples, stacked as ``[view₀ of all; view₁ of all]`` with targets repeated).
"""

import jax
from jax import lax
import jax.numpy as jnp

from hnjax import _checks
from hnjax import bank as bank_lib
from hnjax.samplers import supremix as supremix_lib

# Anchors processed together when SupReMix scores its [N, N] positive
# mixtures per anchor: bounds memory at this many [N, N] slices.
_ANCHOR_CHUNK = 16


def _views(embeddings, targets, name='targets'):
  _checks.embeddings('embeddings', embeddings)
  y = jnp.asarray(targets)
  if y.shape != jnp.shape(embeddings)[:1]:
    raise ValueError(
        f'{name} must have shape [N] = {jnp.shape(embeddings)[:1]}, got '
        f'{y.shape}')
  return jnp.asarray(embeddings, jnp.float32), y


def _mean_over_positives(log_prob_sum, count):
  """-sum / count, and 0 (with zero gradient) for anchors without positives."""
  has = count > 0
  return jnp.where(has, -log_prob_sum / jnp.where(has, count, 1), 0.0)


def sup_con(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    temperature: jax.typing.ArrayLike,
) -> jax.Array:
  """Supervised contrastive loss, the "L_out" form of Khosla et al.

  For anchor i with positives ``P(i) = {p != i : y_p = y_i}``:

  .. math::
    \\ell_i = -\\frac{1}{|P(i)|} \\sum_{p \\in P(i)}
      \\log \\frac{e^{z_i\\cdot z_p/T}}{\\sum_{a \\ne i} e^{z_i\\cdot z_a/T}}

  The denominator runs over all other views, positives included (Eq. 2).
  Anchors without positives get 0 instead of the 0/0 NaN of several public
  implementations. The ``T / base_T`` factor of HobbitLong/SupContrast is
  left to the caller (it is 1 at the default ``base_T = T``).

  Args:
    embeddings: ``[N, D]`` normalised embeddings.
    labels: ``[N]`` labels (any dtype; compared for exact equality).
    temperature: ``T > 0``.

  Returns:
    ``[N]`` float32 per-anchor losses.

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.losses import sup_con
    >>> z = jnp.array([[1., 0.], [1., 0.], [0., 1.]])
    >>> sup_con(z, jnp.array([0, 0, 1]), temperature=1.0)  # log(1 + e^-1)
    Array([0.3132..., 0.3132..., 0.    ], dtype=float32)

  References:
    Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020,
    https://arxiv.org/abs/2004.11362
  """
  z, y = _views(embeddings, labels, 'labels')
  _checks.positive('temperature', temperature)
  n = z.shape[0]
  eye = jnp.eye(n, dtype=bool)
  s = jnp.where(eye, -jnp.inf, z @ z.T / temperature)
  log_prob = s - bank_lib.logsumexp(s)[:, None]
  pos = (y[:, None] == y[None, :]) & ~eye
  total = jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1)
  return _mean_over_positives(total, jnp.sum(pos, axis=1))


def _log_weight(dy, distance_weighting):
  """log of SupReMix's distance-magnifying weight w(|Δy|)."""
  if distance_weighting == 'l1_inv':
    return jnp.log1p(dy)
  if distance_weighting == 'l2_inv':
    return jnp.log1p(dy * dy)
  return jnp.zeros_like(dy)


def supremix(
    key: jax.Array,
    embeddings: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    temperature: float = 0.5,
    window: float = 5.0,
    beta: tuple[float, float] = (2.0, 8.0),
    distance_weighting: str = 'l1_inv',
    mix_negatives: bool = True,
    mix_positives: bool = True,
) -> jax.Array:
  """SupReMix: supervised contrastive regression with mixture pairs.

  The clean form of ALGORITHMS.md §4.5. For anchor i, with real logits
  ``s_ia = z_i·z_a / T`` (gradient on both sides) and mixture logits that
  see the mixture as a constant:

  * hard negatives, one per ``k`` with ``y_k != y_i``:
    ``m = α z_i + (1 - α) z_k``, ``α ~ Beta(2, 8)``, weight
    ``w = w(|y_i - ỹ|) = w((1 - α)|y_i - y_k|)``;
  * hard positives, one per ``(j, k)`` with ``y_j < y_i < y_k`` both within
    ``window``: ``m = α z_j + (1 - α) z_k``, ``α = (y_k - y_i)/(y_k - y_j)``,
    weight 1.

  Logits of detached linear mixtures are linear in the pairwise
  similarities, ``z_i · sg(m) = α z_i·sg(z_j) + (1 - α) z_i·sg(z_k)``, so
  everything comes from one ``[N, N]`` similarity matrix; the authors'
  ``O(N³ D)`` mixture tensor is never built (positive mixtures cost
  ``O(N³)`` scalars, scored per anchor). Mixtures are not re-normalised.
  With distance-magnifying weights ``w`` in the denominator only:

  .. math::
    D_i = \\log \\Big(\\sum_{a \\ne i} w_{ia} e^{s_{ia}}
          + \\sum_{m} w_{im} e^{s_{im}}\\Big), \\qquad
    \\ell_i = -\\frac{1}{|P_i|} \\sum_{p \\in P_i} (s_{ip} - D_i)

  where ``P_i`` holds the same-target views and the hard-positive mixtures
  (one shared log-sum-exp, unlike the authors' code, which shifts the real
  and mixture blocks by different maxima; §4.6). ``w(d)`` is ``d + 1``
  (``'l1_inv'``), ``d² + 1`` (``'l2_inv'``) or 1 (``'none'``). Anchors
  without any positive get 0.

  Args:
    key: PRNG key for the Beta draws of the negative mixtures.
    embeddings: ``[N, D]`` normalised embeddings of all views.
    targets: ``[N]`` regression targets.
    temperature: ``T > 0`` (0.5 for AgeDB in the authors' code).
    window: ``ε > 0``, the hard-positive window (5 for ages).
    beta: Beta parameters of the anchor weight of the negative mixtures.
    distance_weighting: ``'l1_inv'``, ``'l2_inv'`` or ``'none'``.
    mix_negatives: add the anchor-inclusive hard negatives.
    mix_positives: add the anchor-exclusive hard positives.

  Returns:
    ``[N]`` float32 per-anchor losses.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from hnjax.losses import supremix
    >>> z = jnp.array([[1., 0.], [0.6, 0.8], [0., 1.]])
    >>> y = jnp.array([20., 22., 24.])
    >>> supremix(jax.random.key(0), z, y, mix_negatives=False).round(4)
    Array([0. , 1.96..., 0. ], dtype=float32)

  References:
    Wu et al., "Mixup Your Own Pairs", 2023,
    https://arxiv.org/abs/2309.16633
  """
  z, y = _views(embeddings, targets)
  y = y.astype(jnp.float32)
  _checks.positive('temperature', temperature)
  _checks.positive('window', window)
  _checks.one_of('distance_weighting', distance_weighting,
                 ('l1_inv', 'l2_inv', 'none'))
  n = z.shape[0]
  eye = jnp.eye(n, dtype=bool)
  dy = jnp.abs(y[:, None] - y[None, :])
  s = z @ z.T / temperature                         # real pairs
  s_sg = z @ lax.stop_gradient(z).T / temperature  # mixtures: anchor side

  # Real pairs: all other views are candidates, same targets are positives.
  real = jnp.where(eye, -jnp.inf, s + _log_weight(dy, distance_weighting))
  terms = [bank_lib.logsumexp(real)]
  pos_real = (dy == 0) & ~eye
  pos_sum = jnp.sum(jnp.where(pos_real, s, 0.0), axis=1)
  pos_count = jnp.sum(pos_real, axis=1).astype(jnp.float32)

  if mix_negatives:
    alpha, valid = supremix_lib.anchor_inclusive_mixtures(key, y, beta=beta)
    neg = alpha * jnp.diag(s_sg)[:, None] + (1.0 - alpha) * s_sg
    neg = neg + _log_weight((1.0 - alpha) * dy, distance_weighting)
    terms.append(bank_lib.logsumexp(jnp.where(valid, neg, -jnp.inf)))

  if mix_positives:
    def per_anchor(args):
      yi, si = args  # scalar target, [N] anchor-side similarities
      a, ok = supremix_lib.anchor_exclusive_row(yi, y, window)
      logit = a * si[:, None] + (1.0 - a) * si[None, :]  # [j, k]
      return (bank_lib.logsumexp(jnp.where(ok, logit, -jnp.inf).ravel()),
              jnp.sum(jnp.where(ok, logit, 0.0)),
              jnp.sum(ok).astype(jnp.float32))

    lse_mix, sum_mix, count_mix = lax.map(
        per_anchor, (y, s_sg), batch_size=min(_ANCHOR_CHUNK, n))
    terms.append(lse_mix)
    pos_sum = pos_sum + sum_mix
    pos_count = pos_count + count_mix

  d = bank_lib.logsumexp(jnp.stack(terms, axis=-1))
  d = jnp.where(jnp.isfinite(d), d, 0.0)  # only for anchors with no pairs
  return _mean_over_positives(pos_sum - pos_count * d, pos_count)


def rank_n_contrast(
    embeddings: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    temperature: float = 2.0,
) -> jax.Array:
  """Rank-N-Contrast loss for regression (Zha et al., 2023).

  Similarities are negative L2 distances ``s_ij = -|z_i - z_j| / T``
  (features are *not* normalised). Each ``j != i`` is a positive whose
  denominator holds every sample at least as far from ``i`` in target
  space:

  .. math::
    \\ell_i = -\\frac{1}{N - 1} \\sum_{j \\ne i} \\log
      \\frac{e^{s_{ij}}}{\\sum_{k \\ne i,\\ |y_i - y_k| \\ge |y_i - y_j|}
      e^{s_{ik}}}

  so ``mean(ℓ)`` equals kaiwenzha/Rank-N-Contrast's loss. Per anchor the
  candidates are sorted by target distance and the denominators are a
  reversed cumulative log-sum-exp: ``O(N² log N)`` time and ``O(N²)``
  memory instead of the ``[N, N, N]`` mask. The distance has a zero (not
  NaN) gradient for identical embeddings.

  Args:
    embeddings: ``[N, D]`` features.
    targets: ``[N]`` regression targets.
    temperature: ``T > 0`` (2 in the paper).

  Returns:
    ``[N]`` float32 per-anchor losses.

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.losses import rank_n_contrast
    >>> z = jnp.array([[0.], [1.], [3.]])
    >>> rank_n_contrast(z, jnp.array([0., 1., 3.]), temperature=1.0)
    Array([0.0634..., 0.1566..., 0.1566...], dtype=float32)

  References:
    Zha et al., "Rank-N-Contrast: Learning Continuous Representations for
    Regression", NeurIPS 2023, https://arxiv.org/abs/2210.01189
  """
  z, y = _views(embeddings, targets)
  y = y.astype(jnp.float32)
  _checks.positive('temperature', temperature)
  n = z.shape[0]
  if n < 2:
    raise ValueError(f'rank_n_contrast needs N >= 2 embeddings, got {n}')
  sq = jnp.sum(z * z, axis=1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
  ok = d2 > 0
  s = -jnp.where(ok, jnp.sqrt(jnp.where(ok, d2, 1.0)), 0.0) / temperature
  # Row i without its diagonal: column c < i is c, otherwise c + 1.
  cols = jnp.arange(n - 1)[None, :]
  others = jnp.where(cols < jnp.arange(n)[:, None], cols, cols + 1)
  s_o = jnp.take_along_axis(s, others, axis=1)  # [N, N-1]
  dy_o = jnp.abs(y[:, None] - jnp.take_along_axis(
      jnp.broadcast_to(y, (n, n)), others, axis=1))

  def per_anchor(s_row, dy_row):
    order = jnp.argsort(dy_row)
    dy_sorted = dy_row[order]
    # denominator of j = lse of s over all k whose distance is >= d_j.
    tail = lax.cumlogsumexp(s_row[order], reverse=True)
    first = jnp.searchsorted(dy_sorted, dy_row, side='left')
    return -jnp.mean(s_row - tail[first])

  return jax.vmap(per_anchor)(s_o, dy_o)
