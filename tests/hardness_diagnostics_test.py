"""False-negative share of the hardest negatives and the positive's rank."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from hnjax import bank as bank_lib
from hnjax import samplers
from tests import testing
from tests.hardness_range_test import np_range
from tests.sharded_test import COLS
from tests.sharded_test import ROWS
from tests.sharded_test import sharded


def np_diagnostics(q, k, bank, q_labels, bank_labels, num, mask=None, skip=0,
                   ceiling=None):
  """Plain NumPy: the same statistics from the full similarity matrix."""
  sims = np.asarray(q, np.float64) @ np.asarray(bank, np.float64).T
  ok = np.ones(sims.shape, bool) if mask is None else mask

  def share(indices):
    out = []
    for b, row in enumerate(indices):
      row = row[row >= 0]
      labels = bank_labels[row]
      out.append(np.mean((labels >= 0) & (labels == q_labels[b]))
                 if len(row) and q_labels[b] >= 0 else np.nan)
    return np.array(out)

  pos = np.sum(np.asarray(q, np.float64) * k, 1)
  out = dict(
      false_negative_share=share(np_range(q, bank, num, 0, None, mask)[1]),
      positive_rank=1.0 + np.sum(ok & (sims > pos[:, None]), 1))
  if skip or ceiling is not None:
    out['selected_false_negative_share'] = share(
        np_range(q, bank, num, skip, ceiling, mask)[1])
  return out


class HardnessDiagnosticsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(41)
    self.q = testing.unit(rng, 16, 8)
    self.k = testing.unit(rng, 16, 8)
    self.bank = testing.unit(rng, 48, 8)
    self.mask = rng.random((16, 48)) > 0.2
    self.q_labels = rng.integers(0, 3, 16).astype(np.int32)
    self.q_labels[2] = -1  # unknown: no share
    self.bank_labels = rng.integers(-1, 3, 48).astype(np.int32)

  def test_hand_computed(self):
    q = jnp.array([[1., 0.]])
    k = jnp.array([[.6, .8]])  # positive similarity 0.6
    # Similarities 0.8, 0.3, -1, 0.9, 0.5 with labels 1, -1, 1, 2, 1.
    bank = jnp.array([[.8, .6], [.3, -.95393920], [-1., 0.], [.9, .43588989],
                      [.5, .8660254]])
    bank_labels = jnp.array([1, -1, 1, 2, 1])
    fn = lambda **kw: samplers.hardness_diagnostics(
        q, k, bank, jnp.array([1]), bank_labels, num_hard=2, **kw)
    out = fn()  # hardest: 0.9 (label 2), 0.8 (label 1); 2 negatives > 0.6
    np.testing.assert_allclose(out['false_negative_share'], [0.5])
    np.testing.assert_allclose(out['positive_rank'], [3.0])
    self.assertNotIn('selected_false_negative_share', out)
    out = fn(skip_top=1)  # the range 0.8, 0.5: both false negatives
    np.testing.assert_allclose(out['selected_false_negative_share'], [1.0])
    out = fn(max_similarity=0.4)  # 0.3 (label unknown), -1 (label 1)
    np.testing.assert_allclose(out['selected_false_negative_share'], [0.5])
    # Masking the 0.9 row removes it from both statistics.
    out = fn(negative_mask=jnp.array([[True, True, True, False, True]]))
    np.testing.assert_allclose(out['false_negative_share'], [1.0])
    np.testing.assert_allclose(out['positive_rank'], [2.0])

  @parameterized.product(block_size=(0, 8), ranged=(False, True))
  def test_equals_numpy(self, block_size, ranged):
    kw = dict(skip_top=2, max_similarity=0.4) if ranged else {}
    fn = lambda *a: samplers.hardness_diagnostics(
        *a, num_hard=5, negative_mask=self.mask, block_size=block_size, **kw)
    args = (self.q, self.k, self.bank, self.q_labels, self.bank_labels)
    got = jax.jit(fn)(*args)
    want = np_diagnostics(*args, 5, self.mask, kw.get('skip_top', 0),
                          kw.get('max_similarity'))
    self.assertEqual(set(got), set(want))
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-6,
                                 err_msg=name)
    self.assertTrue(np.isnan(got['false_negative_share'][2]))
    self.assertFalse(np.isnan(got['positive_rank']).any())
    if not ranged and block_size:  # eager gives the same
      for name, v in fn(*args).items():
        np.testing.assert_array_equal(v, got[name], err_msg=name)

  def test_sharded_equals_one_device(self):
    # Global ranks and global labels: the hardest of the whole bank,
    # whichever shards hold them.
    kw = dict(num_hard=5, skip_top=3, max_similarity=0.3)
    fn = lambda q, k, b, ql, bl, m, ax: samplers.hardness_diagnostics(
        q, k, b, ql, bl, negative_mask=m, axis_name=ax, **kw)
    args = (self.q, self.k, self.bank, self.q_labels, self.bank_labels,
            self.mask)
    want = jax.jit(lambda *a: fn(*a, None))(*args)
    got = sharded(lambda *a: fn(*a, 'data'), 8,
                  (ROWS, ROWS, ROWS, ROWS, ROWS, COLS), ROWS)(*args)
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-6,
                                 err_msg=name)
    counts = sharded(
        lambda q, b, t, m: bank_lib.count_above(q, b, t, negative_mask=m,
                                                axis_name='data',
                                                block_size=4),
        8, (ROWS, ROWS, ROWS, COLS), ROWS)(
            self.q, self.bank, np.zeros(16, np.float32), self.mask)
    np.testing.assert_array_equal(
        counts, np.sum(self.mask & (self.q @ self.bank.T > 0), 1))

  def test_non_finite_rows_and_no_gradient(self):
    q = self.q.copy()
    q[4] = np.nan
    out = jax.jit(lambda q: samplers.hardness_diagnostics(
        q, self.k, self.bank, self.q_labels, self.bank_labels, num_hard=3))(q)
    for name, v in out.items():
      self.assertTrue(np.isnan(v[4]), name)
      self.assertFalse(np.isnan(np.delete(v, [2, 4])).any(), name)
    # A NaN bank row reaches every query: all NaN, sharded or not.
    bank = self.bank.copy()
    bank[7, 0] = np.inf
    fn = lambda b, ax: samplers.hardness_diagnostics(
        self.q, self.k, b, self.q_labels, self.bank_labels, num_hard=3,
        axis_name=ax)
    for out in (jax.jit(lambda b: fn(b, None))(bank),
                sharded(lambda q, k, b, ql, bl: samplers.hardness_diagnostics(
                    q, k, b, ql, bl, num_hard=3, axis_name='data'), 8,
                        (ROWS,) * 5, ROWS)(self.q, self.k, bank,
                                            self.q_labels, self.bank_labels)):
      for name, v in out.items():
        self.assertTrue(np.isnan(v).all(), name)
    # Statistics, not a loss: no gradient reaches the embeddings.
    grad = jax.jit(jax.grad(lambda q, k, b: sum(
        jnp.nansum(v) for v in samplers.hardness_diagnostics(
            q, k, b, self.q_labels, self.bank_labels, num_hard=3).values()),
                            (0, 1, 2)))(self.q, self.k, self.bank)
    for g in grad:
      np.testing.assert_array_equal(g, 0.0)

  def test_errors(self):
    args = (self.q, self.k, self.bank, self.q_labels, self.bank_labels)
    for kw, msg in [
        (dict(num_hard=0), 'num_hard must be an int > 0'),
        (dict(num_hard=3, skip_top=46), 'larger than the bank'),
    ]:
      with self.assertRaisesRegex(ValueError, msg):
        samplers.hardness_diagnostics(*args, **kw)
    with self.assertRaisesRegex(ValueError, r'query_labels must have shape'):
      samplers.hardness_diagnostics(*args[:3], self.q_labels[:3],
                                    self.bank_labels, num_hard=2)
    with self.assertRaisesRegex(ValueError, r'negative_labels must have'):
      samplers.hardness_diagnostics(*args[:4], self.bank_labels[:4],
                                    num_hard=2)
    with self.assertRaisesRegex(ValueError, 'threshold must have shape'):
      bank_lib.count_above(self.q, self.bank, np.zeros(3))


if __name__ == '__main__':
  absltest.main()
