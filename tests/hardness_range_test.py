"""Hardness-range selection: skip the r hardest, drop those above a ceiling."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from configs import mochi as mochi_config
from hnjax import losses
from hnjax import samplers
from hnjax.train import checks
from hnjax.train import moco
from hnjax.train import runner
from tests import testing
from tests.sharded_test import COLS
from tests.sharded_test import ROWS
from tests.sharded_test import sharded


def np_range(q, bank, num, skip, ceiling, mask=None):
  """Plain NumPy: unmasked, <= ceiling, descending (ties: lower index)."""
  sims = np.asarray(q, np.float64) @ np.asarray(bank, np.float64).T
  out_v = np.full((len(q), num), -np.inf)
  out_i = np.full((len(q), num), -1)
  for b, row in enumerate(sims):
    ok = np.ones(len(row), bool) if mask is None else mask[b].copy()
    if ceiling is not None:
      ok &= row <= ceiling
    idx = np.nonzero(ok)[0]
    idx = idx[np.argsort(-row[idx], kind='stable')][skip:skip + num]
    out_v[b, :len(idx)], out_i[b, :len(idx)] = row[idx], idx
  return out_v, out_i


class HardnessRangeTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(40)
    self.q = testing.unit(rng, 16, 8)
    self.k = testing.unit(rng, 16, 8)
    self.bank = testing.unit(rng, 48, 8)
    self.mask = rng.random((16, 48)) > 0.2

  def test_hand_computed(self):
    q = jnp.array([[1., 0.]])
    # Similarities 0.9, 0.8, 0.5, 0.3, -1 (rows 3, 0, 4, 1, 2).
    bank = jnp.array([[.8, .6], [.3, -.95393920], [-1., 0.], [.9, .43588989],
                      [.5, .8660254]])
    for skip, ceiling, want_v, want_i in [
        (0, None, [.9, .8], [3, 0]),
        (1, None, [.8, .5], [0, 4]),
        (0, .85, [.8, .5], [0, 4]),
        (1, .85, [.5, .3], [4, 1]),
        (0, .8, [.8, .5], [0, 4]),  # equal to the ceiling: kept
        (3, None, [.3, -1.], [1, 2]),
        (1, .4, [-1., -np.inf], [2, -1]),  # fewer than asked: padded
    ]:
      v, i = samplers.hardest_negatives(q, bank, 2, skip_top=skip,
                                        max_similarity=ceiling)
      np.testing.assert_allclose(v[0], want_v, rtol=1e-6,
                                 err_msg=f'{skip}, {ceiling}')
      np.testing.assert_array_equal(i[0], want_i)

  @parameterized.product(block_size=(0, 8), skip=(0, 3), ceiling=(None, 0.3))
  def test_equals_numpy(self, block_size, skip, ceiling):
    fn = jax.jit(lambda q, b, m: samplers.hardest_negatives(
        q, b, 5, negative_mask=m, block_size=block_size, skip_top=skip,
        max_similarity=ceiling))
    v, i = fn(self.q, self.bank, self.mask)
    want_v, want_i = np_range(self.q, self.bank, 5, skip, ceiling, self.mask)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(v, want_v, rtol=1e-5, atol=1e-6)
    # Eager gives the same.
    v2, i2 = samplers.hardest_negatives(
        self.q, self.bank, 5, negative_mask=self.mask, block_size=block_size,
        skip_top=skip, max_similarity=ceiling)
    np.testing.assert_array_equal(i2, i)

  def test_sharded_selection_uses_global_ranks(self):
    # Skipping r is global: the r hardest of the whole bank, whichever
    # shards hold them (a per-shard skip would drop n * r).
    fn = lambda q, b, m, ax: samplers.hardest_negatives(
        q, b, 5, negative_mask=m, axis_name=ax, skip_top=3,
        max_similarity=0.3)
    ref_v, ref_i = fn(self.q, self.bank, self.mask, None)
    got_v, got_i = sharded(lambda *a: fn(*a, 'data'), 8, (ROWS, ROWS, COLS),
                           (ROWS, ROWS))(self.q, self.bank, self.mask)
    np.testing.assert_array_equal(got_i, ref_i)
    np.testing.assert_allclose(got_v, ref_v, rtol=1e-6, atol=1e-6)

  def test_mochi_loss_mixes_the_range_sharded_and_not(self):
    key = jax.random.key(3)
    kw = dict(temperature=0.2, num_hard=6, num_mix=4, num_query_mix=2,
              skip_top=2, max_similarity=0.5)
    fn = lambda q, k, b, m, ax: losses.mochi_info_nce(
        key, q, k, b, negative_mask=m, axis_name=ax, **kw)[0]
    args = (self.q, self.k, self.bank, self.mask)
    ref = jax.jit(lambda *a: fn(*a, None))
    # The fused loss equals info_nce with the sampler's range negatives.

    @jax.jit
    def unfused(q, k, b, m):
      extra = samplers.mochi(key, q, b, num_hard=6, num_mix=4,
                             num_query_mix=2, negative_mask=m, skip_top=2,
                             max_similarity=0.5)
      plain = losses.mochi_info_nce(key, q, k, b, temperature=0.2,
                                    num_hard=6, num_mix=4, num_query_mix=2,
                                    negative_mask=m)[0]
      return losses.info_nce(q, k, b, temperature=0.2, negative_mask=m,
                             extra_negatives=extra), plain

    want, plain = unfused(*args)
    np.testing.assert_allclose(ref(*args), want, rtol=1e-5)
    # It differs from plain MoCHi (the range changes the mixtures) ...
    self.assertGreater(float(jnp.abs(plain - want).max()), 1e-4)
    # ... and 8 devices equal one, values and gradients.
    shard = sharded(lambda *a: fn(*a, 'data'), 8, (ROWS, ROWS, ROWS, COLS),
                    ROWS)
    np.testing.assert_allclose(shard(*args), ref(*args), rtol=1e-5,
                               atol=1e-6)
    grad = lambda f: jax.jit(jax.grad(lambda *a: f(*a).sum(), (0, 1, 2)))
    g_ref, g_got = grad(ref)(*args), grad(shard)(*args)
    for a, b in zip(g_got, g_ref):
      np.testing.assert_allclose(a, b, atol=1e-5)

  def test_proxy_accuracy_still_reads_the_hardest_negative(self):
    _, aux = jax.jit(lambda q, k, b: losses.mochi_info_nce(
        jax.random.key(0), q, k, b, temperature=0.2, num_hard=4, num_mix=2,
        num_query_mix=1, skip_top=3, max_similarity=0.0))(
            self.q, self.k, self.bank)
    np.testing.assert_allclose(aux['hardest_similarity'],
                               (self.q @ self.bank.T).max(1), rtol=1e-6)

  def test_mochi_config_preset(self):
    c = mochi_config.get_config('hardness_range')
    runner.validate(moco.FAMILY, c, num_devices=8)
    self.assertEqual((c.mochi.skip_top, c.mochi.max_similarity), (20, 0.9))
    for field, value, msg in [('skip_top', -1, 'mochi.skip_top=-1'),
                              ('skip_top', 4000, 'mochi.skip_top=4000'),
                              ('max_similarity', float('nan'),
                               'mochi.max_similarity=nan')]:
      c = mochi_config.get_config()
      c.mochi[field] = value
      with self.assertRaisesRegex(checks.ConfigError, msg):
        runner.validate(moco.FAMILY, c, num_devices=8)

  def test_errors(self):
    q, bank = self.q[:2], self.bank[:6]
    for kw, msg in [
        (dict(skip_top=-1), 'skip_top'),
        (dict(skip_top=3), r'num_top=4 \+ skip_top=3 is larger than the '
                           r'bank \(6 entries\)'),
        (dict(max_similarity=float('nan')), 'max_similarity must be finite'),
    ]:
      with self.assertRaisesRegex(ValueError, msg):
        samplers.hardest_negatives(q, bank, 4, **kw)


if __name__ == '__main__':
  absltest.main()
