"""PyTorch peer: the negative side of one MoCo v2 / MoCHi step (fwd + bwd).

Command (peer venv, see README.md in this folder):

  /work/torchvenv/bin/python benchmarks/peers/torch_negatives.py \
      --B 256 --K 65536 --D 128 --N 1024 --s 1024 --s_prime 256 --iters 10

Math (ALGORITHMS.md §2.2 step 3 and §3.1). Inputs: a leaf ``x`` [B, D] with
``requires_grad``, ``q = normalize(x)``; positives ``k`` [B, D] and a queue of
unit rows ``queue`` [K, D], both without gradient; temperature T.

  MoCo:   l_pos = (q * k).sum(1)                    [B]
          l_neg = q @ queue.T                       [B, K]
          logits = cat([l_pos[:, None], l_neg], 1) / T
          loss = cross_entropy(logits, 0); loss.backward()

  MoCHi(N, s, s'): from the same l_neg,
          idx = topk(l_neg.detach(), N).indices     [B, N]  (per-query top-N)
          type 1 (s per query):  i, j ~ randint(N), alpha ~ U(0, 1)
              h  = normalize(alpha * n_i + (1 - alpha) * n_j)
          type 2 (s' per query): j ~ randint(N), beta ~ U(0, 0.5)
              h' = normalize(beta * q.detach() + (1 - beta) * n_j)
          h and h' are detached (constants);
          logits = cat([l_pos, l_neg, q.h, q.h'], 1) / T; CE with label 0.

Source followed: facebookresearch/moco ``moco/builder.py`` (MoCo logits and
loss) and davidsvy/hard-negative-mixing ``src/moco.py`` (``find_hard_negatives``,
``hard_negatives1``, ``hard_negatives2``): ``torch.topk(..., sorted=False)`` on
the detached queue logits, per-query indices composed with ``torch.gather`` and
then used to index the queue, so every synthetic negative of query b mixes only
query b's own top-N (not the flattened-index bug of MaugrimEP/MocoAndMochi,
ALGORITHMS.md §8.4). The ``materialize`` variant instead builds the hard set
``queue[idx]`` [B, N, D] first and then picks from it per query with
``torch.gather`` along dim 1; it is the same math with an extra B*N*D tensor.

Timing: ``torch.set_num_threads(2)``, float32, ``warmup`` untimed iterations,
then ``iters`` timed iterations with ``time.perf_counter``; median and min in
ms. Timed: normalize(x), all logits, top-k, mixing, CE, backward with respect
to x, and clearing ``x.grad``. Not timed: creating the inputs. As in
``builder.py``, the logits are built in a function that returns only the
scaled logits, so ``l_neg`` and the unscaled concatenation are freed before
the loss (this matters for memory at large K).

Memory: each measurement runs in a fresh subprocess. After inputs are built
and one warm-up step has run, the peak-RSS counter is reset (Linux
``/proc/self/clear_refs`` with "5"); one more step runs and the reported
``peak_rss_mb_delta`` is VmHWM after the step minus VmRSS just before it, i.e.
the extra resident memory the step needed at its peak. If the reset is not
permitted, it falls back to the ``resource.getrusage`` maxrss delta (which can
only under-report). tracemalloc would not see torch's allocations.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

NUM_THREADS = 2


def make_inputs(B, K, D, seed=0):
  """Returns (x, k, queue): x [B, D] leaf with grad, k [B, D], queue [K, D]."""
  torch.manual_seed(seed)
  x = torch.randn(B, D, dtype=torch.float32, requires_grad=True)
  k = F.normalize(torch.randn(B, D, dtype=torch.float32), dim=1)
  queue = F.normalize(torch.randn(K, D, dtype=torch.float32), dim=1)
  return x, k, queue


def moco_logits(q, k, queue, T):
  """MoCo logits [B, 1 + K] / T (label 0 is the positive)."""
  l_pos = (q * k).sum(1, keepdim=True)
  l_neg = q @ queue.T
  return torch.cat([l_pos, l_neg], dim=1) / T


def moco_step(x, k, queue, T):
  """One MoCo negative-side step: forward, CE, backward into x.grad."""
  q = F.normalize(x, dim=1)
  logits = moco_logits(q, k, queue, T)
  labels = torch.zeros(logits.shape[0], dtype=torch.long)
  loss = F.cross_entropy(logits, labels)
  loss.backward()
  return loss


def mochi_logits(q, k, queue, N, s, s_prime, T, materialize=False):
  """MoCHi logits [B, 1 + K + s + s'] / T (label 0 is the positive)."""
  B = q.shape[0]
  l_pos = (q * k).sum(1, keepdim=True)
  l_neg = q @ queue.T
  idx = torch.topk(l_neg.detach(), N, dim=1, sorted=False).indices  # [B, N]
  i1, i2 = torch.randint(0, N, (2, B, s))
  alpha = torch.rand(B, s, 1)
  j = torch.randint(0, N, (B, s_prime))
  beta = torch.rand(B, s_prime, 1) * 0.5
  if materialize:
    hard = queue[idx]  # [B, N, D]
    D = hard.shape[-1]

    def pick(sel):  # sel [B, m] in [0, N) -> [B, m, D], row b from hard[b]
      return torch.gather(hard, 1, sel[..., None].expand(-1, -1, D))
  else:

    def pick(sel):  # compose indices per query, then index the queue
      return queue[torch.gather(idx, 1, sel)]
  with torch.no_grad():
    h = F.normalize(alpha * pick(i1) + (1 - alpha) * pick(i2), dim=-1)
    h2 = F.normalize(beta * q.detach()[:, None] + (1 - beta) * pick(j), dim=-1)
  l_h = torch.einsum('bd,bsd->bs', q, h)
  l_h2 = torch.einsum('bd,bsd->bs', q, h2)
  return torch.cat([l_pos, l_neg, l_h, l_h2], dim=1) / T


def mochi_step(x, k, queue, N, s, s_prime, T, materialize=False):
  """One MoCHi negative-side step: forward, CE, backward into x.grad."""
  q = F.normalize(x, dim=1)
  logits = mochi_logits(q, k, queue, N, s, s_prime, T, materialize)
  labels = torch.zeros(logits.shape[0], dtype=torch.long)
  loss = F.cross_entropy(logits, labels)
  loss.backward()
  return loss


def _step_fn(kind, B, K, D, N=0, s=0, s_prime=0, T=0.2, materialize=False,
             seed=0):
  x, k, queue = make_inputs(B, K, D, seed)
  if kind == 'moco':
    def step():
      moco_step(x, k, queue, T)
      x.grad = None
  elif kind == 'mochi':
    def step():
      mochi_step(x, k, queue, N, s, s_prime, T, materialize)
      x.grad = None
  else:
    raise ValueError(f'unknown kind {kind!r}')
  return step


def _time(step, iters, warmup):
  for _ in range(warmup):
    step()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    step()
    times.append((time.perf_counter() - t0) * 1e3)
  return dict(median_ms=statistics.median(times), min_ms=min(times),
              times_ms=times)


def _status_kb(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise KeyError(field)


def _mem_worker(spec):
  """Runs in a fresh process: peak extra RSS (MB) of one warmed-up step."""
  torch.set_num_threads(NUM_THREADS)
  step = _step_fn(**spec)
  step()  # warm-up: one-time allocations and lazy init are not counted
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # reset VmHWM to the current RSS
    before = _status_kb('VmRSS')
    step()
    delta_kb = _status_kb('VmHWM') - before
    method = 'vmhwm'
  except OSError:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    delta_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    method = 'maxrss'
  return dict(peak_rss_mb_delta=delta_kb / 1024, mem_method=method)


def _measure_mem(spec):
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--_mem_worker',
       json.dumps(spec)], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def time_moco(B=256, K=65536, D=128, T=0.2, iters=10, warmup=3, seed=0,
              memory=True):
  """Times the MoCo negative side; returns dict(median_ms, min_ms, ...)."""
  torch.set_num_threads(NUM_THREADS)
  spec = dict(kind='moco', B=B, K=K, D=D, T=T, seed=seed)
  out = _time(_step_fn(**spec), iters, warmup)
  if memory:
    out.update(_measure_mem(spec))
  return out


def time_mochi(B=256, K=65536, D=128, N=1024, s=1024, s_prime=256, T=0.2,
               iters=10, warmup=3, seed=0, materialize=False, memory=True):
  """Times the MoCHi negative side; returns dict(median_ms, min_ms, ...)."""
  torch.set_num_threads(NUM_THREADS)
  spec = dict(kind='mochi', B=B, K=K, D=D, N=N, s=s, s_prime=s_prime, T=T,
              materialize=materialize, seed=seed)
  out = _time(_step_fn(**spec), iters, warmup)
  if memory:
    out.update(_measure_mem(spec))
  return out


def check(B=8, K=64, D=16, N=8, s=5, s_prime=3, T=0.2, seed=0):
  """Self-test against a per-query Python loop; raises AssertionError."""
  x, k, queue = make_inputs(B, K, D, seed)
  q = F.normalize(x.detach(), dim=1)
  for materialize in (False, True):
    torch.manual_seed(seed + 1)
    got = mochi_logits(q, k, queue, N, s, s_prime, T, materialize)
    torch.manual_seed(seed + 1)
    l_neg = q @ queue.T
    idx = torch.topk(l_neg, N, dim=1, sorted=False).indices
    i1, i2 = torch.randint(0, N, (2, B, s))
    alpha = torch.rand(B, s, 1)
    j = torch.randint(0, N, (B, s_prime))
    beta = torch.rand(B, s_prime, 1) * 0.5
    for b in range(B):
      top = queue[idx[b]]  # query b's own hard set [N, D]
      h = F.normalize(alpha[b] * top[i1[b]] + (1 - alpha[b]) * top[i2[b]], dim=-1)
      h2 = F.normalize(beta[b] * q[b] + (1 - beta[b]) * top[j[b]], dim=-1)
      want = torch.cat([(q[b] * k[b]).sum()[None], l_neg[b], h @ q[b],
                        h2 @ q[b]]) / T
      torch.testing.assert_close(got[b], want)
  # Gradient reaches x only through q (h, h' are constants).
  mochi_step(x, k, queue, N, s, s_prime, T)
  assert x.grad is not None and torch.isfinite(x.grad).all()


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--B', type=int, default=256)
  p.add_argument('--K', type=int, nargs='+', default=[4096, 65536],
                 help='queue sizes to run (default: 4096 65536)')
  p.add_argument('--D', type=int, default=128)
  p.add_argument('--N', type=int, default=1024)
  p.add_argument('--s', type=int, default=1024)
  p.add_argument('--s_prime', type=int, default=256)
  p.add_argument('--T', type=float, default=0.2)
  p.add_argument('--iters', type=int, default=10)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--large', action='store_true',
                 help='also run K=1048576 (needs ~1 GB per [B, K] tensor)')
  p.add_argument('--materialize', action='store_true',
                 help='also time MoCHi with the [B, N, D] hard set built')
  p.add_argument('--no_memory', action='store_true')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--_mem_worker', default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a._mem_worker is not None:
    print(json.dumps(_mem_worker(json.loads(a._mem_worker))))
    return

  torch.set_num_threads(NUM_THREADS)
  check()
  Ks = list(a.K) + ([1 << 20] if a.large and (1 << 20) not in a.K else [])
  print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, '
        f'float32, B={a.B} D={a.D} T={a.T}, MoCHi(N={a.N}, s={a.s}, '
        f"s'={a.s_prime}), warmup {a.warmup}, iters {a.iters}; "
        'fwd+bwd w.r.t. q; ms median (min); mem = peak extra RSS of one step')
  cols = ['K', 'MoCo ms', 'MoCo MB', 'MoCHi ms', 'MoCHi MB']
  if a.materialize:
    cols += ['MoCHi[BND] ms', 'MoCHi[BND] MB']
  print(' | '.join(f'{c:>16}' for c in cols))
  mem = not a.no_memory
  for K in Ks:
    common = dict(B=a.B, K=K, D=a.D, T=a.T, iters=a.iters, warmup=a.warmup,
                  seed=a.seed, memory=mem)
    runs = [time_moco(**common),
            time_mochi(N=a.N, s=a.s, s_prime=a.s_prime, **common)]
    if a.materialize:
      runs.append(time_mochi(N=a.N, s=a.s, s_prime=a.s_prime,
                             materialize=True, **common))
    row = [f'{K}']
    for r in runs:
      row.append(f"{r['median_ms']:.1f} ({r['min_ms']:.1f})")
      row.append(f"{r['peak_rss_mb_delta']:.0f}" if mem else '-')
    print(' | '.join(f'{c:>16}' for c in row), flush=True)


if __name__ == '__main__':
  main()
