"""Tests for symmetric_info_nce, sigmoid_contrastive and m2mix."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from hnjax import losses
from tests import testing


def np_ce(logits, label, eps=0.0):
  logits = np.asarray(logits, np.float64)
  mx = logits.max()
  log_p = logits - (mx + np.log(np.sum(np.exp(logits - mx))))
  target = np.full(logits.shape, eps / logits.size)
  target[label] += 1.0 - eps
  return -np.sum(target * log_p)


def np_symmetric(a, b, t, eps=0.0):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  logits = a @ b.T / t
  return np.array([0.5 * (np_ce(logits[i], i, eps) + np_ce(logits[:, i], i, eps))
                   for i in range(a.shape[0])])


def np_symmetric_extra(a, b, extra, mask, t):
  """The a -> b row of pair i also holds a_i's unmasked extra negatives."""
  a, b, extra = (np.asarray(x, np.float64) for x in (a, b, extra))
  logits = a @ b.T / t
  out = []
  for i in range(a.shape[0]):
    row = np.concatenate([logits[i], extra[i][mask[i]] @ a[i] / t])
    out.append(0.5 * (np_ce(row, i) + np_ce(logits[:, i], i)))
  return np.array(out)


def np_sigmoid(a, b, scale, bias):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  out = np.zeros(a.shape[0])
  for i in range(a.shape[0]):
    for j in range(b.shape[0]):
      z = 1.0 if i == j else -1.0
      x = z * (scale * a[i] @ b[j] + bias)
      out[i] += np.log1p(np.exp(-x))  # -log sigmoid(x)
  return out


def np_slerp(a, b, lam):
  """The textbook formula of the m²-mix code: sin-weighted sum."""
  theta = np.arccos(np.clip(np.sum(a * b, -1, keepdims=True), -1, 1))
  return (np.sin(lam * theta) * a + np.sin((1 - lam) * theta) * b) / np.sin(
      theta)


def np_m2mix(v, t, lam, tau):
  v, t = np.asarray(v, np.float64), np.asarray(t, np.float64)
  m = np_slerp(v, t, lam)
  n = v.shape[0]
  out = np.zeros(n)
  for i in range(n):
    li = np.array([v[i] @ (t[i] if j == i else m[j]) for j in range(n)]) / tau
    lt = np.array([t[i] @ (v[i] if j == i else m[j]) for j in range(n)]) / tau
    out[i] = np_ce(li, i) + np_ce(lt, i)
  return out


def np_soft_ce(logits, target):
  logits = np.asarray(logits, np.float64)
  mx = logits.max()
  return -np.sum(target * (logits - (mx + np.log(np.sum(np.exp(logits - mx))))))


def np_m3mix(v, t, lam, tau, term, original_neg=False):
  """changdaeoh/multimodal-mixup: the mixed logits, then calc_mix_loss's
  clip_loss (mean of row and column soft CEs) over the whole matrix."""
  v, t = np.asarray(v, np.float64), np.asarray(t, np.float64)
  n = v.shape[0]
  a = np_slerp(v, v[::-1], lam) if term in ('vmix', 'vlmix') else v
  b = np_slerp(t, t[::-1], lam) if term in ('lmix', 'vlmix') else t
  logits = a @ b.T / tau
  eye, flip = np.eye(n), np.flip(np.eye(n), axis=0)
  target = eye + flip if term == 'vlmix' else lam * eye + (1 - lam) * flip
  if original_neg:
    logits = np.where(eye + flip > 0, logits, v @ t.T / tau)
  return np.array([0.5 * (np_soft_ce(logits[i], target[i]) +
                          np_soft_ce(logits[:, i], target[:, i]))
                   for i in range(n)])


class SymmetricInfoNCETest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(2)
    self.a = testing.unit(rng, 5, 4)
    self.b = testing.unit(rng, 5, 4)

  def test_hand_computed(self):
    x = jnp.eye(2)
    out = losses.symmetric_info_nce(x, x, temperature=1.0)
    np.testing.assert_allclose(out, [math.log1p(math.exp(-1))] * 2, rtol=1e-6)

  @parameterized.parameters((0.07, 0.0), (0.5, 0.1))
  def test_matches_numpy(self, t, eps):
    out = losses.symmetric_info_nce(self.a, self.b, temperature=t,
                                    label_smoothing=eps)
    np.testing.assert_allclose(out, np_symmetric(self.a, self.b, t, eps),
                               rtol=1e-5)

  def test_jit_equals_eager(self):
    f = lambda a: losses.symmetric_info_nce(a, self.b, temperature=0.1,
                                            label_smoothing=0.1)
    np.testing.assert_allclose(jax.jit(f)(self.a), f(self.a), rtol=1e-5)

  def test_gradients(self):
    g = jax.grad(lambda a, b: losses.symmetric_info_nce(
        a, b, temperature=0.5, label_smoothing=0.1).sum(), (0, 1))(
            self.a, self.b)
    ref_a = testing.numeric_grad(
        lambda a: np_symmetric(a, self.b, 0.5, 0.1).sum(), self.a)
    ref_b = testing.numeric_grad(
        lambda b: np_symmetric(self.a, b, 0.5, 0.1).sum(), self.b)
    np.testing.assert_allclose(g[0], ref_a, atol=1e-4)
    np.testing.assert_allclose(g[1], ref_b, atol=1e-4)

  @parameterized.parameters(1e-3, 10.0)
  def test_extreme_temperatures(self, t):
    f = lambda a: losses.symmetric_info_nce(a, self.b, temperature=t)
    np.testing.assert_allclose(f(self.a), np_symmetric(self.a, self.b, t),
                               rtol=1e-4)
    self.assertTrue(testing.all_finite(jax.grad(lambda a: f(a).sum())(self.a)))

  def test_bfloat16(self):
    cast = lambda x: jnp.asarray(x, jnp.bfloat16)
    out = losses.symmetric_info_nce(cast(self.a), cast(self.b),
                                    temperature=0.1)
    self.assertEqual(out.dtype, jnp.float32)
    np.testing.assert_allclose(
        out, np_symmetric(np.asarray(cast(self.a), np.float64),
                          np.asarray(cast(self.b), np.float64), 0.1),
        rtol=1e-4)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, 'a and b must have the same shape'):
      losses.symmetric_info_nce(self.a, self.b[:4], temperature=1.0)
    with self.assertRaisesRegex(ValueError, 'temperature must be > 0, got 0'):
      losses.symmetric_info_nce(self.a, self.b, temperature=0.0)
    with self.assertRaisesRegex(ValueError, r'label_smoothing must be in'):
      losses.symmetric_info_nce(self.a, self.b, temperature=1.0,
                                label_smoothing=1.0)
    with self.assertRaisesRegex(ValueError, "axis_name='data'"):
      losses.symmetric_info_nce(self.a, self.b, temperature=1.0,
                                axis_name='data')


class ExtraNegativesTest(absltest.TestCase):
  """symmetric_info_nce with per-pair mined negatives (a -> b only)."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(7)
    self.a = testing.unit(rng, 5, 4)
    self.b = testing.unit(rng, 5, 4)
    self.extra = testing.unit(rng, 5, 3, 4)
    self.mask = rng.random((5, 3)) > 0.3
    self.mask[2] = False  # a pair without any mined negative

  def loss(self, a, b, extra, mask=None, t=0.2):
    return losses.symmetric_info_nce(a, b, temperature=t,
                                     extra_negatives=extra,
                                     extra_negative_mask=mask)

  def test_hand_computed(self):
    # a = b = e1, one extra e2: row [1, 0] / 1, column [1]: log(1 + e^-1)/2.
    x = jnp.eye(2)[:1]
    out = losses.symmetric_info_nce(x, x, temperature=1.0,
                                    extra_negatives=jnp.eye(2)[None, 1:])
    np.testing.assert_allclose(out, [0.5 * math.log1p(math.exp(-1))],
                               rtol=1e-6)

  def test_matches_numpy_and_jit(self):
    ref = np_symmetric_extra(self.a, self.b, self.extra, self.mask, 0.2)
    np.testing.assert_allclose(
        self.loss(self.a, self.b, self.extra, self.mask), ref, rtol=1e-5)
    np.testing.assert_allclose(
        jax.jit(self.loss)(self.a, self.b, self.extra, self.mask), ref,
        rtol=1e-5)
    # A masked-out pair has the plain CLIP loss; no mask: all count.
    np.testing.assert_allclose(
        self.loss(self.a, self.b, self.extra, self.mask)[2],
        np_symmetric(self.a, self.b, 0.2)[2], rtol=1e-5)
    np.testing.assert_allclose(
        self.loss(self.a, self.b, self.extra),
        np_symmetric_extra(self.a, self.b, self.extra,
                           np.ones((5, 3), bool), 0.2), rtol=1e-5)

  def test_gradients_reach_the_extra_negatives(self):
    g = jax.grad(lambda a, e: self.loss(a, self.b, e, self.mask).sum(),
                 (0, 1))(self.a, self.extra)
    ref_a = testing.numeric_grad(lambda a: np_symmetric_extra(
        a, self.b, self.extra, self.mask, 0.2).sum(), self.a)
    ref_e = testing.numeric_grad(lambda e: np_symmetric_extra(
        self.a, self.b, e, self.mask, 0.2).sum(), self.extra)
    np.testing.assert_allclose(g[0], ref_a, atol=1e-4)
    np.testing.assert_allclose(g[1], ref_e, atol=1e-4)
    self.assertTrue(np.all(g[1][~self.mask] == 0))  # masked: no gradient

  def test_non_finite_extra_poisons_only_its_pair(self):
    extra = self.extra.copy()
    extra[1, 0, 0] = np.nan
    out = np.asarray(self.loss(self.a, self.b, extra, self.mask))
    self.assertTrue(np.isnan(out[1]))
    np.testing.assert_allclose(
        np.delete(out, 1),
        np.delete(np_symmetric_extra(self.a, self.b, self.extra, self.mask,
                                     0.2), 1), rtol=1e-5)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, r'extra_negatives must be \[5, '
                                r'k, 4\] like a, got \[5, 4\]'):
      self.loss(self.a, self.b, self.b)
    with self.assertRaisesRegex(ValueError, 'extra_negative_mask must be '
                                r'bool \[5, 3\], got int'):
      self.loss(self.a, self.b, self.extra, np.ones((5, 3), int))
    with self.assertRaisesRegex(ValueError, 'without extra_negatives'):
      self.loss(self.a, self.b, None, self.mask)
    with self.assertRaisesRegex(ValueError, 'label_smoothing must be 0 with '
                                'extra_negatives, got 0.1'):
      losses.symmetric_info_nce(self.a, self.b, temperature=1.0,
                                label_smoothing=0.1,
                                extra_negatives=self.extra)


class SigmoidContrastiveTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(3)
    self.a = testing.unit(rng, 6, 4)
    self.b = testing.unit(rng, 6, 4)

  def test_hand_computed(self):
    x = jnp.eye(2)
    out = losses.sigmoid_contrastive(x, x, scale=1.0, bias=0.0)
    expected = -math.log(1 / (1 + math.exp(-1))) - math.log(0.5)
    np.testing.assert_allclose(out, [expected] * 2, rtol=1e-6)

  def test_matches_numpy_with_siglip_init(self):
    out = losses.sigmoid_contrastive(self.a, self.b, scale=10.0, bias=-10.0)
    np.testing.assert_allclose(out, np_sigmoid(self.a, self.b, 10.0, -10.0),
                               rtol=1e-5)

  def test_normalised_by_batch_not_pairs(self):
    # The batch mean of the per-row sums, i.e. sum over pairs / B.
    out = losses.sigmoid_contrastive(self.a, self.b, scale=10.0, bias=-10.0)
    total = np_sigmoid(self.a, self.b, 10.0, -10.0).sum()
    np.testing.assert_allclose(jnp.mean(out), total / 6, rtol=1e-5)

  def test_jit_equals_eager(self):
    f = lambda a: losses.sigmoid_contrastive(a, self.b, scale=5.0, bias=-2.0)
    np.testing.assert_allclose(jax.jit(f)(self.a), f(self.a), rtol=1e-5)

  def test_gradients_including_scale_and_bias(self):
    g = jax.grad(lambda a, s, c: losses.sigmoid_contrastive(
        a, self.b, scale=s, bias=c).sum(), (0, 1, 2))(self.a, 10.0, -10.0)
    np.testing.assert_allclose(g[0], testing.numeric_grad(
        lambda a: np_sigmoid(a, self.b, 10.0, -10.0).sum(), self.a), atol=1e-4)
    num_s = (np_sigmoid(self.a, self.b, 10 + 1e-5, -10).sum() -
             np_sigmoid(self.a, self.b, 10 - 1e-5, -10).sum()) / 2e-5
    num_b = (np_sigmoid(self.a, self.b, 10, -10 + 1e-5).sum() -
             np_sigmoid(self.a, self.b, 10, -10 - 1e-5).sum()) / 2e-5
    np.testing.assert_allclose([g[1], g[2]], [num_s, num_b], rtol=1e-4)

  def test_large_logits_finite(self):
    out = losses.sigmoid_contrastive(self.a, -self.b, scale=1e4, bias=0.0)
    self.assertTrue(testing.all_finite(out))
    g = jax.grad(lambda a: losses.sigmoid_contrastive(
        a, -self.b, scale=1e4, bias=0.0).sum())(self.a)
    self.assertTrue(testing.all_finite(g))

  def test_bfloat16(self):
    cast = lambda x: jnp.asarray(x, jnp.bfloat16)
    out = losses.sigmoid_contrastive(cast(self.a), cast(self.b), scale=10.0,
                                     bias=-10.0)
    self.assertEqual(out.dtype, jnp.float32)
    np.testing.assert_allclose(
        out, np_sigmoid(np.asarray(cast(self.a), np.float64),
                        np.asarray(cast(self.b), np.float64), 10.0, -10.0),
        rtol=1e-4)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, 'scale must be > 0, got -1.0'):
      losses.sigmoid_contrastive(self.a, self.b, scale=-1.0, bias=0.0)
    with self.assertRaisesRegex(ValueError, 'same shape'):
      losses.sigmoid_contrastive(self.a, self.b[:, :3], scale=1.0, bias=0.0)


class M2MixTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(4)
    self.v = testing.unit(rng, 5, 4)
    self.t = testing.unit(rng, 5, 4)

  def test_hand_computed(self):
    # Two orthogonal pairs, lam=1: mixtures are the images themselves.
    v = jnp.array([[1., 0.], [0., 1.]])
    t = jnp.array([[0., 1.], [1., 0.]])
    out = losses.m2mix(v, t, 1.0, temperature=1.0)
    # Image row 0: [v0·t0, v0·v1] = [0, 0]; text row 0: [t0·v0, t0·v1] = [0, 1].
    expected = math.log(2) + (math.log(1 + math.e) - 0.0)
    np.testing.assert_allclose(out, [expected] * 2, rtol=1e-6)

  @parameterized.parameters(0.1, 0.5, 0.9)
  def test_matches_numpy(self, lam):
    out = losses.m2mix(self.v, self.t, lam, temperature=0.07)
    np.testing.assert_allclose(out, np_m2mix(self.v, self.t, lam, 0.07),
                               rtol=1e-4)

  def test_jit_equals_eager(self):
    f = lambda v: losses.m2mix(v, self.t, 0.3)
    np.testing.assert_allclose(jax.jit(f)(self.v), f(self.v), rtol=1e-5)

  def test_gradient_flows_through_mixtures(self):
    # Embeddings are normalised upstream, as in every CLIP model; the
    # mixture's gradient is then fixed by its values on the sphere.
    tau = 0.5
    jnorm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    nnorm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    g = jax.grad(lambda v, t: losses.m2mix(
        jnorm(v), jnorm(t), 0.4, temperature=tau).sum(), (0, 1))(
            self.v, self.t)
    ref_v = testing.numeric_grad(
        lambda v: np_m2mix(nnorm(v), self.t, 0.4, tau).sum(), self.v)
    ref_t = testing.numeric_grad(
        lambda t: np_m2mix(self.v, nnorm(t), 0.4, tau).sum(), self.t)
    np.testing.assert_allclose(g[0], ref_v, atol=1e-4)
    np.testing.assert_allclose(g[1], ref_t, atol=1e-4)

  def test_identical_and_antipodal_pairs_are_finite(self):
    for t in (self.v, -self.v):
      f = lambda v, t=t: losses.m2mix(v, t, 0.5).sum()
      self.assertTrue(testing.all_finite(f(self.v)))
      self.assertTrue(testing.all_finite(jax.grad(f)(self.v)))

  @parameterized.parameters(1e-3, 10.0)
  def test_extreme_temperatures(self, tau):
    out = losses.m2mix(self.v, self.t, 0.3, temperature=tau)
    np.testing.assert_allclose(out, np_m2mix(self.v, self.t, 0.3, tau),
                               rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda v: losses.m2mix(v, self.t, 0.3,
                                        temperature=tau).sum())(self.v)
    self.assertTrue(testing.all_finite(g))

  def test_bfloat16(self):
    cast = lambda x: jnp.asarray(x, jnp.bfloat16)
    out = losses.m2mix(cast(self.v), cast(self.t), 0.3)
    self.assertEqual(out.dtype, jnp.float32)
    # Computed in float32: equal to the float32 call on the rounded values.
    up = lambda x: jnp.asarray(cast(x), jnp.float32)
    np.testing.assert_allclose(out, losses.m2mix(up(self.v), up(self.t), 0.3),
                               rtol=1e-6)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, 'lam must be a scalar'):
      losses.m2mix(self.v, self.t, jnp.ones(5))
    with self.assertRaisesRegex(ValueError, 'temperature must be > 0'):
      losses.m2mix(self.v, self.t, 0.5, temperature=0.0)
    with self.assertRaisesRegex(ValueError, 'image and text'):
      losses.m2mix(self.v, self.t[:3], 0.5)



class M3MixTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(6)
    # Even, as the paper's batches: with an odd batch the middle pair is its
    # own partner and the authors' slerp divides 0 by 0 (see below).
    self.v = testing.unit(rng, 6, 4)
    self.t = testing.unit(rng, 6, 4)

  @parameterized.parameters('vmix', 'lmix')
  def test_lam_one_is_clip(self, term):
    # Nothing mixed and targets I: the symmetric InfoNCE of CLIP.
    np.testing.assert_allclose(
        losses.m3mix(self.v, self.t, 1.0, term=term, temperature=0.1),
        losses.symmetric_info_nce(self.v, self.t, temperature=0.1),
        rtol=1e-5)

  def test_hand_computed_vlmix(self):
    # lam=1, two orthogonal pairs: logits v t^T = I, targets I + J = ones.
    v = jnp.eye(2)
    out = losses.m3mix(v, v, 1.0, term='vlmix', temperature=1.0)
    # Each row and column: -(log p_same + log p_other), p = e/(e+1), 1/(e+1).
    expected = 2 * math.log(1 + math.e) - 1.0
    np.testing.assert_allclose(out, [expected] * 2, rtol=1e-6)

  @parameterized.parameters('vmix', 'lmix', 'vlmix')
  def test_matches_numpy(self, term):
    for lam in (0.2, 0.7):
      for original in (False, True):
        out = losses.m3mix(self.v, self.t, lam, term=term, temperature=0.05,
                           original_negatives=original)
        np.testing.assert_allclose(
            out, np_m3mix(self.v, self.t, lam, 0.05, term, original),
            rtol=1e-4, err_msg=f'lam={lam} original={original}')

  @parameterized.parameters('vmix', 'lmix', 'vlmix')
  def test_gradients_and_jit(self, term):
    # Normalised inside, as embeddings are upstream (see M2MixTest).
    tau = 0.5
    jnorm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    nnorm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    f = lambda v, t: losses.m3mix(jnorm(v), jnorm(t), 0.3, term=term,
                                  temperature=tau).sum()
    g = jax.grad(f, (0, 1))(self.v, self.t)
    g_jit = jax.jit(jax.grad(f, (0, 1)))(self.v, self.t)
    ref_v = testing.numeric_grad(
        lambda v: np_m3mix(nnorm(v), self.t, 0.3, tau, term).sum(), self.v)
    ref_t = testing.numeric_grad(
        lambda t: np_m3mix(self.v, nnorm(t), 0.3, tau, term).sum(), self.t)
    for got, jit_got, ref in ((g[0], g_jit[0], ref_v),
                              (g[1], g_jit[1], ref_t)):
      np.testing.assert_allclose(got, ref, atol=1e-4)
      np.testing.assert_allclose(jit_got, got, rtol=1e-5, atol=1e-6)

  def test_odd_batch_middle_pair_is_finite(self):
    # The middle pair mixes with itself: hnjax's slerp returns it (the
    # authors' sin-formula gives 0/0 = NaN there).
    v, t = self.v[:5], self.t[:5]
    f = lambda v: losses.m3mix(v, t, 0.3, term='vlmix').sum()
    self.assertTrue(testing.all_finite(f(v)))
    self.assertTrue(testing.all_finite(jax.grad(f)(v)))

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "term must be one of .* 'mix'"):
      losses.m3mix(self.v, self.t, 0.5, term='mix')
    with self.assertRaisesRegex(ValueError, 'lam must be a scalar'):
      losses.m3mix(self.v, self.t, jnp.ones(5), term='vmix')


if __name__ == '__main__':
  absltest.main()
