"""Tests for hnjax.eval.linear."""

from absl.testing import absltest
import numpy as np

from hnjax.eval import linear


def _gaussian_classes(
    seed, n, dim=20, num_classes=4, separation=10.0, offset=5.0
):
  """Classes separated along their own axis, on top of a large offset.

  The offset and per-feature scales check that features are standardised.
  """
  rng = np.random.RandomState(seed)
  y = rng.randint(num_classes, size=n)
  x = rng.randn(n, dim)
  x[np.arange(n), y] += separation
  x = x * np.linspace(0.1, 30.0, dim) + offset
  return x.astype(np.float32), y


class LinearProbeTest(absltest.TestCase):

  def test_separable_problem_is_solved(self):
    train_x, train_y = _gaussian_classes(0, 400)
    test_x, test_y = _gaussian_classes(1, 400)
    out = linear.linear_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=4,
        epochs=20,
        batch_size=64,
    )
    self.assertGreaterEqual(out['top1'], 0.99)
    self.assertGreaterEqual(out['train_top1'], 0.99)
    self.assertLess(out['loss'], 0.5)  # Chance: log 4 = 1.39.

  def test_random_labels_give_chance(self):
    rng = np.random.RandomState(2)
    train_x = rng.randn(400, 20).astype(np.float32)
    test_x = rng.randn(400, 20).astype(np.float32)
    out = linear.linear_probe(
        train_x,
        rng.randint(4, size=400),
        test_x,
        rng.randint(4, size=400),
        num_classes=4,
        epochs=20,
        batch_size=64,
    )
    # Chance is 0.25; the standard deviation over 400 test points is 0.022.
    self.assertBetween(out['top1'], 0.18, 0.32)
    self.assertGreater(out['train_top1'], out['top1'])  # It memorised some.
    self.assertGreater(out['loss'], np.log(4) - 0.05)  # No better than chance.

  def test_deterministic_given_seed(self):
    # Same shapes as above, so the compiled probe is reused.
    train_x, train_y = _gaussian_classes(3, 400, separation=2.0)
    test_x, test_y = _gaussian_classes(4, 400, separation=2.0)
    run = lambda seed: linear.linear_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=4,
        epochs=20,
        batch_size=64,
        seed=seed,
    )
    self.assertEqual(run(0), run(0))
    self.assertNotEqual(run(0)['loss'], run(1)['loss'])

  def test_bad_arguments(self):
    x, y = _gaussian_classes(5, 10)
    with self.assertRaisesRegex(ValueError, r'train_y must be in \[0, 2\)'):
      linear.linear_probe(x, y, x, y, num_classes=2)
    with self.assertRaisesRegex(ValueError, 'epochs must be >= 1, got 0'):
      linear.linear_probe(x, y, x, y, num_classes=4, epochs=0)
    with self.assertRaisesRegex(ValueError, 'feature dims differ'):
      linear.linear_probe(x, y, x[:, :3], y, num_classes=4)
    with self.assertRaisesRegex(ValueError, 'test_x must be'):
      linear.linear_probe(x, y, x, y[:3], num_classes=4)


if __name__ == '__main__':
  absltest.main()
