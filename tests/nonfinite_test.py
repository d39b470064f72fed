"""Non-finite in, NaN out; impossible temperatures; empty batches.

A loss that touched a NaN or ±inf must never come out finite: the trainers
stop on a non-finite loss, and a finite wrong value (a NaN bank row dropped
from the denominator, a NaN target ranked as +inf) trains on silently.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from hnjax import bank as bank_lib
from hnjax import losses
from hnjax import parallel
from hnjax import samplers
from hnjax.train import checks
from hnjax.train import runner
from hnjax.train import moco
from hnjax.train import supremix as supremix_family
from tests import testing

import configs.mochi as mochi_config
import configs.supremix as supremix_config

KEY = jax.random.key(0)

# The queue-side functions, each ``(q, k, bank, block_size, axis_name) ->
# [B]``; the samplers return one NaN flag per query.
QUEUE_FNS = dict(
    info_nce=lambda q, k, b, bs, ax: losses.info_nce(
        q, k, b, temperature=0.2, block_size=bs, axis_name=ax),
    hard_contrastive=lambda q, k, b, bs, ax: losses.hard_contrastive(
        q, k, b, temperature=0.5, beta=1.0, tau_plus=0.1, block_size=bs,
        axis_name=ax),
    mochi_info_nce=lambda q, k, b, bs, ax: losses.mochi_info_nce(
        KEY, q, k, b, temperature=0.2, num_hard=4, num_mix=3,
        num_query_mix=2, block_size=bs, axis_name=ax)[0],
    mochi_sampler=lambda q, k, b, bs, ax: jnp.sum(samplers.mochi(
        KEY, q, b, num_hard=4, num_mix=3, num_query_mix=2, block_size=bs,
        axis_name=ax), axis=(1, 2)),
    hardest_negatives=lambda q, k, b, bs, ax: jnp.sum(
        samplers.hardest_negatives(q, b, 3, block_size=bs,
                                   axis_name=ax)[0], axis=1),
    bank_lse=lambda q, k, b, bs, ax: bank_lib.bank_stats(
        q, b, scales=(5.0,), block_size=bs, axis_name=ax).lse[0],
)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  return testing.unit(rng, 8, 8), testing.unit(rng, 8, 8), testing.unit(
      rng, 32, 8)


class QueueNonFiniteTest(parameterized.TestCase):

  def test_issue_example(self):
    # One NaN in the bank used to drop the bank from the denominator:
    # info_nce was [0, 0, 0, 0] and mochi_info_nce finite and wrong.
    q = jnp.eye(4, 8)
    bank = jnp.eye(16, 8)[::-1].at[0, 0].set(jnp.nan)
    self.assertTrue(np.isnan(bank_lib.logsumexp(jnp.array([1., jnp.nan]))))
    fns = (
        lambda q, b: losses.info_nce(q, q, b, temperature=0.2),
        lambda q, b: losses.hard_contrastive(
            q, q, b, temperature=0.2, beta=1.0, tau_plus=0.1),
        lambda q, b: losses.mochi_info_nce(
            KEY, q, q, b, temperature=0.2, num_hard=4, num_mix=2,
            num_query_mix=2)[0])
    for fn in fns:
      self.assertTrue(np.all(np.isnan(jax.jit(fn)(q, bank))))

  @parameterized.product(name=tuple(QUEUE_FNS), block_size=(0, 8))
  def test_bad_bank_row_or_query(self, name, block_size):
    # One compiled function for every case (same shapes).
    fn = jax.jit(lambda *a: QUEUE_FNS[name](*a, block_size, None))
    for bad in (np.nan, np.inf, -np.inf):
      q, k, bank = _data()
      bank[5, 2] = bad  # every query reads every bank row
      out = fn(q, k, bank)
      self.assertTrue(np.all(np.isnan(out)), (bad, out))
    q, k, bank = _data()
    clean = fn(q, k, bank)
    q[2, 0] = np.nan
    q[6, 1] = np.inf
    out = fn(q, k, bank)
    bad = np.isin(np.arange(8), [2, 6])  # a query poisons its row only
    self.assertTrue(np.all(np.isnan(out[bad])), out)
    np.testing.assert_allclose(out[~bad], clean[~bad], rtol=1e-6)

  @parameterized.parameters('info_nce', 'hard_contrastive', 'mochi_info_nce')
  def test_bad_positive_poisons_its_row_only(self, name):
    q, k, bank = _data()
    k[3, 0] = np.nan
    out = QUEUE_FNS[name](q, k, bank, 0, None)
    self.assertTrue(np.isnan(out[3]))
    self.assertTrue(np.all(np.isfinite(np.delete(out, 3))))

  def test_bad_extra_negative(self):
    q, k, bank = _data()
    extra = testing.unit(np.random.default_rng(1), 8, 3, 8)
    extra[4, 1, 0] = np.nan
    out = losses.info_nce(q, k, bank, temperature=0.2, extra_negatives=extra)
    self.assertTrue(np.isnan(out[4]))
    self.assertTrue(np.all(np.isfinite(np.delete(out, 4))))

  @parameterized.parameters('info_nce', 'hard_contrastive', 'mochi_info_nce',
                            'mochi_sampler', 'bank_lse')
  def test_sharded_bank_on_8_devices(self, name):
    # The bad row lives on one device's shard; every query still sees it.
    q, k, bank = _data()
    bank[29, 0] = np.nan
    mesh = parallel.make_mesh(8)
    rows = jax.sharding.PartitionSpec('data')
    fn = jax.jit(jax.shard_map(
        lambda *a: QUEUE_FNS[name](*a, 0, 'data'), mesh=mesh,
        in_specs=(rows, rows, rows), out_specs=rows))
    self.assertTrue(np.all(np.isnan(fn(q, k, bank))))
    q2, k2, clean = _data()
    q2[1, 0] = np.nan
    out = fn(q2, k2, clean)
    self.assertTrue(np.isnan(out[1]))
    self.assertTrue(np.all(np.isfinite(np.delete(out, 1))))


class InBatchNonFiniteTest(parameterized.TestCase):

  def test_symmetric_and_m2mix_read_the_whole_batch(self):
    a, b, _ = _data()
    a[3, 0] = np.inf
    self.assertTrue(np.all(np.isnan(
        losses.symmetric_info_nce(a, b, temperature=0.1))))
    self.assertTrue(np.all(np.isnan(losses.m2mix(a, b, 0.5))))
    self.assertTrue(np.all(np.isnan(losses.m2mix(b, b, jnp.nan))))
    for term in losses.M3MIX_TERMS:
      self.assertTrue(np.all(np.isnan(losses.m3mix(a, b, 0.5, term=term))))

  def test_sigmoid_row_of_a_and_every_b(self):
    a, b, _ = _data()
    a[3, 0] = np.nan
    out = losses.sigmoid_contrastive(a, b, scale=10.0, bias=-10.0)
    self.assertTrue(np.isnan(out[3]))
    self.assertTrue(np.all(np.isfinite(np.delete(out, 3))))
    a, b, _ = _data()
    b[0, 0] = np.nan
    self.assertTrue(np.all(np.isnan(
        losses.sigmoid_contrastive(a, b, scale=10.0, bias=-10.0))))

  def test_geodesic_mix_row(self):
    a, b, _ = _data()
    a[2, 0] = np.nan
    out = samplers.geodesic_mix(a, b, 0.3)
    self.assertTrue(np.all(np.isnan(out[2])))
    self.assertTrue(np.all(np.isfinite(np.delete(out, 2, axis=0))))


def _regression(seed=0):
  rng = np.random.default_rng(seed)
  y = np.tile(rng.integers(0, 6, 8).astype(np.float32), 2)
  return testing.unit(rng, 16, 8), y


SUPERVISED_FNS = dict(
    supremix=lambda z, y, ax=None: losses.supremix(
        KEY, z, y, temperature=0.5, window=2.0, axis_name=ax),
    supremix_authors=lambda z, y, ax=None: losses.supremix(
        KEY, z, y, temperature=0.5, window=2.0, variant='authors',
        axis_name=ax),
    rank_n_contrast=lambda z, y, ax=None: losses.rank_n_contrast(
        z, y, temperature=2.0, axis_name=ax),
    sup_con=lambda z, y, ax=None: losses.sup_con(
        z, y.astype(np.int32), temperature=0.5, axis_name=ax),
)


class SupervisedNonFiniteTest(parameterized.TestCase):

  @parameterized.parameters('supremix', 'supremix_authors', 'rank_n_contrast')
  def test_nan_target(self, name):
    # supremix was finite with an all-NaN gradient; rank_n_contrast ranked
    # NaN as +inf.
    z, y = _regression()
    y[4] = np.nan
    fn = jax.jit(SUPERVISED_FNS[name])
    self.assertTrue(np.all(np.isnan(fn(z, y))))

  @parameterized.parameters(*SUPERVISED_FNS)
  def test_nonfinite_embedding(self, name):
    z, y = _regression()
    z[7, 3] = -np.inf
    self.assertTrue(np.all(np.isnan(jax.jit(SUPERVISED_FNS[name])(z, y))))

  @parameterized.parameters('supremix', 'rank_n_contrast', 'sup_con')
  def test_sharded_on_8_devices(self, name):
    z, y = _regression()
    y[11] = np.nan if name != 'sup_con' else y[11]
    z[11, 0] = np.nan if name == 'sup_con' else z[11, 0]
    rows = jax.sharding.PartitionSpec('data')
    fn = jax.jit(jax.shard_map(
        functools.partial(SUPERVISED_FNS[name], ax='data'),
        mesh=parallel.make_mesh(8), in_specs=(rows, rows), out_specs=rows))
    self.assertTrue(np.all(np.isnan(fn(z, y))))

  def test_mixture_coefficients(self):
    y = np.array([1., 2., np.nan, 4.], np.float32)
    alpha, _ = samplers.anchor_inclusive_mixtures(KEY, y)
    self.assertTrue(np.all(np.isnan(alpha[2])))
    self.assertTrue(np.all(np.isnan(alpha[:, 2])))
    keep = np.ix_([0, 1, 3], [0, 1, 3])
    self.assertTrue(np.all(np.isfinite(alpha[keep])))
    alpha, valid = samplers.anchor_exclusive_mixtures(y, window=5.0)
    self.assertTrue(np.all(np.isnan(alpha[2])))
    self.assertTrue(np.all(np.isnan(alpha[:, 2])))
    self.assertTrue(np.all(np.isnan(alpha[:, :, 2])))
    self.assertFalse(np.any(valid[2]) or np.any(valid[:, 2]))
    self.assertTrue(bool(valid[1, 0, 3]))
    self.assertAlmostEqual(float(alpha[1, 0, 3]), 2 / 3, places=6)


# Every loss with a temperature-like argument, as ``t -> [B]``.
_Q, _K, _BANK = _data(3)
_Z, _Y = _regression(3)
TEMPERATURE_FNS = dict(
    info_nce=lambda t: losses.info_nce(_Q, _K, _BANK, temperature=t),
    symmetric_info_nce=lambda t: losses.symmetric_info_nce(
        _Q, _K, temperature=t),
    sigmoid_contrastive=lambda t: losses.sigmoid_contrastive(
        _Q, _K, scale=t, bias=0.0),
    m2mix=lambda t: losses.m2mix(_Q, _K, 0.5, temperature=t),
    m3mix=lambda t: losses.m3mix(_Q, _K, 0.5, term='vlmix', temperature=t),
    sup_con=lambda t: losses.sup_con(_Z, _Y.astype(np.int32), temperature=t),
    supremix=lambda t: losses.supremix(KEY, _Z, _Y, temperature=t,
                                       window=2.0),
    rank_n_contrast=lambda t: losses.rank_n_contrast(_Z, _Y, temperature=t),
)
PYTHON_ONLY_FNS = dict(
    hard_contrastive=lambda t: losses.hard_contrastive(
        _Q, _K, _BANK, temperature=t, beta=1.0, tau_plus=0.1),
    mochi_info_nce=lambda t: losses.mochi_info_nce(
        KEY, _Q, _K, _BANK, temperature=t, num_hard=4, num_mix=2,
        num_query_mix=2),
)


class TemperatureTest(parameterized.TestCase):

  @parameterized.parameters(*TEMPERATURE_FNS, *PYTHON_ONLY_FNS)
  def test_python_value_is_checked(self, name):
    fn = {**TEMPERATURE_FNS, **PYTHON_ONLY_FNS}[name]
    for t in (np.inf, 0.0, -1.0, np.nan):
      message = 'must be finite' if t == np.inf else 'must be > 0'
      with self.assertRaisesRegex(ValueError, message):
        fn(t)

  @parameterized.parameters(*TEMPERATURE_FNS)
  def test_traced_value_gives_nan(self, name):
    # inf used to train nothing (loss log K, zero gradient); <= 0 gave a
    # silent finite loss.
    fn = jax.jit(TEMPERATURE_FNS[name])
    self.assertTrue(np.all(np.isfinite(fn(0.5))))
    for t in (np.inf, 0.0, -1.0, np.nan):
      self.assertTrue(np.all(np.isnan(fn(jnp.float32(t)))), t)

  @parameterized.parameters(
      (moco.FAMILY, mochi_config.get_config),
      (supremix_family.FAMILY, supremix_config.get_config))
  def test_config_rejects_infinite_temperature(self, family, get_config):
    config = get_config()
    config.temperature = float('inf')
    with self.assertRaisesRegex(checks.ConfigError,
                                'temperature=inf: must be finite'):
      runner.validate(family, config, num_devices=1)


_E = np.zeros((0, 8), np.float32)
_E_INT = np.zeros((0,), np.int32)
_E_Y = np.zeros((0,), np.float32)
EMPTY = dict(
    info_nce=lambda: losses.info_nce(_E, _E, _BANK, temperature=0.2),
    info_nce_bank=lambda: losses.info_nce(_Q, _K, _E, temperature=0.2),
    hard_contrastive=lambda: losses.hard_contrastive(
        _E, _E, _BANK, temperature=0.2, beta=1.0, tau_plus=0.1),
    mochi_info_nce=lambda: losses.mochi_info_nce(
        KEY, _E, _E, _BANK, temperature=0.2, num_hard=4, num_mix=2,
        num_query_mix=2),
    symmetric_info_nce=lambda: losses.symmetric_info_nce(
        _E, _E, temperature=0.2),
    sigmoid_contrastive=lambda: losses.sigmoid_contrastive(
        _E, _E, scale=1.0, bias=0.0),
    m2mix=lambda: losses.m2mix(_E, _E, 0.5),
    m3mix=lambda: losses.m3mix(_E, _E, 0.5, term='vmix'),
    sup_con=lambda: losses.sup_con(_E, _E_INT, temperature=0.2),
    supremix=lambda: losses.supremix(KEY, _E, _E_Y),
    rank_n_contrast=lambda: losses.rank_n_contrast(_E, _E_Y),
    mochi=lambda: samplers.mochi(KEY, _E, _BANK, num_hard=4, num_mix=2,
                                 num_query_mix=2),
    mochi_mix=lambda: samplers.mochi_mix(
        KEY, _E, _BANK, np.zeros((0, 4), np.int32), num_mix=2,
        num_query_mix=2),
    mochi_logits=lambda: samplers.mochi_logits(
        KEY, _E, _BANK, np.zeros((0, 4), np.int32), np.zeros((0, 4)),
        num_mix=2, num_query_mix=2),
    hardest_negatives=lambda: samplers.hardest_negatives(_E, _BANK, 2),
    bank_stats=lambda: bank_lib.bank_stats(_E, _BANK, scales=(1.0,)),
    geodesic_mix=lambda: samplers.geodesic_mix(_E, _E, 0.5),
    anchor_inclusive=lambda: samplers.anchor_inclusive_mixtures(KEY, _E_Y),
    anchor_exclusive=lambda: samplers.anchor_exclusive_mixtures(_E_Y),
    hard_top_k_mask=lambda: samplers.hard_top_k_mask(np.zeros((0, 4)), 1),
    guide_margin_mask=lambda: samplers.guide_margin_mask(
        np.zeros((0, 4)), np.zeros((0,))),
    same_id_mask=lambda: samplers.same_id_mask(_E_INT, np.arange(3)),
    same_label_mask=lambda: samplers.same_label_mask(np.arange(3), _E_INT),
)


class EmptyBatchTest(parameterized.TestCase):

  @parameterized.parameters(*EMPTY)
  def test_one_clear_error(self, name):
    # Used to be a ZeroDivisionError (samplers.mochi) or XLA's
    # "zero-size array" from deep inside.
    with self.assertRaisesRegex(ValueError,
                                r'^\w+ is empty \(shape .*\): needs at least'):
      EMPTY[name]()


if __name__ == '__main__':
  absltest.main()
