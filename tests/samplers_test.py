"""Tests for hnjax.samplers."""

import math
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from hnjax import bank as bank_lib
from hnjax import losses
from hnjax import samplers
from tests import testing


def np_slerp(a, b, lam):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  lam = np.asarray(lam, np.float64)[..., None]
  theta = np.arccos(np.clip(np.sum(a * b, -1, keepdims=True), -1, 1))
  return (np.sin(lam * theta) * a + np.sin((1 - lam) * theta) * b) / np.sin(
      theta)


def np_hardest(q, bank, num, mask=None):
  """Stable descending sort: ties keep the lower index first."""
  sims = np.asarray(q, np.float64) @ np.asarray(bank, np.float64).T
  if mask is not None:
    sims = np.where(mask, sims, -np.inf)
  idx = np.argsort(-sims, axis=1, kind='stable')[:, :num]
  vals = np.take_along_axis(sims, idx, 1)
  return vals, np.where(np.isfinite(vals), idx, -1)


class GeodesicMixTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(8)
    self.a = testing.unit(rng, 6, 5)
    self.b = testing.unit(rng, 6, 5)
    self.lam = rng.random(6).astype(np.float32)

  def test_hand_computed(self):
    out = samplers.geodesic_mix(jnp.array([1., 0.]), jnp.array([0., 1.]),
                                1 / 3)
    # 1/3 of the way from b: 60 degrees from a.
    np.testing.assert_allclose(out, [0.5, math.sqrt(3) / 2], atol=1e-6)

  def test_matches_sin_formula(self):
    out = samplers.geodesic_mix(self.a, self.b, self.lam)
    np.testing.assert_allclose(out, np_slerp(self.a, self.b, self.lam),
                               atol=2e-6)

  def test_endpoints_angle_and_norm(self):
    np.testing.assert_allclose(samplers.geodesic_mix(self.a, self.b, 1.0),
                               self.a, atol=1e-6)
    np.testing.assert_allclose(samplers.geodesic_mix(self.a, self.b, 0.0),
                               self.b, atol=1e-6)
    out = samplers.geodesic_mix(self.a, self.b, self.lam)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)
    theta = np.arccos(np.sum(self.a * self.b, -1))
    angle_to_a = np.arccos(np.clip(np.sum(out * self.a, -1), -1, 1))
    np.testing.assert_allclose(angle_to_a, (1 - self.lam) * theta, atol=1e-3)

  def test_lam_broadcasts(self):
    a = np.stack([self.a, self.b])  # [2, 6, 5]
    b = np.stack([self.b, self.a])
    out = samplers.geodesic_mix(a, b, self.lam)  # lam [6] broadcasts
    np.testing.assert_allclose(out[0], np_slerp(self.a, self.b, self.lam),
                               atol=2e-6)

  @parameterized.parameters(0.0, 0.3, 0.5, 1.0)
  def test_identical_and_antipodal_inputs(self, lam):
    for b in (self.a, -self.a):
      out = samplers.geodesic_mix(self.a, b, lam)
      self.assertTrue(testing.all_finite(out))
      np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
      g = jax.grad(lambda a, b=b: samplers.geodesic_mix(a, b, lam).sum())(
          self.a)
      self.assertTrue(testing.all_finite(g))
    np.testing.assert_allclose(samplers.geodesic_mix(self.a, self.a, lam),
                               self.a, atol=1e-6)
    # Antipodal: the angle to a is still (1 - lam) * pi.
    out = samplers.geodesic_mix(self.a, -self.a, lam)
    np.testing.assert_allclose(np.sum(out * self.a, -1),
                               np.cos((1 - lam) * np.pi), atol=1e-5)

  def test_nearly_identical_inputs(self):
    b = self.a + 1e-4 * self.b
    b /= np.linalg.norm(b, axis=-1, keepdims=True)
    g = jax.grad(lambda a: samplers.geodesic_mix(a, b, 0.5).sum())(self.a)
    self.assertTrue(testing.all_finite(g))

  def test_gradient_on_the_sphere(self):
    jnorm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    nnorm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    w = np.random.default_rng(0).normal(size=self.a.shape)
    g = jax.grad(lambda a, lam: jnp.sum(
        w * samplers.geodesic_mix(jnorm(a), self.b, lam)), (0, 1))(
            self.a, self.lam)
    ref_a = testing.numeric_grad(
        lambda a: np.sum(w * np_slerp(nnorm(a), self.b, self.lam)), self.a)
    ref_lam = testing.numeric_grad(
        lambda lam: np.sum(w * np_slerp(self.a, self.b, lam)), self.lam)
    np.testing.assert_allclose(g[0], ref_a, atol=1e-4)
    np.testing.assert_allclose(g[1], ref_lam, atol=1e-4)

  def test_jit_and_dtype(self):
    f = lambda a: samplers.geodesic_mix(a, self.b, self.lam)
    np.testing.assert_allclose(jax.jit(f)(self.a), f(self.a), atol=1e-6)
    out = samplers.geodesic_mix(jnp.asarray(self.a, jnp.bfloat16),
                                jnp.asarray(self.b, jnp.bfloat16), 0.5)
    self.assertEqual(out.dtype, jnp.bfloat16)
    self.assertTrue(testing.all_finite(out))

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, 'a and b must have the same shape'):
      samplers.geodesic_mix(self.a, self.b[:, :3], 0.5)
    with self.assertRaisesRegex(ValueError, 'does not broadcast'):
      samplers.geodesic_mix(self.a, self.b, np.ones(4))


class HardestNegativesTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(9)
    self.q = testing.unit(rng, 5, 4)
    self.bank = testing.unit(rng, 12, 4)
    self.mask = rng.random((5, 12)) > 0.4

  def test_hand_computed(self):
    q = jnp.array([[1., 0.]])
    bank = jnp.array([[0., 1.], [.8, .6], [-1., 0.], [.6, .8]])
    sims, idx = samplers.hardest_negatives(q, bank, 2)
    np.testing.assert_allclose(sims, [[0.8, 0.6]], atol=1e-6)
    np.testing.assert_array_equal(idx, [[1, 3]])

  @parameterized.parameters(1, 4, 12)
  def test_matches_numpy(self, num):
    sims, idx = samplers.hardest_negatives(self.q, self.bank, num,
                                           negative_mask=self.mask)
    ref_v, ref_i = np_hardest(self.q, self.bank, num, self.mask)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(sims, ref_v, atol=1e-6)
    self.assertEqual(idx.dtype, jnp.int32)

  def test_masked_entries_never_selected(self):
    _, idx = samplers.hardest_negatives(self.q, self.bank, 12,
                                        negative_mask=self.mask)
    for b in range(5):
      chosen = [i for i in np.asarray(idx[b]) if i >= 0]
      self.assertTrue(all(self.mask[b, i] for i in chosen))
      self.assertLen(chosen, int(self.mask[b].sum()))

  def test_fully_masked_row(self):
    mask = self.mask.copy()
    mask[3] = False
    sims, idx = samplers.hardest_negatives(self.q, self.bank, 3,
                                           negative_mask=mask)
    np.testing.assert_array_equal(idx[3], [-1, -1, -1])
    self.assertTrue(np.all(np.isneginf(sims[3])))

  def test_ties_go_to_lower_index(self):
    bank = np.tile(self.bank[:3], (3, 1))  # every vector three times
    _, idx = samplers.hardest_negatives(self.q, bank, 6)
    np.testing.assert_array_equal(idx, np_hardest(self.q, bank, 6)[1])

  def test_no_gradient(self):
    g = jax.grad(lambda q, b: samplers.hardest_negatives(q, b, 3)[0].sum(),
                 (0, 1))(self.q, self.bank)
    np.testing.assert_array_equal(g[0], 0.0)
    np.testing.assert_array_equal(g[1], 0.0)

  def test_jit_equals_eager(self):
    f = lambda q: samplers.hardest_negatives(q, self.bank, 4,
                                             negative_mask=self.mask)
    for x, y in zip(jax.jit(f)(self.q), f(self.q)):
      np.testing.assert_allclose(x, y, atol=1e-6)

  def test_bfloat16(self):
    sims, idx = samplers.hardest_negatives(
        jnp.asarray(self.q, jnp.bfloat16), jnp.asarray(self.bank, jnp.bfloat16),
        3)
    self.assertEqual(sims.dtype, jnp.float32)
    self.assertEqual(idx.shape, (5, 3))

  @parameterized.named_parameters(
      ('too_many', 13, 'num_top=13 is larger than the bank'),
      ('zero', 0, 'num must be an int > 0, got 0'),
      ('negative', -2, 'got -2'),
      ('float', 2.0, 'got 2.0'),
  )
  def test_bad_num(self, num, message):
    with self.assertRaisesRegex(ValueError, message):
      samplers.hardest_negatives(self.q, self.bank, num)


class MochiTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(10)
    self.q = testing.unit(rng, 6, 8)
    self.bank = testing.unit(rng, 40, 8)
    self.key = jax.random.key(0)

  def call(self, **kwargs):
    args = dict(num_hard=5, num_mix=7, num_query_mix=3)
    args.update(kwargs)
    return samplers.mochi(self.key, self.q, self.bank, **args)

  def test_shapes_norm_and_dtype(self):
    h = self.call()
    self.assertEqual(h.shape, (6, 10, 8))
    self.assertEqual(h.dtype, jnp.float32)
    np.testing.assert_allclose(np.linalg.norm(h, axis=-1), 1.0, atol=1e-5)
    self.assertEqual(self.call(num_query_mix=0).shape, (6, 7, 8))
    self.assertEqual(self.call(num_mix=0).shape, (6, 3, 8))
    self.assertEqual(self.call(num_mix=0, num_query_mix=0).shape, (6, 0, 8))

  def test_num_hard_one_is_deterministic(self):
    # N = 1: type 1 is the hardest negative itself; type 2 lies on the arc
    # from it towards the query, at most half way (β < 0.5).
    h = self.call(num_hard=1, num_mix=4, num_query_mix=50)
    hardest = self.bank[np_hardest(self.q, self.bank, 1)[1][:, 0]]
    np.testing.assert_allclose(h[:, :4], np.repeat(hardest[:, None], 4, 1),
                               atol=1e-6)
    for b in range(6):
      basis = np.stack([self.q[b], hardest[b]], 1).astype(np.float64)
      c, *_ = np.linalg.lstsq(basis, np.asarray(h[b, 4:], np.float64).T,
                              rcond=None)  # [2, 50]: (β, 1 - β) / norm
      np.testing.assert_allclose(basis @ c, np.asarray(h[b, 4:]).T, atol=1e-5)
      beta = c[0] / c.sum(0)
      self.assertTrue(np.all((beta >= -1e-5) & (beta <= 0.5 + 1e-5)))

  def test_mixes_only_own_hardest_negatives(self):
    # The MaugrimEP port indexes query 0's hard set for every query
    # (ALGORITHMS.md §8.4). Here each type-1 negative must be a
    # normalised convex combination of two of its own query's top-N.
    num_hard = 5
    h = np.asarray(self.call(num_hard=num_hard, num_mix=30, num_query_mix=0),
                   np.float64)
    _, top = np_hardest(self.q, self.bank, num_hard)
    for b in range(6):
      cands = self.bank[top[b]].astype(np.float64)
      for v in h[b]:
        best = np.inf
        for i in range(num_hard):
          for j in range(num_hard):
            basis = np.stack([cands[i], cands[j]], 1)
            c, *_ = np.linalg.lstsq(basis, v, rcond=None)
            best = min(best, np.linalg.norm(basis @ c - v) + (
                0 if np.all(c >= -1e-5) else 1))
        self.assertLess(best, 1e-4, msg=f'query {b}')

  def test_type1_and_type2_distributions(self):
    # q between two orthogonal hard negatives e1, e2; the rest of the bank
    # is far away. Recover the mixing weights from the outputs.
    d = 4
    e1, e2 = np.eye(d)[0], np.eye(d)[1]
    q = ((e1 + e2) / math.sqrt(2))[None].astype(np.float32)
    bank = np.stack([e1, e2, -e1, -e2, -np.eye(d)[2]]).astype(np.float32)
    h = np.asarray(samplers.mochi(jax.random.key(1), q, bank, num_hard=2,
                                  num_mix=4000, num_query_mix=4000),
                   np.float64)[0]
    t1 = h[:4000]
    # Type 1: α e_i + (1-α) e_j; share on e1 is 1 or 0 when i == j (half
    # the draws), α or 1 - α ~ U(0, 1) otherwise.
    share = t1[:, 0] / (t1[:, 0] + t1[:, 1])
    ends = (share < 1e-6) | (share > 1 - 1e-6)
    self.assertAlmostEqual(ends.mean(), 0.5, delta=0.03)
    inner = share[~ends]
    np.testing.assert_allclose(np.histogram(inner, bins=4, range=(0, 1))[0] /
                               inner.size, 0.25, atol=0.03)
    # Type 2: norm(β q + (1 - β) e_j), β ~ U(0, 0.5).
    t2 = h[4000:]
    small = np.minimum(t2[:, 0], t2[:, 1])  # = β / sqrt(2) / norm
    big = np.maximum(t2[:, 0], t2[:, 1])    # = (β / sqrt(2) + 1 - β) / norm
    r = small / big
    beta = r / (1 / math.sqrt(2) - r / math.sqrt(2) + r)
    self.assertGreaterEqual(beta.min(), -1e-6)
    self.assertLessEqual(beta.max(), 0.5 + 1e-6)
    self.assertAlmostEqual(beta.mean(), 0.25, delta=0.01)
    # Both hard negatives are used by type 2, about equally.
    self.assertAlmostEqual(np.mean(t2[:, 0] > t2[:, 1]), 0.5, delta=0.03)

  def test_stop_gradient(self):
    g = jax.grad(lambda q, b: jnp.sum(samplers.mochi(
        self.key, q, b, num_hard=5, num_mix=3, num_query_mix=3) ** 3),
                 (0, 1))(self.q, self.bank)
    np.testing.assert_array_equal(g[0], 0.0)
    np.testing.assert_array_equal(g[1], 0.0)

  def test_as_extra_negatives_gradient_only_through_query(self):
    h = self.call()
    g = jax.grad(lambda q: losses.info_nce(
        q, self.q, self.bank, temperature=0.2,
        extra_negatives=samplers.mochi(self.key, q, self.bank, num_hard=5,
                                       num_mix=7, num_query_mix=3)).sum())(
                                           self.q)
    g_const = jax.grad(lambda q: losses.info_nce(
        q, self.q, self.bank, temperature=0.2, extra_negatives=h).sum())(
            self.q)
    np.testing.assert_allclose(g, g_const, atol=1e-6)

  def test_masked_negatives_never_mixed(self):
    # Mask each query's 3 hardest: with N=2 the result must only involve
    # the 4th and 5th hardest.
    _, top = np_hardest(self.q, self.bank, 5)
    mask = np.ones((6, 40), bool)
    for b in range(6):
      mask[b, top[b, :3]] = False
    h = np.asarray(self.call(num_hard=2, num_mix=20, num_query_mix=0,
                             negative_mask=mask), np.float64)
    for b in range(6):
      allowed = self.bank[top[b, 3:5]].astype(np.float64)  # [2, D]
      c, *_ = np.linalg.lstsq(allowed.T, h[b].T, rcond=None)
      np.testing.assert_allclose(allowed.T @ c, h[b].T, atol=1e-5)

  def test_fully_masked_row_is_finite_zero(self):
    mask = np.ones((6, 40), bool)
    mask[2] = False
    h = self.call(negative_mask=mask)
    self.assertTrue(testing.all_finite(h))
    np.testing.assert_array_equal(h[2], 0.0)

  def test_rows_use_their_own_randomness(self):
    # Same query twice in a batch, different draws; a query's result does
    # not depend on the other rows.
    h_full = self.call()
    h_sub = samplers.mochi(self.key, self.q[:3], self.bank, num_hard=5,
                           num_mix=7, num_query_mix=3)
    np.testing.assert_allclose(h_sub, h_full[:3], atol=1e-6)
    q2 = np.repeat(self.q[:1], 2, axis=0)
    h2 = samplers.mochi(self.key, q2, self.bank, num_hard=5, num_mix=7,
                        num_query_mix=3)
    self.assertGreater(float(jnp.max(jnp.abs(h2[0] - h2[1]))), 1e-3)

  @parameterized.product(masked=(False, True), chunked=(False, True))
  def test_logits_without_mixtures(self, masked, chunked):
    if chunked:  # 4 then 2 queries per forward chunk, 5 then 1 backward.
      self.enter_context(mock.patch.object(
          bank_lib, 'GATHER_CHUNK_FLOATS', 4 * 7 * self.q.shape[1]))
    # Non-unit bank rows, a partially and a fully masked row.
    bank = self.bank * np.linspace(0.5, 2.0, 40)[:, None].astype(np.float32)
    mask = np.ones((6, 40), bool)
    if masked:
      mask[1, :37] = False
      mask[4] = False
    sims, top = samplers.hardest_negatives(self.q, bank, 5, negative_mask=mask)
    kw = dict(num_mix=7, num_query_mix=3)
    w = np.random.default_rng(1).normal(size=(6, 10)).astype(np.float32)

    def direct(q):
      h = samplers.mochi_mix(self.key, q, bank, top, **kw)
      return jnp.einsum('bd,bmd->bm', q, h)

    def fused(q):
      return samplers.mochi_logits(self.key, q, bank, top, sims, **kw)

    np.testing.assert_allclose(fused(self.q), direct(self.q), rtol=1e-5,
                               atol=1e-6)
    g_direct = jax.grad(lambda q: jnp.sum(w * direct(q)))(self.q)
    g_fused = jax.grad(lambda q: jnp.sum(w * fused(q)))(self.q)
    np.testing.assert_allclose(g_fused, g_direct, rtol=1e-5, atol=1e-6)
    if masked:
      np.testing.assert_array_equal(fused(self.q)[4], 0.0)

  def test_jit_equals_eager(self):
    f = lambda q: samplers.mochi(self.key, q, self.bank, num_hard=5,
                                 num_mix=7, num_query_mix=3)
    np.testing.assert_allclose(jax.jit(f)(self.q), f(self.q), atol=1e-6)

  def test_bfloat16(self):
    h = samplers.mochi(self.key, jnp.asarray(self.q, jnp.bfloat16),
                       jnp.asarray(self.bank, jnp.bfloat16), num_hard=5,
                       num_mix=2, num_query_mix=2)
    self.assertEqual(h.dtype, jnp.float32)
    self.assertTrue(testing.all_finite(h))

  @parameterized.named_parameters(
      ('num_hard_too_big', dict(num_hard=41), 'larger than the bank'),
      ('num_hard_zero', dict(num_hard=0), 'num_hard must be an int > 0'),
      ('num_mix_negative', dict(num_mix=-1), 'num_mix must be an int >= 0, '
       'got -1'),
      ('num_query_mix_negative', dict(num_query_mix=-3), 'got -3'),
  )
  def test_bad_input(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      self.call(**kwargs)


class MaskTest(parameterized.TestCase):

  def test_same_id_mask_matches_numpy(self):
    rng = np.random.default_rng(11)
    q_ids = rng.integers(0, 5, 6)
    b_ids = rng.integers(-1, 5, 20)
    expected = (q_ids[:, None] != b_ids[None]) | (b_ids[None] < 0)
    np.testing.assert_array_equal(samplers.same_id_mask(q_ids, b_ids),
                                  expected)
    np.testing.assert_array_equal(
        samplers.same_label_mask(q_ids, b_ids), expected)

  def test_unknown_query_ids_keep_everything(self):
    out = samplers.same_id_mask(np.array([-1]), np.array([-1, 0, 3]))
    np.testing.assert_array_equal(out, [[True, True, True]])

  def test_same_id_mask_removes_own_copy_from_hardest_set(self):
    rng = np.random.default_rng(12)
    bank = testing.unit(rng, 10, 4)
    ids = np.arange(10)
    q = bank[[2, 7]]  # the queries' earlier copies are in the bank
    _, idx = samplers.hardest_negatives(q, bank, 1)
    np.testing.assert_array_equal(idx[:, 0], [2, 7])
    _, idx = samplers.hardest_negatives(
        q, bank, 3, negative_mask=samplers.same_id_mask(ids[[2, 7]], ids))
    self.assertNotIn(2, np.asarray(idx[0]))
    self.assertNotIn(7, np.asarray(idx[1]))

  def test_id_mask_bad_input(self):
    with self.assertRaisesRegex(ValueError, 'query_ids must be a 1-D integer'):
      samplers.same_id_mask(np.zeros((2, 2), int), np.arange(3))
    with self.assertRaisesRegex(ValueError, 'bank_labels must be a 1-D integer'):
      samplers.same_label_mask(np.arange(2), np.zeros(3))

  @parameterized.parameters(('absolute', 0.1), ('relative', 0.2),
                            ('absolute', 0.0))
  def test_guide_margin_mask(self, mode, margin):
    rng = np.random.default_rng(13)
    g = rng.random((4, 9))
    gp = rng.random(4)
    g[0, 0] = gp[0] - margin if mode == 'absolute' else gp[0] * (1 - margin)
    thr = gp - margin if mode == 'absolute' else gp * (1 - margin)
    expected = ~(g > thr[:, None])
    out = samplers.guide_margin_mask(g, gp, margin=margin, mode=mode)
    np.testing.assert_array_equal(out, expected)
    self.assertTrue(bool(out[0, 0]))  # strict: a tie survives

  def test_guide_margin_mask_bad_input(self):
    g, gp = np.zeros((2, 3)), np.zeros(2)
    with self.assertRaisesRegex(ValueError, "mode must be one of .* 'abs'"):
      samplers.guide_margin_mask(g, gp, mode='abs')
    with self.assertRaisesRegex(ValueError, 'margin must be >= 0, got -0.1'):
      samplers.guide_margin_mask(g, gp, margin=-0.1)
    with self.assertRaisesRegex(ValueError, r'guide_query_positive must have'):
      samplers.guide_margin_mask(g, np.zeros(3))

  def test_hard_top_k_mask(self):
    rng = np.random.default_rng(14)
    s = rng.normal(size=(5, 11))
    out = samplers.hard_top_k_mask(s, 3)
    expected = np.zeros_like(out)
    np.put_along_axis(expected, np.argsort(-s, 1)[:, :3], True, 1)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(np.sum(out, 1), 3)

  def test_hard_top_k_mask_equals_slicing_in_info_nce(self):
    rng = np.random.default_rng(15)
    q, k = testing.unit(rng, 3, 4), testing.unit(rng, 3, 4)
    bank = testing.unit(rng, 9, 4)
    mask = samplers.hard_top_k_mask(q @ bank.T, 2)
    out = losses.info_nce(q, k, bank, temperature=0.1, negative_mask=mask)
    for b in range(3):
      kept = bank[np.asarray(mask[b])]
      ref = losses.info_nce(q[b:b + 1], k[b:b + 1], kept, temperature=0.1)
      np.testing.assert_allclose(out[b], ref[0], rtol=1e-6)

  def test_hard_top_k_mask_bad_input(self):
    with self.assertRaisesRegex(ValueError, 'k=5 is larger than'):
      samplers.hard_top_k_mask(np.zeros((2, 4)), 5)
    with self.assertRaisesRegex(ValueError, 'k must be an int > 0, got 0'):
      samplers.hard_top_k_mask(np.zeros((2, 4)), 0)


class SupReMixMixturesTest(absltest.TestCase):

  def test_anchor_exclusive_targets_are_exact(self):
    y = np.array([20., 22., 25., 21., 20., 30., 23.], np.float32)
    alpha, valid = samplers.anchor_exclusive_mixtures(y, window=5.0)
    alpha, valid = np.asarray(alpha, np.float64), np.asarray(valid)
    for i in range(7):
      for j in range(7):
        for k in range(7):
          expect = (y[j] < y[i] < y[k] and y[i] - y[j] < 5 and
                    y[k] - y[i] < 5)
          self.assertEqual(bool(valid[i, j, k]), expect)
          if expect:
            mixed = alpha[i, j, k] * y[j] + (1 - alpha[i, j, k]) * y[k]
            self.assertAlmostEqual(mixed, y[i], places=4)

  def test_anchor_inclusive_validity(self):
    y = np.array([1., 1., 2.])
    _, valid = samplers.anchor_inclusive_mixtures(jax.random.key(0), y)
    np.testing.assert_array_equal(valid, y[:, None] != y[None])

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, 'window must be > 0, got -1.0'):
      samplers.anchor_exclusive_mixtures(np.ones(3), window=-1.0)
    with self.assertRaisesRegex(ValueError, r'targets must have shape \[N\]'):
      samplers.anchor_exclusive_mixtures(np.ones((3, 1)))
    with self.assertRaisesRegex(ValueError, 'beta must be a pair'):
      samplers.anchor_inclusive_mixtures(jax.random.key(0), np.ones(3),
                                         beta=(1.0,))


if __name__ == '__main__':
  absltest.main()
