"""Tests for reading real datasets (cifar, imagenet2012, imagenet100)."""

import glob
import io
import os
import shutil
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from hnjax.data import builders
from hnjax.data import imagenet
from hnjax.data import sources
from hnjax.data import testing

_NAMES = (
    tfds.builder('imagenet2012', data_dir='/nonexistent')
    .info.features['label']
    .names
)


class EmbeddedIntegrityTest(parameterized.TestCase):
  """Case 9 of the robustness issue: a damaged prepared file is named and
  the embedded dataset prepares itself again (a flipped byte used to fail
  only when its record was read, steps into a run)."""

  @parameterized.parameters('flip', 'truncate')
  def test_damaged_file_is_named_and_re_prepared(self, damage):
    data_dir = tempfile.mkdtemp()
    clean = sources.get_source('digits', 'train', data_dir=data_dir)
    rows = np.arange(len(clean))
    expected = clean.get_batch(rows)
    directory = builders.prepare('digits', data_dir=data_dir).data_dir
    name = [f for f in os.listdir(directory) if 'train.array_record' in f][0]
    path = os.path.join(directory, name)
    with open(path, 'r+b') as f:
      if damage == 'flip':
        f.seek(os.path.getsize(path) // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
      else:
        f.truncate(os.path.getsize(path) // 2)
    builders._verified.clear()  # pylint: disable=protected-access  # a new process
    with self.assertLogs(level='WARNING') as logs:
      source = sources.get_source('digits', 'train', data_dir=data_dir)
    self.assertTrue(any(path in l and 'preparing digits again' in l
                        for l in logs.output), logs.output)
    for k, v in source.get_batch(rows).items():
      np.testing.assert_array_equal(v, expected[k], err_msg=k)


class DamagedRealDataTest(absltest.TestCase):

  def test_truncated_file_names_the_dataset_directory(self):
    data_dir = tempfile.mkdtemp()
    testing.make_fake_imagenet(data_dir, num_train=8)
    version_dir = os.path.dirname(glob.glob(
        os.path.join(data_dir, 'imagenet2012', '*', '*train.array_record*'))[0])
    path = glob.glob(os.path.join(version_dir, '*train.array_record*'))[0]
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
    source = sources.get_source('imagenet2012', 'train', data_dir=data_dir)
    with self.assertRaises(sources.DataReadError) as cm:
      source.get_batch(np.arange(8))
    self.assertIn(f'from {version_dir} (a damaged or truncated file?)',
                  str(cm.exception))
    self.assertNotIn('\n', str(cm.exception))


class MissingDataTest(parameterized.TestCase):

  @parameterized.parameters(
      'cifar10', 'cifar100', 'imagenet2012', 'imagenet100'
  )
  def test_missing_files_raise_a_clear_error(self, name):
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaises(FileNotFoundError) as cm:
        sources.get_source(name, 'train', data_dir=d)
      msg = str(cm.exception)
      self.assertIn(repr(name), msg)
      self.assertIn(d, msg)
      self.assertIn('tfds build', msg)
      self.assertNotIn('\n', msg)
      self.assertEqual(os.listdir(d), [])  # nothing downloaded or written

  def test_tfrecord_dataset_asks_for_conversion(self):
    # Random access needs ArrayRecord; a dataset prepared as TFRecord (the
    # tfds default) gets a conversion command. TFRecord files cannot be
    # written without TensorFlow, so relabel fake ArrayRecord metadata.
    with tempfile.TemporaryDirectory() as d:
      testing.make_fake_imagenet(d, num_train=2, num_validation=2)
      path = os.path.join(d, 'imagenet2012', '5.1.0', 'dataset_info.json')
      with open(path) as f:
        info = f.read()
      with open(path, 'w') as f:
        f.write(info.replace('"array_record"', '"tfrecord"'))
      with self.assertRaisesRegex(
          ValueError, "'imagenet2012'.*tfrecord.*convert_format"
      ):
        sources.get_source('imagenet2012', 'train', data_dir=d)

  def test_tensorflow_is_not_needed(self):
    self.assertNotIn('tensorflow', sys.modules)


class MockDataTest(absltest.TestCase):
  """``tfds.testing.mock_data`` fakes decoded examples without TensorFlow."""

  def test_cifar10(self):
    with tfds.testing.mock_data(num_examples=12):
      src = sources.get_source('cifar10', 'train', data_dir='/nonexistent')
      info = sources.get_info('cifar10', data_dir='/nonexistent')
      batch = src.get_batch(np.arange(12))
    self.assertLen(src, 12)
    self.assertEqual(batch['image'].shape, (12, 32, 32, 3))
    self.assertEqual(batch['image'].dtype, np.uint8)
    np.testing.assert_array_equal(batch['index'], np.arange(12))
    self.assertTrue(np.all((batch['label'] >= 0) & (batch['label'] < 10)))
    self.assertEqual(info.num_examples, {'train': 12, 'test': 12})
    self.assertEqual(info.num_classes, 10)

  def test_imagenet2012_is_resized_to_load_size(self):
    with tfds.testing.mock_data(num_examples=6):
      src = sources.get_source(
          'imagenet2012', 'validation', data_dir='/nonexistent', load_size=40
      )
      batch = src.get_batch(np.arange(6))
    self.assertEqual(batch['image'].shape, (6, 40, 40, 3))
    self.assertEqual(batch['image'].dtype, np.uint8)


class FakeImagenetTest(parameterized.TestCase):
  """Reads real (fake) ArrayRecord files written like a prepared ImageNet."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.labels = testing.make_fake_imagenet(
        cls.dir, num_train=24, num_validation=8, image_sizes=(24, 90)
    )
    # The original JPEG bytes, read back without decoding.
    raw = tfds.data_source(
        'imagenet2012',
        split='train',
        data_dir=cls.dir,
        decoders={'image': tfds.decode.SkipDecoding()},
    )
    cls.jpegs = [raw[i]['image'] for i in range(len(raw))]

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir)
    super().tearDownClass()

  def test_decoded_and_centre_cropped(self):
    src = sources.get_source(
        'imagenet2012', 'train', data_dir=self.dir, load_size=32
    )
    self.assertLen(src, 24)
    for i in (0, 1, 7):
      ex = src[i]
      self.assertEqual(ex['image'].shape, (32, 32, 3))
      self.assertEqual(ex['label'], self.labels[i])
      # Independent reference: PIL crop of the centre square, then resize.
      img = Image.open(io.BytesIO(self.jpegs[i])).convert('RGB')
      w, h = img.size
      s = min(w, h)
      box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
      ref = np.asarray(img.crop(box).resize((32, 32), Image.BILINEAR))
      diff = np.abs(ex['image'].astype(int) - ref.astype(int))
      # Half-pixel box offsets differ by < 4 levels; squashing instead of
      # cropping, or an off-centre crop, differ by > 20.
      self.assertLess(diff.mean(), 5)

  def test_default_load_size(self):
    src = sources.get_source('imagenet2012', 'validation', data_dir=self.dir)
    self.assertEqual(
        src[0]['image'].shape, (sources.DEFAULT_LOAD_SIZE,) * 2 + (3,)
    )

  def test_imagenet100_default_classes(self):
    src = sources.get_source(
        'imagenet100', 'train', data_dir=self.dir, load_size=16
    )
    cmc_ids = sorted(_NAMES.index(c) for c in imagenet.IMAGENET100_CLASSES)
    kept = [i for i, lab in enumerate(self.labels) if lab in cmc_ids]
    self.assertLen(src, len(kept))
    self.assertNotEmpty(kept)
    batch = src.get_batch(np.arange(len(src)))
    # Relabelled 0..99 in the order of the original (sorted synset) ids.
    expected = [cmc_ids.index(self.labels[i]) for i in kept]
    np.testing.assert_array_equal(batch['label'], expected)
    np.testing.assert_array_equal(batch['index'], np.arange(len(kept)))
    self.assertTrue(
        all(
            f.startswith(_NAMES[self.labels[i]])
            for f, i in zip(batch['file_name'], kept)
        )
    )
    # The label scan was cached, atomically named, in the data dir.
    cached = [
        f
        for f in os.listdir(os.path.join(self.dir, 'hnjax_subsets'))
        if not f.endswith('.lock')
    ]
    self.assertTrue(cached)
    self.assertTrue(all(f.endswith('.npy') and 'tmp' not in f for f in cached))
    with mock.patch.object(
        imagenet, '_scan', side_effect=AssertionError('scanned again')
    ):
      info = sources.get_info(
          'imagenet100', data_dir=self.dir, load_size=16, splits=('train',)
      )
    self.assertEqual(info.num_classes, 100)
    self.assertEqual(info.num_examples['train'], len(kept))
    self.assertEqual(info.image_shape, (16, 16, 3))

  def test_imagenet100_custom_classes(self):
    chosen = [_NAMES[self.labels[1]], _NAMES[self.labels[0]]]  # any order
    src = sources.get_source(
        'imagenet100', 'train', data_dir=self.dir, load_size=16, classes=chosen
    )
    ids = sorted(_NAMES.index(c) for c in chosen)
    kept = [i for i, lab in enumerate(self.labels) if lab in ids]
    labels = src.get_batch(np.arange(len(src)), ('label',))['label']
    np.testing.assert_array_equal(
        labels, [ids.index(self.labels[i]) for i in kept]
    )
    by_id = sources.get_source(
        'imagenet100', 'train', data_dir=self.dir, load_size=16, classes=ids
    )
    self.assertLen(by_id, len(src))

  @parameterized.named_parameters(
      ('unknown_name', dict(classes=['n99999999']), 'n99999999'),
      ('duplicate', dict(classes=['n01440764', 'n01440764']), 'duplicates'),
      (
          'not_imagenet100',
          dict(name='imagenet2012', classes=['n01440764']),
          'imagenet100',
      ),
  )
  def test_bad_classes(self, kwargs, message):
    kwargs = dict(dict(name='imagenet100'), **kwargs)
    with self.assertRaisesRegex(ValueError, message):
      sources.get_source(split='train', data_dir=self.dir, **kwargs)

  def test_decode_and_resize_inputs(self):
    rng = np.random.default_rng(0)
    gray = np.repeat(np.linspace(0, 255, 40), 30).reshape(40, 30, 1)
    out = imagenet.decode_and_resize(gray.astype(np.uint8), 16)
    self.assertEqual(out.shape, (16, 16, 3))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    rgb = rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format='PNG')  # lossless
    np.testing.assert_array_equal(
        imagenet.decode_and_resize(buf.getvalue(), 12),
        imagenet.decode_and_resize(rgb, 12),
    )

  def test_cmc_class_list(self):
    self.assertLen(set(imagenet.IMAGENET100_CLASSES), 100)
    self.assertContainsSubset(imagenet.IMAGENET100_CLASSES, _NAMES)


if __name__ == '__main__':
  absltest.main()
