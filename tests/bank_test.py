"""Blocked bank statistics equal the dense ones: values, top-k, gradients."""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from hnjax import bank
from hnjax import losses
from hnjax import samplers
from tests import testing


class BlockedEqualsDenseTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(20)
    self.q = testing.unit(rng, 6, 8)
    self.k = testing.unit(rng, 6, 8)
    self.negs = testing.unit(rng, 50, 8)
    self.mask = rng.random((6, 50)) > 0.3
    self.mask[4] = False  # a fully masked row

  @parameterized.product(block=(7, 16, 25), masked=(False, True))
  def test_stats(self, block, masked):
    mask = self.mask if masked else None
    kw = dict(scales=(5.0, 0.0, -2.0), num_top=9, negative_mask=mask)
    dense = bank.bank_stats(self.q, self.negs, block_size=0, **kw)
    blocked = bank.bank_stats(self.q, self.negs, block_size=block, **kw)
    np.testing.assert_allclose(blocked.lse, dense.lse, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(blocked.top_indices, dense.top_indices)
    np.testing.assert_allclose(blocked.top_similarities,
                               dense.top_similarities, atol=1e-6)

  @parameterized.parameters(False, True)
  def test_row_chunks_with_remainder(self, masked):
    # Top-k over 7 queries in row chunks of 2 (3 chunks + 1 row).
    q = np.concatenate([self.q, self.k[:1]])
    mask = np.concatenate([self.mask, self.mask[:1]]) if masked else None
    kw = dict(scales=(5.0, 0.5), num_top=9, negative_mask=mask)
    dense = bank.bank_stats(q, self.negs, block_size=0, **kw)
    g_dense = jax.grad(lambda q: jnp.sum(jnp.where(jnp.isfinite(
        bank.bank_stats(q, self.negs, block_size=0, **kw).lse), bank.bank_stats(
            q, self.negs, block_size=0, **kw).lse, 0.0)))(q)
    with mock.patch.object(bank, 'ROW_CHUNK_LOGITS', 2 * 50):
      chunked = bank.bank_stats(q, self.negs, block_size=7, **kw)
      g_chunked = jax.grad(lambda q: jnp.sum(jnp.where(jnp.isfinite(
          bank.bank_stats(q, self.negs, block_size=7, **kw).lse),
          bank.bank_stats(q, self.negs, block_size=7, **kw).lse, 0.0)))(q)
    np.testing.assert_allclose(chunked.lse, dense.lse, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(chunked.top_indices, dense.top_indices)
    np.testing.assert_allclose(g_chunked, g_dense, rtol=1e-5, atol=1e-6)

  def test_lse_matches_numpy(self):
    st = bank.bank_stats(self.q, self.negs, scales=(3.0,), num_top=0,
                         negative_mask=self.mask, block_size=16)
    s = 3.0 * self.q.astype(np.float64) @ self.negs.T.astype(np.float64)
    for b in range(6):
      if self.mask[b].any():
        x = s[b][self.mask[b]]
        ref = x.max() + np.log(np.exp(x - x.max()).sum())
        np.testing.assert_allclose(st.lse[0, b], ref, rtol=1e-6)
      else:
        self.assertEqual(float(st.lse[0, b]), -np.inf)

  @parameterized.parameters(7, 25)
  def test_gradients(self, block):
    w = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
    w[:, 4] = 0.0  # -inf * 0 is NaN: weight the masked row by zero

    def f(q, negs, block_size):
      st = bank.bank_stats(q, negs, scales=(5.0, 1.0), num_top=3,
                           negative_mask=self.mask, block_size=block_size)
      return jnp.sum(w * jnp.where(jnp.isfinite(st.lse), st.lse, 0.0))

    g_dense = jax.grad(f, (0, 1))(self.q, self.negs, 0)
    g_blocked = jax.jit(jax.grad(f, (0, 1)), static_argnums=2)(
        self.q, self.negs, block)
    for a, b in zip(g_blocked, g_dense):
      np.testing.assert_allclose(a, b, atol=1e-5)
      self.assertTrue(testing.all_finite(a))

  @parameterized.parameters(7, 16)
  def test_losses_and_samplers(self, block):
    kw = dict(temperature=0.1, negative_mask=self.mask)
    for fn in (
        lambda q, n, bs: losses.info_nce(q, self.k, n, block_size=bs, **kw),
        lambda q, n, bs: losses.hard_contrastive(
            q, self.k, n, beta=1.0, tau_plus=0.1, block_size=bs, **kw),
    ):
      dense = fn(self.q, self.negs, 0)
      blocked = fn(self.q, self.negs, block)
      np.testing.assert_allclose(blocked, dense, rtol=1e-5, atol=1e-6)
      # Jitted: op-by-op gradients of the blocked scans took seconds.
      gd = jax.jit(jax.grad(lambda q, n: fn(q, n, 0).sum(), (0, 1)))(
          self.q, self.negs)
      gb = jax.jit(jax.grad(lambda q, n: fn(q, n, block).sum(), (0, 1)))(
          self.q, self.negs)
      for a, b in zip(gb, gd):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    h_dense = samplers.mochi(jax.random.key(0), self.q, self.negs, num_hard=9,
                             num_mix=5, num_query_mix=2, block_size=0)
    h_blocked = samplers.mochi(jax.random.key(0), self.q, self.negs,
                               num_hard=9, num_mix=5, num_query_mix=2,
                               block_size=block)
    np.testing.assert_allclose(h_blocked, h_dense, atol=1e-6)

  def test_automatic_choice(self):
    self.assertEqual(bank._resolve_block_size(None, 256, 4096), 0)
    self.assertEqual(bank._resolve_block_size(None, 256, 65536),
                     bank.DEFAULT_BLOCK_SIZE)
    self.assertEqual(bank._resolve_block_size(100, 2, 50), 0)  # >= K
    self.assertEqual(bank._resolve_block_size(10, 2, 50), 10)
    with self.assertRaisesRegex(ValueError, 'block_size must be an int >= 0'):
      bank.bank_stats(self.q, self.negs, num_top=1, block_size=-1)


class MapRowChunksTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 3, 7, 8, 100)
  def test_equals_one_call(self, rows):
    # A row-wise function of a pytree, with a two-output result.
    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    y = np.arange(7, dtype=np.int32)
    fn = lambda t: (t[0] * 2.0 + t[1][:, None], t[1] - 1)
    calls = []

    def counted(t):
      calls.append(t[0].shape[0])
      return fn(t)

    out = bank.map_row_chunks(counted, (x, y), rows)
    want = fn((x, y))
    np.testing.assert_array_equal(out[0], want[0])
    np.testing.assert_array_equal(out[1], want[1])
    # Traced once per chunk size: the full chunks, then the remainder.
    r = min(rows, 7)
    self.assertEqual(calls, [r] + ([7 % r] if 7 % r else []))

  def test_zero_width_rows(self):
    x = np.zeros((5, 0, 2), np.float32)
    out = bank.map_row_chunks(lambda t: t + 1.0, x, 2)
    self.assertEqual(out.shape, (5, 0, 2))


if __name__ == '__main__':
  absltest.main()
