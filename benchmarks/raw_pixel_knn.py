r"""The raw-pixel baseline of the README's results table.

  python benchmarks/raw_pixel_knn.py                    # shapes32
  python benchmarks/raw_pixel_knn.py --dataset digits

Weighted kNN (k=200, t=0.1, the monitor's protocol) on flattened raw pixels
of the dataset's train split, evaluated on its eval split: what an encoder
must beat. For shapes32 it also scores the two halves of the label (shape and
colour) separately.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hnjax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax.eval import knn  # pylint: disable=g-import-not-at-top,wrong-import-position


def _arrays(source, fields):
  rows = [source[i] for i in range(len(source))]
  x = np.stack([r['image'] for r in rows]).reshape(len(rows), -1)
  return x.astype(np.float32) / 255.0, {f: np.array([r[f] for r in rows])
                                        for f in fields}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dataset', default='shapes32')
  p.add_argument('--k', type=int, default=200)
  p.add_argument('--t', type=float, default=0.1)
  args = p.parse_args()
  info = data.get_info(args.dataset)
  fields = ['label'] + (['shape', 'colour'] if args.dataset == 'shapes32'
                        else [])
  train_x, train = _arrays(data.get_source(args.dataset, info.train_split),
                           fields)
  test_x, test = _arrays(data.get_source(args.dataset, info.eval_split),
                         fields)
  print(f'{args.dataset}: {len(train_x)} train / {len(test_x)} eval images, '
        f'raw pixels, weighted kNN k={args.k} t={args.t}\n')
  print('| target | classes | kNN top-1 |\n|---|---|---|')
  for f in fields:
    n = int(max(train[f].max(), test[f].max())) + 1
    acc = knn.knn_accuracy(test_x, test[f], train_x, train[f], num_classes=n,
                           k=args.k, temperature=args.t)
    print(f'| {f} | {n} | {acc:.4f} |')


if __name__ == '__main__':
  main()
