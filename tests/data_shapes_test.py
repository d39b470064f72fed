"""Tests for the embedded datasets: shapes32, digits, their tfds builders."""

import colorsys
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from hnjax.data import builders
from hnjax.data import digits
from hnjax.data import shapes
from hnjax.data import sources

_HUE = {'red': 0, 'yellow': 55, 'green': 120, 'blue': 225}  # degrees
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hue_distance(rgb, hue_deg):
  """Angular distance in degrees between each pixel's hue and ``hue_deg``."""
  hsv = np.array([colorsys.rgb_to_hsv(*p) for p in rgb.reshape(-1, 3) / 255])
  d = np.abs(hsv[:, 0] * 360 - hue_deg) % 360
  return np.minimum(d, 360 - d).reshape(rgb.shape[:-1]), hsv[:, 1].reshape(
      rgb.shape[:-1]
  )


def _files(data_dir, name):
  return sorted(
      glob.glob(
          os.path.join(data_dir, name, '**', '*array_record*'), recursive=True
      )
  )


class ShapesGenerationTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data = shapes.generate(400, seed=7)

  def test_deterministic_in_seed(self):
    again = shapes.generate(400, seed=7)
    other = shapes.generate(400, seed=8)
    np.testing.assert_array_equal(self.data['image'], again['image'])
    self.assertEqual(self.data['caption'], again['caption'])
    self.assertFalse(np.array_equal(self.data['image'], other['image']))

  def test_alt_image_same_shape_other_background(self):
    img = self.data['image'].astype(float)
    alt = self.data['alt_image'].astype(float)
    self.assertEqual(alt.shape, img.shape)
    yy, xx = np.mgrid[:32, :32] + 0.5
    inside, outside = [], []
    for i in np.flatnonzero(self.data['shape'] == 0)[:40]:  # circles
      d = np.hypot(xx - self.data['x'][i], yy - self.data['y'][i])
      diff = np.abs(img[i] - alt[i]).mean(-1)
      inside.append(np.median(diff[d < self.data['size'][i] - 1]))
      outside.append(np.median(diff[d > self.data['size'][i] + 1]))
    # The shape's pixels differ by the two noises only (sigma <= 0.06);
    # the background is another one.
    self.assertLess(np.median(inside), 12)
    self.assertGreater(np.median(outside), 40)
    # alt_image has its own random stream: image does not depend on it.
    real = shapes._render
    with mock.patch.object(shapes, '_render', lambda rng, f, _: real(
        rng, f, np.random.default_rng(123))):
      other = shapes.generate(400, seed=7)
    np.testing.assert_array_equal(other['image'], self.data['image'])
    self.assertFalse(np.array_equal(other['alt_image'], alt))

  def test_classes_exactly_balanced(self):
    counts = np.bincount(self.data['label'], minlength=shapes.NUM_CLASSES)
    np.testing.assert_array_equal(counts, np.full(20, 20))
    np.testing.assert_array_equal(
        self.data['label'], self.data['shape'] * 4 + self.data['colour']
    )

  def test_types_and_ranges(self):
    self.assertEqual(self.data['image'].shape, (400, 32, 32, 3))
    self.assertEqual(self.data['image'].dtype, np.uint8)
    lo, hi = shapes.SIZE_RANGE
    self.assertTrue(
        np.all((self.data['size'] >= lo) & (self.data['size'] <= hi))
    )
    # The whole shape lies inside the image.
    for c in ('x', 'y'):
      self.assertTrue(np.all(self.data[c] - self.data['size'] >= 0))
      self.assertTrue(np.all(self.data[c] + self.data['size'] <= 32))
    self.assertTrue(np.all(self.data['angle'][self.data['shape'] == 0] == 0))
    self.assertGreater(self.data['image'].std(), 40)  # not blank

  def test_centre_pixel_has_the_class_colour(self):
    hits = 0
    for i in range(100):
      x, y = int(self.data['x'][i]), int(self.data['y'][i])
      colour = shapes.COLOURS[self.data['colour'][i]]
      d, _ = _hue_distance(self.data['image'][i, y, x][None], _HUE[colour])
      hits += d[0] < 25  # +-10 degrees jitter plus pixel noise
    self.assertGreaterEqual(hits, 95)

  def test_size_is_the_drawn_size(self):
    # Area of class-coloured pixels near the centre ~ area of the shape:
    # pi r^2 for circles, 2 r^2 for squares of circumradius r.
    yy, xx = np.mgrid[:32, :32] + 0.5
    ratios = []
    for i in np.flatnonzero(self.data['shape'] <= 1)[:40]:
      r, x, y = (self.data[k][i] for k in ('size', 'x', 'y'))
      colour = shapes.COLOURS[self.data['colour'][i]]
      d, sat = _hue_distance(self.data['image'][i], _HUE[colour])
      near = np.hypot(xx - x, yy - y) <= r + 1
      area = np.sum((d < 25) & (sat > 0.35) & near)
      expected = np.pi * r**2 if self.data['shape'][i] == 0 else 2 * r**2
      ratios.append(area / expected)
    self.assertBetween(np.median(ratios), 0.85, 1.15)

  def test_captions_describe_the_factors(self):
    words = {'small': [], 'medium': [], 'large': []}
    for i, cap in enumerate(self.data['caption']):
      m = re.fullmatch(
          r'a (small|medium|large) (\w+) (\w+)'
          r'(?: rotated (\d+) degrees)? near the ([\w ]+)',
          cap,
      )
      self.assertIsNotNone(m, cap)
      size_word, colour, shape, angle, where = m.groups()
      self.assertEqual(colour, shapes.COLOURS[self.data['colour'][i]])
      self.assertEqual(shape, shapes.SHAPES[self.data['shape'][i]])
      words[size_word].append(self.data['size'][i])
      if shape == 'circle':
        self.assertIsNone(angle)
      else:
        self.assertLessEqual(abs(int(angle) - self.data['angle'][i]), 0.5)
      x, y = self.data['x'][i], self.data['y'][i]
      if 'left' in where:
        self.assertLess(x, 16)
      if 'right' in where:
        self.assertGreater(x, 16)
      if 'top' in where:
        self.assertLess(y, 16)
      if 'bottom' in where:
        self.assertGreater(y, 16)
      if where == 'center':
        self.assertLess(max(abs(x - 16), abs(y - 16)), 8)
    self.assertLess(max(words['small']), min(words['medium']))
    self.assertLess(max(words['medium']), min(words['large']))


class BuildersTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    builders.prepare('shapes32/small', data_dir=cls.dir)
    builders.prepare('digits', data_dir=cls.dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir)
    super().tearDownClass()

  def test_two_preparations_write_identical_files(self):
    with tempfile.TemporaryDirectory() as other:
      builders.prepare('shapes32/small', data_dir=other)
      mine, theirs = (_files(d, 'shapes32') for d in (self.dir, other))
      self.assertLen(mine, 2)  # train and test
      for a, b in zip(mine, theirs):
        self.assertEqual(os.path.basename(a), os.path.basename(b))
        with open(a, 'rb') as fa, open(b, 'rb') as fb:
          self.assertEqual(fa.read(), fb.read())

  def test_prepared_once_then_reused(self):
    with mock.patch.object(shapes.Shapes32, '_generate_examples') as gen:
      builders.prepare('shapes32/small', data_dir=self.dir)
    gen.assert_not_called()

  def test_failed_preparation_leaves_nothing_behind(self):
    def fail(self, split, num_examples):
      del self, split, num_examples
      yield 0, {}
      raise RuntimeError('disk full')

    with tempfile.TemporaryDirectory() as d:
      with mock.patch.object(shapes.Shapes32, '_generate_examples', fail):
        with self.assertRaises(Exception):
          builders.prepare('shapes32/small', data_dir=d)
      self.assertFalse(
          os.path.exists(os.path.join(d, 'shapes32', 'small', '1.0.0'))
      )
      self.assertEmpty(
          glob.glob(os.path.join(d, '**', '*incomplete*'), recursive=True)
      )
      # The next attempt starts afresh and succeeds.
      self.assertLen(
          builders.prepare('shapes32/small', data_dir=d).as_data_source('test'),
          400,
      )

  def test_concurrent_preparations_generate_once(self):
    script = textwrap.dedent(
        """
        import sys
        from hnjax.data import builders, digits
        original = digits.load_split
        def load_split(split):
          print('GENERATING', split, file=sys.stderr, flush=True)
          return original(split)
        digits.load_split = load_split
        b = builders.prepare('digits', data_dir=sys.argv[1])
        print(len(b.as_data_source('train')))
    """
    )
    env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS='cpu')
    with tempfile.TemporaryDirectory() as d:
      procs = [
          subprocess.Popen(
              [sys.executable, '-c', script, d],
              env=env,
              stdout=subprocess.PIPE,
              stderr=subprocess.PIPE,
              text=True,
          )
          for _ in range(2)
      ]
      outs = [p.communicate(timeout=120) for p in procs]
      for p, (out, err) in zip(procs, outs):
        self.assertEqual(p.returncode, 0, err)
        # tfds also prints to stdout; the count is the last line.
        self.assertEqual(out.split()[-1], '1438')
      generated = sum(err.count('GENERATING train') for _, err in outs)
      self.assertEqual(generated, 1)

  def test_digits_split(self):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    ref = datasets.load_digits()
    train, test = digits.load_split('train'), digits.load_split('test')
    both = np.concatenate([train['source_index'], test['source_index']])
    np.testing.assert_array_equal(np.sort(both), np.arange(len(ref.target)))
    for c in range(10):  # stratified: 20% of every class is in test
      in_test = np.sum(test['label'] == c) / np.sum(ref.target == c)
      self.assertBetween(in_test, 0.19, 0.21)
    np.testing.assert_array_equal(
        train['label'], ref.target[train['source_index']]
    )
    expected = np.round(ref.images[test['source_index']] / 16 * 255)
    np.testing.assert_array_equal(test['image'][..., 0], expected)
    src = sources.get_source('digits', 'test', data_dir=self.dir)
    np.testing.assert_array_equal(src[5]['image'], test['image'][5])

  def test_fast_parser_agrees_with_tfds(self):
    for name in ('shapes32/small', 'digits'):
      builder = builders.prepare(name, data_dir=self.dir)
      reference = builder.as_data_source('test')
      src = sources.get_source(name, 'test', data_dir=self.dir, cache=False)
      batch = src.get_batch(np.arange(len(src)))
      for i in range(len(src)):
        for k, v in reference[i].items():
          got = batch[k][i]
          if isinstance(v, bytes):
            self.assertEqual(got, v.decode())
          else:
            np.testing.assert_array_equal(got, v, err_msg=f'{name} {k} {i}')

  def test_source_examples(self):
    src = sources.get_source('shapes32/small', 'train', data_dir=self.dir)
    self.assertLen(src, 2000)
    ex = src[123]
    self.assertEqual(ex['index'], 123)
    self.assertEqual(ex['image'].shape, (32, 32, 3))
    self.assertEqual(ex['image'].dtype, np.uint8)
    self.assertIsInstance(ex['caption'], str)
    self.assertIn(shapes.SHAPES[ex['shape']], ex['caption'])
    self.assertEqual(src[-1]['index'], 1999)
    np.testing.assert_array_equal(
        np.bincount(src.get_batch(np.arange(2000), ('label',))['label']),
        np.full(20, 100),
    )
    uncached = sources.get_source(
        'shapes32/small', 'train', data_dir=self.dir, cache=False
    )
    rows = [5, 1999, 5, 0]
    a, b = src.get_batch(rows), uncached.get_batch(rows)
    self.assertEqual(set(a), set(b))
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    with self.assertRaises(IndexError):
      src.get_batch([2000])

  @parameterized.parameters('shapes32/small', 'digits')
  def test_info_matches_the_data(self, name):
    info = sources.get_info(name, data_dir=self.dir)
    src = sources.get_source(name, 'train', data_dir=self.dir)
    images = src.get_batch(np.arange(len(src)), ('image',))['image'] / 255
    self.assertEqual(info.num_examples['train'], len(src))
    self.assertEqual(info.image_shape, images.shape[1:])
    self.assertEqual(
        info.num_classes, src.get_batch(np.arange(len(src)))['label'].max() + 1
    )
    np.testing.assert_allclose(info.mean, images.mean((0, 1, 2)), atol=0.02)
    np.testing.assert_allclose(info.std, images.std((0, 1, 2)), atol=0.02)

  def test_unknown_dataset(self):
    with self.assertRaisesRegex(ValueError, "'shapes33'.*shapes32"):
      sources.get_source('shapes33', 'train', data_dir=self.dir)
    with self.assertRaisesRegex(ValueError, 'name'):
      builders.prepare('cifar10', data_dir=self.dir)

  def test_default_data_dir_from_environment(self):
    with mock.patch.dict(os.environ, {builders.DATA_DIR_ENV: self.dir}):
      self.assertEqual(builders.default_data_dir(), self.dir)
      self.assertLen(sources.get_source('digits', 'train'), 1438)


if __name__ == '__main__':
  absltest.main()
