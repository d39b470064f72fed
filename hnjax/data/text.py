"""A word-level tokenizer for the embedded captions, CLIP's layout.

Captions are tokenised on the host into fixed-length ``int32`` arrays before
they reach the device (strings never enter a device batch):
``[<start>, w_1, ..., w_n, <end>, <pad>, ...]``. A caption longer than the
context length keeps its first words and the end token last (as CLIP's
tokenizer with ``truncation=True``), so the text tower's end-token pooling
always finds it. The vocabulary is built deterministically from the
training captions (sorted words after the special tokens), so the same data
gives the same ids on every host and in every resumed run.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable, Sequence

import numpy as np

PAD, START, END, UNKNOWN = '<pad>', '<start>', '<end>', '<unk>'
SPECIAL = (PAD, START, END, UNKNOWN)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
  """Lower-cased words of ``text`` (letters and digits; punctuation dropped)."""
  return _WORD.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class WordTokenizer:
  """Maps captions to ``int32 [N, context_length]`` token ids.

  Attributes:
    vocabulary: the tokens, ids are positions; the four ``SPECIAL`` tokens
      come first (``<pad>`` is 0).
    context_length: tokens per caption, start and end included (>= 2).
  """
  vocabulary: tuple[str, ...]
  context_length: int

  def __post_init__(self):
    if self.vocabulary[:len(SPECIAL)] != SPECIAL:
      raise ValueError(f'vocabulary must start with {SPECIAL}')
    if self.context_length < 2:
      raise ValueError(f'context_length must be >= 2 (start and end tokens), '
                       f'got {self.context_length}')

  @functools.cached_property
  def _ids(self) -> dict[str, int]:
    return {w: i for i, w in enumerate(self.vocabulary)}

  @classmethod
  def from_captions(cls, captions: Iterable[str], *,
                    context_length: int) -> WordTokenizer:
    """The tokenizer of every word in ``captions``, in sorted order."""
    vocab = sorted({w for c in captions for w in words(c)} - set(SPECIAL))
    return cls(SPECIAL + tuple(vocab), context_length)

  @property
  def vocab_size(self) -> int:
    return len(self.vocabulary)

  @property
  def end_id(self) -> int:
    return self.vocabulary.index(END)

  def __call__(self, captions: Sequence[str]) -> np.ndarray:
    """Tokenises ``captions``.

    Args:
      captions: ``N`` strings.

    Returns:
      ``int32 [N, context_length]``: start, the words (unknown words as
      ``<unk>``), end, padding; truncated with the end token kept last.

    Raises:
      ValueError: naming the first caption without a word.
    """
    if isinstance(captions, str):
      raise ValueError('captions must be a sequence of strings, got one str')
    out = np.zeros((len(captions), self.context_length), np.int32)
    ids, unknown = self._ids, self._ids[UNKNOWN]
    for n, caption in enumerate(captions):
      tokens = [ids.get(w, unknown) for w in words(caption)]
      if not tokens:
        raise ValueError(f'caption {n} has no words: {caption!r}')
      tokens = tokens[:self.context_length - 2]
      row = [ids[START], *tokens, ids[END]]
      out[n, :len(row)] = row
    return out

  def decode(self, token_ids: Sequence[int]) -> str:
    """The words of one row of ids (special tokens dropped)."""
    return ' '.join(self.vocabulary[int(i)] for i in token_ids
                    if self.vocabulary[int(i)] not in SPECIAL)
