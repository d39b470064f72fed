"""Tests for hnjax.models.norm: SplitBatchNorm, shuffle and unshuffle."""

import functools
import os
import re

# For `python tests/models_norm_test.py`; under pytest conftest.py does it.
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')

# pylint: disable=g-import-not-at-top
from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from hnjax.models import norm
# pylint: enable=g-import-not-at-top

_COLLECTIVES = re.compile(
    r'all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter'
)


def _np_group_bn(x, num_splits, scale, bias, eps=1e-5):
  """NumPy reference: each contiguous group normalised by its own stats."""
  x = np.asarray(x, np.float64)
  groups = np.split(x, num_splits, axis=0)
  out, means, variances = [], [], []
  for g in groups:
    axes = tuple(range(g.ndim - 1))
    mu = g.mean(axis=axes)
    var = ((g - mu) ** 2).mean(axis=axes)
    out.append((g - mu) / np.sqrt(var + eps) * scale + bias)
    means.append(mu)
    variances.append(var)
  return np.concatenate(out), np.stack(means), np.stack(variances)


def _random_variables(seed, module, x, **kwargs):
  """Initialises, then replaces every leaf by random values in [0.5, 2]."""
  variables = module.init(jax.random.key(0), x, **kwargs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda l: jnp.asarray(rng.uniform(0.5, 2.0, l.shape), l.dtype),
      variables,
  )


def _mesh():
  return jax.make_mesh(
      (8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,)
  )


class SplitBatchNormTest(parameterized.TestCase):

  def _data(self, shape, num_splits):
    # Groups with very different means and scales, so that mixing up their
    # statistics would be visible.
    x = np.random.default_rng(0).normal(size=shape)
    offsets = np.repeat(np.arange(num_splits) * 3.0, shape[0] // num_splits)
    x = x * (1.0 + offsets.reshape((-1,) + (1,) * (len(shape) - 1)))
    return jnp.asarray(x + offsets.reshape((-1,) + (1,) * (len(shape) - 1)),
                       jnp.float32)

  @parameterized.parameters(
      ((12, 3, 3, 4), 3), ((12, 3, 3, 4), 1), ((8, 5), 4), ((6, 2, 7), 2)
  )
  def test_groups_use_their_own_statistics(self, shape, num_splits):
    x = self._data(shape, num_splits)
    bn = norm.SplitBatchNorm(num_splits=num_splits, use_running_average=False)
    variables = _random_variables(1, bn, x)
    y, _ = bn.apply(variables, x, mutable=['batch_stats'])
    scale = np.asarray(variables['params']['scale'])
    bias = np.asarray(variables['params']['bias'])
    expected, _, _ = _np_group_bn(x, num_splits, scale, bias)
    self.assertEqual(y.shape, x.shape)
    self.assertEqual(y.dtype, jnp.float32)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

  def test_running_stats_are_group_averages(self):
    num_splits, momentum = 4, 0.8
    x = self._data((16, 2, 2, 3), num_splits)
    bn = norm.SplitBatchNorm(
        num_splits=num_splits, momentum=momentum, use_running_average=False
    )
    variables = _random_variables(2, bn, x)
    _, updates = bn.apply(variables, x, mutable=['batch_stats'])
    _, means, variances = _np_group_bn(x, num_splits, 1.0, 0.0)
    old = variables['batch_stats']
    np.testing.assert_allclose(
        updates['batch_stats']['mean'],
        momentum * np.asarray(old['mean']) + (1 - momentum) * means.mean(0),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        updates['batch_stats']['var'],
        momentum * np.asarray(old['var'])
        + (1 - momentum) * variances.mean(0),
        rtol=1e-5,
    )

  def test_init_does_not_update_running_stats(self):
    x = self._data((8, 3), 2)
    variables = norm.SplitBatchNorm(num_splits=2).init(
        jax.random.key(0), x, use_running_average=False
    )
    np.testing.assert_array_equal(variables['batch_stats']['mean'], 0.0)
    np.testing.assert_array_equal(variables['batch_stats']['var'], 1.0)
    np.testing.assert_array_equal(variables['params']['scale'], 1.0)
    np.testing.assert_array_equal(variables['params']['bias'], 0.0)

  def test_eval_mode_uses_running_stats_for_every_split(self):
    x = self._data((8, 2, 2, 3), 4)
    variables = _random_variables(
        3,
        norm.SplitBatchNorm(),
        x,
        use_running_average=True,
    )
    p, s = variables['params'], variables['batch_stats']
    expected = (np.asarray(x) - s['mean']) / np.sqrt(
        np.asarray(s['var']) + 1e-5
    ) * p['scale'] + p['bias']
    for num_splits in (1, 4):
      bn = norm.SplitBatchNorm(num_splits=num_splits)
      y = bn.apply(variables, x, use_running_average=True)
      np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
      # Any batch size works in eval mode, even one not divisible by G.
      y3 = bn.apply(variables, x[:3], use_running_average=True)
      np.testing.assert_allclose(y3, expected[:3], rtol=1e-5, atol=1e-5)

  @parameterized.parameters(False, True)
  def test_one_split_equals_flax_batch_norm(self, eval_mode):
    x = self._data((10, 3, 3, 5), 1)
    ours = norm.SplitBatchNorm(num_splits=1, momentum=0.7, epsilon=1e-3)
    theirs = nn.BatchNorm(momentum=0.7, epsilon=1e-3)
    variables = _random_variables(
        4, ours, x, use_running_average=eval_mode
    )
    y, upd = ours.apply(
        variables, x, use_running_average=eval_mode, mutable=['batch_stats']
    )
    y_ref, upd_ref = theirs.apply(
        variables, x, use_running_average=eval_mode, mutable=['batch_stats']
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in ('mean', 'var'):
      np.testing.assert_allclose(
          upd['batch_stats'][name], upd_ref['batch_stats'][name], rtol=1e-5
      )

  def test_gradients_equal_flax_batch_norm_per_group(self):
    num_splits = 3
    x = self._data((9, 2, 2, 4), num_splits)
    bn = norm.SplitBatchNorm(num_splits=num_splits, use_running_average=False)
    ref = nn.BatchNorm(use_running_average=False)
    variables = _random_variables(5, bn, x)
    w = np.random.default_rng(6).normal(size=x.shape).astype(np.float32)

    def loss(params, x):
      y, _ = bn.apply(
          {'params': params, 'batch_stats': variables['batch_stats']},
          x,
          mutable=['batch_stats'],
      )
      return jnp.sum(w * y)

    def ref_loss(params, x):
      ys = [
          ref.apply(
              {'params': params, 'batch_stats': variables['batch_stats']},
              xg,
              mutable=['batch_stats'],
          )[0]
          for xg in jnp.split(x, num_splits)
      ]
      return jnp.sum(w * jnp.concatenate(ys))

    g = jax.jit(jax.grad(loss, (0, 1)))(variables['params'], x)
    g_ref = jax.jit(jax.grad(ref_loss, (0, 1)))(variables['params'], x)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        g,
        g_ref,
    )

  def test_indivisible_batch_raises(self):
    bn = norm.SplitBatchNorm(num_splits=4, use_running_average=False)
    with self.assertRaisesRegex(ValueError, r'batch size 10.*num_splits=4'):
      bn.init(jax.random.key(0), jnp.ones((10, 3)))

  def test_bfloat16_output_float32_stats(self):
    x = self._data((8, 2, 2, 3), 2).astype(jnp.bfloat16)
    bn = norm.SplitBatchNorm(
        num_splits=2, dtype=jnp.bfloat16, use_running_average=False
    )
    variables = bn.init(jax.random.key(0), x)
    y, upd = bn.apply(variables, x, mutable=['batch_stats'])
    self.assertEqual(y.dtype, jnp.bfloat16)
    self.assertEqual(variables['params']['scale'].dtype, jnp.float32)
    self.assertEqual(upd['batch_stats']['var'].dtype, jnp.float32)
    expected, _, _ = _np_group_bn(np.asarray(x, np.float32), 2, 1.0, 0.0)
    np.testing.assert_allclose(
        np.asarray(y, np.float32), expected, rtol=2e-2, atol=2e-2
    )

  @parameterized.parameters(1, 8, 16)
  def test_sharded_jit_equals_single_device(self, num_splits):
    self.assertGreaterEqual(jax.device_count(), 8)
    x = self._data((32, 3, 3, 4), 8)
    bn = norm.SplitBatchNorm(num_splits=num_splits, use_running_average=False)
    variables = _random_variables(7, bn, x)

    def fwd(variables, x):
      return bn.apply(variables, x, mutable=['batch_stats'])

    y, upd = jax.jit(fwd)(variables, x)  # Single device.
    xs = jax.device_put(x, NamedSharding(_mesh(), P('data')))
    ys, upds = jax.jit(fwd)(variables, xs)
    np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), upds, upd
    )
    self.assertTrue(ys.sharding.is_equivalent_to(xs.sharding, ys.ndim))

  def test_per_device_groups_need_no_communication(self):
    # With G a multiple of the device count each group lives on one device:
    # the normalised output needs no collective at all. (Updating the
    # running statistics averages [C] vectors across devices, which is
    # cheap and inherent.) With G = 1 the statistics are global (sync BN),
    # which needs a cross-device reduction.
    x = jax.device_put(
        jnp.ones((32, 3, 3, 4)), NamedSharding(_mesh(), P('data'))
    )

    def collectives(num_splits):
      bn = norm.SplitBatchNorm(
          num_splits=num_splits, use_running_average=False
      )
      variables = bn.init(jax.random.key(0), x)
      fwd = lambda v, x: bn.apply(v, x, mutable=['batch_stats'])[0]
      hlo = jax.jit(fwd).lower(variables, x).compile().as_text()
      return set(_COLLECTIVES.findall(hlo))

    self.assertEmpty(collectives(8))
    self.assertEmpty(collectives(16))
    self.assertNotEmpty(collectives(1))


class ShuffleTest(parameterized.TestCase):

  def test_shuffle_permutes_and_unshuffle_inverts(self):
    x = jnp.arange(24.0).reshape(12, 2)
    xs, perm = norm.shuffle(jax.random.key(0), x)
    self.assertEqual(perm.dtype, jnp.int32)
    np.testing.assert_array_equal(np.sort(perm), np.arange(12))
    self.assertFalse(np.array_equal(perm, np.arange(12)))
    np.testing.assert_array_equal(xs, np.asarray(x)[np.asarray(perm)])
    np.testing.assert_array_equal(norm.unshuffle(xs, perm), x)
    _, perm2 = norm.shuffle(jax.random.key(1), x)
    self.assertFalse(np.array_equal(perm, perm2))

  def test_pytrees(self):
    tree = {'a': jnp.arange(6.0), 'b': jnp.arange(12).reshape(6, 2)}
    shuffled, perm = norm.shuffle(jax.random.key(3), tree)
    p = np.asarray(perm)
    np.testing.assert_array_equal(shuffled['a'], np.arange(6.0)[p])
    np.testing.assert_array_equal(
        shuffled['b'], np.arange(12).reshape(6, 2)[p]
    )
    back = norm.unshuffle(shuffled, perm)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    with self.assertRaisesRegex(ValueError, 'leading batch size'):
      norm.shuffle(jax.random.key(0), {'a': jnp.ones(3), 'b': jnp.ones(4)})

  def test_permutation_alone_is_a_no_op_for_global_bn(self):
    # ALGORITHMS.md §8.2: shuffling only matters with per-group statistics.
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    key = jax.random.key(5)

    @functools.partial(jax.jit, static_argnums=0)
    def shuffled_bn(num_splits):
      bn = norm.SplitBatchNorm(
          num_splits=num_splits, use_running_average=False
      )
      variables = bn.init(jax.random.key(0), x)
      xs, perm = norm.shuffle(key, x)
      y, _ = bn.apply(variables, xs, mutable=['batch_stats'])
      plain, _ = bn.apply(variables, x, mutable=['batch_stats'])
      return norm.unshuffle(y, perm), plain, perm

    y, plain, _ = shuffled_bn(1)
    np.testing.assert_allclose(y, plain, rtol=1e-5, atol=1e-6)
    y, plain, perm = shuffled_bn(4)
    self.assertGreater(float(jnp.max(jnp.abs(y - plain))), 1e-2)
    # Reference: group BN of the permuted batch, rows put back.
    expected, _, _ = _np_group_bn(np.asarray(x)[np.asarray(perm)], 4, 1, 0)
    np.testing.assert_allclose(
        y, expected[np.argsort(np.asarray(perm))], rtol=1e-5, atol=1e-5
    )

  def test_sharded_shuffle_bn_equals_single_device(self):
    x = jnp.asarray(
        np.random.default_rng(0).normal(size=(32, 2, 2, 3)), jnp.float32
    )
    bn = norm.SplitBatchNorm(num_splits=8, use_running_average=False)
    variables = _random_variables(1, bn, x)

    def shuffle_bn(key, variables, x):
      xs, perm = norm.shuffle(key, x)
      y, _ = bn.apply(variables, xs, mutable=['batch_stats'])
      return norm.unshuffle(y, perm)

    key = jax.random.key(2)
    y = jax.jit(shuffle_bn)(key, variables, x)  # Single device.
    xs = jax.device_put(x, NamedSharding(_mesh(), P('data')))
    ys = jax.jit(shuffle_bn)(key, variables, xs)
    np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
