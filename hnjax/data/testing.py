"""Test helpers: small fake copies of real datasets, written without TF.

``tfds.testing.mock_data`` fakes ``tfds.data_source`` in memory and works
without TensorFlow for decoded features (cifar10, imagenet2012), but it needs
TensorFlow as soon as encoded bytes are asked for (for example the label scan
of ``imagenet100``, which skips JPEG decoding). ``make_fake_imagenet`` instead
writes real ArrayRecord files, in the exact layout of a prepared
``imagenet2012`` (version, features, variable-size JPEGs), so the whole
reading path (tfds metadata, JPEG decoding, resizing, class subsets) runs as
it would on the real data.
"""

import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from hnjax.data import imagenet
from hnjax.data import tfds_base


def _imagenet_names():
  # The real builder's class names come with tfds (no files needed).
  return (
      tfds.builder('imagenet2012', data_dir='/nonexistent')
      .info.features['label']
      .names
  )


class _FakeImagenet2012(tfds_base.LocalBuilder, skip_registration=True):
  """Writes random JPEGs as ``imagenet2012`` 5.1.0 (same features)."""

  name = 'imagenet2012'
  VERSION = tfds.core.Version('5.1.0')

  def __init__(self, *, sizes, labels, seed, image_sizes, **kwargs):
    self._sizes, self._labels, self._seed = sizes, labels, seed
    self._image_sizes = image_sizes
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names=_imagenet_names()),
                'file_name': tfds.features.Text(),
            }
        ),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # record i is the i-th generated example
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
        split: self._generate_examples(split, n)
        for split, n in self._sizes.items()
    }

  def _generate_examples(self, split, num_examples):
    rng = np.random.default_rng([self._seed, split == 'train'])
    names = self.info.features['label'].names
    lo, hi = self._image_sizes
    for i in range(num_examples):
      h, w = rng.integers(lo, hi + 1, 2)
      # Smooth random colours (a 4x4 grid upsampled), like a photo more
      # than like noise, so resampling differences stay small.
      grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
      img = Image.fromarray(grid).resize((int(w), int(h)), Image.BICUBIC)
      buf = io.BytesIO()
      # PIL encodes: tfds would need TensorFlow to encode a numpy image.
      img.save(buf, format='JPEG', quality=95)
      label = int(self._labels[i % len(self._labels)])
      yield i, {
          'image': buf.getvalue(),
          'label': label,
          'file_name': f'{names[label]}_{i}.JPEG',
      }


def make_fake_imagenet(
    data_dir,
    *,
    num_train=24,
    num_validation=8,
    labels=None,
    seed=0,
    image_sizes=(24, 96),
):
  """Writes a tiny fake ``imagenet2012`` into ``data_dir``.

  Args:
    data_dir: tfds data dir to write ``imagenet2012/5.1.0`` into.
    num_train: examples in ``train``.
    num_validation: examples in ``validation``.
    labels: imagenet2012 class ids cycled through by the examples; default
      alternates ImageNet-100 classes (as listed) and class 0 (not in it).
    seed: seed of the random pixels and image sizes.
    image_sizes: ``(min, max)`` of the random image heights and widths.

  Returns:
    int64 ``[num_train]`` labels of the train examples, in order.
  """
  names = _imagenet_names()
  if labels is None:
    in100 = [names.index(c) for c in imagenet.IMAGENET100_CLASSES]
    labels = [x for c in in100 for x in (c, 0)]
  labels = np.asarray(labels, np.int64)
  builder = _FakeImagenet2012(
      data_dir=data_dir,
      sizes={'train': num_train, 'validation': num_validation},
      labels=labels,
      seed=seed,
      image_sizes=image_sizes,
  )
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(
          try_download_gcs=False,
          compute_stats=tfds.download.ComputeStatsMode.SKIP,
      ),
  )
  return labels[np.arange(num_train) % len(labels)]
