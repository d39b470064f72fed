"""A byte-level BPE tokenizer for real captions, in CLIP's layout.

The HuggingFace ``tokenizers`` library (``pip install tokenizers``) trains
and applies the BPE; this module fixes the layout to that of
`text.WordTokenizer`, so the text towers take either:
``[<start>, t_1, ..., t_n, <end>, <pad>, ...]`` with ``<pad>`` id 0,
``<start>`` 1 and ``<end>`` 2. A caption longer than the context length
keeps its first tokens and the end token last (as CLIP's tokenizer with
``truncation=True``), so end-token pooling always finds it.

The special tokens are not in the ``tokenizers`` model: its ids are shifted
up by ``len(SPECIAL)``. So no caption text (not even a literal ``"<end>"``,
which ``tokenizers`` would match as a special token) can produce them.

Text is NFKC-normalised, whitespace-collapsed and lower-cased (as CLIP
does), then split GPT-2 style into byte-level pieces: every byte has a
token, so no string is unknown and ``decode`` gives back the lower-cased
text.

Training is deterministic: the same captions give the same vocabulary and
ids in every process (``tokenizers`` sorts the byte alphabet and breaks
equal merge counts by token ids, not by hash order; the tests check it
across processes). Save the trained tokenizer with the checkpoint anyway:
another ``tokenizers`` version may train differently.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import numpy as np

PAD, START, END = '<pad>', '<start>', '<end>'
SPECIAL = (PAD, START, END)  # ids 0, 1, 2
_NUM_BYTES = 256  # the byte-level alphabet, always in the vocabulary


def _tokenizers():
  """The ``tokenizers`` package, imported on first use."""
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('hnjax.data.subword needs the HuggingFace tokenizers '
                      'package: pip install tokenizers') from e
  return tokenizers


def _check_context_length(context_length):
  if context_length < 2:
    raise ValueError(f'context_length must be >= 2 (start and end tokens), '
                     f'got {context_length}')


def _check_captions(captions):
  if isinstance(captions, str):
    raise ValueError('captions must be a sequence of strings, got one str')
  for n, c in enumerate(captions):
    if not isinstance(c, str):
      raise ValueError(f'caption {n} is not a str: {type(c).__name__}')


@dataclasses.dataclass(frozen=True)
class SubwordTokenizer:
  """Maps captions to ``int32 [N, context_length]`` byte-level BPE ids.

  Attributes:
    tokenizer_json: the trained ``tokenizers.Tokenizer`` serialised (its
      ``to_str()``), without special tokens: its id ``i`` is our
      ``i + len(SPECIAL)``.
    context_length: tokens per caption, start and end included (>= 2).
  """
  tokenizer_json: str = dataclasses.field(repr=False)
  context_length: int

  def __post_init__(self):
    _check_context_length(self.context_length)
    # Parsed now, so a bad file fails here rather than at the first batch.
    if self._tokenizer.get_vocab_size() < _NUM_BYTES:
      raise ValueError(f'not a byte-level tokenizer: '
                       f'{self._tokenizer.get_vocab_size()} tokens < '
                       f'{_NUM_BYTES} bytes')

  @functools.cached_property
  def _tokenizer(self):
    return _tokenizers().Tokenizer.from_str(self.tokenizer_json)

  def __getstate__(self):  # pickles carry the JSON, not the Rust object
    return {'tokenizer_json': self.tokenizer_json,
            'context_length': self.context_length}

  def __setstate__(self, state):
    self.__dict__.update(state)

  @property
  def vocab_size(self) -> int:
    return len(SPECIAL) + self._tokenizer.get_vocab_size()

  @property
  def end_id(self) -> int:
    return SPECIAL.index(END)

  def __call__(self, captions: Sequence[str]) -> np.ndarray:
    """Tokenises ``captions``.

    Args:
      captions: ``N`` strings.

    Returns:
      ``int32 [N, context_length]``: start, the BPE tokens, end, padding;
      truncated with the end token kept last.

    Raises:
      ValueError: naming the first caption without a token (empty or
        whitespace only).
    """
    _check_captions(captions)
    out = np.zeros((len(captions), self.context_length), np.int32)
    if not len(captions):
      return out
    encodings = self._tokenizer.encode_batch(
        list(captions), add_special_tokens=False)
    start, end = SPECIAL.index(START), SPECIAL.index(END)
    for n, (caption, enc) in enumerate(zip(captions, encodings)):
      if not enc.ids:
        raise ValueError(f'caption {n} has no tokens: {caption!r}')
      tokens = [i + len(SPECIAL) for i in enc.ids[:self.context_length - 2]]
      row = [start, *tokens, end]
      out[n, :len(row)] = row
    return out

  def decode(self, token_ids: Sequence[int]) -> str:
    """The text of one row of ids (special tokens dropped), lower-cased."""
    ids = [int(i) - len(SPECIAL) for i in np.asarray(token_ids).reshape(-1)
           if int(i) >= len(SPECIAL)]
    # The byte-level pre-tokenizer adds a space before the first word.
    return self._tokenizer.decode(ids).strip()

  def save(self, path: str) -> None:
    """Writes the tokenizer (not ``context_length``) as JSON, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(self.tokenizer_json)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str, *, context_length: int) -> SubwordTokenizer:
    """Reads a tokenizer written by ``save``."""
    tokenizer = _tokenizers().Tokenizer.from_file(path)
    return cls(tokenizer.to_str(), context_length)


def train_subword_tokenizer(captions: Sequence[str], *, context_length: int,
                            vocab_size: int = 8192) -> SubwordTokenizer:
  """Trains a byte-level BPE tokenizer on ``captions``.

  Args:
    captions: training captions (all of them: the merges follow their
      frequencies).
    context_length: tokens per caption, start and end included (>= 2).
    vocab_size: the most ids, ``SPECIAL`` and the 256 bytes included;
      fewer when the captions have fewer distinct merges.

  Returns:
    A `SubwordTokenizer`; the same captions give the same one in every
    process.
  """
  _check_context_length(context_length)
  _check_captions(captions)
  if not len(captions):
    raise ValueError('captions must not be empty')
  if vocab_size < len(SPECIAL) + _NUM_BYTES:
    raise ValueError(f'vocab_size must be >= {len(SPECIAL) + _NUM_BYTES} '
                     f'(special tokens and bytes), got {vocab_size}')
  tk = _tokenizers()
  norm, pre = tk.normalizers, tk.pre_tokenizers
  tokenizer = tk.Tokenizer(tk.models.BPE())
  tokenizer.normalizer = norm.Sequence([
      norm.NFKC(),
      norm.Replace(tk.Regex(r'\s+'), ' '),
      norm.Strip(),
      norm.Lowercase(),
  ])
  # A leading space makes a caption's first word the same token as inside.
  tokenizer.pre_tokenizer = pre.ByteLevel(add_prefix_space=True)
  tokenizer.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(
      vocab_size=vocab_size - len(SPECIAL),
      # Every byte, seen or not: no string is ever unknown.
      initial_alphabet=pre.ByteLevel.alphabet(),
      show_progress=False,
  )
  tokenizer.train_from_iterator(list(captions), trainer=trainer)
  return SubwordTokenizer(tokenizer.to_str(), context_length)
