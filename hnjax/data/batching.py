"""Batch composition: epochs whose batches are made of near neighbours.

In-batch negatives are only as hard as the batch is similar. These host-side
samplers turn embeddings of the training examples into an epoch's order,
cut into batches of near neighbours (ALGORITHMS.md §9):

* `neighbour_order` (Sample4Geo): each seed example with its nearest
  neighbours and a few more drawn from its wider neighbourhood;
* `cluster_order` (NGAME): balanced clusters of about ``cluster_size``
  examples, shuffled and concatenated, with `ngame_cluster_size`'s
  doubling curriculum (size 1: random batches);
* `topic_order` (TAS-B): k-means topics, each batch drawn from one topic,
  its members balanced over margin bins when margins are given.

Each returns int64 ``[num_batches * batch_size]`` example ids, batch after
batch: every id at most once per epoch (so at most once per batch), a
function of the inputs, ``seed`` and ``epoch`` only (reproducible, so a
resumed run sees the same batches), and the examples that do not fill a
last batch are dropped. `in_batch_hardest_similarity` measures what an
order achieves. Embeddings are refreshed by calling again with the current
encoder's.
"""

import numpy as np

# NGAME's curriculum: the cluster size doubles at these epochs, from 1.
NGAME_MILESTONES = (10, 20, 25, 50, 75, 100, 125, 150, 200)


def _rng(seed, epoch, salt):
  return np.random.default_rng([int(seed), int(epoch), salt])


def _unit(x):
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or not len(x):
    raise ValueError(f'embeddings must be a non-empty [n, D] array, got '
                     f'shape {x.shape}')
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_batch(batch_size, n):
  if not 1 <= batch_size <= n:
    raise ValueError(f'batch_size={batch_size} must be in [1, {n}] (the '
                     f'number of examples)')


def _cut(order, batch_size):
  """Whole batches only."""
  order = np.asarray(order, np.int64)
  return order[:len(order) // batch_size * batch_size]


def random_order(num_examples: int, batch_size: int, *, seed: int,
                 epoch: int) -> np.ndarray:
  """Random batches (the baseline): a permutation cut into whole batches.

  Args:
    num_examples: ``n``.
    batch_size: ``B``.
    seed: sampler seed.
    epoch: epoch number.

  Returns:
    int64 ``[n // B * B]`` ids.
  """
  _check_batch(batch_size, num_examples)
  return _cut(_rng(seed, epoch, 0).permutation(num_examples), batch_size)


def neighbour_order(neighbours: np.ndarray, batch_size: int, *, seed: int,
                    epoch: int, num_near: int = 32,
                    num_random: int = 32) -> np.ndarray:
  """Sample4Geo's batches: seeds with their neighbours (Deuser et al. 2023).

  Seeds are taken in a random order; each brings, besides itself, its
  ``num_near`` nearest neighbours and ``num_random`` drawn at random from
  the rest of its list (Sample4Geo: 32 of the top 32 and 32 of neighbours
  33-128), skipping every id already placed this epoch; a group that does
  not fit the current batch is cut and the next batch starts with the
  next seed.

  Args:
    neighbours: int ``[n, R]`` each example's neighbours, nearest first
      (itself and ``-1`` entries are ignored); e.g. from
      `hnjax.mining.mine_hard_negatives` of the embeddings against
      themselves, with each example its own positive.
    batch_size: ``B``.
    seed: sampler seed.
    epoch: epoch number.
    num_near: nearest neighbours per seed.
    num_random: further neighbours per seed, drawn from the rest of the
      list.

  Returns:
    int64 ``[n // B * B]`` ids.

  Examples:
    >>> import numpy as np
    >>> from hnjax.data import batching
    >>> nbrs = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])
    >>> order = batching.neighbour_order(nbrs, 2, seed=0, epoch=0,
    ...                                  num_near=1, num_random=0)
    >>> sorted(map(sorted, order.reshape(-1, 2).tolist()))
    [[0, 1], [2, 3]]
  """
  nb = np.asarray(neighbours)
  if nb.ndim != 2 or not np.issubdtype(nb.dtype, np.integer):
    raise ValueError(f'neighbours must be an int [n, R] array, got '
                     f'{nb.dtype}{list(nb.shape)}')
  n = nb.shape[0]
  _check_batch(batch_size, n)
  if num_near < 0 or num_random < 0:
    raise ValueError(f'num_near={num_near} and num_random={num_random} must '
                     f'be >= 0')
  rng = _rng(seed, epoch, 1)
  used = np.zeros(n, bool)
  order, batch = [], []
  for s in rng.permutation(n):
    if used[s]:
      continue
    row = [int(j) for j in nb[s] if 0 <= j < n and j != s]
    near, rest = row[:num_near], row[num_near:]
    if num_random and rest:
      rest = list(rng.choice(rest, min(num_random, len(rest)),
                             replace=False))
    else:
      rest = []
    for j in [int(s)] + near + [int(r) for r in rest]:
      if used[j] or len(batch) == batch_size:
        continue
      used[j] = True
      batch.append(j)
    if len(batch) == batch_size:
      order.extend(batch)
      batch = []
  # Every id has been placed (each seed starts a group); the last, partial
  # batch is dropped.
  return _cut(order + batch, batch_size)


def ngame_cluster_size(epoch: int, *, start: int = 1,
                       milestones=NGAME_MILESTONES,
                       largest: int | None = None) -> int:
  """NGAME's curriculum: ``start`` doubled at each milestone passed.

  Args:
    epoch: epoch number (0-based).
    start: cluster size before the first milestone (1: random batches).
    milestones: epochs at which the size doubles.
    largest: upper bound (e.g. the batch size), or None.

  Returns:
    The cluster size for ``epoch``.
  """
  size = start * 2 ** sum(epoch >= m for m in milestones)
  return size if largest is None else min(size, largest)


def _two_means(x, rng, iters):
  """Balanced split of ``x`` [m, D] (unit rows) into two equal halves."""
  a, b = x[rng.choice(len(x), 2, replace=False)]
  for _ in range(iters):
    side = x @ a - x @ b
    half = np.argsort(-side, kind='stable')
    top, bottom = half[:len(x) // 2], half[len(x) // 2:]
    a = x[top].mean(0)
    b = x[bottom].mean(0)
  side = x @ a - x @ b
  half = np.argsort(-side, kind='stable')
  return half[:len(x) // 2], half[len(x) // 2:]


def balanced_clusters(embeddings: np.ndarray, cluster_size: int, *,
                      seed: int, iters: int = 5) -> list[np.ndarray]:
  """NGAME's balanced k-means: recursive balanced 2-means.

  Splits the examples in two equal halves around two centroids (cosine
  similarity), recursively, until every cluster has at most
  ``cluster_size`` examples; sizes differ by at most one within a level.

  Args:
    embeddings: ``[n, D]`` embeddings (normalised here).
    cluster_size: largest cluster, ``>= 1``.
    seed: seed of the initial centroids.
    iters: 2-means iterations per split.

  Returns:
    A list of int64 arrays of ids, the clusters.
  """
  x = _unit(embeddings)
  if cluster_size < 1:
    raise ValueError(f'cluster_size={cluster_size} must be >= 1')
  rng = np.random.default_rng([int(seed), 2])
  out, todo = [], [np.arange(len(x))]
  while todo:
    ids = todo.pop()
    if len(ids) <= cluster_size:
      out.append(ids)
      continue
    left, right = _two_means(x[ids], rng, iters)
    todo += [ids[right], ids[left]]
  return out


def cluster_order(embeddings: np.ndarray, batch_size: int, *,
                  cluster_size: int, seed: int, epoch: int) -> np.ndarray:
  """NGAME's batches: shuffled balanced clusters, concatenated.

  With ``cluster_size=1`` this is `random_order`'s distribution; larger
  clusters put near neighbours in the same batch. The clusters depend on
  the embeddings and ``seed`` (recompute them when the embeddings are
  refreshed), their order and the order inside each on ``epoch``.

  Args:
    embeddings: ``[n, D]`` current embeddings of the examples.
    batch_size: ``B``.
    cluster_size: examples per cluster (e.g. `ngame_cluster_size`).
    seed: sampler seed.
    epoch: epoch number.

  Returns:
    int64 ``[n // B * B]`` ids.
  """
  x = _unit(embeddings)
  _check_batch(batch_size, len(x))
  if cluster_size <= 1:
    return random_order(len(x), batch_size, seed=seed, epoch=epoch)
  clusters = balanced_clusters(x, cluster_size, seed=seed)
  rng = _rng(seed, epoch, 3)
  order = np.concatenate([rng.permutation(clusters[i])
                          for i in rng.permutation(len(clusters))])
  return _cut(order, batch_size)


def kmeans(embeddings: np.ndarray, num_clusters: int, *, seed: int,
           iters: int = 10) -> np.ndarray:
  """Spherical k-means (cosine), k-means++ initialisation.

  Args:
    embeddings: ``[n, D]``.
    num_clusters: ``k <= n``.
    seed: seed.
    iters: Lloyd iterations.

  Returns:
    int64 ``[n]`` cluster of each example.
  """
  x = _unit(embeddings)
  if not 1 <= num_clusters <= len(x):
    raise ValueError(f'num_clusters={num_clusters} must be in [1, {len(x)}]')
  rng = np.random.default_rng([int(seed), 4])
  centres = [x[rng.integers(len(x))]]
  dist = 1.0 - x @ centres[0]
  for _ in range(1, num_clusters):
    p = np.maximum(dist, 0) + 1e-12
    centres.append(x[rng.choice(len(x), p=p / p.sum())])
    dist = np.minimum(dist, 1.0 - x @ centres[-1])
  c = np.stack(centres)
  for _ in range(iters):
    assign = np.argmax(x @ c.T, axis=1)
    for j in range(num_clusters):
      members = x[assign == j]
      if len(members):
        c[j] = members.sum(0) / max(np.linalg.norm(members.sum(0)), 1e-12)
  return np.argmax(x @ c.T, axis=1).astype(np.int64)


def topic_order(embeddings: np.ndarray, batch_size: int, *,
                num_topics: int, seed: int, epoch: int,
                margins: np.ndarray | None = None,
                num_bins: int = 10) -> np.ndarray:
  """TAS-B's batches: each batch from one topic (Hofstätter et al. 2021).

  Topics are spherical k-means clusters of the (query) embeddings. Each
  topic's members are shuffled, or, with ``margins`` (e.g. a teacher's
  positive-minus-negative score per example), dealt round-robin from
  ``num_bins`` margin quantile bins so that hard (low-margin) examples are
  not under-sampled; whole batches are cut from each topic, the remainders
  of all topics pooled into mixed batches, and the batch order shuffled.

  Args:
    embeddings: ``[n, D]`` query embeddings.
    batch_size: ``B``.
    num_topics: k-means clusters.
    seed: sampler seed (the topics depend on it and the embeddings).
    epoch: epoch number.
    margins: optional float ``[n]``.
    num_bins: margin bins.

  Returns:
    int64 ``[n // B * B]`` ids.
  """
  x = _unit(embeddings)
  _check_batch(batch_size, len(x))
  topics = kmeans(x, num_topics, seed=seed)
  rng = _rng(seed, epoch, 5)
  if margins is not None:
    margins = np.asarray(margins, np.float64)
    if margins.shape != (len(x),):
      raise ValueError(f'margins must have shape [{len(x)}], got '
                       f'{margins.shape}')
    edges = np.quantile(margins, np.linspace(0, 1, num_bins + 1)[1:-1])
    bins = np.searchsorted(edges, margins)
  batches, pool = [], []
  for t in range(num_topics):
    ids = rng.permutation(np.flatnonzero(topics == t))
    if margins is not None and len(ids):
      # Round-robin over the bins present: bin 0, 1, ..., 0, 1, ...
      per_bin = [ids[bins[ids] == b] for b in range(num_bins)]
      dealt = []
      while any(len(b) for b in per_bin):
        for i, b in enumerate(per_bin):
          if len(b):
            dealt.append(b[0])
            per_bin[i] = b[1:]
      ids = np.asarray(dealt, np.int64)
    whole = len(ids) // batch_size * batch_size
    batches += list(ids[:whole].reshape(-1, batch_size))
    pool.extend(ids[whole:])
  pool = rng.permutation(np.asarray(pool, np.int64))
  batches += list(_cut(pool, batch_size).reshape(-1, batch_size))
  if not batches:
    return np.zeros((0,), np.int64)
  return np.concatenate([batches[i] for i in rng.permutation(len(batches))])


def in_batch_hardest_similarity(embeddings: np.ndarray, order: np.ndarray,
                                batch_size: int) -> float:
  """Mean over examples of the cosine similarity to the nearest batch-mate.

  The hardness of the in-batch negatives an order gives (higher: harder).

  Args:
    embeddings: ``[n, D]``.
    order: ids batch after batch, as the samplers return.
    batch_size: ``B >= 2``.

  Returns:
    The mean, a float.
  """
  x = _unit(embeddings)
  batches = _cut(order, batch_size).reshape(-1, batch_size)
  total = 0.0
  for b in batches:
    s = x[b] @ x[b].T
    np.fill_diagonal(s, -np.inf)
    total += float(s.max(axis=1).sum())
  return total / max(batches.size, 1)


# The samplers `EpochOrder` wraps (random batches: the pipeline's default).
ORDERS = ('neighbour', 'cluster', 'topic')


class EpochOrder:
  """A sampler as the input pipeline's ``order``: ``epoch -> ids``.

  Wraps `neighbour_order`, `cluster_order` or `topic_order` with fixed
  embeddings (those of the last refresh), so that
  `hnjax.data.train_iterator(..., order=EpochOrder(...))` draws batches of
  neighbours. The last two epochs' orders are cached (the pipeline asks
  once per step); instances pickle (grain workers). A new instance from
  new embeddings in the middle of an epoch changes the rest of that
  epoch's batches: some examples come twice that epoch, some not at all.

  Args:
    kind: one of `ORDERS`.
    embeddings: ``[n, D]`` embeddings of the training examples.
    batch_size: ``B``, the global batch size.
    seed: sampler seed.
    cluster_size: ``'cluster'``'s examples per cluster.
    num_topics: ``'topic'``'s k-means clusters.
    neighbours: ``'neighbour'``'s ``[n, R]`` nearest-first table (e.g.
      `hnjax.mining.mine_hard_negatives` of the embeddings against
      themselves); required there.
  """

  def __init__(self, kind: str, embeddings: np.ndarray,
               batch_size: int, *, seed: int, cluster_size: int = 8,
               num_topics: int = 32, neighbours: np.ndarray | None = None):
    if kind not in ORDERS:
      raise ValueError(f'order must be one of {ORDERS}, got {kind!r}')
    if kind == 'neighbour' and neighbours is None:
      raise ValueError("order 'neighbour' needs the neighbours table")
    embeddings = _unit(embeddings)
    if neighbours is not None and len(neighbours) != len(embeddings):
      raise ValueError(f'neighbours has {len(neighbours)} rows for '
                       f'{len(embeddings)} embeddings')
    _check_batch(batch_size, len(embeddings))
    self.kind, self.embeddings, self.neighbours = kind, embeddings, neighbours
    self.batch_size, self.seed = batch_size, seed
    self.cluster_size, self.num_topics = cluster_size, num_topics
    self._cache = {}

  def __call__(self, epoch: int) -> np.ndarray:
    epoch = int(epoch)
    if epoch not in self._cache:
      kw = dict(seed=self.seed, epoch=epoch)
      if self.kind == 'neighbour':
        order = neighbour_order(self.neighbours, self.batch_size, **kw)
      elif self.kind == 'cluster':
        order = cluster_order(self.embeddings, self.batch_size,
                              cluster_size=self.cluster_size, **kw)
      else:
        order = topic_order(self.embeddings, self.batch_size,
                            num_topics=self.num_topics, **kw)
      order.flags.writeable = False
      self._cache = {e: o for e, o in self._cache.items() if e == epoch - 1}
      self._cache[epoch] = order
    return self._cache[epoch]

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_cache'}

  def __setstate__(self, state):
    self.__dict__.update(state, _cache={})
