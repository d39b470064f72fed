"""Tests for hnjax.eval.geometry."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from hnjax.eval import geometry


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_alignment(x, y, alpha):
  return np.mean(np.linalg.norm(_unit(x) - _unit(y), axis=-1) ** alpha)


def _np_uniformity(x, t):
  """The paper's code: pdist(x).pow(2).mul(-t).exp().mean().log()."""
  x = _unit(x.astype(np.float64))
  d2 = [
      np.sum((x[i] - x[j]) ** 2)
      for i, j in itertools.combinations(range(len(x)), 2)
  ]
  return np.log(np.mean(np.exp(-t * np.asarray(d2))))


class GeometryTest(parameterized.TestCase):

  @parameterized.parameters(1.0, 2.0)
  def test_alignment_matches_numpy(self, alpha):
    rng = np.random.RandomState(0)
    x, y = rng.randn(2, 50, 8).astype(np.float32)
    self.assertAlmostEqual(
        geometry.alignment(x, y, alpha=alpha),
        _np_alignment(x, y, alpha),
        places=5,
    )

  def test_alignment_without_normalize(self):
    x = np.array([[3.0, 0.0]])
    y = np.array([[0.0, 4.0]])
    self.assertAlmostEqual(geometry.alignment(x, y, normalize=False), 25.0)
    self.assertAlmostEqual(geometry.alignment(x, y), 2.0, places=6)

  @parameterized.parameters(
      dict(n=2, chunk_size=1024, t=2.0),
      dict(n=37, chunk_size=8, t=2.0),  # Padded last chunk.
      dict(n=64, chunk_size=64, t=0.5),
  )
  def test_uniformity_matches_numpy(self, n, chunk_size, t):
    x = np.random.RandomState(n).randn(n, 5).astype(np.float32)
    self.assertAlmostEqual(
        geometry.uniformity(x, t=t, chunk_size=chunk_size),
        _np_uniformity(x, t),
        places=4,
    )

  def test_uniformity_large_t_does_not_underflow(self):
    # exp(-200 * d2) underflows float32 for every pair; log-sum-exp does not.
    x = np.random.RandomState(1).randn(20, 3).astype(np.float32)
    got = geometry.uniformity(x, t=200.0, chunk_size=7)
    self.assertTrue(np.isfinite(got))
    self.assertAlmostEqual(got, _np_uniformity(x, 200.0), delta=1e-3 * abs(got))

  def test_collapsed_and_spread_embeddings(self):
    collapsed = np.tile([[1.0, 0.0, 0.0]], (10, 1))
    self.assertAlmostEqual(geometry.uniformity(collapsed), 0.0, places=6)
    # Uniform on S^2: cos is uniform on [-1, 1] and |x-y|^2 = 2 - 2 cos, so
    # E exp(-2 |x-y|^2) = (1 - e^-8) / 8.
    spread = _unit(np.random.RandomState(2).randn(2000, 3))
    self.assertAlmostEqual(
        geometry.uniformity(spread), np.log((1 - np.exp(-8)) / 8), delta=0.03
    )

  def test_sharded_input(self):
    x = np.random.RandomState(3).randn(32, 4).astype(np.float32)
    mesh = jax.make_mesh((8,), ('data',))
    xs = jax.device_put(x, NamedSharding(mesh, P('data')))
    self.assertAlmostEqual(
        geometry.uniformity(xs, chunk_size=8), _np_uniformity(x, 2.0), places=4
    )
    self.assertAlmostEqual(
        geometry.alignment(xs, xs[::-1]),
        _np_alignment(x, x[::-1], 2.0),
        places=5,
    )

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, r'N >= 2, got \(1, 3\)'):
      geometry.uniformity(np.ones((1, 3)))
    with self.assertRaisesRegex(ValueError, 'chunk_size must be >= 1'):
      geometry.uniformity(np.ones((4, 3)), chunk_size=0)
    with self.assertRaisesRegex(ValueError, r'\(2, 3\) and \(3, 3\)'):
      geometry.alignment(np.ones((2, 3)), np.ones((3, 3)))



class ModalityTest(parameterized.TestCase):

  def test_modality_gap_matches_numpy(self):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(9, 5)) + 1.0, rng.normal(size=(4, 5)) - 1.0
    want = np.linalg.norm(_unit(x).mean(0) - _unit(y).mean(0))
    self.assertAlmostEqual(geometry.modality_gap(x, y), want, places=5)
    self.assertAlmostEqual(geometry.modality_gap(x, x), 0.0, places=6)
    with self.assertRaisesRegex(ValueError, 'same D'):
      geometry.modality_gap(x, y[:, :3])

  @parameterized.parameters((7, 1024), (7, 3), (8, 1))
  def test_relative_alignment_matches_numpy(self, n, chunk_size):
    # rel_lalign_torch(text, image): mean_i |t_i - v_i|^2 - min_{j!=i}
    # |t_i - v_j|^2, written out with loops.
    rng = np.random.default_rng(n)
    t, v = _unit(rng.normal(size=(n, 4))), _unit(rng.normal(size=(n, 4)))
    terms = []
    for i in range(n):
      others = [np.sum((t[i] - v[j]) ** 2) for j in range(n) if j != i]
      terms.append(np.sum((t[i] - v[i]) ** 2) - min(others))
    self.assertAlmostEqual(
        geometry.relative_alignment(t, v, chunk_size=chunk_size),
        np.mean(terms), places=5)
    with self.assertRaisesRegex(ValueError, 'B >= 2'):
      geometry.relative_alignment(t[:1], v[:1])


if __name__ == '__main__':
  absltest.main()
