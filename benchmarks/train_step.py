r"""MoCo v2 and MoCHi training steps: images/s, compile time, input pipeline.

  python benchmarks/train_step.py                      # ResNet-18, batch 256
  python benchmarks/train_step.py --model convnet --K 4096 --iters 10

Times the full jitted step of `hnjax.train.moco.train_step` (on-device
augmentation of both views, momentum update, shuffle-BN key encoder, query
forward and backward, the queue loss, SGD update, enqueue) on random 32x32
uint8 images, for MoCo v2 and MoCHi at each queue size, and the input
pipeline alone (shapes32, grain, host side: raw uint8 batches) to check it
keeps up with the step. The PyTorch peer is a plain MoCo v2 step of the same
shape (benchmarks/peers/torch_moco_step.py, no augmentation) run in its own
venv; the ratio is peer time / hnjax time.
"""

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import moco_v2  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax.train import moco  # pylint: disable=g-import-not-at-top,wrong-import-position
from hnjax.train import optim  # pylint: disable=g-import-not-at-top,wrong-import-position

def time_step(args, k, method, mesh, info):
  config = moco_v2.build('data=cifar10', method=method)
  config.model.backbone = args.model
  config.batch_size = args.batch
  config.queue.size = k
  cfg = moco._step_config(config, info)  # pylint: disable=protected-access
  model = models.create_encoder(args.model, dim=128,
                                bn_splits=config.model.bn_splits)
  tx = optim.make_optimizer(config.optim, lambda s: 0.06)
  state = moco.create_state(config, model, tx, info, mesh)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(dict(
      image=rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8),
      label=rng.integers(0, 10, args.batch).astype(np.int32),
      index=np.arange(args.batch, dtype=np.int32)), mesh)
  step = jax.jit(functools.partial(
      moco.train_step, model=model, tx=tx, cfg=cfg, use_mochi=method ==
      'mochi', mesh=mesh), donate_argnums=0)
  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return dict(step_ms=1e3 * med, images_per_s=args.batch / med,
              compile_s=first - med,
              mochi=(config.mochi.num_hard, config.mochi.num_mix,
                     config.mochi.num_query_mix) if method == 'mochi' else
              None)


def pipeline_images_per_s(batch, steps=60):
  source = data.get_source('shapes32', 'train')
  it = data.train_iterator(source, global_batch_size=batch, seed=0,
                           fields=('image', 'label', 'index'))
  for _ in range(5):
    next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  return batch * steps / (time.perf_counter() - t0)


def augment_images_per_s(batch, iters=5):
  cfg = data.AugmentConfig(out_size=32, blur_prob=0.0)
  f = jax.jit(lambda k, x: data.two_views(k, x, cfg))
  x = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (batch, 32, 32, 3), dtype=np.uint8))
  keys = data.example_keys(jax.random.key(0), jnp.arange(batch))
  jax.block_until_ready(f(keys, x))
  t0 = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(f(keys, x))
  return batch * iters / (time.perf_counter() - t0)


def torch_peer(args, k):
  if args.no_torch:
    return None
  return common.run_peer('torch_moco_step', (
      f't.time_moco_step(batch={args.batch}, K={k}, '
      f'iters={max(2, args.iters // 2)})'), timeout=7200)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet18_cifar')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--K', type=int, nargs='+', default=[4096, 65536])
  p.add_argument('--iters', type=int, default=3)
  p.add_argument('--no-torch', action='store_true')
  args = p.parse_args()
  mesh = parallel.make_mesh()
  info = data.DatasetInfo(
      name='random', num_classes=10, image_shape=(32, 32, 3),
      num_examples={'train': 50000}, train_split='train', eval_split='test',
      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  print(f'jax {jax.__version__}, {jax.device_count()} '
        f'{jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs; '
        f'{args.model}, batch {args.batch}')
  pipe = pipeline_images_per_s(args.batch)
  aug = augment_images_per_s(args.batch)
  print(f'input pipeline (host, raw uint8): {pipe:,.0f} images/s; '
        f'on-device two-view augmentation alone: {aug:,.0f} images/s')
  print('\n| K | MoCo v2 step ms | MoCo v2 images/s | MoCHi step ms | '
        'MoCHi images/s | MoCHi / MoCo | compile s (MoCo / MoCHi) | '
        'pipeline / step consumption | torch MoCo v2 images/s | '
        'hnjax / torch |')
  print('|' + '---|' * 10)
  for k in args.K:
    a = time_step(args, k, 'moco_v2', mesh, info)
    b = time_step(args, k, 'mochi', mesh, info)
    peer = torch_peer(args, k)
    peer_ips = peer['images_per_s'] if peer else None
    peer_cell = '-' if peer_ips is None else f'{peer_ips:.1f}'
    ratio_cell = '-' if peer_ips is None else (
        f'{a["images_per_s"] / peer_ips:.2f}')
    print(f'| {k:,} | {a["step_ms"]:.0f} | {a["images_per_s"]:.1f} | '
          f'{b["step_ms"]:.0f} | {b["images_per_s"]:.1f} | '
          f'{b["step_ms"] / a["step_ms"]:.3f} | {a["compile_s"]:.0f} / '
          f'{b["compile_s"]:.0f} | {pipe / a["images_per_s"]:.0f}x | '
          f'{peer_cell} | {ratio_cell} |', flush=True)
  print(f'MoCHi{b["mochi"]} (the cifar10 preset).')


if __name__ == '__main__':
  main()
