r"""Corpus mining: hnjax (1 and 8 devices) vs NumPy and faiss, time and memory.

  python benchmarks/mining.py                          # 10k x 1M x 128
  python benchmarks/mining.py --queries 1000 --corpus 100000

Mines ``--num`` hard negatives per query with
`hnjax.mining.mine_hard_negatives` (1 CPU device, and the corpus sharded
over 8 fake CPU devices, which share the same cores), a brute-force NumPy
peer in query chunks (``q @ corpus.T``, the same filters, ``argpartition``)
and faiss ``IndexFlatIP`` (exact inner product; filters applied to its top
``range_max + 1``), each in its own process: wall time of the mining (hnjax's
compilation reported apart) and the process's peak resident memory, next to
the corpus's own size. Filter sets: ``none`` (the plain top-k) and
``combined`` (range_min 10, range_max 100, relative margin 0.05, min score
0.1). Queries are noisy copies of their positives. faiss runs in its own
venv (``$HNJAX_FAISS_PYTHON``, default /work/faissenv/bin/python with
``pip install faiss-cpu numpy``); it is skipped when missing.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAISS_PY = os.environ.get('HNJAX_FAISS_PYTHON', '/work/faissenv/bin/python')
FILTER_SETS = {
    'none': {},
    'combined': dict(range_min=10, range_max=100, relative_margin=0.05,
                     min_score=0.1),
}


def make_data(q, c, d, seed=0):
  """Unit corpus rows; queries are noisy copies of their positives."""
  rng = np.random.default_rng(seed)
  corpus = rng.standard_normal((c, d), dtype=np.float32)
  corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
  pos = rng.integers(0, c, q).astype(np.int32)
  queries = corpus[pos] + 0.08 * rng.standard_normal((q, d), dtype=np.float32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  return queries, corpus, pos


def numpy_mine(queries, corpus, pos, num, range_min=0, range_max=None,
               relative_margin=None, min_score=None, chunk=256):
  """The same semantics in NumPy, a chunk of queries at a time."""
  out = np.full((len(queries), num), -1, np.int64)
  width = range_min + num
  for a in range(0, len(queries), chunk):
    qc, pc = queries[a:a + chunk], pos[a:a + chunk]
    s = qc @ corpus.T
    rows = np.arange(len(qc))
    p = s[rows, pc].copy()
    s[rows, pc] = -np.inf
    upper = np.full(len(qc), np.inf, np.float32)
    if relative_margin is not None:
      upper = np.minimum(upper, p * (1 - relative_margin))
    above = (s > upper[:, None]).sum(1)
    s[s > upper[:, None]] = -np.inf
    top = np.argpartition(-s, width - 1, axis=1)[:, :width]
    v = np.take_along_axis(s, top, 1)
    order = np.lexsort((top, -v), axis=1)  # score desc, then index
    top, v = np.take_along_axis(top, order, 1), np.take_along_axis(v, order, 1)
    for i in range(len(qc)):
      skip = max(range_min - above[i], 0)
      keep = [j for j in range(skip, width) if np.isfinite(v[i, j]) and (
          min_score is None or v[i, j] >= min_score) and (
              range_max is None or above[i] + j < range_max)][:num]
      out[a + i, :len(keep)] = top[i, keep]
  return out


def faiss_mine(queries, corpus, pos, num, range_min=0, range_max=None,
               relative_margin=None, min_score=None):
  """faiss IndexFlatIP's exact top-k, then the filters on its results."""
  import faiss  # pylint: disable=g-import-not-at-top
  index = faiss.IndexFlatIP(corpus.shape[1])
  index.add(corpus)
  k = (range_max if range_max is not None else range_min + num) + 1
  scores, idx = index.search(queries, k)
  p = np.sum(queries * corpus[pos], axis=1)
  out = np.full((len(queries), num), -1, np.int64)
  for i in range(len(queries)):
    keep = [j for j in range(k) if idx[i, j] != pos[i]][:k - 1]
    cand = [(idx[i, j], scores[i, j]) for j in keep]
    upper = p[i] * (1 - relative_margin) if relative_margin else np.inf
    ranked = [(c, s) for r, (c, s) in enumerate(cand)
              if r >= range_min and (range_max is None or r < range_max)]
    ranked = [c for c, s in ranked if s <= upper and (
        min_score is None or s >= min_score)]
    out[i, :min(num, len(ranked))] = ranked[:num]
  return out


def child(args):
  """One implementation in this process: prints a JSON line."""
  filters = FILTER_SETS[args.filters]
  queries, corpus, pos = make_data(args.queries, args.corpus, args.dim)
  out = dict(impl=args._impl, devices=args.devices, filters=args.filters)
  if args._impl == 'hnjax':
    import jax  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, _ROOT)
    from hnjax import mining  # pylint: disable=g-import-not-at-top
    from hnjax import parallel  # pylint: disable=g-import-not-at-top
    mesh = parallel.make_mesh(args.devices)
    fn = lambda q, c, p, ax: mining.mine_hard_negatives(
        q, c, p, num_negatives=args.num, axis_name=ax, **filters)
    if args.devices == 1:
      f = jax.jit(lambda q, c, p: fn(q, c, p, None))
      c_arr = jax.device_put(corpus)
    else:
      f = jax.jit(jax.shard_map(
          lambda q, c, p: fn(q, c, p, 'data'), mesh=mesh,
          in_specs=(P(), P('data'), P()), out_specs=(P(), P()),
          check_vma=False))
      c_arr = jax.device_put(corpus, NamedSharding(mesh, P('data')))
    t0 = time.perf_counter()
    compiled = f.lower(queries, c_arr, pos).compile()
    out['compile_s'] = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx, _ = compiled(queries, c_arr, pos)
    idx = np.asarray(jax.block_until_ready(idx))
  elif args._impl == 'numpy':
    t0 = time.perf_counter()
    idx = numpy_mine(queries, corpus, pos, args.num, **filters)
  else:
    t0 = time.perf_counter()
    idx = faiss_mine(queries, corpus, pos, args.num, **filters)
  out['seconds'] = time.perf_counter() - t0
  out['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  np.save(f'/tmp/hnjax_mining_{args._impl}_{args.devices}_{args.filters}.npy',
          idx)
  print('RESULT ' + json.dumps(out), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--queries', type=int, default=10000)
  p.add_argument('--corpus', type=int, default=1000000)
  p.add_argument('--dim', type=int, default=128)
  p.add_argument('--num', type=int, default=10)
  p.add_argument('--filters', nargs='+', default=list(FILTER_SETS))
  p.add_argument('--_impl', help=argparse.SUPPRESS)
  p.add_argument('--devices', type=int, default=1, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._impl:  # pylint: disable=protected-access
    args.filters = args.filters[0]
    child(args)
    return
  runs = [('hnjax', 1), ('hnjax', 8), ('numpy', 1)]
  if os.path.exists(FAISS_PY):
    runs.append(('faiss', 1))
  corpus_mb = args.corpus * args.dim * 4 / 2**20
  print(f'{args.queries:,} queries x {args.corpus:,} corpus x {args.dim}, '
        f'{args.num} negatives; corpus {corpus_mb:.0f} MiB; '
        f'{os.cpu_count()} CPUs')
  print('\n| filters | implementation | mining s | compile s | '
        'peak RSS MiB | same indices as NumPy |')
  print('|---|---|---|---|---|---|')
  for filters in args.filters:
    results = []
    for impl, n in runs:
      env = dict(os.environ)
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                          f' --xla_force_host_platform_device_count={n}')
      python = FAISS_PY if impl == 'faiss' else sys.executable
      cmd = [python, os.path.abspath(__file__), '--_impl', impl, '--devices',
             str(n), '--filters', filters, '--queries', str(args.queries),
             '--corpus', str(args.corpus), '--dim', str(args.dim), '--num',
             str(args.num)]
      res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                           check=False)
      line = [l for l in res.stdout.splitlines() if l.startswith('RESULT ')]
      if not line:
        print(f'{impl} failed: {res.stderr[-800:]}', file=sys.stderr)
        continue
      results.append(json.loads(line[0][len('RESULT '):]))
    ref = np.load(f'/tmp/hnjax_mining_numpy_1_{filters}.npy')
    for r in results:
      idx = np.load(f"/tmp/hnjax_mining_{r['impl']}_{r['devices']}_"
                    f"{filters}.npy")
      same = float(np.mean(np.all(idx == ref, axis=1)))
      name = r['impl'] + (f" ({r['devices']} devices)" if r['impl'] ==
                          'hnjax' else '')
      comp = f"{r['compile_s']:.1f}" if 'compile_s' in r else '-'
      print(f"| {filters} | {name} | {r['seconds']:.1f} | {comp} | "
            f"{r['peak_rss_mb']:,.0f} | {100 * same:.2f}% |", flush=True)


if __name__ == '__main__':
  main()
