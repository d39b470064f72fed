r"""The m²-mix paper's fine-tuning step at full size: CLIP ViT-B/32, batch 128.

  python benchmarks/clip_finetune.py                      # ViT-B/32, 128
  python benchmarks/clip_finetune.py --arch tiny --batch 32 --iters 3  # CPU

Times the jitted CLIP-mixup training step (`hnjax.train.clip_mixup.
train_step`: uint8 images normalised on device, both towers forward and
backward, the loss sharded over ``'data'``, AdamW) of a CLIP with
`hnjax.models.clip_pretrained.ARCHITECTURES`'s sizes and random weights (the
step costs the same with pretrained ones; no checkpoint needed), 224 px
images and 77-token captions, for plain CLIP and CLIP + m²-mix, with the
towers computing in float32 and in bfloat16 (float32 parameters, optimizer
state and logits). Prints median step time, images/s and the compiled
step's FLOPs (XLA's cost analysis) per second, on all visible devices.
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

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import clip_mixup as clip_config
from hnjax import parallel
from hnjax.models import clip_pretrained
from hnjax.train import clip_mixup
# pylint: enable=g-import-not-at-top,wrong-import-position


def build_step(arch, method, dtype, batch, mesh):
  """``(step, state, batch)`` of one fine-tuning configuration."""
  spec = clip_pretrained.ARCHITECTURES[arch]
  config = clip_config.get_config(f'init=pretrained,method={method}')
  config.batch_size = batch
  model = clip_pretrained.create_model(spec, end_id=spec.vocab_size - 1,
                                       dtype=jnp.dtype(dtype))
  cfg = clip_mixup.StepConfig(
      method=method, temperature=0.01, learn_temperature=False,
      m2mix_weight=0.01, m2mix_beta=0.5, m2mix_temperature=0.07,
      m3mix_weights=(('vmix', 0.0), ('lmix', 0.0), ('vlmix', 0.0)),
      m3mix_beta=0.5, original_negatives=False, schedule=True,
      steps_per_epoch=100, image_size=spec.image_size,
      context_length=spec.context_length, mean=clip_pretrained.CLIP_MEAN,
      std=clip_pretrained.CLIP_STD)
  tx = clip_mixup.make_optimizer(config, lambda step: 1e-5)
  state = clip_mixup.create_state(config, model, tx, cfg, mesh)
  rng = np.random.default_rng(0)
  s, length = spec.image_size, spec.context_length
  tokens = rng.integers(1, spec.vocab_size - 2, (batch, length))
  ends = rng.integers(5, length, batch)
  tokens[np.arange(batch), ends] = spec.vocab_size - 1  # the end token
  tokens[np.arange(length)[None] > ends[:, None]] = 0
  data = parallel.global_batch(dict(
      image=rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8),
      tokens=tokens.astype(np.int32),
      index=np.arange(batch, dtype=np.int32)), mesh)
  step = jax.jit(functools.partial(clip_mixup.train_step, model=model, tx=tx,
                                   cfg=cfg, mesh=mesh), donate_argnums=0)
  return step, state, data


def time_step(step, state, data, iters):
  """Compile time, median step ms, compiled FLOPs of one step."""
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', float('nan')))
  state, metrics = compiled(state, data)  # warm-up
  jax.block_until_ready(metrics['loss'])
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - t0)
  assert np.isfinite(float(metrics['loss'])), 'non-finite loss'
  return compile_s, 1e3 * float(np.median(times)), flops


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', default='vit_b32',
                 choices=sorted(clip_pretrained.ARCHITECTURES))
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--iters', type=int, default=10)
  p.add_argument('--methods', default='clip,m2mix')
  p.add_argument('--dtypes', default='float32,bfloat16')
  args = p.parse_args()
  mesh = parallel.make_mesh()
  print(f'jax {jax.__version__}, {jax.device_count()} '
        f'{jax.devices()[0].device_kind} device(s); CLIP {args.arch}, '
        f'global batch {args.batch}', flush=True)
  print('\n| towers | objective | step ms | images/s | compiled GFLOP per '
        'step | TFLOP/s | compile s |')
  print('|' + '---|' * 7)
  for dtype in args.dtypes.split(','):
    for method in args.methods.split(','):
      step, state, data = build_step(args.arch, method, dtype, args.batch,
                                     mesh)
      compile_s, ms, flops = time_step(step, state, data, args.iters)
      print(f'| {dtype} | {method} | {ms:.1f} | {args.batch / ms * 1e3:,.0f} '
            f'| {flops / 1e9:,.1f} | {flops / ms / 1e9:.2f} | '
            f'{compile_s:.1f} |', flush=True)


if __name__ == '__main__':
  main()
