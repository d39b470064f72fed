"""Tests for the regression probe, its metrics and the evaluator registry."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from hnjax.eval import evaluators
from hnjax.eval import regression


def np_average_ranks(x):
  """Rank = #smaller + (#equal - 1) / 2, by brute force."""
  x = np.asarray(x)
  return np.array([np.sum(x < v) + (np.sum(x == v) - 1) / 2 for v in x])


class MetricsTest(parameterized.TestCase):

  def test_hand_computed(self):
    m = regression.metrics(np.array([1., 2., 4.]), np.array([1., 3., 3.]))
    self.assertAlmostEqual(m['mae'], 2 / 3)
    self.assertAlmostEqual(m['mse'], 2 / 3)
    self.assertAlmostEqual(m['rmse'], np.sqrt(2 / 3))
    # Pearson of (1, 2, 4) and (1, 3, 3): centred (-4/3, -1/3, 5/3) and
    # (-4/3, 2/3, 2/3): (24/9) / sqrt(42/9 * 24/9) = sqrt(24/42).
    self.assertAlmostEqual(m['pearson'], np.sqrt(24 / 42))
    # Ranks (0, 1, 2) and (0, 1.5, 1.5).
    self.assertAlmostEqual(m['spearman'], 1.5 / np.sqrt(2 * 1.5))
    self.assertEqual(m['gmean'], 0.0)  # one exact prediction

  def test_gmean(self):
    self.assertAlmostEqual(regression.gmean(np.array([1., -4.])), 2.0)
    self.assertTrue(np.isnan(regression.gmean(np.array([]))))

  def test_spearman_with_ties_matches_definition(self):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 50).astype(float)
    b = a + rng.integers(0, 3, 50)
    np.testing.assert_array_equal(regression.ranks(a), np_average_ranks(a))
    ra, rb = np_average_ranks(a), np_average_ranks(b)
    self.assertAlmostEqual(regression.spearman(a, b),
                           np.corrcoef(ra, rb)[0, 1])

  def test_constant_prediction_has_nan_correlation(self):
    m = regression.metrics(np.ones(4), np.arange(4.0))
    self.assertTrue(np.isnan(m['pearson']))

  def test_shot_groups_are_strict_as_dir(self):
    # Bins (width 1) with 101, 100, 20 and 19 training examples; 7 unseen.
    train = np.concatenate([np.full(101, 0.5), np.full(100, 1.5),
                            np.full(20, 2.5), np.full(19, 3.5)])
    groups = regression.shot_groups(np.array([0.1, 1.9, 2.0, 3.0, 7.0]),
                                    train, bin_width=1.0)
    np.testing.assert_array_equal(groups, [0, 1, 1, 2, 2])

  def test_per_shot_metrics(self):
    train = np.concatenate([np.full(150, 0.5), np.full(5, 5.5)])
    m = regression.metrics(np.array([0.0, 1.0, 6.5]),
                           np.array([0.5, 0.5, 5.5]), train_targets=train,
                           bin_width=1.0)
    self.assertAlmostEqual(m['mae_many'], 0.5)
    self.assertAlmostEqual(m['mae_few'], 1.0)
    self.assertEqual((m['count_many'], m['count_medium'], m['count_few']),
                     (2, 0, 1))
    self.assertTrue(np.isnan(m['mae_medium']))

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, 'differ in shape'):
      regression.metrics(np.ones(3), np.ones(4))
    with self.assertRaisesRegex(ValueError, 'predictions must not be empty'):
      regression.metrics(np.ones(0), np.ones(0))
    with self.assertRaisesRegex(ValueError, 'bin_width must be > 0'):
      regression.shot_groups(np.ones(2), np.ones(2), bin_width=0)


class LinearProbeTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(1)
    self.x = rng.normal(size=(600, 6)).astype(np.float32)
    self.w = rng.normal(size=6)
    self.y = self.x @ self.w * 10 + 50 + rng.normal(size=600)

  def probe(self, **kwargs):
    x, y = self.x, self.y
    return regression.linear_probe(x[:400], y[:400], x[400:500], y[400:500],
                                   x[500:], **kwargs)

  def test_recovers_a_linear_target_in_its_units(self):
    out = self.probe(epochs=30, batch_size=32, learning_rate=1e-2)
    m = regression.metrics(out['predictions'], self.y[500:])
    self.assertLess(m['mae'], 1.2)  # noise std 1: MAE of the truth ~0.8
    self.assertGreater(m['pearson'], 0.99)
    self.assertLess(out['val_mse'], 2.0)
    self.assertBetween(out['best_epoch'], 1, 30)

  def test_keeps_the_best_validation_epoch(self):
    # A huge learning rate diverges after the first epochs: the best epoch
    # is early and its predictions stay sane.
    out = self.probe(epochs=20, batch_size=8, learning_rate=50.0)
    final = self.probe(epochs=1, batch_size=8, learning_rate=50.0)
    self.assertLessEqual(out['val_mse'], final['val_mse'])
    self.assertTrue(np.all(np.isfinite(out['predictions'])))

  def test_deterministic(self):
    a = self.probe(epochs=3, seed=4)['predictions']
    b = self.probe(epochs=3, seed=4)['predictions']
    np.testing.assert_array_equal(a, b)

  def test_bad_input(self):
    x, y = self.x, self.y
    with self.assertRaisesRegex(ValueError, 'val_x must be'):
      regression.linear_probe(x, y, x[:5], y[:4], x)
    with self.assertRaisesRegex(ValueError, 'feature dims differ'):
      regression.linear_probe(x, y, x, y, x[:, :3])
    with self.assertRaisesRegex(ValueError, 'epochs must be >= 1'):
      regression.linear_probe(x, y, x, y, x, epochs=0)


class EvaluatorsTest(absltest.TestCase):

  def test_knn_mae_by_hand(self):
    feats = np.array([[1., 0.], [0.9, 0.1], [0., 1.], [0.1, 1.]])
    splits = {'train': {'features': feats, 'target': np.array([1., 3., 10.,
                                                                20.])},
              'test': {'features': np.array([[1., 0.05], [0.05, 1.]]),
                       'target': np.array([0., 10.])}}
    out = evaluators.run(('knn_mae',), splits, {'knn_k': 2})
    # Neighbours: (1, 3) -> 2, error 2; (10, 20) -> 15, error 5.
    self.assertAlmostEqual(out['knn_mae'], 3.5)

  def test_regression_drops_empty_shot_groups(self):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 4))
    y = x[:, 0] * 3
    split = lambda s: {'features': x[s], 'target': y[s]}
    out = evaluators.run(
        ('regression',), {'train': split(slice(0, 200)),
                          'val': split(slice(200, 250)),
                          'test': split(slice(250, 300))},
        dict(probe_epochs=5, probe_batch_size=32, probe_learning_rate=1e-2,
             seed=0, bin_width=100.0))
    self.assertIn('mae_many', out)
    self.assertNotIn('mae_few', out)  # no few-shot bin: not a NaN
    self.assertEqual(out['predictions'].shape, (50,))

  def test_parse(self):
    self.assertEqual(evaluators.parse(' knn, linear '), ('knn', 'linear'))
    self.assertEqual(evaluators.splits_needed(('knn', 'regression')),
                     ('train', 'val', 'test'))
    with self.assertRaisesRegex(ValueError, r"unknown evaluator\(s\) \['knm'"):
      evaluators.parse('knm')


if __name__ == '__main__':
  absltest.main()
