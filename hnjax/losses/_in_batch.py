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

  Args:
    a: ``[B, D]`` embeddings of one side (e.g. images), normalised.
    b: ``[B, D]`` embeddings of the other side (e.g. texts), normalised.
    temperature: ``T > 0``.
    label_smoothing: ``ε`` in ``[0, 1)``.
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
  _checks.axis_size(axis_name)
  inv_t = 1.0 / numerics.valid_scale(temperature)
  labels = parallel.local_rows(a.shape[0], axis_name)
  a_all = parallel.gather(a, axis_name)
  b_all = parallel.gather(b, axis_name)
  ce_ab = _cross_entropy(a @ b_all.T * inv_t, labels, label_smoothing)
  ce_ba = _cross_entropy(b @ a_all.T * inv_t, labels, label_smoothing)
  # Every pair's loss reads the whole batch (both directions).
  bad = ~(jnp.all(jnp.isfinite(a_all)) & jnp.all(jnp.isfinite(b_all)))
  return numerics.nan_where(bad, 0.5 * (ce_ab + ce_ba))


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
    lam: scalar mixing weight on the image, in ``[0, 1]``.
    temperature: ``τ₂ > 0`` (0.07 in the paper's scripts).

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
  if jnp.ndim(lam) != 0:
    raise ValueError(f'lam must be a scalar, got shape {jnp.shape(lam)}')
  m = geodesic.geodesic_mix(v, t, lam)
  eye = jnp.eye(v.shape[0], dtype=bool)
  diag = jnp.sum(v * t, axis=-1)
  temperature = numerics.valid_scale(temperature)
  logits_img = jnp.where(eye, diag[:, None], v @ m.T) / temperature
  logits_txt = jnp.where(eye, diag[:, None], t @ m.T) / temperature
  labels = jnp.arange(v.shape[0])
  loss = (_cross_entropy(logits_img, labels, 0.0) +
          _cross_entropy(logits_txt, labels, 0.0))
  # Every pair's loss reads every pair's mixture.
  bad = ~(jnp.all(jnp.isfinite(v)) & jnp.all(jnp.isfinite(t))
          & jnp.isfinite(jnp.asarray(lam)))
  return numerics.nan_where(bad, loss)
