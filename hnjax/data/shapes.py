"""shapes32: a generated dataset of coloured shapes on cluttered backgrounds.

Each example is a 32x32 RGB image of one shape (circle, square, triangle,
plus, star) in one colour family (red, yellow, green, blue) drawn over a
low-saturation background with a brightness gradient, pixel noise and a few
random line segments. The class is ``shape * 4 + colour`` (20 classes). The
continuous factors are stored too: ``size`` (circumradius in pixels, a
regression target), ``angle`` (degrees within the shape's symmetry period),
``x``/``y`` (centre in pixels), with a caption such as
``'a large red triangle rotated 40 degrees near the top left'``.

Colours vary within a class (hue +-10 degrees, saturation and value in
[0.55, 1]), and the clutter uses all hues, so colour and shape must both be
read from the shape itself.

Each example also has ``alt_image``: the same shape, pixel for pixel, drawn
over a background, clutter and noise of its own. Two augmentations of one
image share its background, and a hue histogram of the background alone
pairs them, so self-supervised methods learn the background colour and
little of the shape; MoCo on shapes32 augments its key view from
``alt_image`` instead (``data.key_image``), which removes that shortcut and
leaves the classes as they are. ``image`` does not depend on ``alt_image``
(separate random streams).

Generation is vectorised numpy, deterministic in ``seed`` and the split:
about 9 s for the 22000 default images and their second renderings on one
core, plus about as long for tfds to write them.
"""

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds

from hnjax.data import tfds_base

SHAPES = ('circle', 'square', 'triangle', 'plus', 'star')
COLOURS = ('red', 'yellow', 'green', 'blue')
CLASS_NAMES = tuple(f'{c}_{s}' for s in SHAPES for c in COLOURS)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 32
# Rotational symmetry period of each shape in degrees; angles are drawn in
# [0, period) so that the angle is recoverable from the image.
_PERIODS = (0.0, 90.0, 120.0, 90.0, 72.0)
_HUES = (0.0, 55.0, 120.0, 225.0)  # degrees
SIZE_RANGE = (4.5, 12.0)  # circumradius in pixels
_MAX_CLUTTER = 4
_CHUNK = 256  # examples rendered at once: small arrays stay in cache
_SPLIT_SEEDS = {'train': 0, 'test': 1}


def _hsv_to_rgb(h, s, v):
  """HSV in [0, 1] (any broadcastable shapes) to RGB ``[..., 3]``."""
  h6 = (h % 1.0) * 6.0
  k = (np.array([5.0, 3.0, 1.0]) + h6[..., None]) % 6.0
  f = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
  return v[..., None] * (1.0 - s[..., None] * f)


def _box(px, py, ax, ay):
  """Signed distance to an axis-aligned box of half sizes (ax, ay)."""
  qx, qy = np.abs(px) - ax, np.abs(py) - ay
  outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
  return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _triangle(px, py, r):
  """Signed distance to an equilateral triangle with circumradius ``r``."""
  # Inigo Quilez's exact formula; half side length is r * sqrt(3) / 2.
  k = np.sqrt(3.0)
  half = r * k / 2.0
  px = np.abs(px) - half
  py = py + half / k
  flip = px + k * py > 0.0
  px, py = (
      np.where(flip, (px - k * py) / 2.0, px),
      np.where(flip, (-k * px - py) / 2.0, py),
  )
  px = px - np.clip(px, -2.0 * half, 0.0)
  return -np.hypot(px, py) * np.sign(py)


def _star(px, py, r, inner=0.45):
  """Signed distance to a five-pointed star with outer radius ``r``."""
  # Fold the plane into one arm with two reflections (Inigo Quilez).
  k1x, k1y = 0.809016994375, -0.587785252292
  k2x, k2y = -k1x, k1y
  px = np.abs(px)
  d = 2.0 * np.maximum(k1x * px + k1y * py, 0.0)
  px, py = px - d * k1x, py - d * k1y
  d = 2.0 * np.maximum(k2x * px + k2y * py, 0.0)
  px, py = px - d * k2x, py - d * k2y
  px = np.abs(px)
  py = py - r
  bax, bay = inner * -k1y, inner * k1x - 1.0
  h = np.clip((px * bax + py * bay) / (bax**2 + bay**2), 0.0, r)
  return np.hypot(px - bax * h, py - bay * h) * np.sign(py * bax - px * bay)


def _shape_sdf(shape, px, py, r):
  """Signed distance (pixels) to each example's shape; inputs ``[b, H, W]``."""
  fns = (
      lambda x, y, r: np.hypot(x, y) - r,
      lambda x, y, r: _box(x, y, r / np.sqrt(2.0), r / np.sqrt(2.0)),
      lambda x, y, r: _triangle(x, -y, r),  # -y: image rows grow downwards
      lambda x, y, r: np.minimum(
          _box(x, y, r, 0.33 * r), _box(x, y, 0.33 * r, r)
      ),
      lambda x, y, r: _star(x, -y, r),
  )
  d = np.empty_like(px)
  for s, fn in enumerate(fns):  # Evaluate each formula on its examples only.
    sel = shape == s
    d[sel] = fn(px[sel], py[sel], r[sel])
  return d


def _segment_sdf(px, py, ax, ay, bx, by):
  """Distance to segments a-b; points ``[b, H, W]``, ends ``[b, 1, 1]``."""
  dx, dy = bx - ax, by - ay
  t = ((px - ax) * dx + (py - ay) * dy) / (dx**2 + dy**2 + 1e-6)
  t = np.clip(t, 0.0, 1.0)
  return np.hypot(px - ax - t * dx, py - ay - t * dy)


def _position_words(x, y):
  # Shapes keep a margin of size + 1 pixels, so 'center' is a 7x7 pixel box
  # around the middle rather than the middle third.
  lo, hi = IMAGE_SIZE / 2 - 3.5, IMAGE_SIZE / 2 + 3.5
  col = 'left' if x < lo else ('right' if x > hi else '')
  row = 'top' if y < lo else ('bottom' if y > hi else '')
  return ' '.join(w for w in (row, col) if w) or 'center'


def _size_word(size):
  lo, hi = SIZE_RANGE
  t = (size - lo) / (hi - lo)
  return 'small' if t < 1 / 3 else ('medium' if t < 2 / 3 else 'large')


def caption(shape, colour, size, angle, x, y):
  """English caption of one example's factors.

  Args:
    shape: index into ``SHAPES``.
    colour: index into ``COLOURS``.
    size: circumradius in pixels.
    angle: rotation in degrees.
    x: centre column in pixels.
    y: centre row in pixels.

  Returns:
    A string such as ``'a large red triangle rotated 40 degrees near the top
    left'``.
  """
  words = f'a {_size_word(size)} {COLOURS[colour]} {SHAPES[shape]}'
  if _PERIODS[shape] > 0:
    words += f' rotated {int(round(angle))} degrees'
  return f'{words} near the {_position_words(x, y)}'


def _sample_factors(rng, num_examples):
  """Draws labels (exactly balanced) and continuous factors."""
  n = num_examples
  label = rng.permutation(np.arange(n) % NUM_CLASSES)
  shape, colour = label // len(COLOURS), label % len(COLOURS)
  size = rng.uniform(*SIZE_RANGE, n)
  angle = rng.uniform(0.0, 1.0, n) * np.take(_PERIODS, shape)
  margin = size + 1.0
  x = margin + rng.uniform(0.0, 1.0, n) * (IMAGE_SIZE - 2 * margin)
  y = margin + rng.uniform(0.0, 1.0, n) * (IMAGE_SIZE - 2 * margin)
  return dict(
      label=label, shape=shape, colour=colour, size=size, angle=angle, x=x, y=y
  )


def _composite(img, alpha, rgb):
  """In place: ``img = img * (1 - alpha) + alpha * rgb`` per example."""
  # Layers cover few pixels: update only those (3x faster than dense).
  b, y, x = np.nonzero(alpha)
  a = alpha[b, y, x][:, None]
  img[b, y, x] -= a * (img[b, y, x] - rgb[b])


def _col(a):
  """Per-example values ``[b]`` -> float32 ``[b, 1, 1]`` (over pixels)."""
  return np.asarray(a, np.float32)[:, None, None]


_GRID = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5  # pixel centres
_GX, _GY = _GRID[None, None, :], _GRID[None, :, None]


def _background(rng, b):
  """Backgrounds ``[b, 32, 32, 3]`` float32 in [0, 1] (before the shape)."""
  f32 = functools.partial(np.asarray, dtype=np.float32)

  def u(lo, hi):
    return rng.uniform(lo, hi, b)

  # A low-saturation colour with a linear brightness gradient.
  bg = f32(_hsv_to_rgb(u(0, 1), u(0, 0.3), u(0.15, 0.85)))
  theta = u(0, 2 * np.pi)
  slope = u(0, 0.25) / 16
  ramp = _col(slope * np.cos(theta)) * (_GX - 16) + _col(
      slope * np.sin(theta)
  ) * (_GY - 16)
  img = bg[:, None, None, :] + ramp[..., None]

  # Clutter behind the shape: 1-4 thin segments and maybe a small disc, of
  # any hue, so colour must be read from the shape itself.
  num_lines = rng.integers(1, _MAX_CLUTTER + 1, b)
  for i in range(_MAX_CLUTTER):
    ends = rng.uniform(0, IMAGE_SIZE, (4, b))
    width = u(0.5, 1.0)
    rgb = f32(_hsv_to_rgb(u(0, 1), u(0.3, 1), u(0.3, 1)))
    d = _segment_sdf(_GX, _GY, *(_col(e) for e in ends))
    alpha = np.clip(_col(width) + 0.5 - d, 0, 1) * _col(0.7 * (i < num_lines))
    _composite(img, alpha, rgb)
  cx, cy, radius = u(0, IMAGE_SIZE), u(0, IMAGE_SIZE), u(1.5, 3.0)
  rgb = f32(_hsv_to_rgb(u(0, 1), u(0.3, 1), u(0.3, 1)))
  d = np.hypot(_GX - _col(cx), _GY - _col(cy)) - _col(radius)
  _composite(img, np.clip(0.5 - d, 0, 1) * _col(u(0, 1) < 0.5), rgb)
  return img


def _shape_layer(rng, f):
  """Each example's shape: coverage ``[b, 32, 32]`` and colour ``[b, 3]``."""
  b = f['label'].shape[0]
  # Anti-aliased by its signed distance.
  hue = np.take(_HUES, f['colour']) / 360 + rng.uniform(-10, 10, b) / 360
  rgb = np.asarray(
      _hsv_to_rgb(hue, rng.uniform(0.55, 1, b), rng.uniform(0.55, 1, b)),
      np.float32,
  )
  a = np.deg2rad(f['angle'])
  dx, dy = _GX - _col(f['x']), _GY - _col(f['y'])
  px = _col(np.cos(a)) * dx + _col(np.sin(a)) * dy
  py = _col(np.cos(a)) * dy - _col(np.sin(a)) * dx
  d = _shape_sdf(f['shape'], px, py, np.broadcast_to(_col(f['size']), px.shape))
  return np.clip(0.5 - d, 0, 1), rgb


def _finish(rng, img):
  """Adds pixel noise and quantises to uint8."""
  sigma = _col(rng.uniform(0.02, 0.06, img.shape[0]))[..., None]
  img += rng.standard_normal(img.shape, dtype=np.float32) * sigma
  return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _render(rng, f, alt_rng):
  """Renders one chunk of factors: ``image`` and ``alt_image`` uint8.

  ``alt_image`` holds the very same shape (pixels of coverage and colour)
  over a new background, clutter and noise drawn from ``alt_rng``, so that
  ``rng``'s stream, hence ``image``, does not depend on it.
  """
  b = f['label'].shape[0]
  img = _background(rng, b)
  alpha, rgb = _shape_layer(rng, f)
  _composite(img, alpha, rgb)
  img = _finish(rng, img)
  alt = _background(alt_rng, b)
  _composite(alt, alpha, rgb)
  return img, _finish(alt_rng, alt)


def generate(num_examples, seed=0):
  """Generates ``num_examples`` shapes32 examples in memory.

  Args:
    num_examples: number of examples ``n`` (a multiple of 20 gives exactly
      balanced classes).
    seed: integer seed; equal seeds give identical examples.

  Returns:
    A dict of numpy arrays: ``image`` and ``alt_image`` (the same shape
    over another background) uint8 ``[n, 32, 32, 3]``, ``label``,
    ``shape``, ``colour`` int64 ``[n]``, ``size``, ``angle``, ``x``, ``y``
    float32 ``[n]`` and ``caption`` (a list of ``n`` strings).
  """
  if num_examples < 0:
    raise ValueError(f'num_examples must be >= 0, got {num_examples}')
  rng = np.random.default_rng([seed, 0x5A4E])
  alt_rng = np.random.default_rng([seed, 0x5A4E, 1])
  f = _sample_factors(rng, num_examples)
  chunks = [
      _render(rng, {k: v[i : i + _CHUNK] for k, v in f.items()}, alt_rng)
      for i in range(0, num_examples, _CHUNK)
  ]
  out = {k: v.astype(np.int64) for k, v in f.items() if v.dtype.kind == 'i'}
  out.update(
      {k: v.astype(np.float32) for k, v in f.items() if v.dtype.kind == 'f'}
  )
  empty = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for i, name in enumerate(('image', 'alt_image')):
    out[name] = np.concatenate([c[i] for c in chunks]) if chunks else empty
  keys = ('shape', 'colour', 'size', 'angle', 'x', 'y')
  out['caption'] = [
      caption(*(f[k][i] for k in keys)) for i in range(num_examples)
  ]
  return out


@dataclasses.dataclass(eq=False)
class Shapes32Config(tfds.core.BuilderConfig):
  """Split sizes and seed of a shapes32 variant."""

  num_train: int = 20_000
  num_test: int = 2_000
  seed: int = 0


class Shapes32(tfds_base.LocalBuilder):
  """shapes32 as a local tfds builder (nothing to download)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'alt_image: each shape again over another background.',
  }
  BUILDER_CONFIGS = [
      Shapes32Config(name='default', description='20000 train, 2000 test.'),
      Shapes32Config(
          name='small',
          num_train=2_000,
          num_test=400,
          description='2000 train, 400 test, for smoke runs.',
      ),
  ]

  def _info(self):
    hw = (IMAGE_SIZE, IMAGE_SIZE, 3)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                # Tensor (not Image) features: preparing needs no
                # TensorFlow; raw bytes, not the default int64 list of
                # pixels (8x faster I/O).
                'image': tfds.features.Tensor(
                    shape=hw, dtype=np.uint8, encoding='bytes'
                ),
                'alt_image': tfds.features.Tensor(
                    shape=hw, dtype=np.uint8, encoding='bytes'
                ),
                'label': tfds.features.ClassLabel(names=CLASS_NAMES),
                'shape': tfds.features.ClassLabel(names=SHAPES),
                'colour': tfds.features.ClassLabel(names=COLOURS),
                'size': tfds.features.Scalar(dtype=np.float32),
                'angle': tfds.features.Scalar(dtype=np.float32),
                'x': tfds.features.Scalar(dtype=np.float32),
                'y': tfds.features.Scalar(dtype=np.float32),
                'caption': tfds.features.Text(),
                'index': tfds.features.Scalar(dtype=np.int64),
            }
        ),
        supervised_keys=('image', 'label'),
        # Keep generation order so that record i has index i.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    sizes = {'train': cfg.num_train, 'test': cfg.num_test}
    return {
        split: self._generate_examples(split, n) for split, n in sizes.items()
    }

  def _generate_examples(self, split, num_examples):
    data = generate(
        num_examples, seed=self.builder_config.seed * 2 + _SPLIT_SEEDS[split]
    )
    for i in range(num_examples):
      ex = {k: v[i] for k, v in data.items()}
      ex['index'] = i
      yield i, ex
