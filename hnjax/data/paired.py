"""Image-caption pairs for the CLIP-mixup family, tokenised on the host.

`open_paired` returns a `PairedData`: a training source of ``(image,
tokens)`` pairs and validation / test `EvalSet`\\ s. Captions are turned
into ``int32 [L]`` token ids when the data is opened, so strings never
reach a device batch.

========== ============================= =====================================
name       training pairs                evaluation
========== ============================= =====================================
shapes32   train[:45%] (``pretrain``),   val: train[90%:]; test: test;
           train[45%:90%] (``finetune``) 1 caption per image, and one hard
           one caption per image         negative per image and swap type
coco       Karpathy train + restval,     Karpathy test (5k images): every
           the first caption (m²-mix)    caption (standard) and the first
flickr30k  Karpathy train, the first     Karpathy test (1k images): the same
           caption (m²-mix)
========== ============================= =====================================

shapes32's pretraining and fine-tuning halves are disjoint, so the
fine-tuned model sees new pairs of the same distribution. Its captions
(``'a large red triangle rotated 40 degrees near the top left'``) use a
word-level tokenizer built from the training captions
(`hnjax.data.text.WordTokenizer`); COCO and Flickr30k use a byte-level BPE
tokenizer trained on their training captions (`hnjax.data.subword`, HF
``tokenizers``).

A pretrained CLIP brings its own tokenizer and preprocessing: pass its
``tokenizer`` (`hnjax.models.clip_tokenizer.ClipTokenizer`), ``resample=
'bicubic'`` and its ``normalization``, and every dataset is tokenised and
normalised as the checkpoint expects.

The two caption protocols of the real datasets are named explicitly:
``first`` (one caption per image, m²-mix's ``drop_duplicates`` /
``caption[0]``: its training and its reported evaluation) and ``all`` (every
caption, 5 per image: the standard COCO / Flickr30k evaluation).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np

from hnjax.data import captions as captions_lib
from hnjax.data import shapes
from hnjax.data import sources
from hnjax.data import text

DATASETS = ('shapes32', 'shapes32/small', 'coco', 'flickr30k')
PARTS = ('pretrain', 'finetune')
# shapes32's training split: pretraining, fine-tuning, validation.
_SHAPES_CUTS = (0.45, 0.9)


class PairSource:
  """Random access to ``(image, tokens)`` training pairs.

  ``get_batch(rows, fields)`` returns ``image`` uint8 ``[b, H, W, 3]``,
  ``tokens`` int32 ``[b, L]`` and ``index`` int64 ``[b]`` (rows here).
  """

  def __init__(self, images: Any, image_rows: np.ndarray,
               tokens: np.ndarray):
    if len(image_rows) != len(tokens):
      raise ValueError(f'{len(image_rows)} images but {len(tokens)} '
                       'captions')
    self._images = images
    self._image_rows = np.asarray(image_rows, np.int64)
    self._tokens = np.asarray(tokens, np.int32)

  def __len__(self) -> int:
    return len(self._tokens)

  def get_batch(self, rows, fields=None) -> dict[str, np.ndarray]:
    rows = np.asarray(rows, np.int64).reshape(-1)
    out = {}
    for f in fields or ('image', 'tokens', 'index'):
      if f == 'image':
        out[f] = self._images.get_batch(self._image_rows[rows],
                                        ('image',))['image']
      elif f == 'tokens':
        out[f] = self._tokens[rows]
      elif f == 'index':
        out[f] = rows.copy()
      else:
        raise KeyError(f'no field {f!r} in image-caption pairs')
    return out


class ArraySource:
  """Random access to rows of in-memory arrays (e.g. token ids)."""

  def __init__(self, **arrays: np.ndarray):
    self._arrays = arrays
    self._n = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self._n

  def get_batch(self, rows, fields=None) -> dict[str, np.ndarray]:
    rows = np.asarray(rows, np.int64).reshape(-1)
    out = {f: self._arrays[f][rows] for f in fields or self._arrays
           if f != 'index'}
    if fields is None or 'index' in fields:
      out['index'] = rows.copy()
    return out


class _Rows:
  """Rows ``rows`` of an image source, renumbered from 0."""

  def __init__(self, base, rows):
    self._base, self._rows = base, np.asarray(rows, np.int64)

  def __len__(self):
    return len(self._rows)

  def get_batch(self, rows, fields=None):
    rows = np.asarray(rows, np.int64).reshape(-1)
    out = self._base.get_batch(self._rows[rows], fields)
    if 'index' in out:
      out['index'] = rows.copy()
    return out


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One evaluation split.

  Attributes:
    images: source of ``image`` uint8 ``[H, W, 3]`` (and ``index``).
    protocols: ``{name: (tokens int32 [N_txt, L], text_to_image int64
      [N_txt])}``; the first is the headline protocol.
    negatives: ``{swap type: (tokens int32 [N_img, L], eligible bool
      [N_img])}`` hard-negative captions (empty for real data).
    caption_tokens: ``int32 [N_img, L]``, one true caption per image (what
      the hard negatives are compared with).
  """
  images: Any
  protocols: Mapping[str, tuple[np.ndarray, np.ndarray]]
  negatives: Mapping[str, tuple[np.ndarray, np.ndarray]]
  caption_tokens: np.ndarray


@dataclasses.dataclass(frozen=True)
class PairedData:
  """An opened image-caption dataset.

  Attributes:
    name: the dataset.
    train: `PairSource` of the training pairs of the chosen part.
    val: `EvalSet` evaluated during training.
    test: `EvalSet` of the final evaluation.
    tokenizer: ``captions -> int32 [N, L]`` with ``vocab_size``,
      ``end_id`` and ``context_length``.
    image_shape: ``(H, W, 3)`` of the images.
    mean: per-channel mean for normalisation.
    std: per-channel standard deviation.
  """
  name: str
  train: PairSource
  val: EvalSet
  test: EvalSet
  tokenizer: Any
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]


def _tokenize(tokenizer, captions: Sequence[str], where: str) -> np.ndarray:
  try:
    return tokenizer(list(captions))
  except ValueError as e:  # names the caption's position: say which split
    raise ValueError(f'{where}: {e}') from None


def _shapes_eval(source, rows, tokenizer, *, negatives, seed):
  fields = ('caption', 'shape', 'colour', 'size', 'angle', 'x', 'y')
  f = source.get_batch(rows, fields)
  tokens = _tokenize(tokenizer, f['caption'], 'shapes32')
  images = _Rows(source, rows)
  neg = {}
  if negatives:
    for kind, (caps, ok) in captions_lib.hard_negatives(f, seed=seed).items():
      neg[kind] = (tokenizer(caps), ok)
  return EvalSet(images, {'first': (tokens, np.arange(len(rows)))}, neg,
                 tokens)


def _open_shapes(name, part, context_length, data_dir, tokenizer):
  train = sources.get_source(name, 'train', data_dir=data_dir)
  test = sources.get_source(name, 'test', data_dir=data_dir)
  n = len(train)
  a, b = (int(round(c * n)) for c in _SHAPES_CUTS)
  all_train = train.get_batch(np.arange(b), ('caption',))['caption']
  if tokenizer is None:
    tokenizer = text.WordTokenizer.from_captions(
        all_train, context_length=context_length)
  rows = np.arange(a) if part == 'pretrain' else np.arange(a, b)
  pairs = PairSource(train, rows,
                     _tokenize(tokenizer, all_train[rows], 'shapes32 train'))
  info = sources.get_info(name, splits=('test',))
  return PairedData(
      name=name, train=pairs,
      val=_shapes_eval(train, np.arange(b, n), tokenizer, negatives=False,
                       seed=0),
      test=_shapes_eval(test, np.arange(len(test)), tokenizer,
                        negatives=True, seed=0),
      tokenizer=tokenizer,
      image_shape=(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3),
      mean=tuple(info.mean), std=tuple(info.std))


def _real_eval(split, tokenizer):
  # pylint: disable-next=g-import-not-at-top
  from hnjax.data import real_captions
  protocols = {}
  for protocol in ('all', 'first'):
    caps, t2i = real_captions.caption_protocol(split, protocol)
    protocols[protocol] = (_tokenize(tokenizer, caps, split.name),
                           np.asarray(t2i, np.int64))
  return EvalSet(split, protocols, {}, protocols['first'][0])


def _open_real(name, context_length, data_dir, image_size, vocab_size,
               tokenizer, resample):
  # pylint: disable=g-import-not-at-top
  from hnjax.data import real_captions
  from hnjax.data import subword
  from hnjax.models import clip_pretrained
  # pylint: enable=g-import-not-at-top
  if name == 'coco':
    open_split = real_captions.open_coco
    train_splits, val_split = ('train', 'restval'), 'val'
  else:
    open_split = real_captions.open_flickr30k
    train_splits, val_split = ('train',), 'val'
  open_split = functools.partial(open_split, data_dir=data_dir,
                                 image_size=image_size, resample=resample)
  opened = [open_split(s) for s in train_splits]
  first = [real_captions.caption_protocol(s, 'first')[0] for s in opened]
  if tokenizer is None:
    every = [c for s in opened for c in real_captions.caption_protocol(
        s, 'all')[0]]
    tokenizer = subword.train_subword_tokenizer(
        every, context_length=context_length, vocab_size=vocab_size)
  images = _Concat(opened)
  caps = [c for part in first for c in part]
  pairs = PairSource(images, np.arange(len(images)),
                     _tokenize(tokenizer, caps, f'{name} train'))
  val = open_split(val_split)
  test = open_split('test')
  return PairedData(
      name=name, train=pairs, val=_real_eval(val, tokenizer),
      test=_real_eval(test, tokenizer), tokenizer=tokenizer,
      image_shape=(image_size, image_size, 3),
      # CLIP's normalisation statistics.
      mean=clip_pretrained.CLIP_MEAN, std=clip_pretrained.CLIP_STD)


class _Concat:
  """Image sources one after another (COCO's train + restval)."""

  def __init__(self, parts):
    self._parts = parts
    self._starts = np.cumsum([0] + [len(p) for p in parts])

  def __len__(self):
    return int(self._starts[-1])

  def get_batch(self, rows, fields=None):
    rows = np.asarray(rows, np.int64).reshape(-1)
    part = np.searchsorted(self._starts, rows, side='right') - 1
    out = None
    for p in np.unique(part):
      here = np.nonzero(part == p)[0]
      got = self._parts[p].get_batch(rows[here] - self._starts[p], fields)
      if out is None:
        out = {k: np.empty((len(rows),) + v.shape[1:], v.dtype)
               for k, v in got.items()}
      for k, v in got.items():
        out[k][here] = v
    if 'index' in out:
      out['index'] = rows.copy()
    return out


def open_paired(
    name: str,
    *,
    part: str = 'pretrain',
    context_length: int = 16,
    data_dir: str | None = None,
    image_size: int = 224,
    vocab_size: int = 8192,
    tokenizer: Any = None,
    resample: str = 'bilinear',
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> PairedData:
  """Opens an image-caption dataset and tokenises its captions.

  Args:
    name: one of ``DATASETS``.
    part: ``'pretrain'`` or ``'finetune'``: shapes32's half of the
      training split (real datasets train on the whole training split).
    context_length: ``L``, tokens per caption (start and end included;
      longer captions keep their first tokens and the end token).
    data_dir: tfds data dir (shapes32, coco) or the Flickr30k folder.
    image_size: side of the square real images (shapes32: 32).
    vocab_size: BPE vocabulary of the real datasets' tokenizer.
    tokenizer: use this tokenizer (a pretrained CLIP's) instead of building
      one from the training captions; its ``context_length`` must be
      ``context_length``.
    resample: how real images are resized (`imagenet.decode_and_resize`;
      ``'bicubic'`` is CLIP's).
    normalization: ``(mean, std)`` of the images instead of the dataset's
      (a pretrained CLIP's).

  Returns:
    A `PairedData`.

  Raises:
    ValueError: an unknown name or part, a caption without words (naming
      it), ``context_length < 2``.
    FileNotFoundError: missing data.
  """
  if name not in DATASETS:
    raise ValueError(f'data.name={name!r}: not an image-caption dataset; '
                     f'known: {DATASETS}')
  if part not in PARTS:
    raise ValueError(f'part={part!r}: must be one of {PARTS}')
  if context_length < 2:
    raise ValueError(f'text.context_length={context_length}: must be >= 2 '
                     '(start and end tokens)')
  if tokenizer is not None and tokenizer.context_length != context_length:
    raise ValueError(f'text.context_length={context_length}: the tokenizer '
                     f'pads to {tokenizer.context_length}')
  if name.startswith('shapes32'):
    data = _open_shapes(name, part, context_length, data_dir, tokenizer)
  else:
    data = _open_real(name, context_length, data_dir, image_size, vocab_size,
                      tokenizer, resample)
  if normalization is not None:
    mean, std = normalization
    data = dataclasses.replace(data, mean=tuple(mean), std=tuple(std))
  return data
