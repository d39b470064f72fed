"""One entry point to every dataset: random-access sources of numpy dicts.

``get_source(name, split)`` returns a ``Source``: ``len(source)`` examples,
``source[i]`` a dict of numpy values with at least ``image`` uint8
``[H, W, C]``, ``label`` int64 and ``index`` int64 (``i`` itself), and
``source.get_batch(rows)`` the same fields stacked. ``get_info(name)`` gives
the class count, image shape, split sizes and normalisation statistics.

Datasets:

* ``shapes32``, ``shapes32/small``, ``digits``: embedded; generated locally
  and prepared on first use into ``data_dir`` (see ``builders``).
* ``cifar10``, ``cifar100``, ``imagenet2012``: read through
  ``tfds.data_source`` when their ArrayRecord files are in ``data_dir``;
  nothing is ever downloaded. ImageNet images are decoded and resized on the
  host to ``load_size`` (see ``imagenet``).
* ``imagenet100``: the ``imagenet2012`` examples of a class subset
  (``classes``, default the CMC list), relabelled ``0..C-1`` in the order of
  the original class ids (that is, sorted synsets, as torchvision's
  ``ImageFolder`` would).

``data_dir`` defaults to ``$HNJAX_DATA_DIR``, else
``~/.cache/hnjax/tensorflow_datasets`` for the embedded datasets and tfds's
own default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) for the others.
"""

import dataclasses
import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from hnjax.data import builders
from hnjax.data import digits
from hnjax.data import imagenet
from hnjax.data import records
from hnjax.data import shapes

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static facts about a dataset (before any file is opened)."""

  tfds_name: str
  num_classes: int
  image_shape: tuple[int, int, int] | None  # None: variable, use load_size
  mean: tuple[float, ...]  # per channel, images scaled to [0, 1]
  std: tuple[float, ...]
  eval_split: str = 'test'
  embedded: bool = False


# Statistics of shapes32 and digits were computed over their train splits
# (per channel, pixel values / 255); tests recompute them from the data.
_SPECS = {
    'shapes32': _Spec(
        'shapes32',
        shapes.NUM_CLASSES,
        (32, 32, 3),
        (0.465, 0.469, 0.445),
        (0.228, 0.222, 0.226),
        embedded=True,
    ),
    'shapes32/small': _Spec(
        'shapes32/small',
        shapes.NUM_CLASSES,
        (32, 32, 3),
        (0.465, 0.469, 0.445),
        (0.228, 0.222, 0.226),
        embedded=True,
    ),
    'digits': _Spec(
        'digits',
        digits.NUM_CLASSES,
        (8, 8, 1),
        (0.306,),
        (0.376,),
        embedded=True,
    ),
    'cifar10': _Spec(
        'cifar10',
        10,
        (32, 32, 3),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    'cifar100': _Spec(
        'cifar100',
        100,
        (32, 32, 3),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
    'imagenet2012': _Spec(
        'imagenet2012',
        1000,
        None,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        eval_split='validation',
    ),
    'imagenet100': _Spec(
        'imagenet2012',
        100,
        None,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        eval_split='validation',
    ),
}
DATASETS = tuple(_SPECS)
DEFAULT_LOAD_SIZE = 256  # ImageNet host-side square, see `imagenet`.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a trainer needs to know about a dataset.

  Attributes:
    name: dataset name as given to ``get_source``.
    num_classes: number of classes ``C``.
    image_shape: ``(H, W, C)`` of ``source[i]['image']``.
    num_examples: examples per split.
    train_split: name of the training split.
    eval_split: name of the evaluation split (``'test'`` or ``'validation'``).
    mean: per-channel mean of images scaled to ``[0, 1]``.
    std: per-channel standard deviation of images scaled to ``[0, 1]``.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_examples: Mapping[str, int]
  train_split: str
  eval_split: str
  mean: tuple[float, ...]
  std: tuple[float, ...]


class DataReadError(OSError):
  """Examples of a prepared dataset could not be read or decoded (a damaged
  or truncated file); the message names the dataset directory and rows."""


def _where(base):
  """The directory of a tfds data source's files, for error messages."""
  info = getattr(base, 'dataset_info', None)
  return getattr(info, 'data_dir', None) or repr(base)


class Source:
  """Random access to the examples of one split, as dicts of numpy values.

  Wraps a tfds data source: adds ``index`` (the position in this source),
  decodes text to ``str``, casts ``label`` to int64, and optionally remaps
  labels, selects a subset of rows and decodes/resizes images. With
  ``cache=True`` converted examples are kept in memory (column arrays filled
  lazily, so a process still reads only the rows it asks for): later epochs
  then cost a numpy gather instead of a protobuf parse per example.
  """

  def __init__(
      self,
      base,
      *,
      parse=None,
      rows=None,
      label_map=None,
      load_size=None,
      cache=False,
  ):
    self._base = base
    self._parse = parse  # record bytes -> dict, when base yields raw records
    self._rows = None if rows is None else np.asarray(rows, np.int64)
    self._label_map = label_map
    self._load_size = load_size
    self._cache = cache
    self._columns = None  # field -> array [len, ...]; allocated lazily
    self._filled = None  # bool [len]
    self._lock = threading.Lock()

  def __len__(self):
    return len(self._base) if self._rows is None else len(self._rows)

  def __getitem__(self, i):
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f'index {i} out of range for {len(self)} examples')
    batch = self.get_batch([i % len(self)])
    return {k: v[0] for k, v in batch.items()}

  def __getitems__(self, rows):
    batch = self.get_batch(rows)
    return [{k: v[j] for k, v in batch.items()} for j in range(len(rows))]

  def __getstate__(self):  # the cache and lock stay in this process
    state = dict(self.__dict__)
    state.update(_columns=None, _filled=None, _lock=None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _convert(self, ex, position):
    out = {}
    for k, v in ex.items():
      if isinstance(v, bytes) and k != 'image':
        v = v.decode('utf-8')
      elif isinstance(v, float):  # tfds returns float32 scalars as float
        v = np.float32(v)
      out[k] = v if isinstance(v, str) else np.asarray(v)
    if self._load_size is not None:
      out['image'] = imagenet.decode_and_resize(ex['image'], self._load_size)
    if 'label' in out:
      out['label'] = np.asarray(out['label'], np.int64)
    if self._label_map is not None:
      out['label'] = self._label_map[out['label']]
    out['index'] = np.int64(position)
    return out

  def _read(self, rows):
    """Reads and converts ``rows``; returns a list of example dicts."""
    base_rows = rows if self._rows is None else self._rows[rows]
    keys = [int(r) for r in base_rows]
    try:
      try:
        examples = self._base.__getitems__(keys)  # batched (parallel) reads
      except TypeError:
        # tfds 4.9.10's `mock_data` patches `__getitems__` without `self`.
        examples = [self._base[k] for k in keys]
      if self._parse is not None:
        examples = [self._parse(r) for r in examples]
      return [self._convert(ex, r) for ex, r in zip(examples, rows)]
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Decoders and readers raise anything (PIL, protobuf, ArrayRecord);
      # say which files, not only what failed deep inside.
      shown = keys if len(keys) <= 8 else f'{keys[:8]}...'
      raise DataReadError(
          f'could not read records {shown} from {_where(self._base)} (a '
          f'damaged or truncated file?): {type(e).__name__}: '
          f'{" ".join(str(e).split())[:200]}') from e

  def get_batch(self, rows, fields=None):
    """Reads examples ``rows`` and stacks them.

    Args:
      rows: int ``[b]`` positions in this source.
      fields: names of the fields to return; all fields when None.

    Returns:
      A dict of numpy arrays ``[b, ...]`` (strings as ``str`` arrays).
    """
    rows = np.asarray(rows, np.int64).reshape(-1)
    if not rows.size:
      raise ValueError('rows must not be empty')
    if rows.min() < 0 or rows.max() >= len(self):
      raise IndexError(f'rows out of range [0, {len(self)}): {rows}')
    if not self._cache:
      examples = self._read(rows)
      keys = fields or examples[0].keys()
      return {k: np.stack([ex[k] for ex in examples]) for k in keys}
    if self._filled is None or not self._filled[rows].all():
      missing = rows if self._filled is None else rows[~self._filled[rows]]
      missing = np.unique(missing)
      examples = self._read(missing)
      with self._lock:
        if self._columns is None:
          self._columns = {
              k: np.empty(
                  (len(self),) + np.shape(v),
                  object if isinstance(v, str) else np.asarray(v).dtype,
              )
              for k, v in examples[0].items()
          }
          self._filled = np.zeros(len(self), bool)
        for k, col in self._columns.items():
          col[missing] = (
              np.stack([ex[k] for ex in examples])
              if (col.dtype != object)
              else [ex[k] for ex in examples]
          )
        self._filled[missing] = True
    keys = fields or self._columns.keys()
    out = {k: self._columns[k][rows] for k in keys}
    return {
        k: v.astype(str) if v.dtype == object else v for k, v in out.items()
    }


def _check_name(name):
  if name not in _SPECS:
    raise ValueError(f'Unknown dataset name {name!r}; known: {DATASETS}')
  return _SPECS[name]


def real_data_dir(data_dir):
  """The tfds data dir of real (not embedded) datasets."""
  return os.path.expanduser(
      data_dir
      or os.environ.get(builders.DATA_DIR_ENV)
      or tfds_constants.DATA_DIR
  )


def _missing_error(name, tfds_name, split, data_dir, cause):
  """A one-line error that says where we looked and how to prepare."""
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  where = f'{data_dir}/{tfds_name}/{builder.version}'
  if builder.is_prepared():
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      return ValueError(
          f'Dataset {name!r} is prepared in tfds data_dir {data_dir!r} as '
          f'{builder.info.file_format.value}, but random access needs '
          f'ArrayRecord: convert it with `tfds convert_format '
          f'--dataset_dir={where} --out_file_format=array_record`.'
      )
    return ValueError(
        f'Dataset {name!r} split {split!r} could not be read from tfds '
        f'data_dir {data_dir!r}: {cause}'
    )
  manual = (
      ' --manual_dir=<dir with ILSVRC2012_img_{train,val}.tar>'
      if tfds_name == 'imagenet2012'
      else ''
  )
  return FileNotFoundError(
      f'Dataset {name!r} (tfds {tfds_name!r}) is not prepared in tfds '
      f'data_dir {data_dir!r} (no {where}); hnjax never downloads: prepare '
      f'it where TensorFlow is installed with `tfds build {tfds_name} '
      f'--data_dir={data_dir}{manual} --file_format=array_record`, or pass '
      f'data_dir= / set ${builders.DATA_DIR_ENV} to where it is.'
  )


def _tfds_source(name, tfds_name, split, data_dir, decoders=None):
  try:
    return tfds.data_source(
        tfds_name,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders=decoders,
    )
  except Exception as e:  # pylint: disable=broad-exception-caught
    # tfds reports a missing dataset as an unsupported TFRECORD format;
    # say what is missing instead.
    raise _missing_error(
        name, tfds_name, split, data_dir, f'{type(e).__name__}: {e}'
    ) from e


def open_tfds(tfds_name, split, *, data_dir=None, cache=True):
  """A `Source` of any tfds dataset prepared as ArrayRecord in ``data_dir``.

  Args:
    tfds_name: registered tfds name, e.g. ``'shapes3d'``.
    split: a tfds split or slice, e.g. ``'train[:80%]'``.
    data_dir: tfds data dir (default as `real_data_dir`).
    cache: keep converted examples in memory.

  Returns:
    A `Source`; a missing dataset raises one FileNotFoundError that names
    the data dir and how to prepare it.
  """
  data_dir = real_data_dir(data_dir)
  return Source(_tfds_source(tfds_name, tfds_name, split, data_dir),
                cache=cache)


def get_source(
    name, split, *, data_dir=None, load_size=None, classes=None, cache=None
):
  """Random-access source of one split of a dataset.

  Args:
    name: one of ``DATASETS``.
    split: a tfds split, e.g. ``'train'``, ``'test'``, ``'validation'`` or
      a slice such as ``'train[:10%]'``.
    data_dir: tfds data dir (see the module docstring for the default).
    load_size: side of the square ImageNet images are resized to on the host
      (default ``DEFAULT_LOAD_SIZE``); ignored for fixed-size datasets.
    classes: for ``'imagenet100'`` only, the class names (synsets) or
      imagenet2012 ids to keep; default ``imagenet.IMAGENET100_CLASSES``.
      The first use of a split scans all its labels once (reading every
      record) and caches the kept rows under ``data_dir/hnjax_subsets``.
    cache: keep converted examples in memory; default True for the embedded
      datasets and CIFAR, False for ImageNet.

  Returns:
    A ``Source`` of dicts with ``image`` uint8 ``[H, W, C]``, ``label`` int64,
    ``index`` int64 and the dataset's other fields (``shapes32``: ``size``,
    ``angle``, ``x``, ``y``, ``shape``, ``colour``, ``caption``).
  """
  spec = _check_name(name)
  if classes is not None and name != 'imagenet100':
    raise ValueError(f'classes is only for imagenet100, got name={name!r}')
  if load_size is not None and load_size <= 0:
    raise ValueError(f'load_size must be positive, got {load_size}')
  cache = spec.image_shape is not None if cache is None else cache
  if spec.embedded:
    builder = builders.prepare(name, data_dir=data_dir)
    parse = records.flat_parser(builder.info.features)
    if parse is None:
      return Source(builder.as_data_source(split), cache=cache)
    raw = builder.as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    return Source(raw, parse=parse, cache=cache)
  data_dir = real_data_dir(data_dir)
  if spec.image_shape is not None:
    base = _tfds_source(name, spec.tfds_name, split, data_dir)
    return Source(base, cache=cache)
  # ImageNet: tfds decodes the JPEGs (with PIL or OpenCV, no TensorFlow);
  # we resize them to a fixed square (see `imagenet`).
  base = _tfds_source(name, spec.tfds_name, split, data_dir)
  load_size = load_size or DEFAULT_LOAD_SIZE
  if name == 'imagenet2012':
    return Source(base, load_size=load_size, cache=cache)
  names = base.dataset_info.features['label'].names
  ids = imagenet.class_ids(
      imagenet.IMAGENET100_CLASSES if classes is None else classes, names
  )
  label_map = np.full(len(names), -1, np.int64)
  label_map[ids] = np.arange(len(ids))
  key = f'{spec.tfds_name}:{base.dataset_info.version}:{split}:{len(base)}'
  # The label scan skips JPEG decoding. (Under `tfds.testing.mock_data` this
  # needs TensorFlow to fake encoded images; `hnjax.data.testing` writes
  # real fake files instead.)
  undecoded = _tfds_source(
      name,
      spec.tfds_name,
      split,
      data_dir,
      decoders={'image': tfds.decode.SkipDecoding()},
  )
  # A read-only dataset dir (a shared mount) keeps the cache with ours.
  cache_root = (
      data_dir if os.access(data_dir, os.W_OK) else builders.default_data_dir()
  )
  rows = imagenet.subset_indices(
      undecoded, ids, os.path.join(cache_root, 'hnjax_subsets'), key
  )
  return Source(
      base, rows=rows, label_map=label_map, load_size=load_size, cache=cache
  )


def get_info(
    name,
    *,
    data_dir=None,
    load_size=None,
    classes=None,
    splits: Sequence[str] | None = None,
) -> DatasetInfo:
  """Facts about a dataset; opens (and may prepare) its splits.

  Args:
    name: one of ``DATASETS``.
    data_dir: as in ``get_source``.
    load_size: as in ``get_source``.
    classes: as in ``get_source``.
    splits: splits to count; default the train and eval splits.

  Returns:
    A ``DatasetInfo``.
  """
  spec = _check_name(name)
  splits = tuple(splits or ('train', spec.eval_split))
  kwargs: dict[str, Any] = dict(
      data_dir=data_dir, load_size=load_size, classes=classes, cache=False
  )
  sizes = {s: len(get_source(name, s, **kwargs)) for s in splits}
  num_classes = spec.num_classes if classes is None else len(classes)
  shape = spec.image_shape or (load_size or DEFAULT_LOAD_SIZE,) * 2 + (3,)
  return DatasetInfo(
      name=name,
      num_classes=num_classes,
      image_shape=shape,
      num_examples=sizes,
      train_split='train',
      eval_split=spec.eval_split,
      mean=spec.mean,
      std=spec.std,
  )
