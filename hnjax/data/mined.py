"""Hard negatives mined from a dataset: the driver, the records, the source.

Static hard negatives (STAR, Zhan et al. 2021): encode every (query,
positive) pair of a training set once, mine each query's hard negatives
among all the positives with `hnjax.mining.mine_hard_negatives` (its
false-negative filters included), write them down, and train with them:

1. `mine_pairs` embeds a random-access source's queries and positives
   (progress bars), then mines in query chunks (a progress bar; the corpus
   sharded over this process's devices when they divide it) and returns
   `Mined` records;
2. `Mined.save` / `Mined.load`: one ``.npz`` of ``query`` ``[Q]`` (source
   rows), ``positive`` ``[Q]`` (corpus rows: the positive of source row
   ``i`` is corpus row ``i``), ``negatives`` ``[Q, k]`` (corpus rows, ``-1``
   where fewer survived the filters), ``scores`` ``[Q, k]`` and ``info``
   (how they were mined, as JSON);
3. `NegativesSource` wraps the training source so that a batch also holds
   each pair's negatives (``negative_tokens`` ``[b, k, L]`` and
   ``negative_mask`` ``[b, k]``), read from the same source: the input
   pipeline (`hnjax.data.train_iterator`) needs nothing else.

Dynamic hard negatives (ADORE, Zhan et al. 2021) are the same three steps
repeated from the current encoder every few steps, with the table kept in
the train state so a resumed run sees the same negatives
(`hnjax.train.clip_mixup`'s ``mining.every_steps``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P
import numpy as np

from hnjax import mining
from hnjax import notebook

PREFIX = 'negative_'
_FORMAT = 'hnjax.mined/1'


@dataclasses.dataclass(frozen=True)
class Mined:
  """Mined hard negatives of a dataset's pairs (see the module docstring).

  Attributes:
    query: int64 ``[Q]`` source rows of the queries.
    positive: int64 ``[Q]`` corpus rows of their positives.
    negatives: int32 ``[Q, k]`` corpus rows, best first; ``-1``: none.
    scores: float32 ``[Q, k]`` their scores (``-inf`` where ``-1``).
    info: how they were mined (JSON-able).
  """
  query: np.ndarray
  positive: np.ndarray
  negatives: np.ndarray
  scores: np.ndarray
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  def table(self, num_examples: int) -> np.ndarray:
    """int32 ``[num_examples, k]``: row ``i`` the negatives of source row
    ``i`` (``-1`` for rows that were not mined)."""
    out = np.full((num_examples, self.negatives.shape[1]), -1, np.int32)
    if len(self.query) and self.query.max() >= num_examples:
      raise ValueError(f'the records name source row {self.query.max()} but '
                       f'the source has {num_examples} rows')
    out[self.query] = self.negatives
    return out

  def save(self, path: str) -> None:
    """Writes ``path`` (``.npz``) atomically: never half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
      with open(tmp, 'wb') as f:
        np.savez(f, query=self.query, positive=self.positive,
                 negatives=self.negatives, scores=self.scores,
                 info=np.array(json.dumps({'format': _FORMAT, **self.info})))
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  @classmethod
  def load(cls, path: str) -> Mined:
    """Reads records written by `save`.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: the file is not such records.
    """
    if not os.path.isfile(path):
      raise FileNotFoundError(f'no mined negatives at {path!r} (write them '
                              'with python -m launch.mine)')
    try:
      with np.load(path) as z:
        arrays = {k: z[k] for k in ('query', 'positive', 'negatives',
                                    'scores', 'info')}
      info = json.loads(str(arrays.pop('info')))
    except (OSError, KeyError, ValueError) as e:
      raise ValueError(f'{path!r} is not a file of mined negatives '
                       f'({type(e).__name__}: {e})') from None
    if info.pop('format', None) != _FORMAT:
      raise ValueError(f'{path!r} is not a file of mined negatives '
                       f'(format {_FORMAT})')
    q, neg = arrays['query'], arrays['negatives']
    if (neg.ndim != 2 or q.shape != neg.shape[:1]
        or arrays['scores'].shape != neg.shape
        or arrays['positive'].shape != q.shape):
      raise ValueError(f'{path!r}: inconsistent shapes query {q.shape}, '
                       f'negatives {neg.shape}')
    return cls(query=q.astype(np.int64),
               positive=arrays['positive'].astype(np.int64),
               negatives=neg.astype(np.int32),
               scores=arrays['scores'].astype(np.float32), info=info)


class NegativesSource:
  """A training source whose batches also hold each pair's negatives.

  ``get_batch(rows, fields)`` reads ``fields`` of ``rows`` from ``source``;
  for each field ``negative_<f>`` it reads field ``f`` of the rows in
  ``table[rows]`` (``[b, k, ...]``), and ``negative_mask`` is bool ``[b,
  k]``, False where the table holds ``-1`` (those entries repeat row 0's
  value, masked).

  Args:
    source: a random-access source (``len``, ``get_batch(rows, fields)``).
    table: int ``[len(source), k]`` negatives of each row (rows of
      ``source``), e.g. `Mined.table`.
  """

  def __init__(self, source: Any, table: np.ndarray):
    table = np.asarray(table)
    if (table.ndim != 2 or len(table) != len(source)
        or not np.issubdtype(table.dtype, np.integer)):
      raise ValueError(f'the negatives table must be int [{len(source)}, k] '
                       f'(one row per example), got {table.dtype}'
                       f'{list(table.shape)}')
    if table.size and table.max() >= len(source):
      raise ValueError(f'the negatives table names row {table.max()} but the '
                       f'source has {len(source)} rows')
    self.source, self.table = source, table.astype(np.int64)

  def __len__(self) -> int:
    return len(self.source)

  def get_batch(self, rows, fields=None) -> dict[str, np.ndarray]:
    rows = np.asarray(rows, np.int64).reshape(-1)
    fields = tuple(fields or ())
    plain = tuple(f for f in fields if not f.startswith(PREFIX))
    out = self.source.get_batch(rows, plain or None)
    negatives = self.table[rows]
    mask = negatives >= 0
    wanted = [f[len(PREFIX):] for f in fields
              if f.startswith(PREFIX) and f != f'{PREFIX}mask']
    if wanted:
      read = self.source.get_batch(np.where(mask, negatives, 0).reshape(-1),
                                   tuple(wanted))
      for f in wanted:
        out[PREFIX + f] = read[f].reshape(*negatives.shape, *read[f].shape[1:])
    if f'{PREFIX}mask' in fields:
      out[f'{PREFIX}mask'] = mask
    return out


@functools.lru_cache(maxsize=8)
def _miner(num_devices, **kwargs):
  """Jitted ``(queries, corpus, positives, key) -> (indices, scores)``."""
  kwargs = dict(kwargs)

  def mine(q, corpus, pos, key, axis_name=None):
    return mining.mine_hard_negatives(
        q, corpus, pos, key=key if kwargs['sampling_strategy'] == 'random'
        else None, axis_name=axis_name, **kwargs)

  if num_devices == 1:
    return jax.jit(mine)
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:num_devices]),
                           ('corpus',))
  return jax.jit(jax.shard_map(
      functools.partial(mine, axis_name='corpus'), mesh=mesh,
      in_specs=(P(), P('corpus'), P(), P()), out_specs=(P(), P()),
      check_vma=False))


def mine_embeddings(
    query_embeddings: np.ndarray,
    corpus_embeddings: np.ndarray,
    positive_indices: np.ndarray,
    *,
    num_negatives: int = 3,
    chunk: int = 4096,
    key: jax.Array | None = None,
    progress: str | None = None,
    **filters: Any,
) -> tuple[np.ndarray, np.ndarray]:
  """`hnjax.mining.mine_hard_negatives` of host arrays, chunk by chunk.

  The corpus is sharded over this process's devices when their number
  divides it (else it stays on one device); queries go in chunks of
  ``chunk`` (the last one padded), with a progress bar. Every process of a
  multi-host job computes the same result on its own devices.

  Args:
    query_embeddings: ``[Q, D]``.
    corpus_embeddings: ``[C, D]``.
    positive_indices: int ``[Q]`` corpus row of each query's positive
      (``-1``: none).
    num_negatives: ``k``.
    chunk: queries per call.
    key: PRNG key of ``sampling_strategy='random'`` (each chunk draws with
      ``fold_in(key, its first row)``: deterministic in key and chunk).
    progress: description of a progress bar over the chunks, or None.
    **filters: `mine_hard_negatives`' filters and ``sampling_strategy``.

  Returns:
    ``(indices, scores)``: numpy int32 / float32 ``[Q, k]``.
  """
  q = np.asarray(query_embeddings, np.float32)
  corpus = np.asarray(corpus_embeddings, np.float32)
  pos = np.asarray(positive_indices)
  if pos.shape != q.shape[:1]:
    raise ValueError(f'positive_indices must have shape [{len(q)}], got '
                     f'{list(pos.shape)}')
  if chunk < 1:
    raise ValueError(f'chunk must be >= 1, got {chunk}')
  filters.setdefault('sampling_strategy', 'top')
  if filters['sampling_strategy'] == 'random' and key is None:
    raise ValueError("sampling_strategy='random' needs a key")
  devices = len(jax.local_devices())
  shards = devices if len(corpus) % devices == 0 else 1
  fn = _miner(shards, num_negatives=num_negatives, **filters)
  if shards > 1:
    corpus = jax.device_put(corpus, jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.local_devices()), ('corpus',)),
        P('corpus')))
  else:
    corpus = jax.device_put(corpus)
  key = jax.random.key(0) if key is None else key
  chunk = min(chunk, max(len(q), 1))
  idx = np.empty((len(q), num_negatives), np.int32)
  scores = np.empty((len(q), num_negatives), np.float32)
  starts = range(0, len(q), chunk)
  if progress is not None:
    starts = notebook.tqdm_class()(
        starts, desc=progress, unit='chunk',
        disable=jax.process_index() != 0)
  for start in starts:
    stop = min(start + chunk, len(q))
    # The last chunk padded to the same shape: one compilation.
    qc = np.zeros((chunk, q.shape[1]), np.float32)
    pc = np.full((chunk,), -1, np.int32)
    qc[:stop - start], pc[:stop - start] = q[start:stop], pos[start:stop]
    i, s = fn(qc, corpus, pc, jax.random.fold_in(key, start))
    idx[start:stop] = np.asarray(i)[:stop - start]
    scores[start:stop] = np.asarray(s)[:stop - start]
  return idx, scores


def mine_pairs(
    source: Any,
    *,
    embed_query: Callable[[dict[str, jax.Array]], jax.Array],
    embed_positive: Callable[[dict[str, jax.Array]], jax.Array],
    mesh: jax.sharding.Mesh,
    batch_size: int = 512,
    query_inputs: Sequence[str] = ('image',),
    positive_inputs: Sequence[str] = ('tokens',),
    num_negatives: int = 3,
    chunk: int = 4096,
    key: jax.Array | None = None,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    **filters: Any,
) -> Mined:
  """Mines hard negatives for every (query, positive) pair of ``source``.

  The corpus is the positives of all pairs (source row ``i``'s positive is
  corpus row ``i``, never its own negative); duplicates of a positive
  elsewhere in the corpus are false negatives that a positive
  ``absolute_margin`` or ``relative_margin`` removes (a duplicate scores
  exactly the positive's score, which a margin of 0 keeps: removal is
  strict ``>``, as in sentence-transformers).

  Args:
    source: random-access source of the pairs (``len``, ``get_batch``).
    embed_query: jitted ``global batch -> [G, D]`` query embeddings
      (normalised for cosine scores), reading ``query_inputs``.
    embed_positive: the same for the positives, reading
      ``positive_inputs``.
    mesh: the mesh the embedding batches are laid out on.
    batch_size: global batch of the embedding passes.
    query_inputs: source fields of a query.
    positive_inputs: source fields of a positive.
    num_negatives: ``k``, negatives per pair.
    chunk: queries per mining call.
    key: PRNG key of ``sampling_strategy='random'``.
    progress: show progress bars (process 0).
    info: recorded in `Mined.info` besides the filters and the mean score
      of the positives, ``mean_positive_score`` (e.g. which encoder).
    **filters: `hnjax.mining.mine_hard_negatives`' filters (``range_min``,
      ``range_max``, ``max_score``, ``min_score``, ``absolute_margin``,
      ``relative_margin``) and ``sampling_strategy``.

  Returns:
    `Mined` records of all ``len(source)`` pairs.
  """
  from hnjax.eval import features  # pylint: disable=g-import-not-at-top

  def embed(fn, inputs, name):
    return features.extract(fn, source, mesh=mesh, batch_size=batch_size,
                            inputs=tuple(inputs), fields=(),
                            progress=name if progress else None)['features']

  q = embed(embed_query, query_inputs, 'embedding queries')
  corpus = embed(embed_positive, positive_inputs, 'embedding positives')
  rows = np.arange(len(source))
  idx, scores = mine_embeddings(
      q, corpus, rows, num_negatives=num_negatives, chunk=chunk, key=key,
      progress='mining' if progress else None, **filters)
  positive = float(np.mean(np.sum(q * corpus, axis=1))) if len(q) else 0.0
  return Mined(query=rows, positive=rows.copy(), negatives=idx,
               scores=scores, info={'num_negatives': num_negatives,
                                    **filters, **(info or {}),
                                    'mean_positive_score': positive})
