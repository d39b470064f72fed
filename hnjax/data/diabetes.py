"""diabetes: scikit-learn's bundled diabetes regression data as a tfds builder.

``sklearn.datasets.load_diabetes(scaled=False)`` ships 442 patients with 10
baseline measurements (age, sex, BMI, blood pressure and six blood serum
values, in their original units) and a continuous target, a measure of
disease progression one year later (25..346), inside the scikit-learn
wheel; nothing is downloaded. The split is fixed: a seeded permutation puts
60% of the patients in ``train`` (265), 20% in ``validation`` (88) and 20%
in ``test`` (89), each in the original order.
"""

import numpy as np
import tensorflow_datasets as tfds

from hnjax.data import tfds_base

NUM_FEATURES = 10
SPLITS = ('train', 'validation', 'test')
_FRACTIONS = (0.6, 0.2)
_SEED = 0


def load_split(split):
  """Loads one split in memory.

  Args:
    split: ``'train'``, ``'validation'`` or ``'test'``.

  Returns:
    A dict with ``features`` float32 ``[n, 10]``, ``progression`` float32
    ``[n]`` and ``source_index`` int64 ``[n]`` (row in ``load_diabetes``).
  """
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  # Imported here: scikit-learn is only needed to prepare the dataset.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  data = datasets.load_diabetes(scaled=False)
  n = len(data.target)
  order = np.random.default_rng(_SEED).permutation(n)
  cut = np.cumsum([int(round(f * n)) for f in _FRACTIONS])
  rows = np.sort(np.split(order, cut)[SPLITS.index(split)])
  return {
      'features': data.data[rows].astype(np.float32),
      'progression': data.target[rows].astype(np.float32),
      'source_index': rows.astype(np.int64),
  }


class Diabetes(tfds_base.LocalBuilder):
  """scikit-learn diabetes as a local tfds builder (nothing to download)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'features': tfds.features.Tensor(
                shape=(NUM_FEATURES,), dtype=np.float32, encoding='bytes'),
            'progression': tfds.features.Scalar(dtype=np.float32),
            'source_index': tfds.features.Scalar(dtype=np.int64),
            'index': tfds.features.Scalar(dtype=np.int64),
        }),
        disable_shuffling=True,  # record i has index i
        homepage='https://www4.stat.ncsu.edu/~boos/var.select/diabetes.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {s: self._generate_examples(s) for s in SPLITS}

  def _generate_examples(self, split):
    data = load_split(split)
    for i in range(len(data['progression'])):
      ex = {k: v[i] for k, v in data.items()}
      ex['index'] = i
      yield i, ex
