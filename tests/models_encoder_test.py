"""Tests for hnjax.models heads, Encoder and the model registry."""

import functools
import os

# For `python tests/models_encoder_test.py`; under pytest conftest.py does it.
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')

# pylint: disable=g-import-not-at-top
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from hnjax import models
from hnjax.models import heads
# pylint: enable=g-import-not-at-top


def _init(model, seed, x, **kwargs):
  """Random float32 variables for input like ``x``, without JAX's RNG.

  Matrices get N(0, 1 / fan_in), vectors U(0.5, 1.5) (positive variances).
  XLA:CPU takes seconds to compile each threefry shape, hence NumPy.
  """
  shapes = jax.eval_shape(
      functools.partial(model.init, **kwargs), jax.random.key(0), x
  )
  rng = np.random.default_rng(seed)

  def one(leaf):
    if len(leaf.shape) > 1:
      std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)
    return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)

  return jax.tree.map(one, shapes)


def _np_bn(x, p, eps=1e-5):
  return (x - x.mean(0)) / np.sqrt(x.var(0) + eps) * p['scale'] + p['bias']


def _relu(x):
  return np.maximum(x, 0.0)


def _features(batch=8, dim=6, seed=0):
  x = np.random.default_rng(seed).normal(size=(batch, dim))
  return x, jnp.asarray(x, jnp.float32)


class HeadsTest(parameterized.TestCase):

  def test_mlp_head_matches_numpy(self):
    x, xj = _features()
    head = heads.get_head('mlp', dim=3, hidden=5)
    variables = _init(head, 0, xj, train=False)
    self.assertNotIn('batch_stats', variables)  # MoCo v2: no BN in the head.
    y = head.apply(variables, xj, train=True)
    p = jax.tree.map(np.asarray, variables['params'])
    h = _relu(x @ p['fc1']['kernel'] + p['fc1']['bias'])
    expected = h @ p['fc2']['kernel'] + p['fc2']['bias']
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(1, 2)
  def test_mlp_bn_head_matches_numpy(self, bn_splits):
    x, xj = _features()
    head = heads.get_head('mlp_bn', dim=3, hidden=5, bn_splits=bn_splits)
    variables = _init(head, 1, xj, train=False)
    y, upd = head.apply(variables, xj, train=True, mutable=['batch_stats'])
    self.assertEqual(set(upd['batch_stats']), {'bn1', 'bn2'})
    p = jax.tree.map(np.asarray, variables['params'])

    def reference(x):  # SupReMix: Linear → BN → ReLU → Linear → BN.
      h = _relu(_np_bn(x @ p['fc1']['kernel'] + p['fc1']['bias'], p['bn1']))
      return _np_bn(h @ p['fc2']['kernel'] + p['fc2']['bias'], p['bn2'])

    expected = np.concatenate([reference(g) for g in np.split(x, bn_splits)])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    # Evaluation uses the running statistics.
    s = jax.tree.map(np.asarray, variables['batch_stats'])
    h = x @ p['fc1']['kernel'] + p['fc1']['bias']
    h = _relu((h - s['bn1']['mean']) / np.sqrt(s['bn1']['var'] + 1e-5)
              * p['bn1']['scale'] + p['bn1']['bias'])
    h = h @ p['fc2']['kernel'] + p['fc2']['bias']
    expected = ((h - s['bn2']['mean']) / np.sqrt(s['bn2']['var'] + 1e-5)
                * p['bn2']['scale'] + p['bn2']['bias'])
    np.testing.assert_allclose(
        head.apply(variables, xj, train=False), expected, rtol=1e-4,
        atol=1e-4,
    )

  def test_linear_and_identity_heads(self):
    x, xj = _features()
    head = heads.get_head('linear', dim=4)
    variables = _init(head, 2, xj, train=False)
    p = variables['params']['fc']
    np.testing.assert_allclose(
        head.apply(variables, xj, train=False),
        x @ np.asarray(p['kernel']) + np.asarray(p['bias']),
        rtol=1e-5,
        atol=1e-5,
    )
    ident = heads.get_head('identity', dim=4)
    np.testing.assert_array_equal(ident.apply({}, xj, train=True), xj)

  def test_unknown_head(self):
    with self.assertRaisesRegex(ValueError, r"'mlp3'.*'mlp'.*'mlp_bn'"):
      heads.get_head('mlp3')
    with self.assertRaisesRegex(ValueError, 'mlp3'):
      models.create_encoder('convnet', head='mlp3')


class EncoderTest(parameterized.TestCase):

  def _tiny(self, **kwargs):
    return models.create_encoder(
        'convnet', widths=(4, 8), strides=(2, 2), **kwargs
    )

  def test_outputs_and_variable_layout(self):
    enc = self._tiny(dim=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)),
                    jnp.float32)
    variables = _init(enc, 0, x, train=False)
    self.assertEqual(set(variables['params']), {'backbone', 'head'})
    # hidden defaults to the feature size F = 8.
    self.assertEqual(variables['params']['head']['fc1']['kernel'].shape,
                     (8, 8))
    out, _ = jax.jit(
        functools.partial(enc.apply, train=True, mutable=['batch_stats'])
    )(variables, x)
    self.assertEqual(set(out), {'features', 'projection'})
    self.assertEqual(out['features'].shape, (4, 8))
    self.assertEqual(out['projection'].shape, (4, 3))
    # The projection is the head applied to the features, not normalised.
    proj = enc.head.apply(
        {'params': variables['params']['head']}, out['features'], train=True
    )
    np.testing.assert_allclose(out['projection'], proj, rtol=1e-5, atol=1e-6)
    norms = np.linalg.norm(out['projection'], axis=-1)
    self.assertFalse(np.allclose(norms, 1.0))

  def test_hidden_and_head_options(self):
    enc = self._tiny(head='mlp_bn', dim=5, hidden=7, bn_splits=2)
    x = jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32)
    shapes = jax.eval_shape(
        functools.partial(enc.init, train=False), jax.random.key(0), x
    )
    self.assertEqual(shapes['params']['head']['fc1']['kernel'].shape, (8, 7))
    self.assertEqual(shapes['params']['head']['fc2']['kernel'].shape, (7, 5))
    self.assertIn('bn2', shapes['batch_stats']['head'])
    # bn_splits reaches every norm layer: a batch of 3 cannot be split in 2.
    with self.assertRaisesRegex(ValueError, r'batch size 3.*num_splits=2'):
      jax.eval_shape(
          functools.partial(enc.apply, train=True, mutable=['batch_stats']),
          shapes,
          jax.ShapeDtypeStruct((3, 8, 8, 3), jnp.float32),
      )

  def test_bfloat16(self):
    enc = self._tiny(dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    shapes = jax.eval_shape(
        functools.partial(enc.init, train=False), jax.random.key(0), x
    )
    jax.tree.map(lambda l: self.assertEqual(l.dtype, jnp.float32), shapes)
    out = jax.eval_shape(
        functools.partial(enc.apply, train=False), shapes, x
    )
    self.assertEqual(out['projection'].dtype, jnp.float32)
    self.assertEqual(out['features'].dtype, jnp.float32)

  def test_moco_v2_resnet50_head_size(self):
    enc = models.create_encoder('resnet50')
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(
        functools.partial(enc.init, train=False), jax.random.key(0), x
    )
    count = sum(
        int(np.prod(l.shape)) for l in jax.tree.leaves(shapes['params'])
    )
    # ResNet-50 without fc + Linear(2048, 2048) + Linear(2048, 128).
    self.assertEqual(
        count, 23_508_032 + 2048 * 2048 + 2048 + 2048 * 128 + 128
    )

  def test_registry(self):
    for name in ('convnet', 'resnet18_cifar', 'resnet50_cifar', 'resnet50'):
      self.assertIn(name, models.backbone_names())
    self.assertEqual(models.get_model('resnet50').num_features, 2048)
    self.assertEqual(
        models.get_model('resnet18_cifar', width=16).num_features, 128
    )
    with self.assertRaisesRegex(
        ValueError, r"'resnet51'.*'convnet'.*'resnet18_cifar'"
    ):
      models.get_model('resnet51')
    with self.assertRaisesRegex(ValueError, 'resnet51'):
      models.create_encoder('resnet51')

  def test_sharded_shuffle_bn_key_encoder_equals_single_device(self):
    # The MoCo key path: shuffle, encode with per-device (split) BN,
    # unshuffle. On 8 devices under jit it must equal the single-device run.
    enc = self._tiny(bn_splits=8, dim=3)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 8, 8, 3)),
                    jnp.float32)
    variables = _init(enc, 3, x, train=False)

    def keys(key, variables, x):
      xs, perm = models.shuffle(key, x)
      out, upd = enc.apply(variables, xs, train=True, mutable=['batch_stats'])
      return models.unshuffle(out, perm), upd

    key = jax.random.key(4)
    out, upd = jax.jit(keys)(key, variables, x)  # Single device.
    mesh = jax.make_mesh(
        (8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,)
    )
    xs = jax.device_put(x, NamedSharding(mesh, P('data')))
    out_s, upd_s = jax.jit(keys)(key, variables, xs)
    close = functools.partial(
        np.testing.assert_allclose, rtol=1e-5, atol=1e-5
    )
    jax.tree.map(close, out_s, out)
    jax.tree.map(close, upd_s, upd)


if __name__ == '__main__':
  absltest.main()
