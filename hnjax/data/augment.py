"""MoCo v2 augmentations on device, in JAX, one PRNG key per example.

Every random choice for an example is drawn from that example's own typed
key, and examples are processed independently under ``jax.vmap``, so the
views of an example depend only on its key and its image, not on the batch
it is in or on how the batch is sharded over devices. Derive the keys from
the step and the dataset index::

  keys = example_keys(jax.random.fold_in(rng, step), batch['index'])
  view_q, view_k = two_views(keys, batch['image'], config)

The pipeline is torchvision's MoCo v2 recipe: ``RandomResizedCrop`` (scale
(0.2, 1), ratio (3/4, 4/3)), ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with p=0.8
(the four adjustments in a random order, as torchvision), ``RandomGrayscale``
p=0.2, ``GaussianBlur`` sigma in [0.1, 2] with p=0.5, horizontal flip p=0.5,
then normalisation. Differences from torchvision, all deliberate:

* crops have real-valued size and offset (torchvision rounds to pixels) and
  are resampled bilinearly, antialiased when shrinking (as
  ``jax.image.scale_and_translate(..., antialias=True)``);
* the blur kernel is an odd size near 10% of the output side (23 at 224 as
  in MoCo v2, 3 at 32), so blur is mild on small images; the MoCo CIFAR
  recipes drop it, which is ``blur_prob=0``;
* the flip is applied first, inside the crop (free): every later op is
  pixelwise or mirror-symmetric, so the distribution of views is the same;
* single-channel images (digits) stay single-channel: saturation, hue and
  grayscale are identities on them, brightness and contrast apply.

Cost: the crop is two small matrix products per example (``out x H`` and
``out x W``), about 0.4 MFLOP per 32x32 view and 0.2 GFLOP per 224x224 view
from 256x256; two views of 256 32x32 images take about 50-100 ms on two
CPU cores, colour jitter being about half of it.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL/torchvision


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Parameters of the MoCo v2 augmentation (hashable: a static jit arg).

  Attributes:
    out_size: side of the output views.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio (width / height).
    flip_prob: probability of a horizontal flip.
    jitter_prob: probability of applying colour jitter.
    brightness: brightness factor drawn in ``[1 - b, 1 + b]``.
    contrast: contrast factor drawn in ``[1 - c, 1 + c]``.
    saturation: saturation factor drawn in ``[1 - s, 1 + s]``.
    hue: hue shift drawn in ``[-h, h]`` (fraction of the colour wheel).
    jitter_random_order: apply the four adjustments in a random order (as
      torchvision) rather than brightness, contrast, saturation, hue.
    grayscale_prob: probability of converting to grayscale.
    blur_prob: probability of a Gaussian blur.
    blur_sigma: range of the blur standard deviation in pixels.
    blur_kernel_fraction: blur kernel size as a fraction of ``out_size``
      (rounded to an odd size, at least 3).
    mean: per-channel mean subtracted from images scaled to ``[0, 1]``.
    std: per-channel standard deviation divided out after that.
  """

  out_size: int = 224
  scale: tuple[float, float] = (0.2, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.1
  jitter_random_order: bool = True
  grayscale_prob: float = 0.2
  blur_prob: float = 0.5
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  blur_kernel_fraction: float = 0.1
  mean: tuple[float, ...] = _IMAGENET_MEAN
  std: tuple[float, ...] = _IMAGENET_STD

  def __post_init__(self):
    if self.out_size <= 0:
      raise ValueError(f'out_size must be positive, got {self.out_size}')
    for name in ('scale', 'ratio', 'blur_sigma'):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise ValueError(
            f'{name} must satisfy 0 < lo <= hi, got ' f'{getattr(self, name)}'
        )
    if self.scale[1] > 1:
      raise ValueError(f'scale must be within (0, 1], got {self.scale}')
    for name in ('flip_prob', 'jitter_prob', 'grayscale_prob', 'blur_prob'):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f'{name} must be in [0, 1], got {getattr(self, name)}')
    for name in ('brightness', 'contrast', 'saturation'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
    if not 0 <= self.hue <= 0.5:
      raise ValueError(f'hue must be in [0, 0.5], got {self.hue}')
    if len(self.mean) != len(self.std) or min(self.std) <= 0:
      raise ValueError(
          f'mean and std must have equal lengths and std > 0, '
          f'got mean={self.mean}, std={self.std}'
      )

  @property
  def blur_kernel_size(self):
    """Odd blur kernel size near ``blur_kernel_fraction * out_size``, >= 3."""
    k = max(3, int(round(self.blur_kernel_fraction * self.out_size)))
    return k if k % 2 else k + 1


def example_keys(base_key, indices):
  """Per-example keys ``fold_in(base_key, index)``.

  Args:
    base_key: a typed key, e.g. ``fold_in(rng, step)``.
    indices: int ``[b]`` dataset indices of the examples.

  Returns:
    Typed keys ``[b]``; equal indices give equal keys.
  """
  return jax.vmap(lambda i: jax.random.fold_in(base_key, i))(
      jnp.asarray(indices)
  )


def _to_float(images):
  """uint8 images to float32 in [0, 1]; float images are taken as is."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _check_images(images, config=None):
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
        f'images must be [b, H, W, C] with C in (1, 3), got '
        f'shape {images.shape}'
    )
  if config is not None and len(config.mean) not in (1, images.shape[-1]):
    raise ValueError(
        f'config.mean has {len(config.mean)} channels but images '
        f'have {images.shape[-1]}'
    )


def normalize(images, mean, std):
  """``(images - mean) / std`` per channel.

  Args:
    images: float ``[..., C]`` in ``[0, 1]``.
    mean: ``C`` (or 1) channel means.
    std: ``C`` (or 1) channel standard deviations.

  Returns:
    float32 ``[..., C]``.
  """
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
      std, jnp.float32
  )


def _gray(img):
  """Luma ``[H, W, 1]`` of an ``[H, W, C]`` image."""
  if img.shape[-1] == 1:
    return img
  # A weighted sum, not a dot: XLA fuses it with the surrounding ops.
  wr, wg, wb = _GRAY_WEIGHTS
  return (wr * img[..., 0] + wg * img[..., 1] + wb * img[..., 2])[..., None]


_TRIES = 10  # torchvision's RandomResizedCrop attempts
_NUM_UNIFORMS = 2 * _TRIES + 2 + 13


def _crop_box(u, height, width, scale, ratio):
  """(y0, x0, h, w) of a random resized crop, as torchvision (10 tries).

  Args:
    u: uniforms in [0, 1), ``[2 * _TRIES + 2]``.
    height: image height.
    width: image width.
    scale: area fraction range.
    ratio: aspect ratio range.
  """
  area = height * width
  target = area * (scale[0] + (scale[1] - scale[0]) * u[:_TRIES])
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  r = jnp.exp(lo + (hi - lo) * u[_TRIES : 2 * _TRIES])
  w = jnp.sqrt(target * r)
  h = jnp.sqrt(target / r)
  ok = (w <= width) & (h <= height)
  first = jnp.argmax(ok)
  # Fallback when no try fits: the whole image, clamped to the ratio range.
  in_ratio = width / height
  fw = min(width, height * ratio[1]) if in_ratio > ratio[1] else width
  fh = min(height, width / ratio[0]) if in_ratio < ratio[0] else height
  w = jnp.where(ok.any(), w[first], fw)
  h = jnp.where(ok.any(), h[first], fh)
  y0 = u[2 * _TRIES] * (height - h)
  x0 = u[2 * _TRIES + 1] * (width - w)
  return y0, x0, h, w


def _interp_matrix(start, length, in_size, out_size):
  """Weights ``[out, in]`` resampling ``[start, start + length)`` to ``out``.

  Bilinear (triangle kernel), widened by the downscaling factor so that
  shrinking averages rather than aliases, renormalised at the borders; the
  same scheme as ``jax.image.scale_and_translate(..., antialias=True)``,
  written as one small matrix per axis because that compiles in a fraction
  of the time under ``vmap``.
  """
  scale = length / out_size  # input pixels per output pixel
  centres = start + (jnp.arange(out_size) + 0.5) * scale - 0.5
  support = jnp.maximum(scale, 1.0)
  d = (jnp.arange(in_size)[None, :] - centres[:, None]) / support
  w = jnp.maximum(0.0, 1.0 - jnp.abs(d))
  return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-6)


def _resample(img, y0, x0, h, w, out_size, flip=False):
  """Crops box (y0, x0, h, w) of ``img [H, W, C]`` to ``[out, out, C]``.

  A horizontal flip reverses the rows of the column weights, so it is free.
  """
  wy = _interp_matrix(y0, h, img.shape[0], out_size)
  wx = _interp_matrix(x0, w, img.shape[1], out_size)
  wx = jnp.where(flip, wx[::-1], wx)
  # Default precision: HIGHEST is 3x slower on CPU, and bf16 passes on TPU
  # only perturb pixels by about 1/255.
  img = jnp.einsum('oh,hwc->owc', wy, img)
  return jnp.einsum('owc,pw->opc', img, wx)


def _rgb_to_hsv(img):
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  v = jnp.max(img, axis=-1)
  c = v - jnp.min(img, axis=-1)
  safe_c = jnp.where(c > 0, c, 1.0)
  s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
  h = jnp.where(
      v == r,
      (g - b) / safe_c,
      jnp.where(v == g, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c),
  )
  h = jnp.where(c > 0, (h / 6.0) % 1.0, 0.0)
  return h, s, v


def _hsv_to_rgb(h, s, v):
  k = (jnp.asarray([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
  f = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return v[..., None] * (1.0 - s[..., None] * f)


def _color_jitter(u, img, config):
  """torchvision ``ColorJitter`` on one ``[H, W, C]`` image in [0, 1].

  Args:
    u: uniforms in [0, 1), ``[8]``: four factors, then four sort keys of the
      random order.
    img: ``[H, W, C]`` in [0, 1].
    config: an ``AugmentConfig``.
  """

  def factor(v, amount):
    lo = max(0.0, 1.0 - amount)
    return lo + (1.0 + amount - lo) * v

  fb, fc = factor(u[0], config.brightness), factor(u[1], config.contrast)
  fs, fh = factor(u[2], config.saturation), config.hue * (2.0 * u[3] - 1.0)

  # Brightness, contrast and saturation all blend the image with a target
  # (black, its mean luma, its per-pixel luma): op o in 0..2 is
  # clip(f[o] * x + (1 - f[o]) * target[o]); o = 3 (f = 1) is the identity.
  # Selecting a factor and a target is much cheaper to compile than a
  # switch, which under vmap would evaluate every branch anyway.
  def cheap(x, o):
    gray = _gray(x)  # on 1-channel images saturation is thus the identity
    target = jnp.where(o == 0, 0.0, jnp.where(o == 1, jnp.mean(gray), gray))
    f = jnp.where(o == 0, fb, jnp.where(o == 1, fc, jnp.where(o == 2, fs, 1.0)))
    return jnp.clip(f * x + (1.0 - f) * target, 0.0, 1.0)

  def hue(x):
    if x.shape[-1] == 1:
      return x
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + fh) % 1.0, s, v)

  if not config.jitter_random_order:
    for o in range(3):
      img = cheap(img, o)
    return hue(img)
  order = jnp.argsort(u[4:8])  # a uniformly random permutation of 0..3
  # Hue (an HSV round trip) is the costly op: run the blends that precede
  # it, hue once, then the blends that follow it.
  pos = jnp.argmax(order == 3)  # position of hue in the order
  for i in range(3):
    img = cheap(img, jnp.where(i < pos, order[i], 3))
  img = hue(img)
  for i in range(3):
    j = pos + 1 + i
    img = cheap(img, jnp.where(j < 4, order[jnp.minimum(j, 3)], 3))
  return img


def _channel_mix(img, gray):
  """Grayscale (replicated to all channels) if ``gray``, else the identity.

  A per-example ``[C, C]`` matrix product rather than a select, on purpose:
  it materialises the image, which the blur then reads ``2k`` times; from an
  unmaterialised select XLA would recompute the whole colour-jitter chain
  for every read (2-3x slower on CPU). Arithmetic rather than ``jnp.where``
  builds the matrix, which keeps it valid under explicit sharding without a
  mesh context.
  """
  c = img.shape[-1]
  eye = jnp.eye(c)
  to_gray = jnp.broadcast_to(jnp.asarray(_GRAY_WEIGHTS)[:, None], (3, 3))
  mix = eye if c == 1 else eye + jnp.float32(gray) * (to_gray - eye)
  return jnp.einsum('hwc,cd->hwd', img, mix)


def _gaussian_blur(img, sigma, kernel_size):
  """Separable Gaussian blur of ``[H, W, C]`` with reflect padding.

  A sum of shifted slices: cheap, and safe under explicit sharding (a gather
  with per-example indices is not, in JAX 0.10). Its input should be
  materialised (see ``_channel_mix``).
  """
  r = kernel_size // 2
  x = jnp.arange(-r, r + 1, dtype=jnp.float32)
  wts = jnp.exp(-0.5 * (x / sigma) ** 2)
  wts = wts / jnp.sum(wts)
  for axis in (0, 1):
    n = img.shape[axis]
    pad = [(0, 0)] * 3
    pad[axis] = (r, r)
    # Reflect padding needs the image to be wider than the kernel radius.
    padded = jnp.pad(img, pad, mode='reflect' if n > r else 'edge')
    img = sum(
        wts[j] * jax.lax.slice_in_dim(padded, j, j + n, axis=axis)
        for j in range(kernel_size)
    )
  return img


def augment_example(key, image, config):
  """One random MoCo v2 view of one image.

  Args:
    key: typed PRNG key of this example (and view).
    image: uint8 (or float in [0, 1]) ``[H, W, C]``, ``C`` in (1, 3).
    config: an ``AugmentConfig``.

  Returns:
    float32 ``[out_size, out_size, C]``, normalised.
  """
  # All randomness in one draw: one threefry call per example keeps the
  # compiled program small (each call is unrolled by XLA).
  u = jax.random.uniform(key, (_NUM_UNIFORMS,))
  u_crop, u = u[: 2 * _TRIES + 2], u[2 * _TRIES + 2 :]
  img = _to_float(image)
  height, width, _ = img.shape
  box = _crop_box(u_crop, height, width, config.scale, config.ratio)
  # The flip is done by the crop: every later op is pixelwise or (the blur)
  # mirror-symmetric, so flipping first gives the same distribution as
  # torchvision flipping last.
  img = _resample(img, *box, config.out_size, flip=u[12] < config.flip_prob)
  img = jnp.clip(img, 0.0, 1.0)
  if config.jitter_prob > 0:
    jittered = _color_jitter(u[:8], img, config)
    img = jnp.where(u[8] < config.jitter_prob, jittered, img)
  if config.grayscale_prob > 0 or config.blur_prob > 0:
    gray = u[9] < config.grayscale_prob if img.shape[-1] == 3 else False
    img = _channel_mix(img, gray)
  if config.blur_prob > 0:
    lo, hi = config.blur_sigma
    blurred = _gaussian_blur(
        img, lo + (hi - lo) * u[10], config.blur_kernel_size
    )
    img = jnp.where(u[11] < config.blur_prob, blurred, img)
  return normalize(img, config.mean, config.std)


def augment_batch(keys, images, config=AugmentConfig()):
  """One random view per image, each from its own key.

  Args:
    keys: typed PRNG keys ``[b]`` (see ``example_keys``).
    images: uint8 ``[b, H, W, C]``, ``C`` in (1, 3).
    config: an ``AugmentConfig``.

  Returns:
    float32 ``[b, out_size, out_size, C]``, normalised.
  """
  images = jnp.asarray(images)
  _check_images(images, config)
  if keys.shape != images.shape[:1]:
    raise ValueError(
        f'keys must have shape {images.shape[:1]}, got ' f'{keys.shape}'
    )
  # The config is closed over, not passed: vmap wants only arrays.
  return jax.vmap(lambda k, im: augment_example(k, im, config))(keys, images)


def two_views(keys, images, config=AugmentConfig(), config_k=None,
              images_k=None):
  """The query and key views of MoCo, with independent randomness.

  Args:
    keys: typed PRNG keys ``[b]``; view q uses ``fold_in(key, 0)`` and view k
      ``fold_in(key, 1)``.
    images: uint8 ``[b, H, W, C]``.
    config: ``AugmentConfig`` of view q.
    config_k: ``AugmentConfig`` of view k; default ``config``.
    images_k: uint8 ``[b, H, W, C]`` that view k is drawn from (e.g. the
      same object photographed again); default ``images``.

  Returns:
    ``(view_q, view_k)``, each float32 ``[b, out_size, out_size, C]``.
  """
  keys_q = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
  keys_k = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
  images = jnp.asarray(images)
  images_k = images if images_k is None else jnp.asarray(images_k)
  if images_k.shape != images.shape:
    raise ValueError(
        f'images_k must have the shape of images {images.shape}, got '
        f'{images_k.shape}'
    )
  if config_k is not None and config_k != config:
    return (
        augment_batch(keys_q, images, config),
        augment_batch(keys_k, images_k, config_k),
    )
  # One vmap over both views: half the tracing and compiling.
  views = augment_batch(
      jnp.concatenate([keys_q, keys_k]),
      jnp.concatenate([images, images_k]),
      config,
  )
  return views[: len(keys)], views[len(keys) :]


def eval_transform(images, *, out_size, mean, std, crop_fraction=1.0):
  """Deterministic evaluation view: centre crop, resize, normalise.

  Takes the centred square of side ``crop_fraction * min(H, W)`` and resizes
  it to ``out_size`` (antialiased bilinear). With 256x256 inputs,
  ``crop_fraction=0.875`` and ``out_size=224`` this is the standard
  resize-256 / centre-crop-224 ImageNet evaluation, without resampling.

  Args:
    images: uint8 ``[b, H, W, C]``.
    out_size: output side.
    mean: per-channel means (images scaled to ``[0, 1]``).
    std: per-channel standard deviations.
    crop_fraction: side of the centre crop relative to the shorter side.

  Returns:
    float32 ``[b, out_size, out_size, C]``.
  """
  images = _to_float(images)
  _check_images(images)
  if not 0 < crop_fraction <= 1:
    raise ValueError(f'crop_fraction must be in (0, 1], got {crop_fraction}')
  if out_size <= 0:
    raise ValueError(f'out_size must be positive, got {out_size}')
  _, height, width, _ = images.shape
  side = crop_fraction * min(height, width)
  y0, x0 = (height - side) / 2, (width - side) / 2
  side = jnp.float32(side)
  out = jax.vmap(
      lambda im: _resample(
          im, jnp.float32(y0), jnp.float32(x0), side, side, out_size
      )
  )(images)
  return normalize(jnp.clip(out, 0.0, 1.0), mean, std)


def tabular_views(keys, features, *, mean, std, noise=0.1, dropout=0.1):
  """Two views of tabular examples: Gaussian noise and feature dropout.

  Features are standardised with ``mean`` and ``std``; each view adds
  ``N(0, noise²)`` to every standardised feature and then sets each feature
  to 0 (its mean) with probability ``dropout``, from the example's key.

  Args:
    keys: typed PRNG keys ``[b]``; view 0 uses ``fold_in(key, 0)``, view 1
      ``fold_in(key, 1)``.
    features: float ``[b, F]`` raw features.
    mean: ``[F]`` training means.
    std: ``[F]`` training standard deviations.
    noise: standard deviation of the noise (standardised units).
    dropout: probability of dropping each feature.

  Returns:
    ``(view_0, view_1)``, each float32 ``[b, F]``.
  """
  x = (jnp.asarray(features, jnp.float32) - jnp.asarray(mean, jnp.float32)) / (
      jnp.asarray(std, jnp.float32))

  def view(key, row):
    k_noise, k_drop = jax.random.split(key)
    row = row + noise * jax.random.normal(k_noise, row.shape)
    return jnp.where(jax.random.uniform(k_drop, row.shape) < dropout, 0.0,
                     row)

  return tuple(
      jax.vmap(lambda k, r, v=v: view(jax.random.fold_in(k, v), r))(keys, x)
      for v in (0, 1))


def standardize(features, *, mean, std):
  """Evaluation view of tabular examples: ``(x - mean) / std``, float32."""
  return (jnp.asarray(features, jnp.float32) - jnp.asarray(mean, jnp.float32)
          ) / jnp.asarray(std, jnp.float32)
