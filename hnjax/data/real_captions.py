"""Real image–caption datasets for CLIP fine-tuning: COCO and Flickr30k.

``open_coco(split)`` / ``open_flickr30k(split)`` return a `CaptionedImages`:
``captions[i]`` are the captions of image ``i`` (in dataset order) and
``get_batch(rows)`` reads, decodes and resizes images on the host to uint8
``[b, S, S, 3]`` (`imagenet.decode_and_resize`: shorter side to ``S``,
centre crop). Captions stay strings; tokenise them on the host (``text`` or
``subword``) before they reach the device.

Caption protocols (`caption_protocol`):

* ``'first'``: ONE caption per image, the first in dataset order. This is
  m²-mix's protocol (changdaeoh/multimodal-mixup) for training and for its
  own evaluation: Flickr30k through ``drop_duplicates(subset='image')`` on
  its captions file, COCO through ``caption[0]``. Their captions file is not
  public, so "first" here is the first caption in Karpathy's order. Recalls
  under this protocol are not comparable to the CLIP literature.
* ``'all'``: every caption (5 per image on Flickr30k, 5–7 on COCO), flattened
  in image order with ``text_to_image`` giving each caption's image: the
  standard (Karpathy 1k / 5k test) retrieval protocol, where an image is
  retrieved at ``k`` if any of its captions is in the top ``k``
  (`hnjax.eval.retrieval.retrieval_metrics`).

Datasets and where they live:

* COCO: tfds ``coco_captions`` (COCO 2014 images with Karpathy's splits
  ``train`` 82,783, ``restval`` 30,504, ``val`` 5,000, ``test`` 5,000),
  prepared as ArrayRecord in the tfds data dir (as `sources.real_data_dir`);
  hnjax never downloads. m²-mix evaluates on COCO val2017 (5k images), which
  tfds does not pair with captions; Karpathy's ``test`` is the closest 5k
  split, not the same images. Reading every caption means reading every
  record, so the first `open_coco` of a split scans it once with image
  decoding skipped and caches the captions as JSON under
  ``<data_dir>/hnjax_captions/`` (``default_data_dir()`` when ``data_dir``
  is read-only). Opening needs no TensorFlow: the dataset is read from its
  files (tfds builds ``coco_captions`` only with TensorFlow installed).
* Flickr30k: no tfds builder; a folder (``data_dir``, default
  ``<tfds data dir>/flickr30k``) holding::

    dataset_flickr30k.json   # Karpathy's caption_datasets.zip
    flickr30k-images/        # the 31,783 JPEGs of the Flickr30k release
      1000092795.jpg
      ...

  where the JSON is ``{"images": [{"filename": "1000092795.jpg", "split":
  "train" | "val" | "test", "sentences": [{"raw": "Two young guys ..."},
  ...]}, ...]}`` (29,000 / 1,014 / 1,000 images, 5 captions each). Opening a
  split checks that every one of its image files exists.
"""

from __future__ import annotations

import json
import os
from typing import Sequence
import urllib.parse

import numpy as np
import tensorflow_datasets as tfds

from hnjax.data import builders
from hnjax.data import imagenet
from hnjax.data import sources

FIELDS = ('image', 'index')
PROTOCOLS = ('first', 'all')
FLICKR30K_SPLITS = ('train', 'val', 'test')
FLICKR30K_JSON = 'dataset_flickr30k.json'
FLICKR30K_IMAGES = 'flickr30k-images'
_COCO = 'coco_captions'
_SCAN_CHUNK = 1024  # records per read when scanning captions


class CaptionedImages:
  """One split of an image-caption dataset: images and their captions.

  Attributes:
    name: e.g. ``'coco_captions/test'``, ``'flickr30k/test'``.
    captions: per image, in dataset order, its captions (COCO: 5–7,
      Flickr30k: 5); every image has at least one, none is empty.
    image_size: side ``S`` of the square images of ``get_batch``.
    resample: how they are resized (`imagenet.decode_and_resize`).
  """

  def __init__(self, name: str, captions: list[list[str]], images, *,
               image_size: int, resample: str = 'bilinear'):
    """Wraps captions and an image reader.

    Args:
      name: dataset and split, for messages.
      captions: ``N`` lists of captions.
      images: reader with ``read(rows) -> list`` of encoded bytes or uint8
        arrays and ``describe(rows) -> str`` (where, for errors).
      image_size: side ``S`` of the output squares.
      resample: ``'bilinear'`` or ``'bicubic'`` (CLIP's preprocessing).
    """
    if image_size <= 0:
      raise ValueError(f'image_size must be positive, got {image_size}')
    if resample not in imagenet.RESAMPLING:
      raise ValueError(f'resample={resample!r}: must be one of '
                       f'{imagenet.RESAMPLING}')
    self.name = name
    self.captions = captions
    self.image_size = image_size
    self.resample = resample
    self._images = images

  def __len__(self) -> int:
    return len(self.captions)

  def __repr__(self):
    return (f'CaptionedImages({self.name!r}, {len(self)} images, '
            f'image_size={self.image_size})')

  def get_batch(self, rows, fields=None) -> dict[str, np.ndarray]:
    """Reads images ``rows``, decoded and resized on the host.

    Args:
      rows: int ``[b]`` positions in this split.
      fields: names from ``FIELDS``; both when None.

    Returns:
      ``{'image': uint8 [b, S, S, 3], 'index': int64 [b]}`` (``index`` =
      ``rows``), restricted to ``fields``.

    Raises:
      sources.DataReadError: naming the files when an image can't be read.
    """
    fields = FIELDS if fields is None else tuple(fields)
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
      raise ValueError(f'unknown fields {unknown}; known: {FIELDS}')
    rows = np.asarray(rows, np.int64).reshape(-1)
    if not rows.size:
      raise ValueError('rows must not be empty')
    if rows.min() < 0 or rows.max() >= len(self):
      raise IndexError(f'rows out of range [0, {len(self)}): {rows}')
    out = {}
    if 'image' in fields:
      keys = [int(r) for r in rows]
      try:
        out['image'] = np.stack([
            imagenet.decode_and_resize(x, self.image_size, self.resample)
            for x in self._images.read(keys)
        ])
      except Exception as e:  # pylint: disable=broad-exception-caught
        # PIL, protobuf and ArrayRecord raise anything: say which files.
        raise sources.DataReadError(
            f'{self.name}: could not read images '
            f'{self._images.describe(keys)} (a damaged or truncated file?): '
            f'{type(e).__name__}: {" ".join(str(e).split())[:200]}') from e
    if 'index' in fields:
      out['index'] = rows
    return {f: out[f] for f in fields}


def caption_protocol(split: CaptionedImages,
                     protocol: str) -> tuple[list[str], np.ndarray]:
  """The captions of ``split`` under a protocol (see the module docstring).

  Args:
    split: ``N`` images with their captions.
    protocol: ``'first'`` (one caption per image, m²-mix) or ``'all'``
      (every caption, the standard 5-caption protocol).

  Returns:
    ``(texts, text_to_image)``: ``N_txt`` captions and int64 ``[N_txt]`` the
    image of each; ``'first'`` gives ``N_txt = N`` and ``arange(N)``.
  """
  if protocol == 'first':
    return [c[0] for c in split.captions], np.arange(len(split), dtype=np.int64)
  if protocol == 'all':
    texts = [t for c in split.captions for t in c]
    counts = [len(c) for c in split.captions]
    return texts, np.repeat(np.arange(len(split), dtype=np.int64), counts)
  raise ValueError(f'unknown caption protocol {protocol!r}; known: '
                   f'{PROTOCOLS}')


# ---------------------------------------------------------------- COCO


class _TfdsImages:
  """Encoded images of a tfds data source opened with image decoding off."""

  def __init__(self, base):
    self._base = base

  def read(self, rows):
    return [ex['image'] for ex in _read_records(self._base, rows)]

  def describe(self, rows):
    shown = rows if len(rows) <= 8 else f'{rows[:8]}...'
    return f'(records {shown} of {_where(self._base)})'


def _where(base):
  """The directory of a tfds data source's files, for messages."""
  info = getattr(base, 'dataset_info', None)
  return getattr(info, 'data_dir', None) or repr(base)


def _read_records(base, rows):
  try:
    return base.__getitems__(rows)  # batched (parallel) reads
  except TypeError:
    # tfds 4.9.10's `mock_data` patches `__getitems__` without `self`.
    return [base[r] for r in rows]


def _coco_config():
  # The builder class (not an instance: its `_info` needs TensorFlow) names
  # the config and version that `tfds build coco_captions` writes.
  config = tfds.builder_cls(_COCO).BUILDER_CONFIGS[0]
  return config.name, str(config.version)


def _coco_missing_error(split, data_dir, cause):
  """One line: where we looked and how to prepare (as `sources`)."""
  config, version = _coco_config()
  where = os.path.join(data_dir, _COCO, config, version)
  name = f'{_COCO}/{split}'
  if os.path.exists(os.path.join(where, 'dataset_info.json')):
    try:
      file_format = tfds.builder_from_directory(where).info.file_format
    except Exception:  # pylint: disable=broad-exception-caught
      file_format = None  # unreadable metadata: report the cause below
    if file_format not in (None, tfds.core.FileFormat.ARRAY_RECORD):
      return ValueError(
          f'Dataset {_COCO!r} is prepared in tfds data_dir {data_dir!r} as '
          f'{file_format.value}, but random access needs ArrayRecord: '
          f'convert it with `tfds convert_format --dataset_dir={where} '
          f'--out_file_format=array_record`.')
    return ValueError(f'Dataset {name!r} could not be read from tfds '
                      f'data_dir {data_dir!r}: {cause}')
  return FileNotFoundError(
      f'Dataset {_COCO!r} is not prepared in tfds data_dir {data_dir!r} (no '
      f'{where}); hnjax never downloads: prepare it where TensorFlow is '
      f'installed with `tfds build {_COCO} --data_dir={data_dir} '
      f'--file_format=array_record` (COCO 2014 and Karpathy\'s splits, about '
      f'20 GB), or pass data_dir= / set ${builders.DATA_DIR_ENV} to where '
      f'it is.')


def _text(x):
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def _scan_coco(base, where):
  """Captions of every record of ``base``; checks none is missing."""
  out = []
  for start in range(0, len(base), _SCAN_CHUNK):
    rows = list(range(start, min(start + _SCAN_CHUNK, len(base))))
    try:
      examples = _read_records(base, rows)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise sources.DataReadError(
          f'could not read records {rows[0]}..{rows[-1]} from {where} (a '
          f'damaged or truncated file?): {type(e).__name__}: '
          f'{" ".join(str(e).split())[:200]}') from e
    for row, ex in zip(rows, examples):
      caps = [_text(t).strip() for t in ex['captions']['text']]
      if not caps or not all(caps):
        what = 'no captions' if not caps else f'an empty caption: {caps}'
        raise ValueError(f'{where}: record {row} (image '
                         f'{_text(ex["image/filename"])!r}) has {what}')
      out.append(caps)
  return out


def _cached_captions(base, cache_path, where):
  """The captions of ``base``, scanned once and cached as JSON."""

  def load():
    try:
      with open(cache_path) as f:
        caps = json.load(f)['captions']
    except (OSError, ValueError, KeyError, TypeError):
      return None  # missing or damaged: scan again
    return caps if len(caps) == len(base) else None

  caps = load()
  if caps is not None:
    return caps
  os.makedirs(os.path.dirname(cache_path), exist_ok=True)
  # Processes of one machine scan once: the others wait, then load.
  with builders.file_lock(cache_path + '.lock'):
    caps = load()
    if caps is None:
      caps = _scan_coco(base, where)
      tmp = f'{cache_path}.tmp{os.getpid()}'
      with open(tmp, 'w') as f:
        json.dump({'source': where, 'captions': caps}, f)
      os.replace(tmp, cache_path)  # atomic: readers never see a partial file
  return caps


def open_coco(split: str, *, data_dir: str | None = None,
              image_size: int, resample: str = 'bilinear'
              ) -> CaptionedImages:
  """COCO captions (Karpathy's splits) from tfds ``coco_captions``.

  Args:
    split: ``'train'``, ``'restval'``, ``'val'``, ``'test'`` or a tfds slice
      of one, e.g. ``'test[:1000]'``.
    data_dir: tfds data dir (default as `sources.real_data_dir`).
    image_size: side ``S`` of the square images of ``get_batch``.
    resample: ``'bilinear'`` or ``'bicubic'`` (CLIP's preprocessing).

  Returns:
    A `CaptionedImages` named ``'coco_captions/<split>'``; a missing dataset
    raises one FileNotFoundError naming the data dir and how to prepare it.
  """
  data_dir = sources.real_data_dir(data_dir)
  config, version = _coco_config()
  try:
    # The explicit version makes tfds read the features from the files,
    # without the builder code (which needs TensorFlow).
    base = tfds.data_source(
        f'{_COCO}/{config}:{version}',
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={'image': tfds.decode.SkipDecoding()},
    )
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _coco_missing_error(split, data_dir, f'{type(e).__name__}: {e}'
                              ) from e
  # A read-only dataset dir (a shared mount) keeps the cache with ours.
  cache_root = (
      data_dir if os.access(data_dir, os.W_OK) else builders.default_data_dir()
  )
  version = base.dataset_info.version
  quoted = urllib.parse.quote(split, safe='')  # slices hold '[', ':', '%'
  cache_path = os.path.join(cache_root, 'hnjax_captions',
                            f'{_COCO}_{version}_{quoted}_{len(base)}.json')
  captions = _cached_captions(base, cache_path, _where(base))
  return CaptionedImages(f'{_COCO}/{split}', captions, _TfdsImages(base),
                         image_size=image_size, resample=resample)


# ----------------------------------------------------------- Flickr30k


class _FileImages:
  """Image files read as bytes (decoded by `imagenet.decode_and_resize`)."""

  def __init__(self, paths: Sequence[str]):
    self._paths = list(paths)

  def read(self, rows):
    out = []
    for r in rows:
      with open(self._paths[r], 'rb') as f:
        out.append(f.read())
    return out

  def describe(self, rows):
    paths = [self._paths[r] for r in rows]
    return str(paths if len(paths) <= 4 else f'{paths[:4]}...')


def _flickr_entries(json_path, split):
  """``(filename, captions)`` of the split's entries, checked."""
  try:
    with open(json_path) as f:
      images = json.load(f)['images']
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{json_path}: not Karpathy\'s Flickr30k file (want '
                     f'{{"images": [...]}}): {type(e).__name__}: {e}') from e
  out = []
  for i, entry in enumerate(images):
    try:
      if entry['split'] != split:
        continue
      filename = entry['filename']
      raw = [s['raw'] for s in entry['sentences']]
    except (KeyError, TypeError) as e:
      raise ValueError(f'{json_path}: images[{i}] lacks {e} (want filename, '
                       f'split and sentences[].raw)') from e
    what = f'{json_path}: images[{i}] ({filename!r}, split {split!r})'
    if not raw:
      raise ValueError(f'{what} has no captions')
    caps = [str(r).strip() for r in raw]
    for j, c in enumerate(caps):
      if not c:
        raise ValueError(f'{what} sentences[{j}] is an empty caption')
    out.append((filename, caps))
  return out


def open_flickr30k(split: str, *, data_dir: str | None = None,
                   image_size: int, resample: str = 'bilinear'
                   ) -> CaptionedImages:
  """Flickr30k (Karpathy's splits) from a folder (see the module docstring).

  Args:
    split: ``'train'``, ``'val'`` or ``'test'``.
    data_dir: the folder of ``dataset_flickr30k.json`` and
      ``flickr30k-images/`` (default ``<tfds data dir>/flickr30k``).
    image_size: side ``S`` of the square images of ``get_batch``.
    resample: ``'bilinear'`` or ``'bicubic'`` (CLIP's preprocessing).

  Returns:
    A `CaptionedImages` named ``'flickr30k/<split>'``, images in the JSON's
    order.

  Raises:
    FileNotFoundError: the JSON, the image folder or an image of the split is
      missing (the first missing path is named).
    ValueError: unknown or empty split, an entry without captions or with an
      empty caption (the file and entry are named).
  """
  if split not in FLICKR30K_SPLITS:
    raise ValueError(f'unknown Flickr30k split {split!r}; known: '
                     f'{FLICKR30K_SPLITS}')
  data_dir = os.path.expanduser(
      data_dir or os.path.join(sources.real_data_dir(None), 'flickr30k'))
  json_path = os.path.join(data_dir, FLICKR30K_JSON)
  folder = os.path.join(data_dir, FLICKR30K_IMAGES)
  how = (f'put Karpathy\'s {FLICKR30K_JSON} (from caption_datasets.zip) and '
         f'the Flickr30k images in {FLICKR30K_IMAGES}/ there, or pass '
         f'data_dir=')
  if not os.path.isfile(json_path):
    raise FileNotFoundError(f'Flickr30k is not in {data_dir!r}: no '
                            f'{json_path}; {how}')
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'Flickr30k is not in {data_dir!r}: no image '
                            f'folder {folder}; {how}')
  entries = _flickr_entries(json_path, split)
  if not entries:
    raise ValueError(f'{json_path}: split {split!r} has no images')
  # One listing instead of 30k stat calls.
  present = set(os.listdir(folder))
  for filename, _ in entries:
    path = os.path.join(folder, filename)
    if filename not in present and not os.path.isfile(path):
      raise FileNotFoundError(f'Flickr30k image {path} (listed in '
                              f'{json_path}, split {split!r}) is missing')
  paths = [os.path.join(folder, f) for f, _ in entries]
  return CaptionedImages(f'flickr30k/{split}', [c for _, c in entries],
                         _FileImages(paths), image_size=image_size,
                         resample=resample)
