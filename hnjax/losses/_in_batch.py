"""Losses over in-batch pairs (CLIP / Sample4Geo, SigLIP, m²-mix).

With ``axis_name`` (inside ``jax.shard_map``) the batch is sharded: each
device computes the losses of its own rows against the whole global batch,
gathering the other side *with* gradient (open_clip's "local loss, gather
with grad"). Summing the per-device losses gives the global loss, and every
device's embeddings get the exact global gradient. Memory per device is
``O(B * G)`` logits, never ``O(G²)``.
"""

import jax
import jax.numpy as jnp

from hnjax import _checks
from hnjax import numerics
from hnjax import parallel
from hnjax import bank as bank_lib
from hnjax.samplers import geodesic


def _pair(name_a, a, name_b, b):
  _checks.embeddings(name_a, a)
  _checks.floating(name_b, b)
  _checks.same_shape(name_a, a, name_b, b)
  return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


def _cross_entropy(logits, labels, label_smoothing):
  """Per-row CE against integer labels with torch-style label smoothing."""
  log_p = logits - bank_lib.logsumexp(logits)[:, None]
  nll = -jnp.take_along_axis(log_p, labels[:, None], axis=1)[:, 0]
  if not label_smoothing:
    return nll
  return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(
      log_p, axis=1)


def symmetric_info_nce(
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    *,
    temperature: jax.typing.ArrayLike,
    label_smoothing: float = 0.0,
    extra_negatives: jax.typing.ArrayLike | None = None,
    extra_negative_mask: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
  """Symmetric InfoNCE over in-batch pairs (CLIP, Sample4Geo).

  With logits ``L = a bᵀ / T`` over the (global) batch and matched pairs on
  the diagonal, pair ``i`` gets the mean of its two cross-entropies:

  .. math::
    \\ell_i = \\tfrac12\\big(\\mathrm{CE}(L_{i,:}, i) +
                           \\mathrm{CE}(L_{:,i}, i)\\big)

  ``label_smoothing = ε`` uses targets ``(1 - ε)·onehot + ε / G`` as
  ``torch.nn.CrossEntropyLoss`` does (Sample4Geo uses 0.1). For CLIP's
  learnable ``logit_scale`` pass ``temperature = 1 / logit_scale``.

  ``extra_negatives`` ``n_{i,1..k}`` (e.g. hard negatives mined by
  `hnjax.mining`) join the in-batch ones in the ``a → b`` direction of
  their own pair only:
  ``CE([a_i·b_1, …, a_i·b_G, a_i·n_{i,1}, …, a_i·n_{i,k}] / T, i)``; the
  ``b → a`` direction is unchanged. They carry gradient (they are encoded
  by the same tower, as NegCLIP's captions); masked ones drop out.

  Args:
    a: ``[B, D]`` embeddings of one side (e.g. images), normalised.
    b: ``[B, D]`` embeddings of the other side (e.g. texts), normalised.
    temperature: ``T > 0``.
    label_smoothing: ``ε`` in ``[0, 1)`` (0 with ``extra_negatives``).
    extra_negatives: optional ``[B, k, D]`` extra negatives of each ``a_i``
      (this device's rows when sharded), normalised.
    extra_negative_mask: optional bool ``[B, k]``, False where a hard
      negative is missing (a ``-1`` of the miner); default all True.
    axis_name: mesh axis the batch is sharded over (gather with gradient),
      or None.

  Returns:
    ``[B]`` float32 per-pair losses (their mean is the CLIP loss).

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.losses import symmetric_info_nce
    >>> x = jnp.eye(2)
    >>> symmetric_info_nce(x, x, temperature=1.0)  # log(1 + e^-1)
    Array([0.3132..., 0.3132...], dtype=float32)

  References:
    Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision", ICML 2021, https://arxiv.org/abs/2103.00020;
    Deuser et al., "Sample4Geo", ICCV 2023, https://arxiv.org/abs/2303.11851
  """
  a, b = _pair('a', a, 'b', b)
  _checks.positive('temperature', temperature)
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got '
                     f'{label_smoothing}')
  extra, extra_mask = _extra_negatives(a, extra_negatives,
                                       extra_negative_mask)
  if extra is not None and label_smoothing:
    raise ValueError('label_smoothing must be 0 with extra_negatives, got '
                     f'{label_smoothing}')
  shards = _checks.axis_size(axis_name)
  inv_t = 1.0 / numerics.valid_scale(temperature)
  labels = parallel.local_rows(a.shape[0], axis_name)
  a_all = parallel.gather(a, axis_name)
  b_all = parallel.gather(b, axis_name)
  logits_ab = a @ b_all.T * inv_t
  # One shard: the other direction is the transpose (half the products).
  logits_ba = logits_ab.T if shards == 1 else b @ a_all.T * inv_t
  ce_ba = _cross_entropy(logits_ba, labels, label_smoothing)
  # Every pair's loss reads the whole batch (both directions).
  bad = ~(jnp.all(jnp.isfinite(a_all)) & jnp.all(jnp.isfinite(b_all)))
  if extra is not None:
    mined = jnp.einsum('bd,bkd->bk', a, extra) * inv_t
    logits_ab = jnp.concatenate(
        [logits_ab, jnp.where(extra_mask, mined, -jnp.inf)], axis=1)
    # A row's own hard negatives only reach its own loss.
    bad = bad | ~jnp.all(jnp.isfinite(extra), axis=(1, 2))
  ce_ab = _cross_entropy(logits_ab, labels, label_smoothing)
  return numerics.nan_where(bad, 0.5 * (ce_ab + ce_ba))


def _extra_negatives(a, negatives, mask):
  """Checked ``[B, k, D]`` float32 hard negatives and their ``[B, k]`` mask."""
  if negatives is None:
    if mask is not None:
      raise ValueError('extra_negative_mask is given without '
                       'extra_negatives')
    return None, None
  _checks.floating('extra_negatives', negatives)
  negatives = jnp.asarray(negatives, jnp.float32)
  if negatives.ndim != 3 or negatives.shape[::2] != a.shape:
    raise ValueError(f'extra_negatives must be [{a.shape[0]}, k, '
                     f'{a.shape[1]}] like a, got {list(negatives.shape)}')
  if mask is None:
    mask = jnp.ones(negatives.shape[:2], bool)
  mask = jnp.asarray(mask)
  if mask.shape != negatives.shape[:2] or mask.dtype != jnp.bool_:
    raise ValueError(f'extra_negative_mask must be bool '
                     f'{list(negatives.shape[:2])}, got {mask.dtype}'
                     f'{list(mask.shape)}')
  return negatives, mask


def sigmoid_contrastive(
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    *,
    scale: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike,
    axis_name: str | None = None,
) -> jax.Array:
  """SigLIP's pairwise sigmoid loss, one value per row.

  With ``z_ij = +1`` on matched pairs and ``-1`` elsewhere,

  .. math::
    \\ell_i = -\\sum_j \\log \\sigma\\big(z_{ij} (t\\, a_i \\cdot b_j + b)\\big)

  The mean of ``ℓ`` over the batch is SigLIP's loss, normalised by the batch
  size and *not* by B² (a mean over all pairs would shrink it B-fold). No
  softmax: each pair is an independent binary problem. SigLIP initialises
  ``t = 10`` (``exp(log 10)``) and ``b = -10``; both are usually learnable.

  Args:
    a: ``[B, D]`` normalised embeddings (e.g. images).
    b: ``[B, D]`` normalised embeddings (e.g. texts).
    scale: ``t > 0``.
    bias: ``b``.
    axis_name: mesh axis the batch is sharded over (gather with gradient),
      or None.

  Returns:
    ``[B]`` float32 per-row losses.

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.losses import sigmoid_contrastive
    >>> x = jnp.eye(2)
    >>> sigmoid_contrastive(x, x, scale=1.0, bias=0.0)  # -log σ(1) - log σ(0)
    Array([1.0064089, 1.0064089], dtype=float32)

  References:
    Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023,
    https://arxiv.org/abs/2303.15343
  """
  a, b = _pair('a', a, 'b', b)
  _checks.positive('scale', scale)
  _checks.axis_size(axis_name)
  labels = parallel.local_rows(a.shape[0], axis_name)
  b_all = parallel.gather(b, axis_name)
  logits = numerics.valid_scale(scale) * (a @ b_all.T) + jnp.asarray(
      bias, jnp.float32)
  z = jnp.where(labels[:, None] == jnp.arange(b_all.shape[0])[None], 1., -1.)
  loss = -jnp.sum(jax.nn.log_sigmoid(z * logits), axis=1)
  # Row i reads a_i and every b.
  bad = ~numerics.finite_rows(a) | ~jnp.all(jnp.isfinite(b_all))
  return numerics.nan_where(bad | ~jnp.isfinite(jnp.asarray(bias)), loss)


def m2mix(
    image: jax.typing.ArrayLike,
    text: jax.typing.ArrayLike,
    lam: jax.typing.ArrayLike,
    *,
    temperature: float = 0.07,
    axis_name: str | None = None,
) -> jax.Array:
  """The m²-mix term: hard negatives mixed across the modality gap.

  Each pair's image and text are mixed on the sphere,
  ``m_j = geodesic_mix(v_j, t_j, λ)`` (λ on the image; the caller draws
  ``λ ~ Beta(α, α)`` once per step). Off-diagonal logits score each image
  and each text against the other pairs' mixtures, the diagonal keeps the
  true pair:

  .. math::
    L^{img}_{ij} = \\frac{1}{\\tau}\\begin{cases} v_i\\cdot t_i & i=j\\\\
      v_i \\cdot m_j & i\\ne j\\end{cases},\\quad
    L^{txt}_{ij} = \\frac{1}{\\tau}\\begin{cases} t_i\\cdot v_i & i=j\\\\
      t_i \\cdot m_j & i\\ne j\\end{cases},\\quad
    \\ell_i = \\mathrm{CE}(L^{img}_{i,:}, i) + \\mathrm{CE}(L^{txt}_{i,:}, i)

  as in changdaeoh/multimodal-mixup ``main.py`` (a sum, no ½). Gradients
  flow through the mixtures into both encoders (ALGORITHMS.md §5.2). The
  full objective adds ``w · mean(ℓ) / (epoch + 1)`` to a CLIP loss.

  Args:
    image: ``[B, D]`` unit-norm image embeddings.
    text: ``[B, D]`` unit-norm text embeddings.
    lam: scalar mixing weight on the image, in ``[0, 1]`` (the same on
      every device).
    temperature: ``τ₂ > 0`` (0.07 in the paper's scripts).
    axis_name: mesh axis the batch is sharded over: each device's pairs
      against the global batch's mixtures (gathered with gradient), or None.

  Returns:
    ``[B]`` float32 per-pair losses.

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.losses import m2mix
    >>> v = jnp.array([[1., 0.], [0., 1.]])
    >>> m2mix(v, v, 0.5, temperature=1.0).shape
    (2,)

  References:
    Oh et al., "Geodesic Multi-Modal Mixup for Robust Fine-Tuning",
    NeurIPS 2023, https://arxiv.org/abs/2203.03897
  """
  v, t = _pair('image', image, 'text', text)
  _checks.positive('temperature', temperature)
  _checks.axis_size(axis_name)
  if jnp.ndim(lam) != 0:
    raise ValueError(f'lam must be a scalar, got shape {jnp.shape(lam)}')
  rows = parallel.local_rows(v.shape[0], axis_name)
  v_all, t_all = parallel.gather(v, axis_name), parallel.gather(t, axis_name)
  m = geodesic.geodesic_mix(v_all, t_all, lam)  # [G, D]
  own = rows[:, None] == jnp.arange(v_all.shape[0])[None, :]
  diag = jnp.sum(v * t, axis=-1)
  temperature = numerics.valid_scale(temperature)
  # Both sides against the mixtures in one product.
  mixed = jnp.concatenate([v, t]) @ m.T
  b = v.shape[0]
  logits_img = jnp.where(own, diag[:, None], mixed[:b]) / temperature
  logits_txt = jnp.where(own, diag[:, None], mixed[b:]) / temperature
  loss = (_cross_entropy(logits_img, rows, 0.0) +
          _cross_entropy(logits_txt, rows, 0.0))
  # Every pair's loss reads every pair's mixture.
  bad = ~(jnp.all(jnp.isfinite(v_all)) & jnp.all(jnp.isfinite(t_all))
          & jnp.isfinite(jnp.asarray(lam)))
  return numerics.nan_where(bad, loss)


def _soft_cross_entropy(logits, targets):
  """Per-row ``-sum_j targets_j log softmax(logits)_j`` (targets as given)."""
  log_p = logits - bank_lib.logsumexp(logits)[:, None]
  return -jnp.sum(jnp.where(targets > 0, targets * log_p, 0.0), axis=1)


M3MIX_TERMS = ('vmix', 'lmix', 'vlmix')


def m3mix(
    image: jax.typing.ArrayLike,
    text: jax.typing.ArrayLike,
    lam: jax.typing.ArrayLike,
    *,
    term: str,
    temperature: float = 0.01,
    original_negatives: bool = False,
    axis_name: str | None = None,
) -> jax.Array:
  """One of m³-mix's uni-modal mixing terms (V-mix, L-mix, VL-mix).

  Each pair ``i`` is mixed with its flipped partner ``i' = G - 1 - i`` on
  the sphere, ``x̂_i = geodesic_mix(x_i, x_{i'}, λ)``: the images
  (``'vmix'``: logits ``v̂ tᵀ / τ``), the texts (``'lmix'``: ``v t̂ᵀ / τ``)
  or both with the same λ (``'vlmix'``: ``v̂ t̂ᵀ / τ``). Targets are soft:
  ``λ I + (1 - λ) J`` for V-mix and L-mix and ``I + J`` (not normalised, as
  in the code) for VL-mix, with ``J`` the flipped identity. Pair ``i`` gets
  the mean of its row's and its column's soft cross-entropies, as
  changdaeoh/multimodal-mixup's ``calc_mix_loss`` / ``clip_loss``
  (ALGORITHMS.md §5.4). ``original_negatives`` (the code's
  ``--original_neg``) puts the un-mixed logits ``v tᵀ / τ`` back in every
  cell whose target is 0.

  Args:
    image: ``[B, D]`` unit-norm image embeddings.
    text: ``[B, D]`` unit-norm text embeddings.
    lam: scalar mixing weight on the pair itself, in ``[0, 1]`` (the same on
      every device).
    term: ``'vmix'``, ``'lmix'`` or ``'vlmix'``.
    temperature: ``τ > 0`` (the CLIP temperature, 0.01 in the paper).
    original_negatives: keep un-mixed logits off the targets.
    axis_name: mesh axis the batch is sharded over (the flipped partner and
      the columns come from the global batch, gathered with gradient), or
      None.

  Returns:
    ``[B]`` float32 per-pair losses; their mean is the code's term.

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.losses import m3mix
    >>> v = jnp.eye(4, 3)
    >>> m3mix(v, v, 1.0, term='vmix', temperature=1.0).shape
    (4,)

  References:
    Oh et al., "Geodesic Multi-Modal Mixup for Robust Fine-Tuning",
    NeurIPS 2023, https://arxiv.org/abs/2203.03897
  """
  v, t = _pair('image', image, 'text', text)
  _checks.one_of('term', term, M3MIX_TERMS)
  _checks.positive('temperature', temperature)
  shards = _checks.axis_size(axis_name)
  if jnp.ndim(lam) != 0:
    raise ValueError(f'lam must be a scalar, got shape {jnp.shape(lam)}')
  lam = jnp.asarray(lam, jnp.float32)
  rows = parallel.local_rows(v.shape[0], axis_name)
  v_all, t_all = parallel.gather(v, axis_name), parallel.gather(t, axis_name)
  g = v_all.shape[0]
  mix = lambda x: geodesic.geodesic_mix(x, x[::-1], lam)  # pylint: disable=unnecessary-lambda-assignment
  a_all = mix(v_all) if term in ('vmix', 'vlmix') else v_all
  b_all = mix(t_all) if term in ('lmix', 'vlmix') else t_all
  cols = jnp.arange(g)[None, :]
  flip = (g - 1 - rows)[:, None]
  own, partner = cols == rows[:, None], cols == flip
  if term == 'vlmix':
    targets = own.astype(jnp.float32) + partner.astype(jnp.float32)
  else:
    targets = lam * own + (1.0 - lam) * partner
  inv_t = 1.0 / numerics.valid_scale(temperature)
  row_logits = a_all[rows] @ b_all.T * inv_t  # row i of v̂ t̂ᵀ
  # Column i, as a row; with one shard the transpose (half the products).
  col_logits = (row_logits.T if shards == 1 else
                b_all[rows] @ a_all.T * inv_t)
  if original_negatives:
    off = ~(own | partner)
    plain = v @ t_all.T * inv_t
    row_logits = jnp.where(off, plain, row_logits)
    col_logits = jnp.where(off, plain.T if shards == 1 else
                           t @ v_all.T * inv_t, col_logits)
  loss = 0.5 * (_soft_cross_entropy(row_logits, targets) +
                _soft_cross_entropy(col_logits, targets))
  bad = ~(jnp.all(jnp.isfinite(v_all)) & jnp.all(jnp.isfinite(t_all))
          & jnp.isfinite(lam))
  return numerics.nan_where(bad, loss)
