r"""The negative side of a MoCo / MoCHi step: hnjax vs dense vs PyTorch.

  python benchmarks/negatives.py                 # K = 4096, 65536, 1048576
  python benchmarks/negatives.py --K 65536 --iters 5 --no-torch

Times forward + backward with respect to the query of

* MoCo: InfoNCE of ``[q·k | q·queue] / T``;
* MoCHi(N, s, s'): the same plus the N hardest queue negatives per query and
  s + s' synthetic negatives mixed from them (`hnjax.losses.mochi_info_nce`),

for hnjax's automatic path (blocked above 2**22 logits), the same math forced
through the dense path (one ``[B, K]`` logits matrix), and a PyTorch eager
peer (benchmarks/peers/torch_negatives.py, ``torch.topk``) run in its own
venv (/work/torchvenv, see benchmarks/peers/README.md). The arithmetic floor
is the matmul FLOPs (forward logits plus the query gradient, 4·B·K·D) over
the peak float32 matmul rate measured in this process. Peak extra memory is
XLA's temporary buffer size for the compiled step (arguments excluded).
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

_time = common.time_ms


def peak_matmul_gflops(n=2048, iters=5):
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  _, best = _time(f, a, iters=iters)
  return 2 * n**3 / (best / 1e3) / 1e9


def _inputs(b, k, d, seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
      rng.normal(size=s)).astype(np.float32)
  return jnp.asarray(unit(b, d)), jnp.asarray(unit(b, d)), jnp.asarray(
      unit(k, d))


def step_fns(args, block_size):
  """Jitted fwd+bwd (w.r.t. the query) of MoCo and MoCHi."""
  key = jax.random.key(0)

  def loss(q, k, queue, num_hard):
    out, _ = losses.mochi_info_nce(
        key, q, k, queue, temperature=args.T, num_hard=num_hard,
        num_mix=args.s, num_query_mix=args.s_prime, block_size=block_size)
    return jnp.mean(out)

  grad = lambda num_hard: jax.jit(jax.value_and_grad(
      lambda q, k, queue: loss(q, k, queue, num_hard)))
  return grad(0), grad(args.N)


def profile(args, k, iters):
  """Where MoCHi's time goes: each stage jitted and timed on its own."""
  from hnjax import bank  # pylint: disable=g-import-not-at-top
  from hnjax import samplers  # pylint: disable=g-import-not-at-top
  q, _, queue = _inputs(args.B, k, args.D)
  key = jax.random.key(0)
  sims, top = jax.jit(lambda q, queue: bank.bank_stats(
      q, queue, num_top=args.N)[1:3])(q, queue)
  mix = dict(num_mix=args.s, num_query_mix=args.s_prime)
  # Every array is an argument: XLA constant-folds gathers from closed-over
  # constants, which would time the folding away.
  stages = {
      'logits + log-sum-exp, fwd+bwd (= MoCo)': (jax.jit(jax.grad(
          lambda q, queue: bank.bank_stats(
              q, queue, scales=(1 / args.T,)).lse.sum())), (q, queue)),
      f'hardest-{args.N} selection': (jax.jit(
          lambda q, queue: bank.bank_stats(
              q, queue, num_top=args.N).top_indices), (q, queue)),
      'XLA top_k alone on [B, K] logits': (jax.jit(
          lambda s: jax.lax.top_k(s, args.N)[1]), (q @ queue.T,)),
      f'synthetic logits ({args.s}+{args.s_prime}, mochi_logits), fwd+bwd': (
          jax.jit(jax.grad(lambda q, queue, top, sims: jnp.sum(
              jax.nn.logsumexp(samplers.mochi_logits(
                  key, q, queue, top, sims, **mix), -1)))),
          (q, queue, top, sims)),
      'the same from materialised mixtures (mochi_mix), fwd+bwd': (
          jax.jit(jax.grad(lambda q, queue, top: jnp.sum(jax.nn.logsumexp(
              jnp.einsum('bd,bmd->bm', q, samplers.mochi_mix(
                  key, q, queue, top, **mix)), -1)))), (q, queue, top)),
  }
  print(f'\nprofile at K={k} (median ms):')
  for name, (fn, a) in stages.items():
    print(f'  {name}: {_time(fn, *a, iters=iters)[0]:.0f}')


def _torch_peer(args, k):
  if args.no_torch:
    return None
  return common.run_peer('torch_negatives', (
      f'{{"moco": t.time_moco({args.B}, {k}, {args.D}, {args.T!r}, '
      f'{args.iters}), "mochi": t.time_mochi({args.B}, {k}, {args.D}, '
      f'{args.N}, {args.s}, {args.s_prime}, {args.T!r}, {args.iters})}}'))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--B', type=int, default=256)
  p.add_argument('--K', type=int, nargs='+', default=[4096, 65536, 1048576])
  p.add_argument('--D', type=int, default=128)
  p.add_argument('--N', type=int, default=1024)
  p.add_argument('--s', type=int, default=1024)
  p.add_argument('--s_prime', type=int, default=256)
  p.add_argument('--T', type=float, default=0.2)
  p.add_argument('--iters', type=int, default=5)
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--no-dense', action='store_true',
                 help='skip the dense path (its [B, K] logits are 1 GiB at '
                 'K = 1M)')
  p.add_argument('--json', default='', help='also write the rows here')
  p.add_argument('--profile', type=int, default=65536,
                 help='K of the per-stage profile (0: none)')
  args = p.parse_args()

  peak = peak_matmul_gflops()
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, '
        f'{os.cpu_count()} CPUs; peak float32 matmul {peak:.1f} GFLOP/s; '
        f'B={args.B} D={args.D} MoCHi({args.N}, {args.s}, {args.s_prime})')
  rows = []
  for k in args.K:
    q, pos, queue = _inputs(args.B, k, args.D)
    row = dict(K=k, floor_ms=4 * args.B * k * args.D / peak / 1e6)
    for name, block in (('hnjax', None), ('dense', 0)):
      if name == 'dense' and args.no_dense:
        continue
      moco, mochi = step_fns(args, block)
      row[f'{name}_moco_ms'] = _time(moco, q, pos, queue, iters=args.iters)[0]
      row[f'{name}_mochi_ms'] = _time(mochi, q, pos, queue,
                                      iters=args.iters)[0]
      row[f'{name}_moco_mb'] = common.temp_mb(moco, q, pos, queue)
      row[f'{name}_mochi_mb'] = common.temp_mb(mochi, q, pos, queue)
    peer = _torch_peer(args, k)
    if peer:
      row['torch_moco_ms'] = peer['moco']['median_ms']
      row['torch_mochi_ms'] = peer['mochi']['median_ms']
    rows.append(row)
    print(json.dumps(row), flush=True)

  fmt = lambda x: '-' if x is None else (f'{x:.0f}' if x >= 10 else
                                         f'{x:.1f}')
  print('\n| K | floor ms | hnjax MoCo ms | hnjax MoCHi ms | MoCHi/MoCo | '
        'MoCo/floor | dense MoCo ms | dense MoCHi ms | torch MoCo ms | '
        'torch MoCHi ms | torch/hnjax MoCHi | hnjax MoCHi temp MB | '
        'dense MoCHi temp MB |')
  print('|' + '---|' * 13)
  for r in rows:
    g = r.get
    ratio = lambda a, b: None if g(a) is None or g(b) is None else g(a) / g(b)
    cells = [r['K'], g('floor_ms'), g('hnjax_moco_ms'), g('hnjax_mochi_ms'),
             ratio('hnjax_mochi_ms', 'hnjax_moco_ms'),
             ratio('hnjax_moco_ms', 'floor_ms'), g('dense_moco_ms'),
             g('dense_mochi_ms'), g('torch_moco_ms'), g('torch_mochi_ms'),
             ratio('torch_mochi_ms', 'hnjax_mochi_ms'), g('hnjax_mochi_mb'),
             g('dense_mochi_mb')]
    print('| ' + ' | '.join(
        f'{c:.2f}' if isinstance(c, float) and c < 10 else
        (fmt(c) if isinstance(c, float) else str(c)) for c in cells) + ' |')
  if args.profile:
    profile(args, args.profile, args.iters)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
