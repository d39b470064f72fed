"""ImageNet helpers: host-side JPEG decoding and class subsets (ImageNet-100).

Variable-size ImageNet images are brought to one fixed ``load_size`` square on
the host, so that device batches have a static shape: the shorter side is
resized to ``load_size`` (PIL bilinear with antialiasing) and the centre
square is kept. With ``load_size=256`` the standard evaluation crop (resize
256, centre crop 224) is then exactly ``augment.eval_transform`` with
``crop_fraction=0.875``. Training crops are drawn from the centre square, so
a non-square image loses its edges (about 12% of a 4:3 image) to the random
resized crop; this is the price of fixed-shape uint8 batches and of doing the
augmentation on device.

tfds decodes the JPEGs without TensorFlow (OpenCV if installed, else PIL);
``decode_and_resize`` also accepts encoded bytes, which it decodes with PIL in
``draft`` mode (the JPEG decoder downscales by 2, 4 or 8 for free when the
image is at least twice ``load_size``).
"""

import hashlib
import io
import os

from absl import logging
import numpy as np
from PIL import Image

from hnjax.data import builders

# The 100 ImageNet classes of CMC (Tian et al., 2019), used by MoCHi and most
# ImageNet-100 results: https://github.com/HobbitLong/CMC/blob/master/
# imagenet100.txt
IMAGENET100_CLASSES = (
    'n02869837',
    'n01749939',
    'n02488291',
    'n02107142',
    'n13037406',
    'n02091831',
    'n04517823',
    'n04589890',
    'n03062245',
    'n01773797',
    'n01735189',
    'n07831146',
    'n07753275',
    'n03085013',
    'n04485082',
    'n02105505',
    'n01983481',
    'n02788148',
    'n03530642',
    'n04435653',
    'n02086910',
    'n02859443',
    'n13040303',
    'n03594734',
    'n02085620',
    'n02099849',
    'n01558993',
    'n04493381',
    'n02109047',
    'n04111531',
    'n02877765',
    'n04429376',
    'n02009229',
    'n01978455',
    'n02106550',
    'n01820546',
    'n01692333',
    'n07714571',
    'n02974003',
    'n02114855',
    'n03785016',
    'n03764736',
    'n03775546',
    'n02087046',
    'n07836838',
    'n04099969',
    'n04592741',
    'n03891251',
    'n02701002',
    'n03379051',
    'n02259212',
    'n07715103',
    'n03947888',
    'n04026417',
    'n02326432',
    'n03637318',
    'n01980166',
    'n02113799',
    'n02086240',
    'n03903868',
    'n02483362',
    'n04127249',
    'n02089973',
    'n03017168',
    'n02093428',
    'n02804414',
    'n02396427',
    'n04418357',
    'n02172182',
    'n01729322',
    'n02113978',
    'n03787032',
    'n02089867',
    'n02119022',
    'n03777754',
    'n04238763',
    'n02231487',
    'n03032252',
    'n02138441',
    'n02104029',
    'n03837869',
    'n03494278',
    'n04136333',
    'n03794056',
    'n03492542',
    'n02018207',
    'n04067472',
    'n03930630',
    'n03584829',
    'n02123045',
    'n04229816',
    'n02100583',
    'n03642806',
    'n04336792',
    'n03259280',
    'n02116738',
    'n02108089',
    'n03424325',
    'n01855672',
    'n02090622',
)


RESAMPLING = ('bilinear', 'bicubic')


def decode_and_resize(image, load_size, resample='bilinear'):
  """Decodes an image and resizes it to a ``load_size`` centre square.

  Args:
    image: encoded image bytes (JPEG, PNG, ...) or a uint8 array
      ``[H, W, C]``.
    load_size: side ``S`` of the output square.
    resample: ``'bilinear'`` (JPEGs first downscaled in the DCT, fast) or
      ``'bicubic'`` (the full image resampled bicubically: CLIP's
      preprocessing, for pretrained CLIP towers).

  Returns:
    uint8 ``[S, S, 3]``: the shorter side resized to ``S``, centre cropped.
  """
  if resample not in RESAMPLING:
    raise ValueError(f'resample={resample!r}: must be one of {RESAMPLING}')
  if isinstance(image, (bytes, bytearray, memoryview)):
    img = Image.open(io.BytesIO(image))
    if resample == 'bilinear':
      img.draft('RGB', (load_size, load_size))  # JPEG-only DCT downscaling
  else:
    arr = np.asarray(image, np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:  # grayscale [H, W, 1]
      arr = arr[..., 0]
    img = Image.fromarray(arr)
  img = img.convert('RGB')
  w, h = img.size
  side = min(w, h)
  left, top = (w - side) / 2, (h - side) / 2
  img = img.resize(
      (load_size, load_size),
      Image.BICUBIC if resample == 'bicubic' else Image.BILINEAR,
      box=(left, top, left + side, top + side),
  )
  return np.asarray(img, np.uint8)


def class_ids(classes, names):
  """Maps class names or ids to sorted, unique integer ids.

  Args:
    classes: sequence of class names (e.g. synsets ``'n01440764'``) or ids.
    names: the full dataset's class names, in id order.

  Returns:
    int64 ``[C]`` sorted original class ids.
  """
  index = {n: i for i, n in enumerate(names)}
  ids = []
  for c in classes:
    if isinstance(c, (int, np.integer)):
      if not 0 <= c < len(names):
        raise ValueError(f'classes: id {c} is not in [0, {len(names)})')
      ids.append(int(c))
    elif c in index:
      ids.append(index[c])
    else:
      raise ValueError(f'classes: unknown class name {c!r}')
  if len(set(ids)) != len(ids):
    raise ValueError(f'classes has duplicates: {list(classes)}')
  if not ids:
    raise ValueError('classes must not be empty')
  return np.sort(np.asarray(ids, np.int64))


def subset_indices(source, ids, cache_dir, key, chunk=1024):
  """Positions of the examples of ``source`` whose label is in ``ids``.

  Finding them reads every record once (for ImageNet, the whole 140 GB), so
  the answer is cached in ``cache_dir`` under a name derived from ``key``
  and ``ids``, written atomically.

  Args:
    source: random-access source of dicts with a ``label``, supporting
      ``__getitems__`` (open it with image decoding skipped).
    ids: int ``[C]`` kept class ids.
    cache_dir: directory of the cache file.
    key: string identifying the source (dataset, version, split, length).
    chunk: records read per call.

  Returns:
    int64 ``[n]`` increasing positions in ``source``.
  """
  digest = hashlib.sha1(
      (key + ',' + ','.join(map(str, ids))).encode()
  ).hexdigest()[:16]
  path = os.path.join(cache_dir, f'subset-{digest}.npy')
  if os.path.exists(path):
    return np.load(path)
  os.makedirs(cache_dir, exist_ok=True)
  # Processes of one machine scan once: the others wait, then load.
  with builders.file_lock(path + '.lock'):
    if os.path.exists(path):
      return np.load(path)
    positions = _scan(source, ids, chunk)
    tmp = f'{path}.tmp{os.getpid()}.npy'
    np.save(tmp, positions)
    os.replace(tmp, path)  # atomic: readers never see a partial file
  return positions


def _scan(source, ids, chunk):
  """Positions of the examples of ``source`` whose label is in ``ids``."""
  logging.info('Scanning %d records for a class subset.', len(source))
  keep = np.zeros(int(np.max(ids)) + 1, bool)
  keep[ids] = True
  labels = np.empty(len(source), np.int64)
  for start in range(0, len(source), chunk):
    rows = list(range(start, min(start + chunk, len(source))))
    labels[start : start + len(rows)] = [
        int(ex['label']) for ex in source.__getitems__(rows)
    ]
  in_range = labels < len(keep)
  return np.flatnonzero(in_range & keep[np.where(in_range, labels, 0)])
