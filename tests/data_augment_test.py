"""Tests for hnjax.data.augment: MoCo v2 views on device, one key each."""

import colorsys
import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hnjax.data import augment
from hnjax.data import shapes

# Only the transform under test is on; no crop (whole image, same size).
_OFF = dict(
    scale=(1.0, 1.0),
    ratio=(1.0, 1.0),
    flip_prob=0.0,
    jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
)


def _keys(n, seed=0):
  return augment.example_keys(jax.random.key(seed), jnp.arange(n))


def _run(config, images, seed=0):
  images = jnp.asarray(images)
  fn = jax.jit(augment.augment_batch, static_argnums=2)
  return np.asarray(fn(_keys(len(images), seed), images, config))


def _binomial_ok(count, n, p):
  """``count`` within 4.5 standard deviations of a Binomial(n, p) mean."""
  return abs(count - n * p) <= 4.5 * np.sqrt(n * p * (1 - p))


class TwoViewsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = augment.AugmentConfig(
        out_size=16, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3)
    )
    cls.images = shapes.generate(16, seed=1)['image'][:, 4:24, 6:26]  # 20x20
    cls.fn = staticmethod(jax.jit(augment.two_views, static_argnums=2))
    cls.keys = augment.example_keys(jax.random.key(3), jnp.arange(100, 108))
    cls.q, cls.k = (
        np.asarray(v) for v in cls.fn(cls.keys, cls.images[:8], cls.config)
    )

  def test_shape_dtype_range(self):
    for v in (self.q, self.k):
      self.assertEqual(v.shape, (8, 16, 16, 3))
      self.assertEqual(v.dtype, np.float32)
      self.assertTrue(np.all(np.isfinite(v)))
      # Pixels in [0, 1] before normalisation.
      pixels = v * np.array(self.config.std) + np.array(self.config.mean)
      self.assertGreaterEqual(pixels.min(), -1e-5)
      self.assertLessEqual(pixels.max(), 1 + 1e-5)

  def test_views_differ(self):
    for i in range(8):
      self.assertFalse(np.allclose(self.q[i], self.k[i]))
      self.assertFalse(np.allclose(self.q[i], self.q[(i + 1) % 8]))

  def test_example_depends_only_on_its_key_and_image(self):
    # A different batch: shuffled, with other examples in between.
    order = np.array([3, 0, 7, 5])
    other_keys = augment.example_keys(jax.random.key(9), jnp.arange(4))
    keys = jnp.concatenate([self.keys[order], other_keys])
    images = np.concatenate([self.images[order], self.images[8:12]])
    q, k = self.fn(keys, images, self.config)
    np.testing.assert_allclose(q[:4], self.q[order], atol=1e-5)
    np.testing.assert_allclose(k[:4], self.k[order], atol=1e-5)
    # Keys derived the same way are equal: reproducible across runs.
    again = augment.example_keys(jax.random.key(3), jnp.arange(100, 108))
    q2, _ = self.fn(again, self.images[:8], self.config)
    np.testing.assert_array_equal(q2, self.q)

  def test_sharded_over_devices_equals_single_device(self):
    mesh = jax.make_mesh((8,), ('data',))
    shard = NamedSharding(mesh, P('data'))
    keys = jax.device_put(self.keys, shard)
    images = jax.device_put(jnp.asarray(self.images[:8]), shard)
    q, k = self.fn(keys, images, self.config)
    self.assertEqual(q.sharding.spec[0], 'data')  # stays batch-sharded
    np.testing.assert_allclose(q, self.q, atol=1e-5)
    np.testing.assert_allclose(k, self.k, atol=1e-5)

  def test_key_view_from_other_images(self):
    # View k is drawn from images_k with the same randomness as it would
    # be from images: the query view is untouched.
    other = self.images[8:16]
    q, k = self.fn(self.keys, self.images[:8], self.config, None, other)
    np.testing.assert_array_equal(q, self.q)
    _, k_other = self.fn(self.keys, other, self.config)
    np.testing.assert_allclose(k, k_other, atol=1e-6)
    self.assertFalse(np.allclose(k, self.k))
    with self.assertRaisesRegex(ValueError, 'images_k must have the shape'):
      augment.two_views(self.keys, self.images[:8], self.config,
                        images_k=other[:, :10])

  def test_example_keys(self):
    a = augment.example_keys(jax.random.key(0), jnp.array([5, 6, 5]))
    data = jax.random.key_data(a)
    np.testing.assert_array_equal(data[0], data[2])
    self.assertFalse(np.array_equal(data[0], data[1]))
    b = augment.example_keys(jax.random.key(1), jnp.array([5]))
    self.assertFalse(np.array_equal(jax.random.key_data(b)[0], data[0]))

  def test_single_channel_images_stay_single_channel(self):
    config = augment.AugmentConfig(out_size=8, mean=(0.3,), std=(0.4,))
    images = np.random.default_rng(0).integers(
        0, 256, (8, 8, 8, 1), dtype=np.uint8
    )
    q, k = self.fn(self.keys, images, config)
    self.assertEqual(q.shape, (8, 8, 8, 1))
    self.assertTrue(np.all(np.isfinite(k)))


class DistributionTest(absltest.TestCase):

  def test_flip_and_grayscale_rates(self):
    config = augment.AugmentConfig(
        out_size=16, **dict(_OFF, flip_prob=0.5, grayscale_prob=0.2)
    )
    img = shapes.generate(1, seed=4)['image'][0, 8:24, 8:24] / 255.0
    n = 600
    out = _run(config, np.broadcast_to(img, (n,) + img.shape))
    gray = lambda x: np.broadcast_to(  # pylint: disable=g-long-lambda
        (x @ np.array([0.299, 0.587, 0.114]))[..., None], x.shape
    )
    candidates = {
        (False, False): img,
        (True, False): img[:, ::-1],
        (False, True): gray(img),
        (True, True): gray(img[:, ::-1]),
    }
    flips = grays = 0
    for o in out:
      match = [
          c for c, ref in candidates.items() if np.allclose(o, ref, atol=1e-4)
      ]
      self.assertLen(match, 1)
      flips += match[0][0]
      grays += match[0][1]
    self.assertTrue(_binomial_ok(flips, n, 0.5), flips)
    self.assertTrue(_binomial_ok(grays, n, 0.2), grays)

  def test_crop_area_and_ratio(self):
    config = augment.AugmentConfig(
        out_size=16, **dict(_OFF, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    )
    side = 64
    ramp = (np.arange(side) + 0.5) / side
    img = np.zeros((side, side, 3), np.float32)
    img[..., 0] = ramp[None, :]  # x coordinate
    img[..., 1] = ramp[:, None]  # y coordinate
    n = 400
    out = _run(config, np.broadcast_to(img, (n,) + img.shape))
    # Bilinear resampling keeps a ramp linear: the slope between output
    # columns 2 and 13 gives the crop width (rows: the height).
    w = (out[:, 8, 13, 0] - out[:, 8, 2, 0]) * side / 11 * 16
    h = (out[:, 13, 8, 1] - out[:, 2, 8, 1]) * side / 11 * 16
    area = w * h / side**2
    self.assertGreaterEqual(area.min(), 0.2 - 0.01)
    self.assertLessEqual(area.max(), 1 + 0.01)
    self.assertBetween(area.mean(), 0.5, 0.7)
    self.assertGreaterEqual((w / h).min(), 3 / 4 - 0.01)
    self.assertLessEqual((w / h).max(), 4 / 3 + 0.01)
    # Crops are placed all over the image.
    centre_x = out[:, 8, 8, 0]
    self.assertLess(centre_x.min(), 0.3)
    self.assertGreater(centre_x.max(), 0.7)

  def test_brightness_and_hue_jitter(self):
    config = augment.AugmentConfig(
        out_size=8,
        **dict(
            _OFF,
            jitter_prob=0.8,
            brightness=0.4,
            contrast=0.0,
            saturation=0.0,
            hue=0.1,
        ),
    )
    rgb = colorsys.hsv_to_rgb(0.3, 0.8, 0.5)
    n = 400
    out = _run(config, np.broadcast_to(np.float32(rgb), (n, 8, 8, 3)))
    self.assertLess(np.ptp(out, axis=(1, 2)).max(), 1e-5)  # still uniform
    hsv = np.array([colorsys.rgb_to_hsv(*o[0, 0]) for o in out])
    value_ratio = hsv[:, 2] / 0.5
    hue_shift = (hsv[:, 0] - 0.3 + 0.5) % 1.0 - 0.5
    np.testing.assert_allclose(hsv[:, 1], 0.8, atol=1e-4)  # untouched
    changed = np.abs(value_ratio - 1) + np.abs(hue_shift) > 1e-4
    self.assertTrue(_binomial_ok(changed.sum(), n, 0.8), changed.sum())
    self.assertBetween(value_ratio.min(), 0.6 - 1e-4, 0.65)
    self.assertBetween(value_ratio.max(), 1.35, 1.4 + 1e-4)
    self.assertBetween(hue_shift.min(), -0.1 - 1e-4, -0.09)
    self.assertBetween(hue_shift.max(), 0.09, 0.1 + 1e-4)

  def test_blur_rate(self):
    # sigma >= 1 so that every blur visibly changes a checkerboard.
    config = augment.AugmentConfig(
        out_size=32, **dict(_OFF, blur_prob=0.5, blur_sigma=(1.0, 2.0))
    )
    checker = (np.indices((32, 32)).sum(0) % 2).astype(np.float32)
    img = np.repeat(checker[..., None], 3, axis=-1)
    n = 300
    out = _run(config, np.broadcast_to(img, (n, 32, 32, 3)))
    blurred = out.std(axis=(1, 2, 3)) < 0.9 * img.std()
    self.assertTrue(_binomial_ok(blurred.sum(), n, 0.5), blurred.sum())
    unblurred = out[~blurred]
    np.testing.assert_allclose(
        unblurred, np.broadcast_to(img, unblurred.shape), atol=1e-5
    )


class EvalTransformTest(absltest.TestCase):

  def test_centre_crop_without_resampling(self):
    images = np.random.default_rng(0).integers(
        0, 256, (3, 32, 32, 3), dtype=np.uint8
    )
    out = augment.eval_transform(
        images,
        out_size=28,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        crop_fraction=0.875,
    )
    expected = (images[:, 2:30, 2:30] / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(out, expected, atol=1e-5)

  def test_downscale_keeps_a_ramp(self):
    ramp = (np.arange(32) + 0.5) / 32
    img = np.broadcast_to(ramp[None, :, None], (1, 32, 32, 3))
    out = np.asarray(
        augment.eval_transform(
            img.astype(np.float32), out_size=16, mean=(0.0,) * 3, std=(1.0,) * 3
        )
    )
    self.assertEqual(out.shape, (1, 16, 16, 3))
    np.testing.assert_allclose(
        out[0, 5, 1:-1, 0], (np.arange(1, 15) + 0.5) / 16, atol=1e-5
    )


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      ('out_size', 0),
      ('scale', (0.0, 1.0)),
      ('scale', (0.5, 1.5)),
      ('ratio', (2.0, 1.0)),
      ('flip_prob', 1.5),
      ('hue', 0.7),
      ('brightness', -0.1),
      ('blur_sigma', (0.0, 1.0)),
      ('std', (0.0,) * 3),
  )
  def test_bad_config(self, field, value):
    with self.assertRaisesRegex(ValueError, field):
      augment.AugmentConfig(**{field: value})

  def test_bad_inputs(self):
    config = augment.AugmentConfig(out_size=8)
    with self.assertRaisesRegex(ValueError, 'keys'):
      augment.augment_batch(_keys(3), np.zeros((4, 8, 8, 3), np.uint8), config)
    with self.assertRaisesRegex(ValueError, 'images'):
      augment.augment_batch(_keys(4), np.zeros((4, 8, 8, 2), np.uint8), config)
    with self.assertRaisesRegex(ValueError, 'mean'):
      augment.augment_batch(
          _keys(4),
          np.zeros((4, 8, 8, 1), np.uint8),
          dataclasses.replace(config, mean=(0.5, 0.5), std=(1.0, 1.0)),
      )


if __name__ == '__main__':
  absltest.main()
