"""Tests for hnjax.models.resnet, hnjax.models.convnet and hnjax.models.mlp."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hnjax import models
from hnjax.models import norm
from hnjax.models import resnet


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _np_conv(x, w, stride=1, pad=0):
  """NumPy NHWC / HWIO convolution with PyTorch's symmetric zero padding."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw, _, co = w.shape
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, co))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i : i + stride * (ho - 1) + 1 : stride,
                j : j + stride * (wo - 1) + 1 : stride, :]
      out += patch @ w[i, j]
  return out


def _np_bn(x, p, eps=1e-5):
  """NumPy batch norm with batch statistics over all axes but the last."""
  axes = tuple(range(x.ndim - 1))
  mu, var = x.mean(axes), x.var(axes)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _relu(x):
  return np.maximum(x, 0.0)


def _fill(tree, seed):
  """Random float64 values for a tree of shapes, without JAX's RNG.

  Kernels get N(0, 1 / fan_in); vectors (BN scale and bias, biases, running
  statistics) U(0.5, 1.5), so that variances stay positive. (XLA:CPU takes
  seconds to compile each threefry shape, so tests avoid ``init``'s RNG.)
  """
  rng = np.random.default_rng(seed)

  def one(leaf):
    if len(leaf.shape) > 1:
      fan_in = np.prod(leaf.shape[:-1])
      return rng.normal(0.0, 1.0 / np.sqrt(fan_in), leaf.shape)
    return rng.uniform(0.5, 1.5, leaf.shape)

  return jax.tree.map(one, tree)


def _init(model, seed, x, **kwargs):
  """Randomly filled float32 variables of ``model`` for input like ``x``."""
  shapes = jax.eval_shape(
      functools.partial(model.init, **kwargs), jax.random.key(0), x
  )
  return jax.tree.map(jnp.float32, _fill(shapes, seed))


class ResNetTest(parameterized.TestCase):

  # torchvision totals minus the 1000-way fc (512 * 1000 + 1000 = 513,000
  # for ResNet-18/34; 2048 * 1000 + 1000 = 2,049,000 for ResNet-50):
  # resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032. The CIFAR
  # stem swaps the 7x7x3x64 conv (9408) for a 3x3x3x64 one (1728).
  @parameterized.parameters(
      ('resnet18', 224, 11_689_512 - 513_000, 512),
      ('resnet34', 224, 21_797_672 - 513_000, 512),
      ('resnet50', 224, 25_557_032 - 2_049_000, 2048),
      ('resnet18_cifar', 32, 11_689_512 - 513_000 - 9408 + 1728, 512),
      ('resnet50_cifar', 32, 25_557_032 - 2_049_000 - 9408 + 1728, 2048),
  )
  def test_torchvision_parameter_counts_and_shapes(
      self, name, size, num_params, features
  ):
    model = models.get_model(name)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), x
    )
    self.assertEqual(_count(variables['params']), num_params)
    self.assertEqual(model.num_features, features)
    out = jax.eval_shape(
        functools.partial(model.apply, train=False), variables, x
    )
    self.assertEqual(out.shape, (2, features))
    self.assertEqual(out.dtype, jnp.float32)

  @parameterized.parameters(
      ('cifar', 32, (32, 16, 8, 4)), ('imagenet', 224, (56, 28, 14, 7))
  )
  def test_stage_resolutions(self, stem, size, resolutions):
    model = resnet.ResNet(stage_sizes=(1, 1, 1, 1), width=8, stem=stem)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), x
    )
    _, state = jax.eval_shape(
        functools.partial(
            model.apply, train=False, capture_intermediates=True,
            mutable=['intermediates'],
        ),
        variables,
        x,
    )
    inter = state['intermediates']
    for i, res in enumerate(resolutions):
      (out,) = inter[f'stage{i + 1}_block1']['__call__']
      self.assertEqual(out.shape, (1, res, res, 8 * 2**i))

  def _check_block(self, block_cls, filters, strides, in_channels):
    conv = functools.partial(nn.Conv, use_bias=False)
    bn = functools.partial(norm.SplitBatchNorm, use_running_average=False)
    block = block_cls(filters=filters, conv=conv, norm=bn, strides=strides)
    x = np.random.default_rng(0).normal(size=(4, 6, 6, in_channels))
    variables = _init(block, 1, jnp.asarray(x, jnp.float32))
    y, _ = jax.jit(functools.partial(block.apply, mutable=['batch_stats']))(
        variables, jnp.asarray(x, jnp.float32)
    )
    params = jax.tree.map(np.asarray, variables['params'])
    return np.asarray(y), x, params

  def test_basic_block_matches_numpy(self):
    y, x, p = self._check_block(resnet.BasicBlock, 5, 2, 3)
    h = _relu(_np_bn(_np_conv(x, p['Conv_0']['kernel'], 2, 1),
                     p['SplitBatchNorm_0']))
    h = _np_bn(_np_conv(h, p['Conv_1']['kernel'], 1, 1),
               p['SplitBatchNorm_1'])
    short = _np_bn(_np_conv(x, p['proj_conv']['kernel'], 2, 0),
                   p['proj_norm'])
    self.assertEqual(y.shape, (4, 3, 3, 5))
    np.testing.assert_allclose(y, _relu(h + short), rtol=1e-4, atol=1e-4)

  def test_basic_block_identity_shortcut(self):
    y, x, p = self._check_block(resnet.BasicBlock, 3, 1, 3)
    self.assertNotIn('proj_conv', p)
    h = _relu(_np_bn(_np_conv(x, p['Conv_0']['kernel'], 1, 1),
                     p['SplitBatchNorm_0']))
    h = _np_bn(_np_conv(h, p['Conv_1']['kernel'], 1, 1),
               p['SplitBatchNorm_1'])
    np.testing.assert_allclose(y, _relu(h + x), rtol=1e-4, atol=1e-4)

  def test_bottleneck_matches_numpy(self):
    y, x, p = self._check_block(resnet.Bottleneck, 2, 2, 3)
    h = _relu(_np_bn(_np_conv(x, p['Conv_0']['kernel']),
                     p['SplitBatchNorm_0']))
    # torchvision v1.5: the stride sits on the 3x3 convolution.
    h = _relu(_np_bn(_np_conv(h, p['Conv_1']['kernel'], 2, 1),
                     p['SplitBatchNorm_1']))
    h = _np_bn(_np_conv(h, p['Conv_2']['kernel']), p['SplitBatchNorm_2'])
    short = _np_bn(_np_conv(x, p['proj_conv']['kernel'], 2, 0),
                   p['proj_norm'])
    self.assertEqual(y.shape, (4, 3, 3, 8))
    np.testing.assert_allclose(y, _relu(h + short), rtol=1e-4, atol=1e-4)

  def test_zero_init_residual(self):
    # Zero conv kernels keep init free of random-number kernels.
    conv = functools.partial(
        nn.Conv, use_bias=False, kernel_init=nn.initializers.zeros
    )
    for block_cls, last in ((resnet.BasicBlock, 'SplitBatchNorm_1'),
                            (resnet.Bottleneck, 'SplitBatchNorm_2')):
      block = block_cls(
          filters=4,
          conv=conv,
          norm=functools.partial(
              norm.SplitBatchNorm, use_running_average=True
          ),
          strides=2,
          zero_init_residual=True,
      )
      variables = jax.jit(block.init)(
          jax.random.key(0), jnp.ones((2, 4, 4, 3))
      )
      p = variables['params']
      np.testing.assert_array_equal(p[last]['scale'], 0.0)
      np.testing.assert_array_equal(p['SplitBatchNorm_0']['scale'], 1.0)
      np.testing.assert_array_equal(p['proj_norm']['scale'], 1.0)

  def test_tiny_resnet_train_and_eval(self):
    model = resnet.ResNet(
        stage_sizes=(1, 1), block='bottleneck', width=4, stem='imagenet',
        bn_splits=2,
    )
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)),
                    jnp.float32)
    variables = _init(model, 2, x, train=False)
    self.assertEqual(model.num_features, 32)

    @jax.jit
    def run(variables, x):
      y, upd = model.apply(variables, x, train=True, mutable=['batch_stats'])
      return y, upd, model.apply(variables, x, train=False)

    y_train, upd, y_eval = run(variables, x)
    self.assertEqual(y_train.shape, (4, 32))
    self.assertTrue(np.all(np.isfinite(y_train)))
    # Train mode normalises with batch statistics, eval mode with running
    # ones: the two differ, and the running statistics moved.
    self.assertGreater(float(jnp.abs(y_train - y_eval).max()), 1e-3)
    old = variables['batch_stats']['stem_norm']['mean']
    self.assertGreater(
        float(jnp.abs(upd['batch_stats']['stem_norm']['mean'] - old).max()),
        0.0,
    )
    # Evaluation is per example: one example alone gives the same features.
    y_one = jax.jit(functools.partial(model.apply, train=False))(
        variables, x[:1]
    )
    np.testing.assert_allclose(y_one, y_eval[:1], rtol=1e-5, atol=1e-6)

  def test_bfloat16_compute_float32_params(self):
    kw = dict(stage_sizes=(1, 1), width=4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)),
                    jnp.float32)
    m32 = resnet.ResNet(**kw)
    m16 = resnet.ResNet(**kw, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(
        functools.partial(m16.init, train=False), jax.random.key(0), x
    )
    jax.tree.map(lambda l: self.assertEqual(l.dtype, jnp.float32), shapes)
    variables = _init(m32, 3, x, train=False)
    y16 = jax.jit(functools.partial(m16.apply, train=False))(variables, x)
    y32 = jax.jit(functools.partial(m32.apply, train=False))(variables, x)
    self.assertEqual(y16.dtype, jnp.float32)
    np.testing.assert_allclose(y16, y32, rtol=5e-2, atol=5e-2)

  @parameterized.parameters(dict(block='wide'), dict(stem='tiny'))
  def test_unknown_options_raise(self, **kw):
    model = resnet.ResNet(stage_sizes=(1,), width=4, **kw)
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    with self.assertRaisesRegex(ValueError, 'known'):
      jax.eval_shape(
          functools.partial(model.init, train=False), jax.random.key(0), x
      )


class ConvNetTest(parameterized.TestCase):

  def test_parameter_count_and_shapes(self):
    model = models.get_model('convnet')
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), x
    )
    # 3x3 convs 3→16→32→64→128 without bias, plus BN scale and bias.
    convs = 9 * (3 * 16 + 16 * 32 + 32 * 64 + 64 * 128)
    self.assertEqual(
        _count(variables['params']), convs + 2 * (16 + 32 + 64 + 128)
    )
    self.assertEqual(model.num_features, 128)
    for size in (32, 8):
      out = jax.eval_shape(
          functools.partial(model.apply, train=True, mutable=['batch_stats']),
          variables,
          jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32),
      )[0]
      self.assertEqual(out.shape, (2, 128))
      self.assertEqual(out.dtype, jnp.float32)

  @parameterized.parameters(1, 2)
  def test_matches_numpy(self, bn_splits):
    model = models.get_model(
        'convnet', widths=(4, 6), strides=(2, 1), bn_splits=bn_splits
    )
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3))
    variables = _init(model, 4, jnp.ones((1, 8, 8, 3)), train=False)
    y, _ = jax.jit(
        functools.partial(model.apply, train=True, mutable=['batch_stats'])
    )(variables, jnp.asarray(x, jnp.float32))
    p = jax.tree.map(np.asarray, variables['params'])

    def reference(x):
      h = _relu(_np_bn(_np_conv(x, p['Conv_0']['kernel'], 2, 1),
                       p['SplitBatchNorm_0']))
      h = _relu(_np_bn(_np_conv(h, p['Conv_1']['kernel'], 1, 1),
                       p['SplitBatchNorm_1']))
      return h.mean((1, 2))

    # Each group of the batch is normalised on its own.
    expected = np.concatenate([reference(xg) for xg in np.split(x, bn_splits)])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    if bn_splits > 1:
      with self.assertRaisesRegex(ValueError, 'num_splits=2'):
        model.apply(variables, x[:3], train=True, mutable=['batch_stats'])

  def test_mismatched_lengths_raise(self):
    model = models.ConvNet(widths=(4, 8), strides=(2,))
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    with self.assertRaisesRegex(ValueError, 'same length'):
      jax.eval_shape(
          functools.partial(model.init, train=False), jax.random.key(0), x
      )


class MLPTest(absltest.TestCase):

  def test_matches_numpy(self):
    model = models.get_model('mlp', widths=(6, 4))
    x = np.random.default_rng(3).normal(size=(10, 5)).astype(np.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    out, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    p = variables['params']
    h = x
    for i in range(2):
      h = h @ np.asarray(p[f'Dense_{i}']['kernel'])
      h = np.maximum(_np_bn(h, p[f'SplitBatchNorm_{i}']), 0)
    np.testing.assert_allclose(out, h, atol=1e-5)
    self.assertEqual(model.num_features, 4)
    enc = models.create_encoder('mlp', head='mlp_bn', dim=3)
    out = enc.apply(enc.init(jax.random.key(0), x, train=False), x,
                    train=False)
    self.assertEqual(out['projection'].shape, (10, 3))
    with self.assertRaisesRegex(ValueError, r'MLP expects \[B, F\]'):
      model.init(jax.random.key(0), x[:, :, None], train=False)


if __name__ == '__main__':
  absltest.main()
