"""Datasets with continuous targets: splits, targets, folders and errors."""

import csv
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from hnjax.data import augment
from hnjax.data import regression
from hnjax.data import sources


class EmbeddedTest(absltest.TestCase):

  def test_shapes32_splits_and_long_tail(self):
    d = regression.open_regression('shapes32/small', long_tail=5.0)
    base = sources.get_source('shapes32/small', 'train')
    self.assertEqual(len(d.splits['val']), 200)  # the last 10% of train
    self.assertEqual(len(d.splits['test']), 400)
    y = d.splits['train'].targets()
    # The long tail: large shapes are rare in train, not in validation.
    lo, hi = y.min(), y.max()
    mid = (lo + hi) / 2
    self.assertGreater(np.sum(y < mid), 3 * np.sum(y >= mid))
    v = d.splits['val'].targets()
    self.assertLess(abs(np.mean(v < mid) - 0.5), 0.1)
    # Targets are the examples' sizes; index is the position in the split.
    b = d.splits['val'].get_batch(np.array([0, 5]), ('image', 'target',
                                                     'index'))
    ref = base.get_batch(np.array([1800, 1805]), ('size', 'image'))
    np.testing.assert_array_equal(b['target'], ref['size'])
    np.testing.assert_array_equal(b['image'], ref['image'])
    np.testing.assert_array_equal(b['index'], [0, 5])
    # Same tail for every run (seeded apart from the run's seed).
    again = regression.open_regression('shapes32/small', long_tail=5.0)
    np.testing.assert_array_equal(again.splits['train'].targets(), y)
    full = regression.open_regression('shapes32/small', long_tail=0.0)
    self.assertLen(full.splits['train'], 1800)

  def test_diabetes(self):
    d = regression.open_regression('diabetes')
    self.assertEqual({k: len(v) for k, v in d.splits.items()},
                     {'train': 265, 'val': 88, 'test': 89})
    self.assertEqual((d.input, d.input_shape), ('features', (10,)))
    rows = [d.splits[s]._base.get_batch(np.arange(len(d.splits[s])),
                                        ('source_index',))['source_index']
            for s in ('train', 'val', 'test')]
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)),
                                  np.arange(442))
    y = d.splits['train'].targets()
    self.assertBetween(y.min(), 25, 346)

  def test_unknown_names(self):
    with self.assertRaisesRegex(ValueError, "data.name='digits': not a "
                                'regression dataset'):
      regression.open_regression('digits')
    with self.assertRaisesRegex(ValueError, "data.target='colour'"):
      regression.open_regression('shapes32', target='colour')


class TfdsTest(parameterized.TestCase):

  @parameterized.parameters(('dsprites', 'x_position', 1),
                            ('shapes3d', 'scale', 3))
  def test_tfds_latents(self, name, target, channels):
    with tfds.testing.mock_data(num_examples=12):
      d = regression.open_regression(name, target=target,
                                     data_dir='/nonexistent')
      b = d.splits['train'].get_batch(np.arange(4), ('image', 'target'))
      base = sources.open_tfds(name, 'train[:80%]', data_dir='/nonexistent')
      np.testing.assert_array_equal(
          b['target'], base.get_batch(np.arange(4),
                                      (f'value_{target}',))[f'value_{target}'])
    self.assertEqual(b['image'].shape, (4, 64, 64, channels))
    self.assertEqual(d.input_shape, (64, 64, channels))

  def test_missing_tfds_dataset_names_the_dir(self):
    with self.assertRaisesRegex(FileNotFoundError, "'shapes3d'.*no_data"):
      regression.open_regression('shapes3d', data_dir='/tmp/no_data')


class FolderTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = self.enter_context(tempfile.TemporaryDirectory())
    os.makedirs(os.path.join(self.root, 'AgeDB'))
    rng = np.random.default_rng(0)
    self.rows = []
    for i, split in enumerate(['train'] * 4 + ['val'] * 2 + ['test'] * 2):
      path = f'AgeDB/{i}_face_{20 + i}.jpg'
      Image.fromarray(rng.integers(0, 255, (40, 30, 3), np.uint8)).save(
          os.path.join(self.root, path))
      self.rows.append({'age': str(20 + i), 'path': path, 'split': split})

  def write(self, rows, name='agedb.csv'):
    with open(os.path.join(self.root, name), 'w', newline='') as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
    return os.path.join(self.root, name)

  def test_agedb_layout(self):
    self.write(self.rows)
    d = regression.open_regression('agedb', data_dir=self.root, load_size=16)
    self.assertEqual({k: len(v) for k, v in d.splits.items()},
                     {'train': 4, 'val': 2, 'test': 2})
    b = d.splits['test'].get_batch(np.array([1]), ('image', 'target', 'index'))
    self.assertEqual(b['image'].shape, (1, 16, 16, 3))
    self.assertEqual(b['image'].dtype, np.uint8)
    np.testing.assert_array_equal(b['target'], [27.0])
    self.assertEqual((d.mean, d.bin_width), ((0.5,) * 3, 1.0))

  def test_folder_with_any_target_column(self):
    rows = [dict(r, score=str(float(r['age']) / 10)) for r in self.rows]
    path = self.write(rows, 'mine.csv')
    d = regression.open_regression('folder', csv_path=path, target='score',
                                   load_size=8)
    np.testing.assert_allclose(d.splits['train'].targets(), [2.0, 2.1, 2.2,
                                                             2.3])

  def test_errors_name_the_file_and_row(self):
    # (row index, replacement, error, message); CSV line = index + 2.
    cases = [
        (2, dict(path='AgeDB/missing.jpg'), FileNotFoundError,
         r'agedb.csv, row 4: image .*missing.jpg not found'),
        (1, dict(age='nan'), ValueError,
         r"agedb.csv, row 3: age='nan' is not a finite number"),
        (0, dict(age='twenty'), ValueError,
         r"agedb.csv, row 2: age='twenty' is not a finite number"),
    ]
    for i, change, error, message in cases:
      rows = list(self.rows)
      rows[i] = dict(rows[i], **change)
      self.write(rows)
      with self.assertRaisesRegex(error, message):
        regression.open_regression('agedb', data_dir=self.root)
    self.write([r for r in self.rows if r['split'] != 'val'])
    with self.assertRaisesRegex(ValueError, "no rows with split='val'"):
      regression.open_regression('agedb', data_dir=self.root)
    self.write([{'age': r['age'], 'file': r['path'], 'split': r['split']}
                for r in self.rows])
    with self.assertRaisesRegex(ValueError, r"missing column\(s\) \['path'\]"):
      regression.open_regression('agedb', data_dir=self.root)
    with self.assertRaisesRegex(FileNotFoundError, 'imdb_wiki.csv: CSV file '
                                'not found'):
      regression.open_regression('imdb_wiki', data_dir=self.root)
    with self.assertRaisesRegex(ValueError, 'the folder dataset needs a CSV'):
      regression.open_regression('folder')


class TabularViewsTest(absltest.TestCase):

  def test_noise_dropout_and_keys(self):
    x = np.tile(np.arange(8.0, dtype=np.float32), (2000, 1))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(
        np.arange(2000))
    mean, std = np.arange(8.0), np.full(8, 2.0)
    v0, v1 = augment.tabular_views(keys, x, mean=mean, std=std, noise=0.1,
                                   dropout=0.25)
    v0, v1 = np.asarray(v0), np.asarray(v1)
    self.assertAlmostEqual(np.mean(v0 == 0), 0.25, delta=0.015)
    kept = v0[v0 != 0]  # standardised value 0 plus noise
    self.assertAlmostEqual(kept.std(), 0.1, delta=0.01)
    self.assertFalse(np.array_equal(v0, v1))
    again, _ = augment.tabular_views(keys, x, mean=mean, std=std, noise=0.1,
                                     dropout=0.25)
    np.testing.assert_array_equal(v0, again)
    np.testing.assert_allclose(augment.standardize(x[:1], mean=mean, std=std),
                               np.zeros((1, 8)))


if __name__ == '__main__':
  absltest.main()
