"""`hnjax.mining.mine_hard_negatives` against a plain NumPy reference.

Embeddings have small integer entries, so every score is an exact small
integer in float32: ties are frequent (the lower corpus index must win)
and every filter's comparison is exact.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.sharding import PartitionSpec as P
import numpy as np

from hnjax import mining
from hnjax import parallel


def survivors(q, corpus, pos, *, range_min=0, range_max=None,
              max_score=None, min_score=None, absolute_margin=None,
              relative_margin=None):
  """Per query: the surviving corpus indices in rank order, and scores."""
  s = q.astype(np.float64) @ corpus.T.astype(np.float64)
  out = []
  for i in range(len(q)):
    cands = [c for c in range(len(corpus)) if c != pos[i]]
    ranked = sorted(cands, key=lambda c, i=i: (-s[i, c], c))
    ranked = ranked[range_min:range_max]
    upper = np.inf
    if max_score is not None:
      upper = min(upper, max_score)
    if pos[i] >= 0:
      p = s[i, pos[i]]
      if absolute_margin is not None:
        upper = min(upper, p - absolute_margin)
      if relative_margin is not None:
        upper = min(upper, p * (1 - relative_margin))
    keep = [c for c in ranked if s[i, c] <= upper and (
        min_score is None or s[i, c] >= min_score)]
    out.append(keep)
  return out, s


def reference_top(q, corpus, pos, num, **filters):
  surv, s = survivors(q, corpus, pos, **filters)
  idx = np.full((len(q), num), -1, np.int32)
  val = np.full((len(q), num), -np.inf, np.float32)
  for i, keep in enumerate(surv):
    keep = keep[:num]
    idx[i, :len(keep)] = keep
    val[i, :len(keep)] = s[i, keep]
  return idx, val


def data(seed=0, num_q=12, num_c=64, dim=6):
  rng = np.random.default_rng(seed)
  q = rng.integers(-2, 3, (num_q, dim)).astype(np.float32)
  corpus = rng.integers(-2, 3, (num_c, dim)).astype(np.float32)
  pos = rng.integers(0, num_c, num_q).astype(np.int32)
  pos[3] = -1  # a query without a positive
  return q, corpus, pos


FILTERS = {
    'none': {},
    'range_min': dict(range_min=5),
    'range_max': dict(range_max=6),
    'max_score': dict(max_score=3.0),
    'min_score': dict(min_score=2.0),
    'absolute_margin': dict(absolute_margin=1.0),
    'relative_margin': dict(relative_margin=0.25),
    'combined': dict(range_min=2, range_max=30, max_score=8.0, min_score=-1.0,
                     absolute_margin=0.0, relative_margin=0.1),
    'nothing_left': dict(min_score=100.0),
}


def sharded(fn, n):
  mesh = parallel.make_mesh(n)
  return jax.jit(jax.shard_map(
      fn, mesh=mesh, in_specs=(P(), P('data'), P()), out_specs=(P(), P()),
      check_vma=False))


class TopTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(k, v) for k, v in FILTERS.items()])
  def test_equals_numpy(self, filters):
    q, corpus, pos = data()
    want_i, want_v = reference_top(q, corpus, pos, 4, **filters)
    # Small blocks and query chunks with remainders: the blocked merges.
    got_i, got_v = mining.mine_hard_negatives(
        q, corpus, pos, num_negatives=4, block_size=7, query_chunk=5,
        **filters)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_v, want_v)
    dense = mining.mine_hard_negatives(q, corpus, pos, num_negatives=4,
                                       **filters)
    np.testing.assert_array_equal(dense[0], want_i)

  def test_hand_computed(self):
    q = np.array([[1., 0.]], np.float32)
    corpus = np.array([[1., 0.], [.9, .1], [.5, .5], [0., 1.], [.9, 0.]],
                      np.float32)
    idx, s = mining.mine_hard_negatives(q, corpus, np.array([0]),
                                        num_negatives=3)
    np.testing.assert_array_equal(idx, [[1, 4, 2]])  # 0.9 ties: lower first
    np.testing.assert_allclose(s, [[0.9, 0.9, 0.5]])

  @parameterized.parameters('none', 'combined', 'range_min')
  def test_sharded_equals_one_device(self, name):
    q, corpus, pos = data(1)
    filters = FILTERS[name]
    fn = lambda q, c, p, ax: mining.mine_hard_negatives(
        q, c, p, num_negatives=4, block_size=3, axis_name=ax, **filters)
    ref = fn(q, corpus, pos, None)
    out = sharded(lambda *a: fn(*a, 'data'), 8)(q, corpus, pos)
    np.testing.assert_array_equal(out[0], ref[0])
    np.testing.assert_array_equal(out[1], ref[1])

  def test_jit_equals_eager(self):
    q, corpus, pos = data(2)
    f = lambda q, c, p: mining.mine_hard_negatives(q, c, p, num_negatives=3,
                                                  block_size=9)
    np.testing.assert_array_equal(jax.jit(f)(q, corpus, pos)[0],
                                  f(q, corpus, pos)[0])

  def test_more_negatives_than_candidates(self):
    q, corpus, pos = data(3, num_c=4)
    idx, s = mining.mine_hard_negatives(q, corpus, pos, num_negatives=6)
    want_i, _ = reference_top(q, corpus, pos, 6)
    np.testing.assert_array_equal(idx, want_i)
    self.assertTrue(np.all(idx[:, 4:] == -1))
    self.assertTrue(np.all(np.isneginf(s[:, 4:])))

  @parameterized.product(axis=(None, 'data'), where=('query', 'corpus'))
  def test_non_finite_rows_are_nan(self, axis, where):
    # A NaN query is NaN for that query only; an inf corpus row touches
    # every query's scores (inf or 0 * inf): all NaN, never a plausible
    # finite list.
    q, corpus, pos = data(6)
    if where == 'query':
      q[2, 0] = np.nan
    else:
      corpus[40, 1] = np.inf
    fn = lambda q, c, p, ax: mining.mine_hard_negatives(
        q, c, p, num_negatives=3, block_size=5, axis_name=ax)
    if axis is None:
      idx, s = fn(q, corpus, pos, None)
    else:
      idx, s = sharded(lambda *a: fn(*a, 'data'), 8)(q, corpus, pos)
    hit = np.zeros(len(q), bool)
    hit[2 if where == 'query' else slice(None)] = True
    self.assertTrue(np.all(np.isnan(s[hit])) and np.all(idx[hit] == -1))
    self.assertTrue(np.all(np.isfinite(s[~hit][:, 0])))
    self.assertTrue(np.all(idx[~hit][:, 0] >= 0))

  def test_errors(self):
    q, corpus, pos = data()
    call = lambda **kw: mining.mine_hard_negatives(q, corpus, pos, **kw)
    with self.assertRaisesRegex(ValueError, "sampling_strategy='random' "
                                'needs a key'):
      call(sampling_strategy='random')
    with self.assertRaisesRegex(ValueError, 'range_max=2 must be larger'):
      call(range_min=2, range_max=2)
    with self.assertRaisesRegex(ValueError, 'absolute_margin must be'):
      call(absolute_margin=-1.0)
    with self.assertRaisesRegex(ValueError, 'sampling_strategy'):
      call(sampling_strategy='best')
    with self.assertRaisesRegex(ValueError, 'positive_indices must be'):
      mining.mine_hard_negatives(q, corpus, pos[:3])
    with self.assertRaisesRegex(ValueError, 'same dim'):
      mining.mine_hard_negatives(q, corpus[:, :3], pos)


class RandomTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('all', {}), ('range_max', dict(range_max=20)),
      ('combined', FILTERS['combined']), ('range_min', dict(range_min=5)))
  def test_a_uniform_sample_of_the_survivors(self, filters):
    q, corpus, pos = data(4)
    surv, s = survivors(q, corpus, pos, **filters)
    counts = [np.zeros(len(corpus)) for _ in q]
    draws = 300
    f = jax.jit(lambda key: mining.mine_hard_negatives(
        q, corpus, pos, num_negatives=3, sampling_strategy='random', key=key,
        block_size=11, **filters))
    for t in range(draws):
      idx, val = map(np.asarray, f(jax.random.key(t)))
      for i, keep in enumerate(surv):
        got = [c for c in idx[i] if c >= 0]
        self.assertLen(got, min(3, len(keep)))
        self.assertLen(set(got), len(got))  # without replacement
        self.assertContainsSubset(got, keep)
        np.testing.assert_array_equal(val[i, :len(got)], s[i, got])
        self.assertTrue(np.all(np.diff(val[i, :len(got)]) <= 0))
        counts[i][got] += 1
    # Each survivor is drawn with probability 3 / |survivors|.
    for i, keep in enumerate(surv):
      if len(keep) > 3:
        freq = counts[i][keep] / draws
        np.testing.assert_allclose(freq, 3 / len(keep), atol=0.12)

  def test_deterministic_and_layout_free(self):
    q, corpus, pos = data(5)
    fn = lambda q, c, p, key, ax, block: mining.mine_hard_negatives(
        q, c, p, num_negatives=4, sampling_strategy='random', key=key,
        block_size=block, axis_name=ax, min_score=-2.0)
    key = jax.random.key(9)
    a = fn(q, corpus, pos, key, None, 5)
    b = fn(q, corpus, pos, key, None, 64)
    c = sharded(lambda q, c, p: fn(q, c, p, key, 'data', 3), 8)(q, corpus,
                                                                  pos)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], c[0])
    other = fn(q, corpus, pos, jax.random.key(10), None, 5)
    self.assertFalse(np.array_equal(a[0], other[0]))
    # A range_max beyond the corpus draws the same sample as none.
    d = mining.mine_hard_negatives(q, corpus, pos, num_negatives=4,
                                   sampling_strategy='random', key=key,
                                   range_max=len(corpus), min_score=-2.0)
    np.testing.assert_array_equal(a[0], d[0])


if __name__ == '__main__':
  absltest.main()
