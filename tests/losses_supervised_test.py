"""Tests for sup_con, supremix and rank_n_contrast."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from hnjax import losses
from hnjax import samplers
from tests import testing


def np_lse(x):
  x = np.asarray(x, np.float64)
  mx = x.max()
  return mx + np.log(np.sum(np.exp(x - mx)))


def np_sup_con(z, y, t):
  z = np.asarray(z, np.float64)
  n = z.shape[0]
  out = np.zeros(n)
  for i in range(n):
    others = [a for a in range(n) if a != i]
    lse = np_lse([z[i] @ z[a] / t for a in others])
    pos = [a for a in others if y[a] == y[i]]
    if pos:
      out[i] = -np.mean([z[i] @ z[p] / t - lse for p in pos])
  return out


def np_supremix(z, y, t, window, alpha, weighting, mix_neg, mix_pos,
                z_mix=None):
  """Explicit mixture vectors, one anchor at a time (float64).

  ``z_mix`` (default ``z``) builds the mixtures: pass a constant to get the
  detached-mixture gradient by finite differences.
  """
  z = np.asarray(z, np.float64)
  zm = z if z_mix is None else np.asarray(z_mix, np.float64)
  y = np.asarray(y, np.float64)
  w = {'l1_inv': lambda d: d + 1, 'l2_inv': lambda d: d * d + 1,
       'none': lambda d: 1.0}[weighting]
  n = z.shape[0]
  out = np.zeros(n)
  for i in range(n):
    cands, pos = [], []  # (logit, log weight)
    for a in range(n):
      if a != i:
        cands.append((z[i] @ z[a] / t, math.log(w(abs(y[i] - y[a])))))
        if y[a] == y[i]:
          pos.append(z[i] @ z[a] / t)
    if mix_neg:
      for k in range(n):
        if y[k] != y[i]:
          al = alpha[i, k]
          m = al * zm[i] + (1 - al) * zm[k]
          ym = al * y[i] + (1 - al) * y[k]
          cands.append((z[i] @ m / t, math.log(w(abs(y[i] - ym)))))
    if mix_pos:
      for j in range(n):
        for k in range(n):
          if (y[j] < y[i] < y[k] and y[i] - y[j] < window and
              y[k] - y[i] < window):
            al = (y[k] - y[i]) / (y[k] - y[j])
            m = al * zm[j] + (1 - al) * zm[k]
            cands.append((z[i] @ m / t, 0.0))
            pos.append(z[i] @ m / t)
    if pos:
      d = np_lse([l + lw for l, lw in cands])
      out[i] = -np.mean([p - d for p in pos])
  return out


def np_supremix_authors(z, y, alpha, t, window, weighting, mix_neg, mix_pos):
  """What the authors' AgeDB-DIR code computes, one anchor at a time.

  Written from the walk-through of their mixing_func, compress_mixtures
  and SupConLoss_v2 (ALGORITHMS.md §4.6); ties in their unstable sort of
  the slot mask are taken in slot order (a stable sort).
  """
  z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
  n = len(y)

  def w(d, mixture):
    if weighting == 'l1_inv':
      return abs(d) + 1
    if weighting == 'l2_inv':
      return (d + 1) ** 2 + 1 if mixture else d * d + 1
    return 1.0

  def slots(i):  # kept mixture columns in order: negatives, then positives
    out = []  # (vector, label, is_positive, (j, k))
    for k in range(n):
      if k != i and y[k] != y[i]:
        a = alpha[i, k]
        out.append((a * z[i] + (1 - a) * z[k] if mix_neg else np.zeros_like(
            z[i]), a * y[i] + (1 - a) * y[k] if mix_neg else 0.0, False,
                    (i, k)))
    for j in range(n):
      for k in range(n):
        if y[j] < y[i] < y[k] and y[i] - y[j] < window and (
            y[k] - y[i] < window):
          a = (y[k] - y[i]) / (y[k] - y[j])
          out.append((a * z[j] + (1 - a) * z[k] if mix_pos else np.zeros_like(
              z[i]), y[i] if mix_pos else 0.0, True, (j, k)))
    return out

  all_slots = [slots(i) for i in range(n)]
  m_cols = max(len(sl) for sl in all_slots)
  out = np.zeros(n)
  for i, sl in enumerate(all_slots):
    grid = np.zeros((n, n))  # labels of the N² slots; 0 where unfilled
    for _, lab, _, jk in sl:
      grid[jk] = lab
    ranked = np.sort(grid.ravel())[n * n - len(sl):]  # by value, apart
    mix = np.array([v @ z[i] / t for v, _, _, _ in sl])
    top = max(mix.max(), -z[i].sum() / t if len(sl) < m_cols else -np.inf)
    real = z @ z[i] / t
    real_top = real.max()  # self included
    den = sum(np.exp(real[a] - real_top) * w(y[i] - y[a], False)
              for a in range(n) if a != i)
    den += sum(np.exp(m - top) * w(y[i] - lab, True)
               for m, lab in zip(mix, ranked))
    pos = [real[a] - real_top for a in range(n) if a != i and y[a] == y[i]]
    pos += [m - top for m, (_, _, p, _) in zip(mix, sl) if p]
    out[i] = -np.mean(np.array(pos) - np.log(den))
  return out


def np_rnc(z, y, t):
  z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
  n = z.shape[0]
  s = -np.linalg.norm(z[:, None] - z[None], axis=-1) / t
  out = np.zeros(n)
  for i in range(n):
    terms = []
    for j in range(n):
      if j == i:
        continue
      ks = [k for k in range(n)
            if k != i and abs(y[i] - y[k]) >= abs(y[i] - y[j])]
      terms.append(s[i, j] - np_lse(s[i, ks]))
    out[i] = -np.mean(terms)
  return out


class SupConTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(5)
    self.z = testing.unit(rng, 8, 5)
    self.y = np.array([0, 1, 0, 2, 1, 0, 3, 2])  # label 3 has no positive

  def test_hand_computed(self):
    z = jnp.array([[1., 0.], [1., 0.], [0., 1.]])
    out = losses.sup_con(z, jnp.array([0, 0, 1]), temperature=1.0)
    np.testing.assert_allclose(out, [math.log1p(math.exp(-1))] * 2 + [0.0],
                               rtol=1e-6)

  @parameterized.parameters(0.1, 0.5)
  def test_matches_numpy(self, t):
    out = losses.sup_con(self.z, self.y, temperature=t)
    np.testing.assert_allclose(out, np_sup_con(self.z, self.y, t), rtol=1e-5,
                               atol=1e-6)

  def test_anchor_without_positives_is_zero_with_finite_gradient(self):
    out = losses.sup_con(self.z, self.y, temperature=0.1)
    self.assertEqual(float(out[6]), 0.0)
    g = jax.grad(lambda z: losses.sup_con(z, self.y, temperature=0.1).sum())(
        self.z)
    self.assertTrue(testing.all_finite(g))

  def test_no_positives_anywhere(self):
    out = losses.sup_con(self.z, np.arange(8), temperature=0.1)
    np.testing.assert_array_equal(out, np.zeros(8))

  def test_jit_and_gradients(self):
    f = lambda z: losses.sup_con(z, self.y, temperature=0.5)
    np.testing.assert_allclose(jax.jit(f)(self.z), f(self.z), rtol=1e-5)
    g = jax.grad(lambda z: f(z).sum())(self.z)
    ref = testing.numeric_grad(lambda z: np_sup_con(z, self.y, 0.5).sum(),
                               self.z)
    np.testing.assert_allclose(g, ref, atol=1e-4)

  @parameterized.parameters(1e-3, 10.0)
  def test_extreme_temperatures(self, t):
    out = losses.sup_con(self.z, self.y, temperature=t)
    np.testing.assert_allclose(out, np_sup_con(self.z, self.y, t), rtol=1e-4,
                               atol=1e-4)

  def test_bfloat16(self):
    zb = jnp.asarray(self.z, jnp.bfloat16)
    out = losses.sup_con(zb, self.y, temperature=0.2)
    self.assertEqual(out.dtype, jnp.float32)
    np.testing.assert_allclose(
        out, np_sup_con(np.asarray(zb, np.float64), self.y, 0.2), rtol=1e-4,
        atol=1e-5)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, r'labels must have shape \[N\]'):
      losses.sup_con(self.z, self.y[:5], temperature=0.1)
    with self.assertRaisesRegex(ValueError, 'temperature must be > 0'):
      losses.sup_con(self.z, self.y, temperature=-0.1)


class SupReMixTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(6)
    self.z = testing.unit(rng, 10, 4)
    self.y = np.array([20., 22., 25., 21., 20., 30., 23., 26., 22., 40.],
                      np.float32)
    self.key = jax.random.key(3)
    self.alpha = np.asarray(
        samplers.anchor_inclusive_mixtures(self.key, self.y)[0])

  def test_hand_computed(self):
    # Anchor 22 between 20 and 24 (window 5): one positive mixture with
    # α = 1/2, logit 0.5·1.2 + 0.5·1.6 = 1.4; real pairs weighted by 3.
    z = jnp.array([[1., 0.], [0.6, 0.8], [0., 1.]])
    out = losses.supremix(jax.random.key(0), z, jnp.array([20., 22., 24.]),
                          mix_negatives=False)
    d = math.log(3 * math.exp(1.2) + 3 * math.exp(1.6) + math.exp(1.4))
    np.testing.assert_allclose(out, [0.0, d - 1.4, 0.0], rtol=1e-6)

  @parameterized.product(weighting=('l1_inv', 'l2_inv', 'none'),
                         mix=((True, True), (True, False), (False, True),
                              (False, False)))
  def test_matches_explicit_mixtures(self, weighting, mix):
    out = losses.supremix(self.key, self.z, self.y, temperature=0.5,
                          window=5.0, distance_weighting=weighting,
                          mix_negatives=mix[0], mix_positives=mix[1])
    ref = np_supremix(self.z, self.y, 0.5, 5.0, self.alpha, weighting, *mix)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)

  def test_no_mixing_and_no_weights_is_sup_con(self):
    out = losses.supremix(self.key, self.z, self.y, temperature=0.3,
                          distance_weighting='none', mix_negatives=False,
                          mix_positives=False)
    np.testing.assert_allclose(
        out, losses.sup_con(self.z, self.y, temperature=0.3), rtol=1e-6)

  def test_mixtures_are_detached(self):
    # Finite differences of the explicit version with constant mixtures.
    g = jax.jit(jax.grad(
        lambda z: losses.supremix(self.key, z, self.y).sum()))(self.z)
    ref = testing.numeric_grad(
        lambda z: np_supremix(z, self.y, 0.5, 5.0, self.alpha, 'l1_inv', True,
                              True, z_mix=self.z).sum(), self.z)
    np.testing.assert_allclose(g, ref, atol=1e-4)
    full = testing.numeric_grad(
        lambda z: np_supremix(z, self.y, 0.5, 5.0, self.alpha, 'l1_inv', True,
                              True).sum(), self.z)
    self.assertGreater(np.max(np.abs(full - ref)), 1e-2)

  @parameterized.product(weighting=('l1_inv', 'l2_inv', 'none'),
                         mix=((True, True), (True, False), (False, True)))
  def test_authors_variant_matches_their_code_path(self, weighting, mix):
    # Their batches always hold two views per sample (targets repeated).
    rng = np.random.default_rng(9)
    z = testing.unit(rng, 14, 5)
    y = np.tile(np.array([20., 22., 25., 21., 27., 30., 23.], np.float32), 2)
    alpha = np.asarray(samplers.anchor_inclusive_mixtures(self.key, y)[0])
    out = losses.supremix(self.key, z, y, temperature=0.5, window=5.0,
                          distance_weighting=weighting, mix_negatives=mix[0],
                          mix_positives=mix[1], variant='authors')
    ref = np_supremix_authors(z, y, alpha, 0.5, 5.0, weighting, *mix)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)

  def test_authors_reference_against_their_torch_run(self):
    # Their PyTorch functions (agedb-dir, torch 2.13 CPU, sort stable=True)
    # on these inputs gave these losses (mean over the 2B anchors).
    rng = np.random.default_rng(0)
    yb = rng.integers(20, 30, 6).astype(np.float64)
    z = rng.normal(size=(12, 8))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    alpha = rng.beta(2, 8, (12, 12))
    y = np.concatenate([yb, yb])
    for mix, torch_value in (((True, True), 5.015722242013150),
                             ((True, False), 6.144259091996712),
                             ((False, True), 6.262287649577016)):
      ref = np_supremix_authors(z, y, alpha, 0.5, 5, 'l1_inv', *mix)
      # (Their mixture labels pass through float32: 4e-9 here.)
      self.assertAlmostEqual(ref.mean(), torch_value, places=7)

  def test_authors_variant_differs_from_clean(self):
    clean = losses.supremix(self.key, self.z, self.y)
    authors = losses.supremix(self.key, self.z, self.y, variant='authors')
    self.assertGreater(float(jnp.max(jnp.abs(clean - authors))), 0.1)
    g = jax.grad(lambda z: losses.supremix(
        self.key, z, self.y, variant='authors').sum())(self.z)
    self.assertTrue(testing.all_finite(g))

  @parameterized.parameters((1.5, None), (1.5, 2), (40.0, None), (3.0, 1))
  def test_banded_positives_equal_all_pairs(self, window, max_partners):
    # The band (chosen at run time) and the fallback to all pairs give the
    # values and gradients of scoring every pair.
    rng = np.random.default_rng(8)
    y = np.tile(rng.uniform(0, 10, 24).astype(np.float32), 2)
    z = testing.unit(rng, 48, 6)
    f = lambda mp: jax.jit(jax.value_and_grad(lambda z: losses.supremix(
        self.key, z, y, window=window, max_partners=mp).sum()))(z)
    (v, g), (v_ref, g_ref) = f(max_partners), f(0)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    np.testing.assert_allclose(g, g_ref, atol=1e-6)
    ref = np_supremix(z, y, 0.5, window, np.asarray(
        samplers.anchor_inclusive_mixtures(self.key, y)[0]), 'l1_inv', True,
                      True)
    np.testing.assert_allclose(v, ref.sum(), rtol=1e-5)

  def test_jit_equals_eager(self):
    f = lambda z: losses.supremix(self.key, z, self.y)
    np.testing.assert_allclose(jax.jit(f)(self.z), f(self.z), rtol=1e-5)

  @parameterized.parameters((2.0, 8.0), (8.0, 2.0), (5.0, 5.0), (0.5, 2.5))
  def test_beta_draws(self, a, b):
    # Integer parameters use order statistics, others jax.random.beta; both
    # must have Beta(a, b)'s mean, variance and CDF.
    alpha, _ = samplers.anchor_inclusive_mixtures(
        jax.random.key(0), np.arange(300.0), beta=(a, b))
    x = np.asarray(alpha).ravel()
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    self.assertAlmostEqual(x.mean(), mean, delta=0.004)
    self.assertAlmostEqual(x.var(), var, delta=0.1 * var)
    ref = np.sort(np.random.default_rng(0).beta(a, b, x.size))
    # Kolmogorov-Smirnov distance to a NumPy sample of the same size.
    grid = np.linspace(0, 1, 201)
    ks = np.max(np.abs(np.searchsorted(np.sort(x), grid) -
                       np.searchsorted(ref, grid))) / x.size
    self.assertLess(ks, 0.01)

  def test_rows_use_their_own_randomness(self):
    # Anchor i's draws depend on (key, i) only: any subset of anchors (a
    # device's rows) gets the same numbers.
    y = np.arange(10.0)
    full, _ = samplers.anchor_inclusive_mixtures(self.key, y)
    part, valid = samplers.anchor_inclusive_mixtures(self.key, y,
                                                     anchors=[3, 7])
    np.testing.assert_array_equal(part, np.asarray(full)[[3, 7]])
    self.assertEqual(valid.shape, (2, 10))

  def test_anchor_without_positives(self):
    out = losses.supremix(self.key, self.z, self.y)
    self.assertEqual(float(out[9]), 0.0)  # y=40: nothing within the window
    self.assertTrue(testing.all_finite(jax.jit(jax.grad(
        lambda z: losses.supremix(self.key, z, self.y).sum()))(self.z)))

  @parameterized.parameters(1e-3, 10.0)
  def test_extreme_temperatures(self, t):
    out = losses.supremix(self.key, self.z, self.y, temperature=t)
    ref = np_supremix(self.z, self.y, t, 5.0, self.alpha, 'l1_inv', True, True)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)

  def test_bfloat16(self):
    zb = jnp.asarray(self.z, jnp.bfloat16)
    out = losses.supremix(self.key, zb, self.y)
    self.assertEqual(out.dtype, jnp.float32)
    ref = np_supremix(np.asarray(zb, np.float64), self.y, 0.5, 5.0,
                      self.alpha, 'l1_inv', True, True)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)

  @parameterized.named_parameters(
      ('window', dict(window=0.0), 'window must be > 0, got 0.0'),
      ('temperature', dict(temperature=-1.0), 'temperature must be > 0'),
      ('weighting', dict(distance_weighting='L1'),
       "distance_weighting must be one of .* got 'L1'"),
      ('beta', dict(beta=(2.0, 0.0)), r'beta\[1\] must be > 0'),
      ('variant', dict(variant='paper'), "variant must be one of .* 'paper'"),
      ('max_partners', dict(max_partners=-1), 'max_partners must be an int'),
  )
  def test_bad_input(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      losses.supremix(self.key, self.z, self.y, **kwargs)

  def test_bad_targets(self):
    with self.assertRaisesRegex(ValueError, r'targets must have shape \[N\]'):
      losses.supremix(self.key, self.z, self.y[:4])


class RankNContrastTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(7)
    self.z = rng.normal(size=(9, 3)).astype(np.float32)
    self.y = np.array([1., 3., 2., 3., 5., 1., 4., 2., 0.], np.float32)

  def test_hand_computed(self):
    z = jnp.array([[0.], [1.], [3.]])
    out = losses.rank_n_contrast(z, jnp.array([0., 1., 3.]), temperature=1.0)
    a = 0.5 * math.log1p(math.exp(-2))
    b = 0.5 * math.log1p(math.exp(-1))
    np.testing.assert_allclose(out, [a, b, b], rtol=1e-5)

  @parameterized.parameters(0.5, 2.0)
  def test_matches_numpy_with_ties(self, t):
    out = losses.rank_n_contrast(self.z, self.y, temperature=t)
    np.testing.assert_allclose(out, np_rnc(self.z, self.y, t), rtol=1e-5,
                               atol=1e-5)

  def test_gradients(self):
    g = jax.jit(jax.grad(
        lambda z: losses.rank_n_contrast(z, self.y).sum()))(self.z)
    ref = testing.numeric_grad(lambda z: np_rnc(z, self.y, 2.0).sum(), self.z)
    np.testing.assert_allclose(g, ref, atol=1e-4)

  def test_jit_equals_eager(self):
    f = lambda z: losses.rank_n_contrast(z, self.y)
    np.testing.assert_allclose(jax.jit(f)(self.z), f(self.z), rtol=1e-5)

  def test_identical_embeddings_are_finite(self):
    z = np.repeat(self.z[:1], 9, axis=0)
    f = lambda z: losses.rank_n_contrast(z, self.y).sum()
    self.assertTrue(testing.all_finite(f(z)))
    self.assertTrue(testing.all_finite(jax.jit(jax.grad(f))(z)))

  @parameterized.parameters(1e-3, 10.0)
  def test_extreme_temperatures(self, t):
    out = losses.rank_n_contrast(self.z, self.y, temperature=t)
    np.testing.assert_allclose(out, np_rnc(self.z, self.y, t), rtol=1e-4,
                               atol=1e-3)

  def test_bfloat16(self):
    zb = jnp.asarray(self.z, jnp.bfloat16)
    out = losses.rank_n_contrast(zb, self.y)
    self.assertEqual(out.dtype, jnp.float32)
    self.assertTrue(testing.all_finite(out))

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, 'temperature must be > 0'):
      losses.rank_n_contrast(self.z, self.y, temperature=0.0)
    with self.assertRaisesRegex(ValueError, 'N >= 2'):
      losses.rank_n_contrast(self.z[:1], self.y[:1])
    with self.assertRaisesRegex(ValueError, r'targets must have shape \[N\]'):
      losses.rank_n_contrast(self.z, self.y[:, None])


if __name__ == '__main__':
  absltest.main()
