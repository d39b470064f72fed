"""Datasets, input pipelines and on-device augmentation.

* ``get_source(name, split)`` / ``get_info(name)``: random access to the
  embedded datasets (``shapes32``, ``digits``, generated locally on first use)
  and to tfds-prepared ``cifar10``, ``cifar100``, ``imagenet2012`` and
  ``imagenet100``; see ``sources``.
* ``train_iterator`` / ``eval_iterator``: deterministic, resumable,
  multi-host grain pipelines of raw uint8 batches; see ``pipeline``.
* ``AugmentConfig``, ``example_keys``, ``augment_batch``, ``two_views``,
  ``eval_transform``: MoCo v2 augmentation in JAX with one key per example;
  see ``augment``; ``tabular_views`` / ``standardize`` for tabular inputs.
* ``open_regression``: datasets with a continuous target (SupReMix); see
  ``regression``.
* ``open_paired``: image-caption pairs tokenised on the host (CLIP-mixup:
  shapes32's captions, COCO, Flickr30k); see ``paired``, ``real_captions``,
  ``text`` and ``subword``.
* ``batching``: epochs of near-neighbour batches (Sample4Geo, NGAME,
  TAS-B) for harder in-batch negatives; ``EpochOrder`` feeds one to
  ``train_iterator(order=...)``.
* ``mined``: hard negatives mined for every pair of a dataset
  (``mine_pairs``), their records (``Mined``) and a source whose batches
  carry them (``NegativesSource``).
"""

from hnjax.data.augment import augment_batch
from hnjax.data.augment import augment_example
from hnjax.data.augment import AugmentConfig
from hnjax.data.augment import eval_transform
from hnjax.data.augment import example_keys
from hnjax.data.augment import normalize
from hnjax.data.augment import standardize
from hnjax.data.augment import tabular_views
from hnjax.data.augment import two_views
from hnjax.data.builders import default_data_dir
from hnjax.data.builders import prepare
from hnjax.data.imagenet import IMAGENET100_CLASSES
from hnjax.data.paired import open_paired
from hnjax.data.pipeline import eval_iterator
from hnjax.data.pipeline import steps_per_epoch
from hnjax.data.pipeline import train_dataset
from hnjax.data.pipeline import train_iterator
from hnjax.data.pipeline import train_rows
from hnjax.data.regression import open_regression
from hnjax.data.regression import RegressionData
from hnjax.data.sources import DATASETS
from hnjax.data.sources import DatasetInfo
from hnjax.data.sources import get_info
from hnjax.data.sources import get_source
from hnjax.data.sources import Source
