"""The mining driver, its records, the negatives source and batch orders."""

import os
import pickle
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from hnjax import parallel
from hnjax.data import batching
from hnjax.data import mined
from hnjax.data import paired
from hnjax.data import pipeline
from tests import mining_test


def integer_embeddings(seed, n, d=4):
  return np.random.default_rng(seed).integers(-3, 4, (n, d)).astype(
      np.float32)


class MineEmbeddingsTest(parameterized.TestCase):

  # 48 rows: sharded over the 8 test devices; 45: on one device.
  @parameterized.parameters(48, 45)
  def test_equals_numpy_in_padded_chunks(self, corpus_size):
    q = integer_embeddings(0, 19)
    corpus = integer_embeddings(1, corpus_size)
    pos = np.arange(19) * 2
    pos[3] = -1
    filters = dict(range_min=1, relative_margin=0.2, min_score=-4.0)
    idx, scores = mined.mine_embeddings(q, corpus, pos, num_negatives=4,
                                        chunk=7, **filters)
    keep, s = mining_test.survivors(q, corpus, pos, **filters)
    for i in range(19):
      want = (keep[i] + [-1] * 4)[:4]
      np.testing.assert_array_equal(idx[i], want, err_msg=f'query {i}')
      np.testing.assert_array_equal(
          scores[i], [s[i, c] if c >= 0 else -np.inf for c in want])

  def test_random_draw_is_deterministic_in_the_key(self):
    q, corpus = integer_embeddings(2, 9), integer_embeddings(3, 40)
    draw = lambda k: mined.mine_embeddings(
        q, corpus, np.arange(9), num_negatives=3, chunk=4,
        sampling_strategy='random', key=jax.random.key(k))[0]
    np.testing.assert_array_equal(draw(0), draw(0))
    self.assertFalse(np.array_equal(draw(0), draw(1)))
    keep, _ = mining_test.survivors(q, corpus, np.arange(9))
    for i, row in enumerate(draw(0)):
      self.assertLen(set(row), 3)
      self.assertTrue(set(row) <= set(keep[i]))
    with self.assertRaisesRegex(ValueError, 'needs a key'):
      mined.mine_embeddings(q, corpus, np.arange(9),
                            sampling_strategy='random')

  def test_bad_input(self):
    q = integer_embeddings(0, 4)
    with self.assertRaisesRegex(ValueError, r'positive_indices must have '
                                r'shape \[4\], got \[3\]'):
      mined.mine_embeddings(q, q, np.arange(3))
    with self.assertRaisesRegex(ValueError, 'chunk must be >= 1, got 0'):
      mined.mine_embeddings(q, q, np.arange(4), chunk=0)


class MinedRecordsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.records = mined.Mined(
        query=np.array([0, 2]), positive=np.array([0, 2]),
        negatives=np.array([[1, -1], [0, 1]], np.int32),
        scores=np.array([[.5, -np.inf], [.4, .3]], np.float32),
        info={'relative_margin': 0.05})

  def test_round_trip_leaves_one_file(self):
    path = os.path.join(self.dir, 'sub', 'mined.npz')
    self.records.save(path)
    self.assertEqual(os.listdir(os.path.dirname(path)), ['mined.npz'])
    back = mined.Mined.load(path)
    for f in ('query', 'positive', 'negatives', 'scores'):
      np.testing.assert_array_equal(getattr(back, f),
                                    getattr(self.records, f))
    self.assertEqual(back.info, {'relative_margin': 0.05})
    np.testing.assert_array_equal(
        back.table(4), [[1, -1], [-1, -1], [0, 1], [-1, -1]])
    with self.assertRaisesRegex(ValueError, 'records name source row 2 but the '
                                'source has 2 rows'):
      back.table(2)

  def test_load_errors_name_the_path(self):
    missing = os.path.join(self.dir, 'nope.npz')
    with self.assertRaisesRegex(FileNotFoundError, 'no mined negatives at '
                                '.*nope.npz'):
      mined.Mined.load(missing)
    other = os.path.join(self.dir, 'other.npz')
    np.savez(other, x=np.zeros(3))
    with self.assertRaisesRegex(ValueError, 'other.npz.* is not a file of '
                                'mined negatives'):
      mined.Mined.load(other)


class NegativesSourceTest(absltest.TestCase):

  def test_batches_hold_each_rows_negatives(self):
    tokens = np.arange(5 * 3).reshape(5, 3).astype(np.int32)
    table = np.array([[1, 2], [-1, -1], [4, -1], [0, 1], [3, 3]])
    source = mined.NegativesSource(paired.ArraySource(tokens=tokens), table)
    out = source.get_batch(np.array([2, 0, 1]), (
        'tokens', 'index', 'negative_tokens', 'negative_mask'))
    np.testing.assert_array_equal(out['tokens'], tokens[[2, 0, 1]])
    np.testing.assert_array_equal(out['index'], [2, 0, 1])
    np.testing.assert_array_equal(out['negative_mask'],
                                  [[1, 0], [1, 1], [0, 0]])
    self.assertEqual(out['negative_tokens'].shape, (3, 2, 3))
    np.testing.assert_array_equal(out['negative_tokens'][0, 0], tokens[4])
    np.testing.assert_array_equal(out['negative_tokens'][1], tokens[[1, 2]])

  def test_bad_table(self):
    src = paired.ArraySource(tokens=np.zeros((5, 3), np.int32))
    with self.assertRaisesRegex(ValueError, r'must be int \[5, k\] .*got '
                                r'int64\[4, 2\]'):
      mined.NegativesSource(src, np.zeros((4, 2), np.int64))
    with self.assertRaisesRegex(ValueError, 'names row 5 but the source has '
                                '5 rows'):
      mined.NegativesSource(src, np.full((5, 2), 5))


class MinePairsTest(absltest.TestCase):

  def test_driver_equals_mining_the_embeddings(self):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = (x + 0.3 * rng.normal(size=(40, 6))).astype(np.float32)
    y[7] = y[3]  # a duplicate positive: a false negative of pair 3
    source = paired.ArraySource(x=x, y=y)
    mesh = parallel.make_mesh()
    unit = lambda v: v / jnp.linalg.norm(v, axis=1, keepdims=True)
    records = mined.mine_pairs(
        source, embed_query=jax.jit(lambda b: unit(b['x'])),
        embed_positive=jax.jit(lambda b: unit(b['y'])), mesh=mesh,
        batch_size=16, query_inputs=('x',), positive_inputs=('y',),
        num_negatives=3, absolute_margin=0.01, progress=False,
        info={'encoder': 'identity'})
    xu = x / np.linalg.norm(x, axis=1, keepdims=True)
    yu = y / np.linalg.norm(y, axis=1, keepdims=True)
    idx, _ = mined.mine_embeddings(xu, yu, np.arange(40), num_negatives=3,
                                   absolute_margin=0.01)
    np.testing.assert_array_equal(records.negatives, idx)
    np.testing.assert_array_equal(records.query, np.arange(40))
    self.assertNotIn(7, records.negatives[3])  # scores the positive's: out
    positive = records.info.pop('mean_positive_score')
    self.assertAlmostEqual(positive, np.mean(np.sum(xu * yu, axis=1)),
                           places=5)
    self.assertEqual(records.info, {'num_negatives': 3,
                                    'absolute_margin': 0.01,
                                    'encoder': 'identity'})


class EpochOrderTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.emb = np.random.default_rng(5).normal(size=(64, 4))

  def test_the_pipeline_follows_the_order_and_resumes(self):
    order = batching.EpochOrder('cluster', self.emb, 16, seed=3,
                                cluster_size=4)
    source = paired.ArraySource(x=np.arange(64))
    kw = dict(global_batch_size=16, seed=0, order=order, fields=('x',),
              process_index=0, process_count=1)
    it = pipeline.train_iterator(source, **kw)
    got = np.concatenate([next(it)['x'] for _ in range(6)])
    want = np.concatenate([
        batching.cluster_order(self.emb, 16, cluster_size=4, seed=3, epoch=e)
        for e in (0, 1)])[:96]
    np.testing.assert_array_equal(got, want)
    resumed = pipeline.train_iterator(source, start_step=5, **kw)
    np.testing.assert_array_equal(next(resumed)['x'], got[80:])
    # Grain workers get a pickled copy: the same orders.
    copy = pickle.loads(pickle.dumps(order))
    np.testing.assert_array_equal(copy(1), order(1))

  def test_bad_orders(self):
    with self.assertRaisesRegex(ValueError, "order must be one of"):
      batching.EpochOrder('random', self.emb, 16, seed=0)
    with self.assertRaisesRegex(ValueError, 'needs the neighbours table'):
      batching.EpochOrder('neighbour', self.emb, 16, seed=0)
    source = paired.ArraySource(x=np.arange(64))
    with self.assertRaisesRegex(ValueError, r'order\(0\) must give at least '
                                '64 rows'):
      pipeline.train_rows(0, num_examples=64, global_batch_size=16, seed=0,
                          order=lambda e: np.arange(10))
    del source


if __name__ == '__main__':
  absltest.main()
