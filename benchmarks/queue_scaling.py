r"""Sharded memory queue: per-device memory and MoCHi step time vs K.

  python benchmarks/queue_scaling.py                  # 8 fake CPU devices
  python benchmarks/queue_scaling.py --devices 8 --K 65536 262144 1048576

The queue ``[K, D]`` is sharded over ``--devices`` devices (fake CPU devices
here; the same code runs on TPU/GPU meshes). For each K it reports the bytes
of queue each device holds, XLA's temporary buffers of the compiled step per
device (the "peak extra memory": logits blocks, top-k candidates, mixtures;
arguments excluded), and the wall time of MoCHi + InfoNCE forward and
backward with respect to the queries (`hnjax.losses.mochi_info_nce` inside
``shard_map``). On fake CPU devices all shards share the same cores, so the
time measures total work, not parallel speed-up.
"""

import argparse
import os
import sys
import time


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
  args = p.parse_args()
  os.environ['JAX_NUM_CPU_DEVICES'] = str(args.devices)
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count='
                             f'{args.devices}')

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
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
