"""digits: scikit-learn's bundled 8x8 handwritten digits as a tfds builder.

``sklearn.datasets.load_digits`` ships 1797 grayscale images with values
0..16 in the scikit-learn wheel, so nothing is downloaded. Images are scaled
to uint8 0..255 (``round(v * 255 / 16)``) and kept single-channel,
``[8, 8, 1]``. The split is stratified and fixed: in each class, a seeded
permutation puts the first 20% (rounded) into ``test``, giving 1438 train and
359 test examples, each split in the original order.
"""

import numpy as np
import tensorflow_datasets as tfds

from hnjax.data import tfds_base

NUM_CLASSES = 10
TEST_FRACTION = 0.2
_SEED = 0


def load_split(split):
  """Loads one split of the digits data in memory.

  Args:
    split: ``'train'`` or ``'test'``.

  Returns:
    A dict with ``image`` uint8 ``[n, 8, 8, 1]``, ``label`` int64 ``[n]`` and
    ``source_index`` int64 ``[n]`` (row in ``load_digits``).
  """
  if split not in ('train', 'test'):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  # Imported here: scikit-learn is only needed to prepare the dataset.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  data = datasets.load_digits()
  labels = data.target.astype(np.int64)
  rng = np.random.default_rng(_SEED)
  is_test = np.zeros(len(labels), bool)
  for c in range(NUM_CLASSES):
    rows = np.flatnonzero(labels == c)
    num_test = int(round(TEST_FRACTION * len(rows)))
    is_test[rng.permutation(rows)[:num_test]] = True
  rows = np.flatnonzero(is_test == (split == 'test'))
  images = np.round(data.images[rows] * (255 / 16)).astype(np.uint8)
  return {
      'image': images[..., None],
      'label': labels[rows],
      'source_index': rows.astype(np.int64),
  }


class Digits(tfds_base.LocalBuilder):
  """scikit-learn digits as a local tfds builder (nothing to download)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Tensor(
                    shape=(8, 8, 1), dtype=np.uint8, encoding='bytes'
                ),
                'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                'source_index': tfds.features.Scalar(dtype=np.int64),
                'index': tfds.features.Scalar(dtype=np.int64),
            }
        ),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # record i has index i
        homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {s: self._generate_examples(s) for s in ('train', 'test')}

  def _generate_examples(self, split):
    data = load_split(split)
    for i in range(len(data['label'])):
      ex = {k: v[i] for k, v in data.items()}
      ex['index'] = i
      yield i, ex
