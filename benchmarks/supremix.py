r"""SupReMix's loss: hnjax vs SupCon vs the authors' PyTorch code path.

  python benchmarks/supremix.py                      # 2B = 256, 512, 1024, 4096
  python benchmarks/supremix.py --N 256 --iters 5 --no-torch

Times forward + backward with respect to the embeddings of

* hnjax ``losses.supremix`` (clean form, both mixture kinds, distance
  weights), its default path (hard positives scored in a band of the
  target order chosen at run time) and with every pair scored
  (``max_partners=0``, the O(N³) path);
* hnjax ``losses.sup_con`` at the same N (the cost SupReMix adds to);
* a PyTorch eager peer following the authors' AgeDB-DIR code
  (benchmarks/peers/torch_supremix.py: the mixtures materialised as their
  ``mixing_func``'s ``[N, N, N, D]`` tensor), run in its own venv
  ($HNJAX_TORCH_PYTHON, default /work/torchvenv/bin/python; see
  benchmarks/peers/README.md), and its SupCon.

Batches: D = 128 unit vectors, ages ``randint(0, 100)`` repeated for the
two views, T = 0.5, window 5, Beta(2, 8), as the authors' AgeDB recipe.
Peak memory: XLA's temporary buffers of the compiled step (arguments
excluded); for the peer, the process's peak resident memory increase.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hnjax import losses

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def batch(n, d, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, d))
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  y = np.tile(rng.integers(0, 100, n // 2), 2).astype(np.float32)
  return jnp.asarray(z, jnp.float32), jnp.asarray(y)


def fns(args):
  key = jax.random.key(0)
  grad = lambda f: jax.jit(jax.value_and_grad(lambda z, y: f(z, y).mean()))
  return {
      'supremix': grad(lambda z, y: losses.supremix(
          key, z, y, temperature=args.T, window=args.window)),
      'supremix_all_pairs': grad(lambda z, y: losses.supremix(
          key, z, y, temperature=args.T, window=args.window,
          max_partners=0)),
      'supcon': grad(lambda z, y: losses.sup_con(z, y,
                                                 temperature=args.T)),
  }


def profile(args, n):
  """Where SupReMix's time goes at ``n`` views: each part on its own."""
  from hnjax import samplers  # pylint: disable=g-import-not-at-top
  from hnjax.losses import _supervised  # pylint: disable=g-import-not-at-top
  z, y = batch(n, args.D)
  key = jax.random.key(0)
  s = z @ z.T / args.T
  parts = {
      'Beta draws of the hard negatives ([N, N])': (jax.jit(
          lambda y: samplers.anchor_inclusive_mixtures(key, y)[0]), (y,)),
      'hard positives, banded, fwd+bwd': (jax.jit(jax.grad(
          lambda s, y: _supervised._positive_mixtures(
              y, y, s, args.window, None)[0].sum())), (s, y)),
      'SupCon (the real pairs alone), fwd+bwd': (jax.jit(jax.grad(
          lambda z, y: losses.sup_con(z, y, temperature=args.T).sum())),
                                                  (z, y)),
  }
  print(f'\nprofile at 2B={n} (median ms):')
  for name, (fn, a) in parts.items():
    print(f'  {name}: {common.time_ms(fn, *a, iters=args.iters)[0]:.1f}')


def _torch_peer(args, n):
  if args.no_torch:
    return None
  return common.run_peer('torch_supremix', (
      f'{{"supremix": t.time_supremix({n}, {args.D}, {args.iters}), '
      f'"supcon": t.time_supcon({n}, {args.D}, {args.iters})}}'))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--N', type=int, nargs='+', default=[256, 512, 1024, 4096],
                 help='views per batch (2B)')
  p.add_argument('--D', type=int, default=128)
  p.add_argument('--T', type=float, default=0.5)
  p.add_argument('--window', type=float, default=5.0)
  p.add_argument('--iters', type=int, default=3)
  p.add_argument('--all-pairs-max', type=int, default=1024,
                 help='largest N for the O(N³) all-pairs path')
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--profile', type=int, default=1024,
                 help='2B of the per-part profile (0: none)')
  args = p.parse_args()
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, '
        f'{os.cpu_count()} CPUs; D={args.D} T={args.T} window={args.window}')
  f = fns(args)
  rows = []
  for n in args.N:
    z, y = batch(n, args.D)
    row = dict(N=n)
    for name, fn in f.items():
      if name == 'supremix_all_pairs' and n > args.all_pairs_max:
        continue
      row[f'{name}_ms'] = common.time_ms(fn, z, y, iters=args.iters)[0]
      row[f'{name}_mb'] = common.temp_mb(fn, z, y)
    peer = _torch_peer(args, n)
    if peer:
      row['torch_supremix'] = peer['supremix']
      row['torch_supcon_ms'] = peer['supcon'].get('median_ms')
    rows.append(row)
    print(json.dumps(row), flush=True)

  def cell(x):
    if x is None:
      return '-'
    return f'{x:.0f}' if x >= 10 else f'{x:.2f}'

  print('\n| 2B | SupReMix ms | SupReMix MB | all pairs ms | all pairs MB | '
        'SupCon ms | SupReMix / SupCon | torch SupReMix ms | torch peak MB '
        '| torch / hnjax | torch SupCon ms |')
  print('|' + '---|' * 11)
  for r in rows:
    t = r.get('torch_supremix') or {}
    torch_ms = t.get('median_ms')
    cells = [
        str(r['N']), cell(r['supremix_ms']), cell(r['supremix_mb']),
        cell(r.get('supremix_all_pairs_ms')),
        cell(r.get('supremix_all_pairs_mb')), cell(r['supcon_ms']),
        cell(r['supremix_ms'] / r['supcon_ms']),
        cell(torch_ms) if torch_ms else t.get('skipped', '-'),
        cell(t.get('peak_mb')),
        cell(torch_ms / r['supremix_ms']) if torch_ms else '-',
        cell(r.get('torch_supcon_ms'))]
    print('| ' + ' | '.join(cells) + ' |')
  if args.profile:
    profile(args, args.profile)


if __name__ == '__main__':
  main()
