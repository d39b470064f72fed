r"""Sharded memory queue: per-device memory and MoCHi step time vs K.

  python benchmarks/queue_scaling.py                  # 8 fake CPU devices
  python benchmarks/queue_scaling.py --devices 8 --K 65536 262144 1048576
  python benchmarks/queue_scaling.py --weak           # weak scaling, below

The queue ``[K, D]`` is sharded over ``--devices`` devices (fake CPU devices
here; the same code runs on TPU/GPU meshes). For each K it reports the bytes
of queue each device holds, XLA's temporary buffers of the compiled step per
device (the "peak extra memory": logits blocks, top-k candidates, mixtures;
arguments excluded), and the wall time of MoCHi + InfoNCE forward and
backward with respect to the queries (`hnjax.losses.mochi_info_nce` inside
``shard_map``). On fake CPU devices all shards share the same cores, so the
time measures total work, not parallel speed-up.

``--weak``: weak scaling. The per-device batch and the total queue are fixed
(every query still meets all K keys) and the same step is compiled for n =
1, 2, 4, 8 fake devices (each in a fresh process) and, compile only, for
``--extra`` larger meshes up to a 256-device pod. Per device it reports
XLA's cost analysis (FLOPs, bytes accessed) of the per-device HLO before
backend passes (backend-independent; unfused, so bytes are an upper bound)
and of the CPU-compiled program, temporaries, and the bytes every
collective of one step moves (summed from the compiled HLO: all-gather,
all-to-all, reduce-scatter, all-reduce; a loop body counted once, i.e. per
round). Work is counted on the usual path: the exact
second pass of the global top-k (which runs only when one shard holds more
of a query's hardest negatives than it proposed; its expected frequency on
a randomly spread queue is printed) is compiled out for the count
(``bank.EXACT_SECOND_PASS``). A fit ``a + b n + c / n`` over n = 2 ... 16
predicts a 256-device pod; the compiled 64 and 256-device programs check
it.
The fit uses the backend-independent counts: the CPU backend splits an
all-to-all into n pieces, each of which its cost analysis charges with the
whole buffer, so the CPU columns of large fake meshes grow as n^2 with a
cost a TPU/GPU all-to-all does not have.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_COLLECTIVE = re.compile(
    r'= (\(?[^=]*?\)?) (all-gather|all-to-all|reduce-scatter|all-reduce|'
    r'collective-permute)(-start)?\(')
_SHAPE = re.compile(r'(pred|s8|u8|s32|u32|s64|u64|bf16|f16|f32|f64)'
                    r'\[([\d,]*)\]')
_BYTES = dict(pred=1, s8=1, u8=1, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8,
              u64=8, f64=8)


def collective_bytes(hlo_text):
  """Bytes the collectives of a compiled HLO module produce, per device."""
  total = 0
  hlo_text = re.sub(r'/\*index=\d+\*/', '', hlo_text)  # in tuple shapes
  for m in _COLLECTIVE.finditer(hlo_text):
    for dtype, dims in _SHAPE.findall(m.group(1)):
      size = 1
      for d in filter(None, dims.split(',')):
        size *= int(d)
      total += size * _BYTES[dtype]
  return total


def weak_child(args):
  """One mesh size: per-device costs of the MoCHi step, as JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from hnjax import bank as bank_lib  # pylint: disable=g-import-not-at-top
  from hnjax import losses  # pylint: disable=g-import-not-at-top
  from hnjax import parallel  # pylint: disable=g-import-not-at-top

  n = args.devices
  bank_lib.EXACT_SECOND_PASS = False  # count the usual path (docstring)
  mesh = parallel.make_mesh(n)

  def loss(q, k, keys):
    def body(q, k, keys):
      out, _ = losses.mochi_info_nce(
          jax.random.key(0), q, k, keys, temperature=0.2, num_hard=args.N,
          num_mix=args.s, num_query_mix=args.s_prime, axis_name='data')
      return out
    out = jax.shard_map(body, mesh=mesh, in_specs=(P('data'),) * 3,
                        out_specs=P('data'))(q, k, keys)
    return jnp.mean(out)

  g = args.B_local * n
  shapes = (jax.ShapeDtypeStruct((g, args.D), jnp.float32),) * 2 + (
      jax.ShapeDtypeStruct((args.K[0], args.D), jnp.float32),)
  t0 = time.perf_counter()
  lowered = jax.jit(jax.value_and_grad(loss)).lower(*shapes)
  compiled = lowered.compile()
  out = dict(n=n, compile_s=time.perf_counter() - t0)
  cost = lowered.cost_analysis()
  out.update(hlo_flops=cost['flops'], hlo_bytes=cost['bytes accessed'])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  out.update(flops=cost['flops'], bytes=cost['bytes accessed'],
             temp=compiled.memory_analysis().temp_size_in_bytes,
             collective=collective_bytes(compiled.as_text()))
  if args.time:
    rng = np.random.default_rng(0)
    unit = lambda *s: (lambda x: x / np.linalg.norm(
        x, axis=-1, keepdims=True))(rng.normal(size=s)).astype(np.float32)
    rows = jax.sharding.NamedSharding(mesh, P('data'))
    xs = [jax.device_put(unit(*x.shape), rows) for x in shapes]
    jax.block_until_ready(compiled(*xs))
    times = []
    for _ in range(args.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*xs))
      times.append(time.perf_counter() - t0)
    out['step_ms'] = 1e3 * float(np.median(times))
  print('RESULT ' + json.dumps(out), flush=True)


def second_pass_rate(n, b_local, num_hard, k):
  """Expected exact second passes per step on a randomly spread queue.

  A query's ``N`` hardest rows land on a given shard Binomial(N, 1/n)
  times; the pass runs when some (query, shard) count exceeds the
  proposals.
  """
  from hnjax import bank as bank_lib  # pylint: disable=g-import-not-at-top
  if n == 1:
    return 0.0
  t = min(bank_lib._proposals(num_hard, n), num_hard, k // n)  # pylint: disable=protected-access
  if t >= min(num_hard, k // n):
    return 0.0  # every candidate is proposed: no second pass exists
  p = 1.0 / n
  tail = sum(math.comb(num_hard, j) * p**j * (1 - p)**(num_hard - j)
             for j in range(t + 1, num_hard + 1))
  return min(1.0, tail * b_local * n * n)


def weak(args):
  """Runs every mesh size in its own process and prints the table."""
  sizes = [1, 2, 4, 8] + list(args.extra)
  rows = []
  for n in sizes:
    cmd = [sys.executable, os.path.abspath(__file__), '--_child', '--devices',
           str(n), '--K', str(args.K[0]), '--B_local', str(args.B_local),
           '--D', str(args.D), '--N', str(args.N), '--s', str(args.s),
           '--s_prime', str(args.s_prime), '--iters', str(args.iters)]
    if args.time and n <= 8:
      cmd.append('--time')
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
    rows.append(json.loads(line[-1][len('RESULT '):]))
    rows[-1]['second_pass'] = second_pass_rate(n, args.B_local, args.N,
                                               args.K[0])
  print(f'B_local {args.B_local}, K {args.K[0]:,}, D {args.D}, MoCHi('
        f'{args.N}, {args.s}, {args.s_prime}); per device, one step (fwd + '
        f'bwd w.r.t. the queries); {os.cpu_count()} CPUs')
  print('\n| devices | GFLOP | MB accessed | collective MB | temp MB | '
        'CPU GFLOP | CPU MB accessed | second passes / step | compile s | '
        'step ms (fake devices) |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    step = f"{r['step_ms']:.0f}" if 'step_ms' in r else '-'
    print(f"| {r['n']} | {r['hlo_flops'] / 1e9:.3f} | "
          f"{r['hlo_bytes'] / 1e6:.1f} | {r['collective'] / 1e6:.2f} | "
          f"{r['temp'] / 1e6:.1f} | {r['flops'] / 1e9:.3f} | "
          f"{r['bytes'] / 1e6:.1f} | {r['second_pass']:.1e} | "
          f"{r['compile_s']:.1f} | {step} |")
  # n = 1 exchanges nothing; the larger meshes check the prediction.
  fit = [r for r in rows if 2 <= r['n'] <= 16]
  basis = lambda n: [1.0, n, 1.0 / n]
  print('\nFit a + b n + c / n over n = 2 ... 16, predicted 256-device pod '
        '(ratio to 8 devices):')
  for name in ('hlo_flops', 'hlo_bytes', 'collective'):
    coef = _lstsq([basis(r['n']) for r in fit], [r[name] for r in fit])
    pred = lambda n, c=coef: sum(a * v for a, v in zip(c, basis(n)))
    line = (f'  {name}: {coef[0]:.3g} + {coef[1]:.3g} n + {coef[2]:.3g} / n;'
            f' 256 devices: {pred(256):.3g} ({pred(256) / pred(8):.2f}x)')
    measured = [r for r in rows if r['n'] == 256]
    if measured:
      line += (f'; compiled for 256: {measured[0][name]:.3g} '
               f'({measured[0][name] / pred(8):.2f}x)')
    print(line)


def _lstsq(a, y):
  """Least squares of a tiny system, without importing jax or numpy here."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.linalg.lstsq(np.asarray(a), np.asarray(y), rcond=None)[0]


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--devices', type=int, default=8)
  p.add_argument('--K', type=int, nargs='+',
                 default=[65536, 131072, 262144, 524288, 1048576])
  p.add_argument('--B', type=int, default=256, help='global batch')
  p.add_argument('--D', type=int, default=128)
  p.add_argument('--N', type=int, default=1024)
  p.add_argument('--s', type=int, default=1024)
  p.add_argument('--s_prime', type=int, default=256)
  p.add_argument('--iters', type=int, default=3)
  p.add_argument('--weak', action='store_true',
                 help='weak scaling (defaults below apply to it)')
  p.add_argument('--B_local', type=int, default=16)
  p.add_argument('--extra', type=int, nargs='*', default=[16, 64, 256],
                 help='--weak: larger meshes, compiled only')
  p.add_argument('--time', action='store_true',
                 help='--weak: also time the step on n <= 8 fake devices')
  p.add_argument('--_child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.weak and not args._child:  # pylint: disable=protected-access
    if '--K' not in sys.argv:
      args.K = [32768]
    for name, value in (('--D', 64), ('--N', 256), ('--s', 256),
                        ('--s_prime', 64)):
      if name not in sys.argv:
        setattr(args, name[2:], value)
    sys.path.insert(0, _ROOT)
    weak(args)
    return
  os.environ['JAX_NUM_CPU_DEVICES'] = str(args.devices)
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count='
                             f'{args.devices}')

  sys.path.insert(0, _ROOT)
  if args._child:  # pylint: disable=protected-access
    weak_child(args)
    return
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from hnjax import losses  # pylint: disable=g-import-not-at-top
  from hnjax import parallel  # pylint: disable=g-import-not-at-top
  from hnjax import queue as queue_lib  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh(args.devices)
  rows = NamedSharding(mesh, P('data'))
  rng = np.random.default_rng(0)
  unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
      rng.normal(size=s)).astype(np.float32)
  q = jax.device_put(unit(args.B, args.D), rows)
  k = jax.device_put(unit(args.B, args.D), rows)
  key = jax.random.key(0)

  def loss(q, k, keys):
    def body(q, k, keys):
      out, _ = losses.mochi_info_nce(
          key, q, k, keys, temperature=0.2, num_hard=args.N, num_mix=args.s,
          num_query_mix=args.s_prime, axis_name='data')
      return out
    out = jax.shard_map(body, mesh=mesh, in_specs=(P('data'),) * 3,
                        out_specs=P('data'))(q, k, keys)
    return jnp.mean(out)

  step = jax.jit(jax.value_and_grad(loss))
  print(f'jax {jax.__version__}, {args.devices} {jax.devices()[0].platform} '
        f'devices on {os.cpu_count()} CPUs; global batch {args.B}, D={args.D},'
        f' MoCHi({args.N}, {args.s}, {args.s_prime})')
  print('\n| K | queue per device MiB | peak extra per device MiB | '
        'MoCHi + InfoNCE fwd+bwd ms |')
  print('|---|---|---|---|')
  for size in args.K:
    queue = queue_lib.init(jax.random.key(1), size, args.D, sharding=rows)
    per_device = queue.keys.addressable_shards[0].data.nbytes / 2**20
    compiled = step.lower(q, k, queue.keys).compile()
    mem = compiled.memory_analysis()
    temp = mem.temp_size_in_bytes / 2**20 if mem is not None else float('nan')
    jax.block_until_ready(compiled(q, k, queue.keys))
    times = []
    for _ in range(args.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(q, k, queue.keys))
      times.append(time.perf_counter() - t0)
    print(f'| {size:,} | {per_device:.1f} | {temp:.1f} | '
          f'{1e3 * float(np.median(times)):.0f} |', flush=True)


if __name__ == '__main__':
  main()
