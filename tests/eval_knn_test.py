"""Tests for hnjax.eval.knn."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from hnjax.eval import knn


def _np_knn_predict(query, bank, labels, num_classes, k, temperature):
  """Dense float64 reference, as in the MoCo CIFAR-10 demo."""
  q = query / np.linalg.norm(query, axis=1, keepdims=True)
  b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  sims = q.astype(np.float64) @ b.T.astype(np.float64)
  k = min(k, len(bank))
  idx = np.argsort(-sims, axis=1)[:, :k]
  scores = np.zeros((len(q), num_classes))
  for row in range(len(q)):
    for j in idx[row]:
      scores[row, labels[j]] += np.exp(sims[row, j] / temperature)
  return scores.argmax(axis=1)


def _data(seed, num_queries=37, num_bank=120, dim=16, num_classes=5):
  rng = np.random.RandomState(seed)
  centres = rng.randn(num_classes, dim)
  bank_labels = rng.randint(num_classes, size=num_bank)
  query_labels = rng.randint(num_classes, size=num_queries)
  bank = centres[bank_labels] + 1.5 * rng.randn(num_bank, dim)
  query = centres[query_labels] + 1.5 * rng.randn(num_queries, dim)
  return (
      query.astype(np.float32),
      query_labels,
      bank.astype(np.float32),
      bank_labels,
  )


class KnnTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(k=1, chunk_size=8, temperature=0.1),
      dict(k=10, chunk_size=37, temperature=0.1),
      dict(k=200, chunk_size=256, temperature=0.1),  # k > N: all vote.
      dict(k=20, chunk_size=5, temperature=0.01),  # exp(100) would overflow.
  )
  def test_matches_numpy_reference(self, k, chunk_size, temperature):
    query, _, bank, bank_labels = _data(0)
    got = knn.knn_predict(
        query,
        bank,
        bank_labels,
        num_classes=5,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    want = _np_knn_predict(query, bank, bank_labels, 5, k, temperature)
    self.assertEqual(got.shape, (37,))
    self.assertEqual(got.dtype, np.int32)
    np.testing.assert_array_equal(np.asarray(got), want)

  def test_several_labelings_share_one_search(self):
    # A class = 4 * a + b, scored for the class and each factor: equal to
    # the NumPy reference per labeling (every labeling votes with the same
    # neighbours, and extra empty classes change no argmax).
    query, q_lab, bank, b_lab = _data(2, num_classes=8)
    got = knn.knn_accuracies(
        query, bank, {'class': (q_lab, b_lab), 'a': (q_lab // 4, b_lab // 4),
                      'b': (q_lab % 4, b_lab % 4)}, k=10, chunk_size=8)
    for name, fn, n in (('class', lambda y: y, 8), ('a', lambda y: y // 4, 2),
                        ('b', lambda y: y % 4, 4)):
      want = np.mean(_np_knn_predict(query, bank, fn(b_lab), n, 10, 0.1)
                     == fn(q_lab))
      self.assertAlmostEqual(got[name], want, msg=name)
    self.assertLess(got['class'], got['b'])  # not all trivially 1
    with self.assertRaisesRegex(ValueError, r"labels\['a'\] must have"):
      knn.knn_accuracies(query, bank, {'a': (q_lab[:3], b_lab)})

  def test_k_above_bank_size_equals_k_bank_size(self):
    query, _, bank, bank_labels = _data(1, num_bank=30)
    big = knn.knn_predict(query, bank, bank_labels, num_classes=5, k=200)
    exact = knn.knn_predict(query, bank, bank_labels, num_classes=5, k=30)
    np.testing.assert_array_equal(np.asarray(big), np.asarray(exact))

  def test_hand_computed_vote(self):
    # Two neighbours of class 1 at cos 0.8 outvote one of class 0 at cos 1:
    # 2 e^{8} > e^{10}?  No: e^{10} = 22026 > 2 e^{8} = 5962, so class 0.
    bank = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]], np.float32)
    labels = np.array([0, 1, 1])
    query = np.array([[1.0, 0.0]], np.float32)
    self.assertEqual(
        int(knn.knn_predict(query, bank, labels, num_classes=2, k=3)[0]), 0
    )
    # With a softer vote (t = 1) the two class-1 neighbours win.
    self.assertEqual(
        int(
            knn.knn_predict(
                query, bank, labels, num_classes=2, k=3, temperature=1.0
            )[0]
        ),
        1,
    )

  def test_sharded_inputs(self):
    query, query_labels, bank, bank_labels = _data(
        2, num_queries=40, num_bank=128
    )
    mesh = jax.make_mesh((8,), ('data',))
    rows = NamedSharding(mesh, P('data'))
    got = knn.knn_accuracy(
        jax.device_put(query, rows),
        jax.device_put(query_labels, rows),
        jax.device_put(bank, rows),
        jax.device_put(bank_labels, rows),
        num_classes=5,
        k=10,
    )
    want = np.mean(
        _np_knn_predict(query, bank, bank_labels, 5, 10, 0.1) == query_labels
    )
    self.assertAlmostEqual(got, want)

  def test_accuracy_on_separable_clusters(self):
    rng = np.random.RandomState(3)
    centres = 10 * np.eye(4, 8)
    labels = rng.randint(4, size=200)
    feats = (centres[labels] + rng.randn(200, 8)).astype(np.float32)
    acc = knn.knn_accuracy(
        feats[:50], labels[:50], feats[50:], labels[50:], num_classes=4
    )
    self.assertEqual(acc, 1.0)

  @parameterized.parameters(
      dict(kwargs=dict(k=0), match='k must be >= 1, got 0'),
      dict(kwargs=dict(temperature=0.0), match='temperature must be > 0'),
      dict(
          kwargs=dict(num_classes=2), match=r'bank_labels must be in \[0, 2\)'
      ),
      dict(kwargs=dict(chunk_size=0), match='chunk_size must be >= 1'),
  )
  def test_bad_arguments(self, kwargs, match):
    query, _, bank, bank_labels = _data(4)
    kwargs = dict(dict(num_classes=5), **kwargs)
    with self.assertRaisesRegex(ValueError, match):
      knn.knn_predict(query, bank, bank_labels, **kwargs)

  def test_bad_shapes(self):
    query, query_labels, bank, bank_labels = _data(5)
    with self.assertRaisesRegex(ValueError, 'bank_features'):
      knn.knn_predict(query[:, :3], bank, bank_labels, num_classes=5)
    with self.assertRaisesRegex(ValueError, 'bank_labels must have shape'):
      knn.knn_predict(query, bank, bank_labels[:3], num_classes=5)
    with self.assertRaisesRegex(ValueError, 'query_labels must have shape'):
      knn.knn_accuracy(
          query, query_labels[:3], bank, bank_labels, num_classes=5
      )


if __name__ == '__main__':
  absltest.main()
