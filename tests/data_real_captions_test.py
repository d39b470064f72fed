"""Real caption datasets (fake Flickr30k and COCO on disk) and the BPE."""

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from hnjax.data import builders
from hnjax.data import real_captions
from hnjax.data import sources
from hnjax.data import subword
from hnjax.data import tfds_base

_COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40),
            (40, 220, 220), (128, 128, 128))


def _write_flickr(root, splits=('train', 'train', 'val', 'test', 'test',
                                'train')):
  """A fake Flickr30k folder: one solid-colour PNG per entry, 5 captions."""
  os.makedirs(os.path.join(root, real_captions.FLICKR30K_IMAGES))
  images = []
  for i, split in enumerate(splits):
    filename = f'{1000 + i}.png'
    # Varied sizes and one greyscale image: all come back [S, S, 3].
    mode, colour = ('L', 128) if i == 5 else ('RGB', _COLOURS[i])
    Image.new(mode, (20 + 4 * i, 30 - 2 * i), colour).save(
        os.path.join(root, real_captions.FLICKR30K_IMAGES, filename))
    images.append({'filename': filename, 'split': split,
                   'sentences': [{'raw': f'Image {i}, caption {j}.'}
                                 for j in range(5)]})
  _write_json(root, images)
  return images


def _write_json(root, images):
  with open(os.path.join(root, real_captions.FLICKR30K_JSON), 'w') as f:
    json.dump({'images': images}, f)


class Flickr30kTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = self.enter_context(tempfile.TemporaryDirectory())
    self.images = _write_flickr(self.root)

  def open(self, split, image_size=8):
    return real_captions.open_flickr30k(split, data_dir=self.root,
                                        image_size=image_size)

  def test_splits_images_and_captions(self):
    for split, ids in (('train', [0, 1, 5]), ('val', [2]), ('test', [3, 4])):
      d = self.open(split)
      self.assertEqual(d.name, f'flickr30k/{split}')
      self.assertLen(d, len(ids))
      self.assertEqual(d.captions, [[f'Image {i}, caption {j}.'
                                     for j in range(5)] for i in ids])
      b = d.get_batch(np.arange(len(ids)))
      self.assertEqual(b['image'].shape, (len(ids), 8, 8, 3))
      self.assertEqual(b['image'].dtype, np.uint8)
      np.testing.assert_array_equal(b['index'], np.arange(len(ids)))
      self.assertEqual(b['index'].dtype, np.int64)
      for img, i in zip(b['image'], ids):  # solid colours survive resizing
        want = (128,) * 3 if i == 5 else _COLOURS[i]
        np.testing.assert_allclose(img.reshape(-1, 3).mean(0), want, atol=2)
    d = self.open('train', image_size=5)
    b = d.get_batch([2, 0], fields=('index',))
    self.assertEqual(list(b), ['index'])
    np.testing.assert_array_equal(b['index'], [2, 0])
    self.assertEqual(d.get_batch([1], ('image',))['image'].shape,
                     (1, 5, 5, 3))

  def test_caption_protocols(self):
    d = self.open('train')
    d.captions[1] = d.captions[1][:3]  # a ragged image
    texts, t2i = real_captions.caption_protocol(d, 'first')
    self.assertEqual(texts, ['Image 0, caption 0.', 'Image 1, caption 0.',
                             'Image 5, caption 0.'])
    np.testing.assert_array_equal(t2i, [0, 1, 2])
    self.assertEqual(t2i.dtype, np.int64)
    texts, t2i = real_captions.caption_protocol(d, 'all')
    self.assertLen(texts, 13)
    self.assertEqual(texts[5:8], [f'Image 1, caption {j}.' for j in range(3)])
    np.testing.assert_array_equal(t2i, [0] * 5 + [1] * 3 + [2] * 5)
    self.assertEqual(t2i.dtype, np.int64)
    with self.assertRaisesRegex(ValueError, "unknown caption protocol 'one'"):
      real_captions.caption_protocol(d, 'one')

  def test_default_data_dir(self):
    parent = self.enter_context(tempfile.TemporaryDirectory())
    shutil.copytree(self.root, os.path.join(parent, 'flickr30k'))
    with mock.patch.dict(os.environ, {builders.DATA_DIR_ENV: parent}):
      d = real_captions.open_flickr30k('val', data_dir=None, image_size=4)
    self.assertLen(d, 1)

  def test_missing_files(self):
    json_path = os.path.join(self.root, real_captions.FLICKR30K_JSON)
    folder = os.path.join(self.root, real_captions.FLICKR30K_IMAGES)
    missing = os.path.join(folder, '1003.png')
    os.remove(missing)
    with self.assertRaisesRegex(FileNotFoundError,
                                f'{missing} .*split \'test\'.* missing'):
      self.open('test')
    self.assertLen(self.open('train'), 3)  # other splits are complete
    shutil.rmtree(folder)
    with self.assertRaisesRegex(FileNotFoundError, f'no image folder {folder}'):
      self.open('train')
    os.remove(json_path)
    with self.assertRaisesRegex(FileNotFoundError,
                                f'no {json_path}; .*caption_datasets.zip'):
      self.open('train')

  def test_bad_entries(self):
    json_path = os.path.join(self.root, real_captions.FLICKR30K_JSON)
    with self.assertRaisesRegex(ValueError, "unknown Flickr30k split 'dev'"):
      self.open('dev')
    _write_json(self.root, [x for x in self.images if x['split'] != 'val'])
    with self.assertRaisesRegex(ValueError,
                                f"{json_path}: split 'val' has no images"):
      self.open('val')
    self.images[4]['sentences'] = []
    _write_json(self.root, self.images)
    with self.assertRaisesRegex(
        ValueError, rf"{json_path}: images\[4\] \('1004.png'.* no captions"):
      self.open('test')
    self.images[4]['sentences'] = [{'raw': 'ok'}, {'raw': '  '}]
    _write_json(self.root, self.images)
    with self.assertRaisesRegex(
        ValueError, r"images\[4\] \('1004.png'.*sentences\[1\] is an empty"):
      self.open('test')
    del self.images[3]['sentences'][0]['raw']
    _write_json(self.root, self.images)
    with self.assertRaisesRegex(ValueError, r"images\[3\] lacks 'raw'"):
      self.open('test')
    with open(json_path, 'w') as f:
      f.write('{"images": [')
    with self.assertRaisesRegex(ValueError, f"{json_path}: not Karpathy's"):
      self.open('test')

  def test_batch_errors(self):
    d = self.open('test')
    with self.assertRaisesRegex(IndexError, 'out of range'):
      d.get_batch([2])
    with self.assertRaisesRegex(ValueError, 'unknown fields'):
      d.get_batch([0], ('caption',))
    with self.assertRaisesRegex(ValueError, 'image_size must be positive'):
      self.open('test', image_size=0)
    path = os.path.join(self.root, real_captions.FLICKR30K_IMAGES, '1004.png')
    with open(path, 'wb') as f:
      f.write(b'not a png')
    with self.assertRaisesRegex(sources.DataReadError,
                                f'flickr30k/test: could not read .*{path}'):
      d.get_batch([0, 1])


class _FakeCocoCaptions(tfds_base.LocalBuilder, skip_registration=True):
  """A few records in the layout of tfds ``coco_captions`` 2014 / 1.1.0."""

  name = 'coco_captions'
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name='2014', version=tfds.core.Version('1.1.0'))]

  def __init__(self, *, sizes, **kwargs):
    self._sizes = sizes
    super().__init__(**kwargs)

  def _info(self):
    # The real features (coco.py builds them with TensorFlow dtypes).
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'image/filename': tfds.features.Text(),
            'image/id': np.int64,
            'objects': tfds.features.Sequence({
                'id': np.int64,
                'area': np.int64,
                'bbox': tfds.features.BBoxFeature(),
                'label': tfds.features.ClassLabel(num_classes=80),
                'is_crowd': np.bool_,
            }),
            'captions': tfds.features.Sequence({
                'text': np.str_,
                'id': np.int64,
            }),
        }),
        disable_shuffling=True,  # record i is the i-th generated example
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s, n) for s, n in self._sizes.items()}

  def _generate_examples(self, split, num_examples):
    for i in range(num_examples):
      buf = io.BytesIO()
      Image.new('RGB', (24 + 3 * i, 18), _COLOURS[i]).save(
          buf, format='JPEG', quality=95)
      # 'restval' holds a record without captions (an error).
      n_caps = 0 if split == 'restval' and i == 1 else 5 + i % 3
      yield i, {
          'image': buf.getvalue(),
          'image/filename': f'COCO_{split}_{i}.jpg',
          'image/id': 100 + i,
          'objects': {'id': [i], 'area': [10], 'label': [i % 80],
                      'bbox': [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)],
                      'is_crowd': [False]},
          'captions': [{'text': _coco_caption(split, i, j), 'id': 10 * i + j}
                       for j in range(n_caps)],
      }


def _coco_caption(split, i, j):
  return f'A {split} photo {i}, caption {j}.'


class CocoTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = tempfile.mkdtemp()
    _FakeCocoCaptions(
        data_dir=cls.data_dir, sizes={'train': 3, 'test': 5, 'restval': 3}
    ).download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ),
    )

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.data_dir)
    super().tearDownClass()

  def test_open_read_and_cache(self):
    d = real_captions.open_coco('test', data_dir=self.data_dir, image_size=8)
    self.assertEqual(d.name, 'coco_captions/test')
    self.assertLen(d, 5)
    self.assertEqual(d.captions, [[_coco_caption('test', i, j)
                                   for j in range(5 + i % 3)]
                                  for i in range(5)])
    b = d.get_batch([4, 0])
    self.assertEqual(b['image'].shape, (2, 8, 8, 3))
    self.assertEqual(b['image'].dtype, np.uint8)
    np.testing.assert_array_equal(b['index'], [4, 0])
    np.testing.assert_allclose(b['image'][0].reshape(-1, 3).mean(0),
                               _COLOURS[4], atol=4)
    _, t2i = real_captions.caption_protocol(d, 'all')
    np.testing.assert_array_equal(np.bincount(t2i), [5, 6, 7, 5, 6])
    cache = os.path.join(self.data_dir, 'hnjax_captions',
                         'coco_captions_1.1.0_test_5.json')
    self.assertTrue(os.path.exists(cache))
    # Later opens read the cache, not the records.
    with mock.patch.object(real_captions, '_scan_coco',
                           side_effect=AssertionError('rescanned')):
      again = real_captions.open_coco('test', data_dir=self.data_dir,
                                      image_size=8)
    self.assertEqual(again.captions, d.captions)
    # Slices get their own cache file.
    part = real_captions.open_coco('test[1:3]', data_dir=self.data_dir,
                                   image_size=8)
    self.assertEqual(part.captions, d.captions[1:3])
    self.assertTrue(os.path.exists(os.path.join(
        self.data_dir, 'hnjax_captions',
        'coco_captions_1.1.0_test%5B1%3A3%5D_2.json')))

  def test_read_only_data_dir_caches_in_default_dir(self):
    default = self.enter_context(tempfile.TemporaryDirectory())
    real_access = os.access
    with mock.patch.dict(os.environ, {builders.DATA_DIR_ENV: default}), \
        mock.patch.object(
            real_captions.os, 'access',
            lambda p, m: False if p == self.data_dir else real_access(p, m)):
      d = real_captions.open_coco('train', data_dir=self.data_dir,
                                  image_size=4)
    self.assertLen(d, 3)
    self.assertTrue(os.path.exists(os.path.join(
        default, 'hnjax_captions', 'coco_captions_1.1.0_train_3.json')))

  def test_errors(self):
    with self.assertRaisesRegex(
        ValueError, r"record 1 \(image 'COCO_restval_1.jpg'\) has no capt"):
      real_captions.open_coco('restval', data_dir=self.data_dir,
                              image_size=4)
    with self.assertRaisesRegex(
        ValueError, "'coco_captions/validation' could not be read"):
      real_captions.open_coco('validation', data_dir=self.data_dir,
                              image_size=4)
    empty = self.enter_context(tempfile.TemporaryDirectory())
    with self.assertRaisesRegex(
        FileNotFoundError,
        f"'coco_captions' is not prepared in tfds data_dir '{empty}' .*"
        f'`tfds build coco_captions --data_dir={empty} '
        '--file_format=array_record`'):
      real_captions.open_coco('test', data_dir=empty, image_size=4)
    # Prepared, but as TFRecord: say how to convert.
    shutil.copytree(os.path.join(self.data_dir, 'coco_captions'),
                    os.path.join(empty, 'coco_captions'))
    info = os.path.join(empty, 'coco_captions', '2014', '1.1.0',
                        'dataset_info.json')
    with open(info) as f:
      meta = json.load(f)
    meta['fileFormat'] = 'tfrecord'
    with open(info, 'w') as f:
      json.dump(meta, f)
    with self.assertRaisesRegex(ValueError, 'as tfrecord, .*tfds '
                                'convert_format .*array_record'):
      real_captions.open_coco('test', data_dir=empty, image_size=4)


_CAPTIONS = [
    'Two young guys with shaggy hair look at their hands.',
    'A dog runs on the green grass.',
    'A man in a red shirt is playing ball in the street.',
    'Two dogs play with a ball on the grass.',
    'A woman with long hair walks a dog in the park.',
] * 4


class SubwordTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = subword.train_subword_tokenizer(_CAPTIONS, context_length=12,
                                              vocab_size=320)

  def test_layout(self):
    ids = self.tok(['a dog', 'A DOG  runs'])
    self.assertEqual(ids.shape, (2, 12))
    self.assertEqual(ids.dtype, np.int32)
    self.assertEqual(self.tok.end_id, 2)
    self.assertLessEqual(self.tok.vocab_size, 320)
    self.assertGreater(self.tok.vocab_size, 259)  # merges were learnt
    for row in ids:
      n = int(np.argmax(row == self.tok.end_id))
      self.assertEqual(row[0], 1)  # <start>
      self.assertTrue((row[1:n] > 2).all())  # no special token inside
      self.assertTrue((row[n + 1:] == 0).all())  # <pad>
    np.testing.assert_array_equal(ids[0][:3], ids[1][:3])  # lower-cased
    self.assertEqual(self.tok.decode(ids[1]), 'a dog runs')

  def test_truncation_keeps_the_end_token(self):
    long = [_CAPTIONS[2] * 3]
    wide = subword.SubwordTokenizer(self.tok.tokenizer_json, 64)(long)[0]
    ids = self.tok(long)[0]
    self.assertEqual(ids[-1], self.tok.end_id)
    np.testing.assert_array_equal(ids[:-1], wide[:11])  # the first tokens
    self.assertNotEqual(wide[11], self.tok.end_id)

  def test_any_string_round_trips(self):
    tok = subword.SubwordTokenizer(self.tok.tokenizer_json, 64)
    texts = ['Zebra ΑΒΓ naïve 日本語 🙂', '!!!', '¿Qué?', 'tab\tand\nnewline',
             'xqzj#@$%^&*()[]{}<end><pad>']
    ids = tok(texts)
    for text, row in zip(texts, ids):
      self.assertEqual(tok.decode(row), ' '.join(text.lower().split()))
      # A literal '<end>' in the text is text, not the end token.
      self.assertEqual(list(row).count(tok.end_id), 1)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "caption 1 has no tokens: ' '"):
      self.tok(['a dog', ' '])
    with self.assertRaisesRegex(ValueError, 'sequence of strings'):
      self.tok('a dog')
    with self.assertRaisesRegex(ValueError, 'caption 1 is not a str'):
      self.tok(['a dog', b'a cat'])
    with self.assertRaisesRegex(ValueError, 'context_length must be >= 2'):
      subword.train_subword_tokenizer(['a'], context_length=1)
    with self.assertRaisesRegex(ValueError, 'context_length must be >= 2'):
      subword.SubwordTokenizer(self.tok.tokenizer_json, 1)
    with self.assertRaisesRegex(ValueError, 'vocab_size must be >= 259'):
      subword.train_subword_tokenizer(['a'], context_length=4,
                                      vocab_size=100)
    with self.assertRaisesRegex(ValueError, 'sequence of strings'):
      subword.train_subword_tokenizer('a dog', context_length=4)
    with mock.patch.dict(sys.modules, {'tokenizers': None}):
      with self.assertRaisesRegex(ImportError, 'pip install tokenizers'):
        subword.SubwordTokenizer(self.tok.tokenizer_json, 8)

  def test_save_load_and_pickle(self):
    root = self.enter_context(tempfile.TemporaryDirectory())
    path = os.path.join(root, 'tok', 'bpe.json')
    self.tok.save(path)
    loaded = subword.SubwordTokenizer.load(path, context_length=12)
    self.assertEqual(loaded, self.tok)
    np.testing.assert_array_equal(loaded(_CAPTIONS), self.tok(_CAPTIONS))
    unpickled = pickle.loads(pickle.dumps(self.tok))
    self.assertEqual(unpickled, self.tok)
    np.testing.assert_array_equal(unpickled(_CAPTIONS), self.tok(_CAPTIONS))

  def test_training_is_deterministic_across_processes(self):
    again = subword.train_subword_tokenizer(_CAPTIONS, context_length=12,
                                            vocab_size=320)
    self.assertEqual(again, self.tok)
    # A fresh process (new hash seeds in Python and Rust) learns the same.
    script = (
        'import hashlib, json, sys\n'
        'from hnjax.data import subword\n'
        'imported = "tokenizers" in sys.modules\n'
        'caps = json.loads(sys.stdin.read())\n'
        'tok = subword.train_subword_tokenizer(caps, context_length=12, '
        'vocab_size=320)\n'
        'print(imported, hashlib.sha1(tok.tokenizer_json.encode())'
        '.hexdigest(), tok(caps).tolist())\n')
    env = dict(os.environ, PYTHONHASHSEED='123')
    out = subprocess.run(
        [sys.executable, '-c', script], input=json.dumps(_CAPTIONS),
        capture_output=True, text=True, check=True, env=env).stdout.split(
            ' ', 2)
    self.assertEqual(out[0], 'False')  # `import` alone doesn't need tokenizers
    self.assertEqual(
        out[1], hashlib.sha1(self.tok.tokenizer_json.encode()).hexdigest())
    self.assertEqual(json.loads(out[2]), self.tok(_CAPTIONS).tolist())


if __name__ == '__main__':
  absltest.main()
