"""Batch-composition samplers: valid epochs, deterministic, harder batches."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from hnjax.data import batching


def clustered(num_clusters=8, per_cluster=16, dim=12, seed=0):
  """Well-separated clusters; returns (embeddings, cluster of each)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_clusters, dim)) * 4
  labels = np.repeat(np.arange(num_clusters), per_cluster)
  x = centres[labels] + rng.normal(size=(len(labels), dim))
  perm = rng.permutation(len(labels))  # no order to lean on
  return x[perm].astype(np.float32), labels[perm]


def self_neighbours(x, r):
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  s = u @ u.T
  np.fill_diagonal(s, -np.inf)
  return np.argsort(-s, axis=1, kind='stable')[:, :r]


def orders(x, batch, seed=0, epoch=0):
  return {
      'random': batching.random_order(len(x), batch, seed=seed, epoch=epoch),
      'neighbour': batching.neighbour_order(
          self_neighbours(x, 40), batch, seed=seed, epoch=epoch, num_near=15,
          num_random=0),
      'cluster': batching.cluster_order(x, batch, cluster_size=16, seed=seed,
                                        epoch=epoch),
      'topic': batching.topic_order(x, batch, num_topics=8, seed=seed,
                                    epoch=epoch),
  }


class EpochTest(parameterized.TestCase):

  @parameterized.parameters('random', 'neighbour', 'cluster', 'topic')
  def test_each_id_once_whole_batches_deterministic(self, name):
    x, _ = clustered(per_cluster=17)  # 136 examples, batch 16: 8 whole
    order = orders(x, 16)[name]
    self.assertEqual(order.dtype, np.int64)
    self.assertLen(order, 128)
    self.assertLen(set(order.tolist()), len(order))
    self.assertTrue(np.all((order >= 0) & (order < len(x))))
    np.testing.assert_array_equal(order, orders(x, 16)[name])
    self.assertFalse(np.array_equal(order, orders(x, 16, epoch=1)[name]))

  @parameterized.parameters('neighbour', 'cluster', 'topic')
  def test_batches_are_harder_than_random(self, name):
    # Clusters of 16 and batches of 16: a sampler that finds them puts
    # each example with its own cluster.
    x, labels = clustered()
    o = orders(x, 16)
    hard = batching.in_batch_hardest_similarity(x, o[name], 16)
    rand = batching.in_batch_hardest_similarity(x, o['random'], 16)
    self.assertGreater(hard, rand + 0.05)  # measured: 0.969 against 0.896
    same = np.mean([len(set(labels[b])) == 1
                    for b in o[name].reshape(-1, 16)])
    self.assertGreaterEqual(same, 0.75)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, r'batch_size=0 must be in'):
      batching.random_order(10, 0, seed=0, epoch=0)
    with self.assertRaisesRegex(ValueError, 'neighbours must be an int'):
      batching.neighbour_order(np.zeros((4, 2)), 2, seed=0, epoch=0)
    with self.assertRaisesRegex(ValueError, 'margins must have shape'):
      batching.topic_order(np.eye(4), 2, num_topics=2, seed=0, epoch=0,
                           margins=np.zeros(3))


class NeighbourTest(absltest.TestCase):

  def test_seed_brings_its_neighbours_then_random_ones(self):
    # Example 0's list: 1, 2 near, then 3..7; num_near=2, num_random=1:
    # its group is {0, 1, 2} plus one of 3..7.
    nbrs = np.array([[1, 2, 3, 4, 5, 6, 7]] + [[0] * 7] * 7)
    for seed in range(20):
      order = batching.neighbour_order(nbrs, 4, seed=seed, epoch=0,
                                       num_near=2, num_random=1)
      batch = [b for b in order.reshape(-1, 4) if 0 in b]
      if not batch:
        continue
      b = set(batch[0].tolist())
      if order.reshape(-1, 4)[:, 0].tolist().count(0):  # 0 was a seed
        self.assertTrue({0, 1, 2} <= b)
        self.assertLen(b - {0, 1, 2}, 1)


class ClusterTest(absltest.TestCase):

  def test_balanced_clusters_partition(self):
    x, _ = clustered(per_cluster=13)  # 104 examples
    clusters = batching.balanced_clusters(x, 8, seed=0)
    sizes = [len(c) for c in clusters]
    self.assertLessEqual(max(sizes), 8)
    self.assertGreaterEqual(min(sizes), 6)  # halves: 104 -> 52 ... 6 or 7
    np.testing.assert_array_equal(np.sort(np.concatenate(clusters)),
                                  np.arange(104))

  def test_curriculum_doubles(self):
    sizes = [batching.ngame_cluster_size(e) for e in (0, 9, 10, 20, 25, 60)]
    self.assertEqual(sizes, [1, 1, 2, 4, 8, 16])
    self.assertEqual(batching.ngame_cluster_size(300, largest=64), 64)

  def test_size_one_is_random(self):
    x, _ = clustered()
    np.testing.assert_array_equal(
        batching.cluster_order(x, 16, cluster_size=1, seed=3, epoch=2),
        batching.random_order(len(x), 16, seed=3, epoch=2))


class TopicTest(absltest.TestCase):

  def test_margin_bins_dealt_round_robin(self):
    # One topic; margins 0..15 in 4 bins: every batch of 4 takes one
    # example from each bin.
    x = np.ones((16, 3), np.float32)
    margins = np.arange(16.0)
    order = batching.topic_order(x, 4, num_topics=1, seed=0, epoch=0,
                                 margins=margins, num_bins=4)
    for b in order.reshape(-1, 4):
      self.assertEqual(sorted(margins[b] // 4), [0, 1, 2, 3])

  def test_hardest_similarity_by_hand(self):
    x = np.array([[1, 0], [1, 0], [0, 1], [-1, 0]], np.float32)
    # Batches {0, 1} (sims 1, 1) and {2, 3} (sims 0, 0): mean 0.5.
    self.assertAlmostEqual(batching.in_batch_hardest_similarity(
        x, np.array([0, 1, 2, 3]), 2), 0.5)


if __name__ == '__main__':
  absltest.main()
