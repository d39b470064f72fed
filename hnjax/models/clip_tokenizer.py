"""The tokenizer of a pretrained CLIP checkpoint, read from its folder.

A folder in the Hugging Face layout holds either ``tokenizer.json`` (read
as it is by the ``tokenizers`` library, the one Hugging Face itself runs)
or OpenAI's ``vocab.json`` + ``merges.txt``, from which this module builds
the pipeline Hugging Face builds for them: NFC, whitespace runs to one
space, lower case; OpenAI's split pattern; byte-level BPE with ``</w>``
ending each word; ``<|startoftext|>`` and ``<|endoftext|>`` around every
caption. ``tokenizer_config.json``, when present, names the special tokens.

Calling the tokenizer gives what the reference gives with
``padding='max_length', truncation=True, max_length=context_length``:
``int32 [N, context_length]`` rows ``[start, tokens..., end, pad...]``; a
caption too long for the context keeps its first tokens and the end token
last. Special-token text inside a caption is matched as that token, as the
reference does.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

START, END = '<|startoftext|>', '<|endoftext|>'
# OpenAI CLIP's pre-tokenizer split (the one Hugging Face converts it to).
SPLIT_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|"
                 r"'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
FILES = ('tokenizer.json', 'vocab.json', 'merges.txt')


def _tokenizers():
  """The ``tokenizers`` package, imported on first use."""
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('CLIP tokenizers need the Hugging Face tokenizers '
                      'package: pip install tokenizers') from e
  return tokenizers


def _token_text(value: Any, default: str) -> str:
  """A special token of tokenizer_config.json (a string or {'content'})."""
  if isinstance(value, dict):
    value = value.get('content')
  return value if isinstance(value, str) and value else default


def _build_from_vocab(path: str):
  """Hugging Face's CLIP pipeline for ``vocab.json`` + ``merges.txt``."""
  tk = _tokenizers()
  with open(os.path.join(path, 'vocab.json'), encoding='utf-8') as f:
    vocab = json.load(f)
  merges = []
  with open(os.path.join(path, 'merges.txt'), encoding='utf-8') as f:
    for n, line in enumerate(f):
      line = line.rstrip('\n')
      if (n == 0 and line.startswith('#version')) or not line.strip():
        continue
      pair = line.split()
      if len(pair) != 2:
        raise ValueError(f'{os.path.join(path, "merges.txt")} line {n + 1}: '
                         f'expected two tokens, got {line!r}')
      merges.append(tuple(pair))
  for special in (START, END):
    if special not in vocab:
      raise ValueError(f'{os.path.join(path, "vocab.json")}: no {special!r} '
                       'token (not a CLIP vocabulary)')
  tokenizer = tk.Tokenizer(tk.models.BPE(
      vocab=vocab, merges=merges, unk_token=END, continuing_subword_prefix='',
      end_of_word_suffix='</w>', fuse_unk=False))
  tokenizer.normalizer = tk.normalizers.Sequence([
      tk.normalizers.NFC(),
      tk.normalizers.Replace(tk.Regex(r'\s+'), ' '),
      tk.normalizers.Lowercase()])
  tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
      tk.pre_tokenizers.Split(tk.Regex(SPLIT_PATTERN), behavior='removed',
                              invert=True),
      tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tokenizer.decoder = tk.decoders.ByteLevel()
  tokenizer.post_processor = tk.processors.RobertaProcessing(
      (END, vocab[END]), (START, vocab[START]), trim_offsets=False,
      add_prefix_space=False)  # (sep, cls): start ... end
  tokenizer.add_special_tokens([START, END])
  return tokenizer


class ClipTokenizer:
  """Captions to ``int32 [N, context_length]`` token ids of a checkpoint.

  Attributes:
    context_length: tokens per caption, start and end included.
    start_id, end_id, pad_id: the special tokens' ids.
    vocab_size: number of ids.
  """

  def __init__(self, tokenizer: Any, *, context_length: int, start: str,
               end: str, pad: str, where: str = 'tokenizer'):
    """Wraps a ``tokenizers.Tokenizer`` (use `from_folder`)."""
    if context_length < 2:
      raise ValueError(f'context_length={context_length}: must be >= 2 (the '
                       'start and end tokens)')
    ids = {}
    for name, token in (('start', start), ('end', end), ('pad', pad)):
      ids[name] = tokenizer.token_to_id(token)
      if ids[name] is None:
        raise ValueError(f'{where}: the {name} token {token!r} is not in the '
                         'vocabulary')
    self._tokenizer = tokenizer
    self.context_length = int(context_length)
    self.start_id, self.end_id, self.pad_id = (
        ids['start'], ids['end'], ids['pad'])
    tokenizer.enable_truncation(max_length=self.context_length)
    tokenizer.enable_padding(length=self.context_length, pad_id=self.pad_id,
                             pad_token=pad)

  @classmethod
  def from_folder(cls, path: str, *, context_length: int | None = None
                  ) -> ClipTokenizer:
    """Reads the tokenizer of a checkpoint folder.

    Args:
      path: a folder with ``tokenizer.json``, or ``vocab.json`` and
        ``merges.txt`` (and optionally ``tokenizer_config.json``).
      context_length: tokens per caption; default the config's
        ``model_max_length``.

    Returns:
      A `ClipTokenizer`.

    Raises:
      FileNotFoundError: naming the folder and the files it lacks.
      ValueError: a file that is not a CLIP tokenizer, naming it.
    """
    config_path = os.path.join(path, 'tokenizer_config.json')
    config = {}
    if os.path.exists(config_path):
      with open(config_path, encoding='utf-8') as f:
        config = json.load(f)
    if os.path.exists(os.path.join(path, 'tokenizer.json')):
      where = os.path.join(path, 'tokenizer.json')
      try:
        tokenizer = _tokenizers().Tokenizer.from_file(where)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f'{where}: not a tokenizers file ({e})') from None
    elif all(os.path.exists(os.path.join(path, f)) for f in FILES[1:]):
      where = os.path.join(path, 'vocab.json')
      tokenizer = _build_from_vocab(path)
    else:
      raise FileNotFoundError(
          f'{path}: no tokenizer (needs tokenizer.json, or vocab.json and '
          'merges.txt)')
    if context_length is None:
      context_length = config.get('model_max_length')
      if not isinstance(context_length, int) or context_length > 4096:
        raise ValueError(f'{config_path}: no usable model_max_length '
                         f'({context_length!r}); pass context_length')
    end = _token_text(config.get('eos_token'), END)
    return cls(tokenizer, context_length=context_length,
               start=_token_text(config.get('bos_token'), START), end=end,
               pad=_token_text(config.get('pad_token'), end), where=where)

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def __call__(self, captions: Sequence[str]) -> np.ndarray:
    """Tokenises captions.

    Args:
      captions: ``N`` strings (a single string is an error, not ``N``
        characters).

    Returns:
      ``int32 [N, context_length]``.

    Raises:
      ValueError: ``captions`` is a string or holds a non-string, naming
        its position.
    """
    if isinstance(captions, str):
      raise ValueError('captions must be a sequence of strings, got one str')
    captions = list(captions)
    for n, c in enumerate(captions):
      if not isinstance(c, str):
        raise ValueError(f'caption {n} is not a str: {type(c).__name__}')
    out = np.full((len(captions), self.context_length), self.pad_id,
                  np.int32)
    for n, enc in enumerate(self._tokenizer.encode_batch(captions)):
      out[n] = enc.ids
    return out

  def decode(self, token_ids: Sequence[int]) -> str:
    """The text of one row of ids, special tokens dropped."""
    text = self._tokenizer.decode(
        [int(i) for i in np.asarray(token_ids).reshape(-1)])
    return ' '.join(text.replace('</w>', ' ').split())  # words end in </w>

  def __getstate__(self):  # picklable: the Rust object as its JSON
    state = dict(self.__dict__)
    state['_tokenizer'] = self._tokenizer.to_str()
    return state

  def __setstate__(self, state):
    state = dict(state)
    state['_tokenizer'] = _tokenizers().Tokenizer.from_str(
        state['_tokenizer'])
    self.__dict__.update(state)
