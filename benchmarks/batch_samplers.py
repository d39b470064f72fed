r"""How hard are the in-batch negatives of each batch-composition sampler?

  python benchmarks/batch_samplers.py
  python benchmarks/batch_samplers.py --data digits --batch 128

For one epoch of each order of `hnjax.data.batching` (random batches,
Sample4Geo neighbour batches, NGAME balanced clusters of 8 and 32, TAS-B
topics) built from the training images' raw pixels (unit-normalised), it
reports the mean cosine similarity of each example to its nearest
batch-mate (the hardest in-batch negative; higher is harder) and how often
that batch-mate has the example's own label (an in-batch false negative:
the price of hardness), and the time to build the order.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from hnjax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax import mining  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax.data import batching  # pylint: disable=g-import-not-at-top,wrong-import-position


def nearest_mate_label_share(x, labels, order, batch):
  """Share of examples whose nearest batch-mate has their label."""
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  same = 0
  for b in order.reshape(-1, batch):
    s = u[b] @ u[b].T
    np.fill_diagonal(s, -np.inf)
    same += int(np.sum(labels[b] == labels[b][s.argmax(1)]))
  return same / order.size


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data', default='shapes32')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--examples', type=int, default=8192)
  args = p.parse_args()
  source = data.get_source(args.data, 'train')
  n = min(args.examples, len(source))
  raw = source.get_batch(np.arange(n), ('image', 'label'))
  x = raw['image'].reshape(n, -1).astype(np.float32)
  x -= x.mean(0)  # centred pixels: cosine of raw images is nearly 1
  labels = np.asarray(raw['label'])
  t0 = time.perf_counter()
  nbrs, _ = mining.mine_hard_negatives(x, x, np.arange(n), num_negatives=128)
  nbrs = np.asarray(nbrs)
  mine_s = time.perf_counter() - t0
  runs = {
      'random': lambda: batching.random_order(n, args.batch, seed=0, epoch=0),
      'Sample4Geo neighbours (32 + 32 of 128)': lambda: (
          batching.neighbour_order(nbrs, args.batch, seed=0, epoch=0)),
      'NGAME clusters of 8': lambda: batching.cluster_order(
          x, args.batch, cluster_size=8, seed=0, epoch=0),
      'NGAME clusters of 32': lambda: batching.cluster_order(
          x, args.batch, cluster_size=32, seed=0, epoch=0),
      f'TAS-B topics ({n // args.batch})': lambda: batching.topic_order(
          x, args.batch, num_topics=n // args.batch, seed=0, epoch=0),
  }
  print(f'{args.data}: {n} training images, raw centred pixels, batch '
        f'{args.batch}; neighbour lists by hnjax.mining in {mine_s:.1f} s')
  print('\n| order | mean hardest in-batch similarity | nearest batch-mate '
        'has the same label | build s |')
  print('|---|---|---|---|')
  for name, fn in runs.items():
    t0 = time.perf_counter()
    order = fn()
    secs = time.perf_counter() - t0
    hard = batching.in_batch_hardest_similarity(x, order, args.batch)
    same = nearest_mate_label_share(x, labels, order, args.batch)
    print(f'| {name} | {hard:.3f} | {same:.3f} | {secs:.1f} |', flush=True)


if __name__ == '__main__':
  main()
