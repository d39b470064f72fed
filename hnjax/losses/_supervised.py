"""Supervised contrastive losses over a batch of labelled views.

``N`` is the number of views in the batch (``2B`` for two views of ``B``
samples, stacked as ``[view₀ of all; view₁ of all]`` with targets repeated).

With ``axis_name`` (inside ``jax.shard_map``) the batch is sharded: each
device passes its ``[B, D]`` rows and gets its rows' per-anchor losses;
its anchors meet the whole batch, all-gathered *with* gradient (the
transpose of the gather is a reduce-scatter), so the sum of all devices'
losses has exactly the single-device gradient. Memory per device is
``O(B · N)`` plus, for SupReMix's positive mixtures, ``O(N²)`` per anchor
chunk; nothing of size ``N³`` is ever built.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

from hnjax import _checks
from hnjax import bank as bank_lib
from hnjax import numerics
from hnjax import parallel
from hnjax.samplers import supremix as supremix_lib

# Elements of the [chunk, N, N] positive-mixture logits scored at once
# (16 MiB of float32): bounds memory whatever N is.
_MIX_BUDGET = 1 << 22
SUPREMIX_VARIANTS = ('clean', 'authors')
DISTANCE_WEIGHTINGS = ('l1_inv', 'l2_inv', 'none')


def _views(embeddings, targets, name='targets'):
  _checks.embeddings('embeddings', embeddings)
  y = jnp.asarray(targets)
  if y.shape != jnp.shape(embeddings)[:1]:
    raise ValueError(
        f'{name} must have shape [N] = {jnp.shape(embeddings)[:1]}, got '
        f'{y.shape}')
  return jnp.asarray(embeddings, jnp.float32), y


def _batch(z, y, axis_name):
  """Local rows against the global batch.

  Returns:
    ``(z_all [N, D] with gradient, y_all [N], rows [B] global indices of
    the local rows, self_mask [B, N])``.
  """
  _checks.axis_size(axis_name)
  z_all = parallel.gather(z, axis_name)
  y_all = parallel.gather(y, axis_name)
  rows = parallel.local_rows(z.shape[0], axis_name)
  return z_all, y_all, rows, rows[:, None] == jnp.arange(z_all.shape[0])


def _nan_unless_finite(loss, z_all, y_all, temperature):
  """Every anchor reads the whole batch: one non-finite embedding or target,
  or a traced temperature that is not finite and > 0 (see
  `numerics.valid_scale`), makes every loss NaN, never a finite value the
  trainer would not stop on (anchors without pairs included).
  """
  ok = jnp.all(jnp.isfinite(z_all)) & jnp.isfinite(temperature)
  if jnp.issubdtype(y_all.dtype, jnp.floating):
    ok &= jnp.all(jnp.isfinite(y_all))
  return numerics.nan_where(~ok, loss)


def _mean_over_positives(log_prob_sum, count):
  """-sum / count, and 0 (with zero gradient) for anchors without positives."""
  has = count > 0
  return jnp.where(has, -log_prob_sum / jnp.where(has, count, 1), 0.0)


def sup_con(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    temperature: jax.typing.ArrayLike,
    axis_name: str | None = None,
) -> jax.Array:
  """Supervised contrastive loss, the "L_out" form of Khosla et al.

  For anchor i with positives ``P(i) = {p != i : y_p = y_i}``:

  .. math::
    \\ell_i = -\\frac{1}{|P(i)|} \\sum_{p \\in P(i)}
      \\log \\frac{e^{z_i\\cdot z_p/T}}{\\sum_{a \\ne i} e^{z_i\\cdot z_a/T}}

  The denominator runs over all other views, positives included (Eq. 2).
  Anchors without positives get 0 instead of the 0/0 NaN of several public
  implementations. The ``T / base_T`` factor of HobbitLong/SupContrast is
  left to the caller (it is 1 at the default ``base_T = T``). For
  regression, pass binned targets as labels.

  Args:
    embeddings: ``[N, D]`` normalised embeddings (``[B, D]`` local rows
      with ``axis_name``).
    labels: ``[N]`` labels (any dtype; compared for exact equality).
    temperature: ``T > 0``.
    axis_name: mesh axis the batch is sharded over, inside
      ``jax.shard_map``; None on one device.

  Returns:
    ``[N]`` (local: ``[B]``) float32 per-anchor losses.

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
  z_all, y_all, _, self_mask = _batch(z, y, axis_name)
  temperature = numerics.valid_scale(temperature)
  s = jnp.where(self_mask, -jnp.inf, z @ z_all.T / temperature)
  log_prob = s - bank_lib.logsumexp(s)[:, None]
  pos = (y[:, None] == y_all[None, :]) & ~self_mask
  total = jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1)
  return _nan_unless_finite(
      _mean_over_positives(total, jnp.sum(pos, axis=1)), z_all, y_all,
      temperature)


def _log_weight(dy, distance_weighting):
  """log of SupReMix's distance-magnifying weight w(|Δy|)."""
  if distance_weighting == 'l1_inv':
    return jnp.log1p(dy)
  if distance_weighting == 'l2_inv':
    return jnp.log1p(dy * dy)
  return jnp.zeros_like(dy)


def _exclusive_alpha(yi, yj, yk):
  """Weight on z_j that puts the mixture's target at y_i, clipped to [0, 1]."""
  span = yk - yj
  return jnp.clip((yk - yi) / jnp.where(span > 0, span, 1.0), 0.0, 1.0)


def _positive_mixtures_full(y, y_all, s_sg, *, window):
  """Positive-mixture terms of every local anchor over all ``N²`` pairs.

  Returns ``(lse, sum, count)``, each ``[B]``: the log-sum-exp, the sum and
  the number of the anchor's positive-mixture logits.
  """
  n = y_all.shape[0]

  def per_anchor(args):
    yi, si = args  # scalar target, [N] anchor-side similarities
    a, ok = supremix_lib.anchor_exclusive_row(yi, y_all, window)
    logit = a * si[:, None] + (1.0 - a) * si[None, :]  # [j, k]
    return (bank_lib.logsumexp(jnp.where(ok, logit, -jnp.inf).ravel()),
            jnp.sum(jnp.where(ok, logit, 0.0)),
            jnp.sum(ok).astype(jnp.float32))

  chunk = max(1, min(y.shape[0], _MIX_BUDGET // (n * n)))
  # Rematerialised: the backward pass keeps each chunk's inputs, not its
  # [chunk, N, N] intermediates (which over all chunks would be N³).
  return lax.map(jax.checkpoint(per_anchor), (y, s_sg), batch_size=chunk)


def _positive_mixtures_banded(y, y_all, s_sg, *, window, m):
  """The same terms when every anchor has at most ``m`` partners per side.

  In target order, an anchor's hard-positive partners are the ``m``
  nearest views below and above it (strictly, within the window), so only
  an ``[m, m]`` block of pairs is scored per anchor: ``O(B m²)``.
  """
  n = y_all.shape[0]
  order = jnp.argsort(y_all, stable=True)
  ys = y_all[order]
  s_sorted = jnp.take(s_sg, order, axis=1)  # [B, N]
  lo = jnp.searchsorted(ys, y, side='left')  # views with a smaller target
  hi = jnp.searchsorted(ys, y, side='right')
  steps = jnp.arange(m)
  below = lo[:, None] - 1 - steps  # nearest first
  above = hi[:, None] + steps
  ok_b = below >= 0
  ok_a = above < n
  below, above = jnp.clip(below, 0, n - 1), jnp.clip(above, 0, n - 1)
  yj, yk = ys[below], ys[above]  # [B, m]
  ok_b &= y[:, None] - yj < window
  ok_a &= yk - y[:, None] < window
  sj = jnp.take_along_axis(s_sorted, below, axis=1)
  sk = jnp.take_along_axis(s_sorted, above, axis=1)

  def per_anchor(args):
    yi, yj, yk, sj, sk, ok_b, ok_a = args  # scalar, then [m] each
    a = _exclusive_alpha(yi, yj[:, None], yk[None, :])
    logit = (a * sj[:, None] + (1.0 - a) * sk[None, :]).ravel()  # [m * m]
    ok = (ok_b[:, None] & ok_a[None, :]).ravel()
    return (bank_lib.logsumexp(jnp.where(ok, logit, -jnp.inf)),
            jnp.sum(jnp.where(ok, logit, 0.0)),
            jnp.sum(ok).astype(jnp.float32))

  chunk = max(1, min(y.shape[0], _MIX_BUDGET // (m * m)))
  return lax.map(jax.checkpoint(per_anchor), (y, yj, yk, sj, sk, ok_b, ok_a),
                 batch_size=chunk)


def _band_sizes(n, max_partners):
  """Powers of two up to the largest useful band (a band of N/2 per side
  already costs as much as scoring all pairs)."""
  top = n // 2 if max_partners is None else min(max_partners, n // 2)
  return tuple(2**e for e in range(3, 31) if 2**e <= top) or ()


def _positive_mixtures(y, y_all, s_sg, window, max_partners):
  """The smallest band that sees every partner, else all pairs.

  Same values on every path; the choice is made at run time from the
  targets (`lax.switch`), so one compiled step serves every batch.
  """
  sizes = _band_sizes(y_all.shape[0], max_partners)
  if not sizes:
    return _positive_mixtures_full(y, y_all, s_sg, window=window)
  return _banded(y, y_all, s_sg, window, sizes)


def _band_index(y, y_all, window, sizes):
  """Index of the smallest band holding every anchor's partners;
  ``len(sizes)`` when none does (then all pairs are scored)."""
  d = y[:, None] - y_all[None, :]
  below = jnp.sum((d > 0) & (d < window), axis=1)
  above = jnp.sum((d < 0) & (-d < window), axis=1)
  most = jnp.max(jnp.maximum(below, above))
  return jnp.searchsorted(jnp.asarray(sizes), most, side='left')


def _branches(y, y_all, window, sizes):
  return [functools.partial(_positive_mixtures_banded, y, y_all,
                            window=window, m=m) for m in sizes] + [
                                functools.partial(_positive_mixtures_full, y,
                                                  y_all, window=window)]


# A custom VJP: differentiating through lax.switch makes XLA run the
# backward pass of every branch, the O(N³) one included; here the backward
# pass re-runs only the chosen branch under jax.vjp.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _banded(y, y_all, s_sg, window, sizes):
  return lax.switch(_band_index(y, y_all, window, sizes),
                    _branches(y, y_all, window, sizes), s_sg)


def _banded_fwd(y, y_all, s_sg, window, sizes):
  return _banded(y, y_all, s_sg, window, sizes), (y, y_all, s_sg)


def _banded_bwd(window, sizes, res, cts):
  y, y_all, s_sg = res
  grads = [lambda f=f: jax.vjp(f, s_sg)[1](cts)[0]
           for f in _branches(y, y_all, window, sizes)]
  g = lax.switch(_band_index(y, y_all, window, sizes), grads)
  return jnp.zeros_like(y), jnp.zeros_like(y_all), g


_banded.defvjp(_banded_fwd, _banded_bwd)


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
    variant: str = 'clean',
    max_partners: int | None = None,
    axis_name: str | None = None,
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
  ``O(N³ D)`` mixture tensor is never built. Mixtures are not re-normalised.
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

  Cost. The hard positives are found in target order: if no anchor has
  more than ``m`` views on either side within the window, each anchor
  scores an ``[m, m]`` block of pairs, ``O(N m²)`` in all, with ``m`` the
  smallest power of two that fits this batch (chosen at run time inside the
  same compiled function); if none up to ``max_partners`` fits, all ``N²``
  pairs per anchor are scored, in anchor chunks of bounded memory. Every
  path gives the same values. The Beta draws of anchor ``i`` come from
  ``fold_in(key, i)`` (see `hnjax.samplers.anchor_inclusive_mixtures`).

  ``variant='authors'`` computes instead what the authors' AgeDB-DIR code
  computes on the same batch (ALGORITHMS.md §4.6 items 1, 2, 6): the real
  and the mixture blocks shifted by their own row maxima (the real one
  including the self-similarity, the mixture one including the all-(-1)
  padding columns of anchors with fewer mixtures than the batch's most)
  under one softmax; distance weights on *every* denominator term, with
  the mixtures' weight labels sorted by value apart from the mixtures, so
  that negative mixtures get the smallest labels and positive mixtures the
  largest (the pairing inside each kind follows a stable sort; torch's
  unstable CPU sort pairs them differently, a 1e-3 relative effect);
  ``'l2_inv'`` for mixtures as ``(Δ + 1)² + 1``; and a disabled mixture
  kind kept in the softmax as zero vectors (logit 0, label 0; disabled
  positive mixtures still count as positives). It scores all ``N²`` slots
  per anchor and sorts their labels (``O(N³ log N)``): for checking
  published numbers on small batches, not for training.

  Args:
    key: PRNG key for the Beta draws of the negative mixtures.
    embeddings: ``[N, D]`` normalised embeddings of all views (``[B, D]``
      local rows with ``axis_name``).
    targets: ``[N]`` regression targets (local ``[B]``).
    temperature: ``T > 0`` (0.5 for AgeDB in the authors' code).
    window: ``ε > 0``, the hard-positive window (5 for ages).
    beta: Beta parameters of the anchor weight of the negative mixtures.
    distance_weighting: ``'l1_inv'``, ``'l2_inv'`` or ``'none'``.
    mix_negatives: add the anchor-inclusive hard negatives.
    mix_positives: add the anchor-exclusive hard positives.
    variant: ``'clean'`` (default) or ``'authors'``.
    max_partners: largest band (partners per side) before scoring all
      pairs; None: ``N / 2``; 0: always all pairs.
    axis_name: mesh axis the batch is sharded over, inside
      ``jax.shard_map``; None on one device.

  Returns:
    ``[N]`` (local: ``[B]``) float32 per-anchor losses.

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
                 DISTANCE_WEIGHTINGS)
  _checks.one_of('variant', variant, SUPREMIX_VARIANTS)
  if max_partners is not None:
    _checks.non_negative_int('max_partners', max_partners)
  temperature = numerics.valid_scale(temperature)  # traced: NaN unless > 0
  z_all, y_all, rows, self_mask = _batch(z, y, axis_name)
  alpha, neg_ok = supremix_lib.anchor_inclusive_mixtures(
      key, y_all, beta=beta, anchors=rows)
  s = z @ z_all.T / temperature                         # real pairs
  s_sg = z @ lax.stop_gradient(z_all).T / temperature  # mixtures: anchor side
  if variant == 'authors':
    return _nan_unless_finite(_authors(
        z, y, y_all, s, s_sg, self_mask, alpha, neg_ok,
        temperature=temperature, window=window, weighting=distance_weighting,
        mix_neg=mix_negatives, mix_pos=mix_positives, axis_name=axis_name),
                              z_all, y_all, temperature)
  dy = jnp.abs(y[:, None] - y_all[None, :])

  # Real pairs: all other views are candidates, same targets are positives.
  real = jnp.where(self_mask, -jnp.inf,
                   s + _log_weight(dy, distance_weighting))
  terms = [bank_lib.logsumexp(real)]
  pos_real = (dy == 0) & ~self_mask
  pos_sum = jnp.sum(jnp.where(pos_real, s, 0.0), axis=1)
  pos_count = jnp.sum(pos_real, axis=1).astype(jnp.float32)

  if mix_negatives:
    s_ii = jnp.sum(jnp.where(self_mask, s_sg, 0.0), axis=1)
    neg = alpha * s_ii[:, None] + (1.0 - alpha) * s_sg
    neg = neg + _log_weight((1.0 - alpha) * dy, distance_weighting)
    terms.append(bank_lib.logsumexp(jnp.where(neg_ok, neg, -jnp.inf)))

  if mix_positives:
    lse_mix, sum_mix, count_mix = _positive_mixtures(y, y_all, s_sg, window,
                                                     max_partners)
    terms.append(lse_mix)
    pos_sum = pos_sum + sum_mix
    pos_count = pos_count + count_mix

  d = bank_lib.logsumexp(jnp.stack(terms, axis=-1))
  d = jnp.where(jnp.isneginf(d), 0.0, d)  # only for anchors with no pairs
  return _nan_unless_finite(
      _mean_over_positives(pos_sum - pos_count * d, pos_count), z_all, y_all,
      temperature)


def _authors_weight(delta, weighting, mixtures):
  """The authors' DM weight (``calculate_weight``), not in log space."""
  if weighting == 'l1_inv':
    return jnp.abs(delta) + 1.0
  if weighting == 'l2_inv':  # their mixture branch squares (Δ + 1)
    return (delta + 1.0) ** 2 + 1.0 if mixtures else delta * delta + 1.0
  return jnp.ones_like(delta)


def _authors(z, y, y_all, s, s_sg, self_mask, alpha, neg_ok, *, temperature,
             window, weighting, mix_neg, mix_pos, axis_name):
  """The authors' SupConLoss_v2 on mixing_func's mixtures (see `supremix`).

  Per anchor the ``N²`` mixture slots ``(j, k)`` of the authors'
  ``[N, N, N]`` tensor: negatives in row ``j = i``, positives where
  ``y_j < y_i < y_k`` within the window. ``compress_mixtures`` keeps, in
  order, padding, the negatives, the positives (each in row-major slot
  order: a stable sort of the ``{-1, 0, 1}`` slot mask); the batch keeps as
  many columns as its fullest anchor has mixtures. Shifts are
  stop-gradient, as their ``logits_max.detach()``.
  """
  n = y_all.shape[0]
  s_ii = jnp.sum(jnp.where(self_mask, s_sg, 0.0), axis=1)
  # Negative slots (row j = i): zero vectors with label 0 when disabled.
  neg_logit = (alpha * s_ii[:, None] + (1 - alpha) * s_sg if mix_neg
               else jnp.zeros_like(s_sg))
  neg_label = (alpha * y[:, None] + (1 - alpha) * y_all if mix_neg
               else jnp.zeros_like(s_sg))
  # The all-(-1) padding column's logit, -sum(z_i) / T.
  pad = -jnp.sum(lax.stop_gradient(z), axis=1) / temperature

  def positive_slots(yi, si):
    a, ok = supremix_lib.anchor_exclusive_row(yi, y_all, window)
    logit = a * si[:, None] + (1 - a) * si[None, :] if mix_pos else (
        jnp.zeros((n, n)))
    return logit.ravel(), ok.ravel()

  def count(args):
    yi, nok = args
    _, pok = positive_slots(yi, jnp.zeros(n))
    return jnp.sum(nok) + jnp.sum(pok)

  chunk = max(1, min(y.shape[0], _MIX_BUDGET // (4 * n * n)))
  m_cols = jnp.max(lax.map(count, (y, neg_ok), batch_size=chunk))
  if axis_name is not None:
    m_cols = lax.pmax(m_cols, axis_name)

  def mixture_terms(args):
    """One anchor's mixture block: denominator, positive sum and count."""
    yi, si, nl, nlab, nok, pad_i, self_row = args
    plogit, pok = positive_slots(yi, si)
    valid = jnp.concatenate([nok, pok])  # kept columns, in their order
    logit = jnp.concatenate([nl, plogit])
    v = jnp.sum(valid)
    # Weight labels: all N² slot labels (0 where nothing was filled)
    # sorted by value on their own; the kept columns take the top ones.
    slot_labels = jnp.where(self_row[:, None], jnp.where(nok, nlab, 0.0),
                            jnp.where(pok & mix_pos, yi, 0.0).reshape(n, n))
    ranked = jnp.sort(slot_labels.ravel())
    rank = jnp.cumsum(valid) - 1
    label = ranked[jnp.clip(n * n - v + rank, 0, n * n - 1)]
    w = _authors_weight(yi - label, weighting, True)
    top = jnp.max(jnp.where(valid, logit, -jnp.inf))
    top = lax.stop_gradient(jnp.where(v < m_cols, jnp.maximum(top, pad_i),
                                      top))
    shifted = logit - top
    pos = jnp.concatenate([jnp.zeros(n, bool), pok])
    return (jnp.sum(jnp.where(valid, jnp.exp(shifted) * w, 0.0)),
            jnp.sum(jnp.where(pos, shifted, 0.0)),
            jnp.sum(pos).astype(jnp.float32))

  mix_den, mix_pos_sum, mix_pos_count = lax.map(
      jax.checkpoint(mixture_terms), (y, s_sg, neg_logit, neg_label, neg_ok, pad, self_mask),
      batch_size=chunk)

  # The real block, shifted by its own row maximum (self included).
  real = s - lax.stop_gradient(jnp.max(s, axis=1, keepdims=True))
  w_real = _authors_weight(y[:, None] - y_all[None, :], weighting, False)
  real_den = jnp.sum(jnp.where(self_mask, 0.0, jnp.exp(real) * w_real),
                     axis=1)
  real_pos = (y[:, None] == y_all[None, :]) & ~self_mask
  log_den = jnp.log(real_den + mix_den)
  count_pos = jnp.sum(real_pos, axis=1) + mix_pos_count
  total = (jnp.sum(jnp.where(real_pos, real, 0.0), axis=1) + mix_pos_sum
           - count_pos * log_den)
  return _mean_over_positives(total, count_pos)


def rank_n_contrast(
    embeddings: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    temperature: float = 2.0,
    axis_name: str | None = None,
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
    embeddings: ``[N, D]`` features (``[B, D]`` local rows with
      ``axis_name``).
    targets: ``[N]`` regression targets (local ``[B]``).
    temperature: ``T > 0`` (2 in the paper).
    axis_name: mesh axis the batch is sharded over, inside
      ``jax.shard_map``; None on one device.

  Returns:
    ``[N]`` (local: ``[B]``) float32 per-anchor losses.

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
  z_all, y_all, rows, _ = _batch(z, y, axis_name)
  n = z_all.shape[0]
  if n < 2:
    raise ValueError(f'rank_n_contrast needs N >= 2 embeddings, got {n}')
  d2 = jnp.maximum(jnp.sum(z * z, axis=1)[:, None]
                   + jnp.sum(z_all * z_all, axis=1)[None, :]
                   - 2.0 * z @ z_all.T, 0.0)
  ok = d2 > 0
  temperature = numerics.valid_scale(temperature)
  s = -jnp.where(ok, jnp.sqrt(jnp.where(ok, d2, 1.0)), 0.0) / temperature
  # Row i without its own column: column c < i is c, otherwise c + 1.
  cols = jnp.arange(n - 1)[None, :]
  others = jnp.where(cols < rows[:, None], cols, cols + 1)
  s_o = jnp.take_along_axis(s, others, axis=1)  # [B, N-1]
  dy_o = jnp.abs(y[:, None] - y_all[others])

  def per_anchor(s_row, dy_row):
    order = jnp.argsort(dy_row)
    dy_sorted = dy_row[order]
    # denominator of j = lse of s over all k whose distance is >= d_j.
    tail = lax.cumlogsumexp(s_row[order], reverse=True)
    first = jnp.searchsorted(dy_sorted, dy_row, side='left')
    return -jnp.mean(s_row - tail[first])

  return _nan_unless_finite(jax.vmap(per_anchor)(s_o, dy_o), z_all, y_all,
                            temperature)
