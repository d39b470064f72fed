"""Datasets with a continuous target, for contrastive regression (SupReMix).

`open_regression` returns a `RegressionData`: train, validation and test
sources whose batches hold the input (``image`` uint8 ``[H, W, C]`` or
``features`` float32 ``[F]``), ``target`` float32 and ``index``, plus what
a trainer needs to normalise inputs and to bin targets into DIR shot groups.

========== ================================== ================================
name       targets (first: default)           splits
========== ================================== ================================
shapes32   size, angle, x, y (pixels, deg.)   train[:18000] long-tailed /
                                              train[18000:] / test (embedded)
diabetes   progression                        train / validation / test
                                              (scikit-learn, embedded)
shapes3d   scale, orientation, floor_hue,     train[:80%] / [80%:90%] /
           wall_hue, object_hue               [90%:] (tfds, when prepared)
dsprites   scale, orientation, x_position,    as shapes3d
           y_position
agedb      age                                ``split`` column of
imdb_wiki  age                                ``<data_dir>/agedb.csv`` or
folder     any numeric column                 ``imdb_wiki.csv`` / ``csv``
========== ================================== ================================

shapes32 is a DIR-style benchmark (Yang et al., 2021): its training split
is subsampled so that the target has a long tail (an example with
normalised target ``t`` in ``[0, 1]`` is kept with probability
``exp(-long_tail * t)``, seeded independently of the run), while the
validation and test splits stay balanced; ``long_tail=0`` keeps everything.

Image folders (AgeDB-DIR, IMDB-WIKI-DIR and your own data): a CSV with a
header and at least the columns ``path`` (relative to the CSV's folder, or
to ``image_root``), ``split`` (``train``, ``val``, ``test``) and the target
column. The authors' ``agedb.csv`` (YyzHarry/imbalanced-regression) has
``age,path,split`` with paths ``AgeDB/<file>.jpg``, so the layout is::

  <data_dir>/agedb.csv
  <data_dir>/AgeDB/0_MariaCallas_35_f.jpg ...

Images are decoded on the host and resized to a ``load_size`` square
(shorter side, centre crop). A missing file, a target that is not a finite
number or an empty split is one error naming the file and the CSV row.
"""

import csv
import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np

from hnjax.data import builders
from hnjax.data import diabetes
from hnjax.data import imagenet
from hnjax.data import shapes
from hnjax.data import sources

# name -> (target fields, default bin width per target in target units).
_TARGETS = {
    'shapes32': {'size': 0.25, 'angle': 3.0, 'x': 0.5, 'y': 0.5},
    'diabetes': {'progression': 10.0},
    'shapes3d': {'scale': 1 / 14, 'orientation': 60 / 14,
                 'floor_hue': 0.1, 'wall_hue': 0.1, 'object_hue': 0.1},
    'dsprites': {'scale': 0.1, 'orientation': 2 * math.pi / 40,
                 'x_position': 1 / 32, 'y_position': 1 / 32},
    'agedb': {'age': 1.0},
    'imdb_wiki': {'age': 1.0},
}
DATASETS = ('shapes32', 'shapes32/small', 'diabetes', 'shapes3d', 'dsprites',
            'agedb', 'imdb_wiki', 'folder')
_VAL_FRACTION = 0.1  # shapes32: the end of train is the validation split
_LONG_TAIL_SEED = 1234
_STATS_SAMPLE = 1024  # images used for the mean and std of tfds datasets


@dataclasses.dataclass(frozen=True)
class RegressionData:
  """The splits of a regression dataset and facts about them.

  Attributes:
    name: dataset name.
    target: name of the target.
    splits: ``{'train', 'val', 'test'}`` -> random-access sources with
      fields ``input``, ``target`` and ``index``.
    input: ``'image'`` or ``'features'``.
    input_shape: ``(H, W, C)`` or ``(F,)``.
    mean: per-channel (images in ``[0, 1]``) or per-feature mean.
    std: the matching standard deviations.
    bin_width: target bin width of the DIR shot groups.
  """
  name: str
  target: str
  splits: dict[str, Any]
  input: str
  input_shape: tuple[int, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  bin_width: float


class TargetSource:
  """Rows of a source, with one of its fields served as ``target``.

  ``get_batch(rows, fields)`` reads ``rows`` (positions in this source)
  and returns ``target`` as float32 and ``index`` as the position here.
  """

  def __init__(self, base, field, rows=None):
    self._base, self._field = base, field
    self._rows = (np.arange(len(base)) if rows is None
                  else np.asarray(rows, np.int64))

  def __len__(self):
    return len(self._rows)

  def targets(self) -> np.ndarray:
    """All targets of this source, float32 ``[n]``."""
    return self.get_batch(np.arange(len(self)), ('target',))['target']

  def get_batch(self, rows, fields=None):
    rows = np.asarray(rows, np.int64).reshape(-1)
    wanted = tuple(fields or ('target', 'index'))
    base_fields = [self._field if f == 'target' else f for f in wanted
                   if f != 'index']
    batch = (self._base.get_batch(self._rows[rows], tuple(base_fields))
             if base_fields else {})
    out = {}
    for f in wanted:
      if f == 'index':
        out[f] = rows.copy()
      elif f == 'target':
        out[f] = np.asarray(batch[self._field], np.float32)
      else:
        out[f] = batch[f]
    return out


class CsvImages:
  """Images listed in a CSV with a numeric target column (one split).

  Attributes:
    paths: image paths, one per row of the split.
  """

  def __init__(self, csv_path, split, target_column, *, image_root=None,
               load_size=224):
    self._load_size = load_size
    root = image_root or os.path.dirname(os.path.abspath(csv_path))
    self.paths, targets = [], []
    for line, row in _csv_rows(csv_path, target_column):
      if row['split'] != split:
        continue
      value = row[target_column]
      try:
        y = float(value)
      except ValueError:
        y = math.nan
      if not math.isfinite(y):
        raise ValueError(f'{csv_path}, row {line}: {target_column}='
                         f'{value!r} is not a finite number')
      path = os.path.join(root, row['path'])
      if not os.path.isfile(path):
        raise FileNotFoundError(f'{csv_path}, row {line}: image {path} not '
                                'found')
      self.paths.append(path)
      targets.append(y)
    if not self.paths:
      raise ValueError(f'{csv_path}: no rows with split={split!r}')
    self._targets = np.asarray(targets, np.float32)

  def __len__(self):
    return len(self.paths)

  def targets(self) -> np.ndarray:
    """All targets of this split, float32 ``[n]``."""
    return self._targets.copy()

  def get_batch(self, rows, fields=None):
    rows = np.asarray(rows, np.int64).reshape(-1)
    out = {}
    for f in fields or ('image', 'target', 'index'):
      if f == 'image':
        images = []
        for r in rows:
          with open(self.paths[r], 'rb') as fh:
            images.append(imagenet.decode_and_resize(fh.read(),
                                                     self._load_size))
        out[f] = np.stack(images)
      elif f == 'target':
        out[f] = self._targets[rows]
      elif f == 'index':
        out[f] = rows.copy()
      else:
        raise KeyError(f'no field {f!r} in an image folder')
    return out


def _csv_rows(path, target_column):
  """(line number, row dict) of a CSV; checks the header."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: CSV file not found')
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    missing = {'path', 'split', target_column} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f'{path}: missing column(s) {sorted(missing)}; the '
                       f'header is {reader.fieldnames}')
    for row in reader:
      yield reader.line_num, row


def _check_target(name, target):
  known = tuple(_TARGETS.get(name.split('/')[0], ()))
  if name == 'folder':
    return target or 'target'
  target = target or known[0]
  if target not in known:
    raise ValueError(f'data.target={target!r}: {name} has no continuous '
                     f'target of that name; known: {known}')
  return target


def _stats(source, field, sample=_STATS_SAMPLE):
  """Per-channel mean and std of up to ``sample`` images in [0, 1]."""
  rows = np.linspace(0, len(source) - 1, min(sample, len(source)))
  x = source.get_batch(rows.astype(np.int64), (field,))[field]
  x = x.astype(np.float64) / 255.0
  axes = tuple(range(x.ndim - 1))
  return (tuple(x.mean(axes).tolist()),
          tuple(np.maximum(x.std(axes), 1e-3).tolist()))


def open_regression(
    name: str,
    *,
    target: str = '',
    data_dir: str | None = None,
    csv_path: str = '',
    image_root: str = '',
    load_size: int | None = None,
    long_tail: float = 4.0,
    bin_width: float = 0.0,
) -> RegressionData:
  """Opens the train, validation and test splits of a regression dataset.

  Args:
    name: one of ``DATASETS``.
    target: the target (see the module docstring); '' for the default.
      For ``folder``, the CSV column (default ``target``).
    data_dir: tfds data dir (embedded and tfds datasets), or the folder
      with ``agedb.csv`` / ``imdb_wiki.csv``.
    csv_path: the CSV of ``folder`` (and an override for agedb/imdb_wiki).
    image_root: where the CSV's paths start; default the CSV's folder.
    load_size: side of the square images of a folder (default 224).
    long_tail: shapes32's training-set tail (see the module docstring).
    bin_width: target bin width of the shot groups; 0 for the default.

  Returns:
    A `RegressionData`.

  Raises:
    ValueError: unknown name or target, bad CSV rows, empty splits.
    FileNotFoundError: missing data or image files.
  """
  if name not in DATASETS:
    raise ValueError(f'data.name={name!r}: not a regression dataset; known: '
                     f'{DATASETS}')
  target = _check_target(name, target)
  default_width = _TARGETS.get(name.split('/')[0], {}).get(target, 1.0)
  width = bin_width or default_width
  if name.startswith('shapes32'):
    return _shapes32(name, target, data_dir, long_tail, width)
  if name == 'diabetes':
    split = lambda s: TargetSource(
        sources.Source(builders.prepare('diabetes', data_dir=data_dir)
                       .as_data_source(s)), 'progression')
    splits = {'train': split('train'), 'val': split('validation'),
              'test': split('test')}
    x = splits['train'].get_batch(np.arange(len(splits['train'])),
                                  ('features',))['features']
    return RegressionData(name, target, splits, 'features',
                          (diabetes.NUM_FEATURES,), tuple(x.mean(0).tolist()),
                          tuple(np.maximum(x.std(0), 1e-6).tolist()), width)
  if name in ('shapes3d', 'dsprites'):
    parts = {'train': 'train[:80%]', 'val': 'train[80%:90%]',
             'test': 'train[90%:]'}
    splits = {k: TargetSource(sources.open_tfds(name, s, data_dir=data_dir),
                              f'value_{target}') for k, s in parts.items()}
    shape = (64, 64, 3 if name == 'shapes3d' else 1)
    mean, std = _stats(splits['train'], 'image')
    return RegressionData(name, target, splits, 'image', shape, mean, std,
                          width)
  # Image folders.
  if not csv_path:
    if name == 'folder':
      raise ValueError("data.csv='': the folder dataset needs a CSV (see "
                       'hnjax.data.regression)')
    csv_path = os.path.join(os.path.expanduser(data_dir or '.'),
                            f'{name}.csv')
  size = load_size or 224
  splits = {k: CsvImages(csv_path, s, target, image_root=image_root or None,
                         load_size=size)
            for k, s in (('train', 'train'), ('val', 'val'),
                         ('test', 'test'))}
  # Normalize(0.5, 0.5) as the DIR and SupReMix code.
  return RegressionData(name, target, splits, 'image', (size, size, 3),
                        (0.5,) * 3, (0.5,) * 3, width)


def _shapes32(name, target, data_dir, long_tail, width):
  train_all = sources.get_source(name, 'train', data_dir=data_dir)
  test = sources.get_source(name, 'test', data_dir=data_dir)
  n = len(train_all)
  n_train = n - int(round(_VAL_FRACTION * n))
  rows = np.arange(n_train)
  if long_tail:
    y = train_all.get_batch(rows, (target,))[target].astype(np.float64)
    t = (y - y.min()) / max(y.max() - y.min(), 1e-12)
    keep = np.random.default_rng(_LONG_TAIL_SEED).uniform(size=n_train)
    rows = rows[keep < np.exp(-long_tail * t)]
  spec = sources.get_info(name, splits=('test',))
  return RegressionData(
      name, target,
      {'train': TargetSource(train_all, target, rows),
       'val': TargetSource(train_all, target, np.arange(n_train, n)),
       'test': TargetSource(test, target)},
      'image', (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3), spec.mean, spec.std,
      width)


def target_names(name: str) -> Sequence[str]:
  """The continuous targets a dataset offers (first: the default)."""
  return tuple(_TARGETS.get(name.split('/')[0], ()))
