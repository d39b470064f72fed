r"""One accelerator benchmark: negatives and MoCo v2 / MoCHi training steps.

  bash benchmarks/accelerator.sh            # fresh GPU machine or TPU VM
  python benchmarks/accelerator.py          # in an environment with hnjax
  python benchmarks/accelerator.py --small  # the reduced CPU mode CI runs

Prints one table per part, on whatever devices JAX sees (all of them, the
global batch being the per-device batch times their number):

* negatives: MoCo's and MoCHi's queue loss (`hnjax.losses.mochi_info_nce`,
  forward and backward w.r.t. the queries) at the ImageNet preset's sizes,
  with the exact and the approximate (`jax.lax.approx_max_k`) selection;
* training steps (`hnjax.train.moco.train_step`: on-device augmentation of
  both views, key encoder, query forward/backward, queue loss, SGD,
  enqueue) on random uint8 images for ResNet-50 at 224 px (the ImageNet
  preset: K = 65,536, MoCHi(1024, 512, 256)) and the CIFAR ResNet-18 at 32
  px (the CIFAR preset: K = 4,096, MoCHi(512, 512, 128)), bfloat16 and
  float32 compute, MoCo v2 and MoCHi: step time, images/s, MoCHi / MoCo
  time ratio and the compiled step's FLOPs per second (XLA's cost analysis
  of the per-device program) against the device's nominal dense peak for
  that dtype (when the device is in `PEAKS`) and against a large matmul
  measured here.

``--small`` swaps in small shapes (a convnet, 32 px, batch 16, small
queues) so the whole script runs in about a minute on CPU: the numbers
mean nothing there, the code paths are the same.
"""

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import moco_v2  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax.train import moco  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax.train import optim  # pylint: disable=g-import-not-at-top,wrong-import-position

# Nominal dense peaks per chip in TFLOP/s, (bfloat16, float32 as XLA runs
# it by default: TF32 tensor cores on NVIDIA, bf16 passes on TPU), from the
# vendors' data sheets; matched against `device_kind` in this order.
PEAKS = (
    ('H200', (989.0, 494.0)),
    ('H100', (989.0, 494.0)),
    ('A100', (312.0, 156.0)),
    ('L4', (121.0, 60.0)),
    ('TPU v6', (918.0, 918.0)),
    ('TPU v5p', (459.0, 459.0)),
    ('TPU v5', (197.0, 197.0)),  # v5e ("TPU v5 lite")
    ('TPU v4', (275.0, 275.0)),
)


def nominal_peak(kind, dtype):
  """TFLOP/s of one chip, or None for a device not in `PEAKS`."""
  for name, (bf16, f32) in PEAKS:
    if name.lower() in kind.lower():
      return bf16 if dtype == 'bfloat16' else f32
  return None


def matmul_tflops(n, dtype, iters):
  """Measured TFLOP/s of one ``[n, n] @ [n, n]`` matmul on one device."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  ms, _ = common.time_ms(jax.jit(lambda x: x @ x), a, iters=iters)
  return 2 * n**3 / (ms / 1e3) / 1e12


def negatives(args):
  """MoCo / MoCHi queue loss, fwd + bwd w.r.t. the queries: rows of a table."""
  b, k, d = (32, 4096, 32) if args.small else (256, 65536, 128)
  n_hard, s, s2 = (64, 64, 16) if args.small else (1024, 512, 256)
  rng = np.random.default_rng(0)
  unit = lambda *sh: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
      rng.normal(size=sh)).astype(np.float32)
  q, pos, queue = (jnp.asarray(unit(b, d)), jnp.asarray(unit(b, d)),
                   jnp.asarray(unit(k, d)))
  rows = []
  for name, hard, recall in (('MoCo v2', 0, None),
                             (f'MoCHi({n_hard}, {s}, {s2}) exact', n_hard,
                              None),
                             (f'MoCHi({n_hard}, {s}, {s2}) approx 0.95',
                              n_hard, 0.95)):
    # Every array an argument: XLA would constant-fold closed-over ones.
    def loss(q, pos, queue, hard=hard, recall=recall):
      out, _ = losses.mochi_info_nce(
          jax.random.key(0), q, pos, queue, temperature=0.2, num_hard=hard,
          num_mix=s, num_query_mix=s2, recall_target=recall)
      return jnp.mean(out)
    ms, _ = common.time_ms(jax.jit(jax.value_and_grad(loss)), q, pos, queue,
                           iters=args.iters)
    rows.append(f'| {name} | {b} | {k:,} | {d} | {ms:.2f} |')
  return rows


def train_step_row(args, spec, dtype, method, mesh, peak_measured):
  """Times one (model, dtype, method) training step; returns its numbers."""
  model_name, size, per_device, k, mochi_nss, preset = spec
  config = moco_v2.build(f'data={preset},dtype={dtype}', method=method)
  n = mesh.size
  config.batch_size = per_device * n
  config.queue.size = k
  config.model.backbone = model_name
  config.data.image_size = size
  config.mochi.num_hard, config.mochi.num_mix, config.mochi.num_query_mix = (
      mochi_nss)
  config.model.bn_splits = min(config.model.bn_splits, per_device)
  info = data.DatasetInfo(
      name='random', num_classes=10, image_shape=(size, size, 3),
      num_examples={'train': 100 * config.batch_size}, train_split='train',
      eval_split='test', mean=(0.5,) * 3, std=(0.25,) * 3)
  model = models.create_encoder(
      model_name, dim=config.model.dim, bn_splits=config.model.bn_splits,
      dtype=jnp.dtype(dtype))
  tx = optim.make_optimizer(config.optim, lambda _: 0.03)
  state = moco.create_state(config, model, tx, info, mesh)
  rng = np.random.default_rng(0)
  g = config.batch_size
  batch = parallel.global_batch(dict(
      image=rng.integers(0, 256, (g, size, size, 3), dtype=np.uint8),
      label=rng.integers(0, 10, g).astype(np.int32),
      index=np.arange(g, dtype=np.int32)), mesh)
  step = jax.jit(functools.partial(
      moco.train_step, model=model, tx=tx,
      cfg=moco._step_config(config, info),  # pylint: disable=protected-access
      use_mochi=method == 'mochi', mesh=mesh), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get('flops', float('nan')))  # per device
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  if not np.isfinite(float(m['loss'])):
    raise FloatingPointError(f'{model_name} {dtype} {method}: non-finite '
                             f'loss')
  ms = 1e3 * float(np.median(times))
  tflops = flops / (ms / 1e3) / 1e12
  nominal = nominal_peak(jax.devices()[0].device_kind, dtype)
  return dict(model=model_name, size=size, dtype=dtype, method=method,
              batch=g, k=k, ms=ms, images_per_s=g / (ms / 1e3),
              compile_s=compile_s, tflop=flops / 1e12, tflops=tflops,
              of_nominal=None if nominal is None else tflops / nominal,
              of_measured=tflops / peak_measured[dtype])


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--small', action='store_true',
                 help='reduced shapes for a CPU (CI)')
  p.add_argument('--iters', type=int, default=10)
  args = p.parse_args()
  if args.small:
    args.iters = min(args.iters, 2)
  mesh = parallel.make_mesh()
  dev = jax.devices()[0]
  print(f'jax {jax.__version__}, {jax.device_count()} x {dev.device_kind} '
        f'({dev.platform}), {os.cpu_count()} host CPUs'
        + (' [--small: shapes reduced, numbers meaningless]' if args.small
           else ''))
  n_mm = 1024 if args.small else 8192
  peak = {dt: matmul_tflops(n_mm, dt, iters=3 if args.small else 10)
          for dt in ('bfloat16', 'float32')}
  print(f'measured {n_mm}^3 matmul: {peak["bfloat16"]:.1f} TFLOP/s bf16, '
        f'{peak["float32"]:.1f} TFLOP/s f32 (one device)')

  print('\n| queue loss (fwd + bwd) | B | K | D | ms |')
  print('|---|---|---|---|---|')
  for row in negatives(args):
    print(row, flush=True)

  # (backbone, px, batch per device, K, MoCHi(N, s, s'), config preset)
  specs = ([('convnet', 32, 16, 512, (32, 32, 8), 'cifar10')] if args.small
           else [('resnet50', 224, 128, 65536, (1024, 512, 256), 'imagenet'),
                 ('resnet18_cifar', 32, 512, 4096, (512, 512, 128),
                  'cifar10')])
  print('\n| model | px | compute | method | global batch | K | step ms | '
        'images/s | MoCHi / MoCo | GFLOP / step / device | TFLOP/s | '
        'of nominal peak | of measured matmul | compile s |')
  print('|' + '---|' * 14)
  for spec in specs:
    for dtype in ('bfloat16', 'float32'):
      base = None
      for method in ('moco_v2', 'mochi'):
        r = train_step_row(args, spec, dtype, method, mesh, peak)
        base = base or r['ms']
        nominal = ('-' if r['of_nominal'] is None else
                   f"{100 * r['of_nominal']:.0f}%")
        print(f"| {r['model']} | {r['size']} | {r['dtype']} | "
              f"{'MoCHi' if method == 'mochi' else 'MoCo v2'} | {r['batch']} "
              f"| {r['k']:,} | {r['ms']:.1f} | {r['images_per_s']:,.0f} | "
              f"{r['ms'] / base:.3f} | {1e3 * r['tflop']:,.1f} | "
              f"{r['tflops']:.2f} | {nominal} | "
              f"{100 * r['of_measured']:.0f}% | {r['compile_s']:.0f} |",
              flush=True)


if __name__ == '__main__':
  main()
