r"""CLIP + m²-mix loss step: hnjax vs the authors' PyTorch code path.

  python benchmarks/clip.py                        # B = 256, 1024, 4096
  python benchmarks/clip.py --batches 256 --no-torch

Times forward + backward with respect to both embedding matrices (random
unit vectors, D = 512) of

* hnjax CLIP: ``mean(losses.symmetric_info_nce(v, t, temperature=0.01))``;
* hnjax CLIP + m²-mix: ``+ 0.01 * mean(losses.m2mix(v, t, λ,
  temperature=0.07))`` with ``λ ~ Beta(0.5, 0.5)`` drawn inside the step
  (ALGORITHMS.md §5.3 at epoch 0);
* hnjax CLIP + m³-mix: the above + the V-, L- and VL-mix terms of
  ``losses.m3mix`` (weights 0.05, 0.05, 0.1, their own λ);
* a PyTorch eager peer following the authors' ``main.py``
  (benchmarks/peers/torch_clip.py), in its own venv ($HNJAX_TORCH_PYTHON,
  see benchmarks/peers/README.md); its loss is checked against hnjax's on
  the same inputs and λ first.

Memory: XLA's temporary buffers of the compiled step; for the peer, the
peak resident memory growth during its first step. Then the whole
training step of the CLIP-mixup family (both towers, batch 128, shapes32)
with each objective, where the loss is a small part. The retrieval
evaluation's benchmark (5k images x 25k captions) is
``python benchmarks/retrieval.py``. Numbers go in the README.
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

M3 = (('vmix', 0.05), ('lmix', 0.05), ('vlmix', 0.1))


def embeddings(b, d, seed=0):
  # The peer draws the same arrays (torch_clip._inputs).
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, b, d)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  return jnp.asarray(x[0]), jnp.asarray(x[1])


def total_loss(v, t, lam, lam3, method):
  """§5.3's objective at epoch 0 (per-pair means)."""
  loss = jnp.mean(losses.symmetric_info_nce(v, t, temperature=0.01))
  if method in ('m2mix', 'm3mix'):
    loss += 0.01 * jnp.mean(losses.m2mix(v, t, lam, temperature=0.07))
  if method == 'm3mix':
    for term, w in M3:
      loss += w * jnp.mean(losses.m3mix(v, t, lam3, term=term,
                                        temperature=0.01))
  return loss


def step_fn(method):
  def step(v, t, key):
    k1, k2 = jax.random.split(key)
    lam = jax.random.beta(k1, 0.5, 0.5)
    lam3 = jax.random.beta(k2, 0.5, 0.5)
    return jax.value_and_grad(total_loss, argnums=(0, 1))(v, t, lam, lam3,
                                                          method)
  return jax.jit(step)


def check_peer(d):
  """The peer's loss equals hnjax's on the same inputs and λ."""
  v, t = embeddings(64, d, seed=1)
  for method in ('m2mix', 'm3mix'):
    ours = float(total_loss(v, t, 0.3, 0.7, method))
    theirs = common.run_peer('torch_clip', (
        f't.loss_value(64, {d}, 1, 0.3, 0.7, m3={method == "m3mix"})'))
    if theirs is None:
      return False
    if abs(ours - theirs) > 1e-5 * abs(ours):
      raise AssertionError(f'{method}: peer {theirs} != hnjax {ours}')
  print('peer agrees with hnjax (m2mix, m3mix, B=64)')
  return True


def train_steps(iters):
  """ms per CLIP-mixup training step (both towers, batch 128, shapes32)."""
  # pylint: disable=g-import-not-at-top
  from configs import clip_mixup as clip_config
  from hnjax import parallel
  from hnjax.train import clip_mixup
  from hnjax.train import runner
  # pylint: enable=g-import-not-at-top
  out = {}
  for method in ('clip', 'm2mix', 'm3mix'):
    config = clip_config.get_config('stage=pretrain')
    config.method, config.learn_temperature = method, False
    setup = runner.prepare(clip_mixup.FAMILY, config)
    pieces = clip_mixup.build(setup)
    step = jax.jit(pieces.step(None), donate_argnums=0)
    batch = parallel.global_batch(setup.data.train.get_batch(
        np.arange(config.batch_size), setup.data.fields), setup.mesh)
    state = [pieces.init_state()]

    def run(batch):
      state[0], metrics = step(state[0], batch)
      return metrics['loss']

    out[method] = common.time_ms(run, batch, iters=iters)[0]
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batches', type=lambda s: [int(x) for x in s.split(',')],
                 default=[256, 1024, 4096])
  p.add_argument('--D', type=int, default=512)
  p.add_argument('--iters', type=int, default=5)
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--no-train-step', action='store_true')
  args = p.parse_args()
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, '
        f'{os.cpu_count()} CPUs; D={args.D}')
  peer = not args.no_torch and check_peer(args.D)
  rows = []
  key = jax.random.key(0)
  for b in args.batches:
    v, t = embeddings(b, args.D)
    for method in ('clip', 'm2mix', 'm3mix'):
      fn = step_fn(method)
      row = dict(B=b, method=method,
                 ms=common.time_ms(fn, v, t, key, iters=args.iters)[0],
                 mb=common.temp_mb(fn, v, t, key))
      if peer:
        row['torch'] = common.run_peer('torch_clip', (
            f't.time_loss({b}, {args.D}, {args.iters}, '
            f'm2={method != "clip"}, m3={method == "m3mix"})'))
      rows.append(row)
      print(json.dumps(row), flush=True)

  cell = lambda x: '-' if x is None else (f'{x:.0f}' if x >= 10 else
                                          f'{x:.2f}')
  print('\n| B | loss | hnjax ms | hnjax MB | / CLIP | torch ms | torch MB '
        '| torch / hnjax |')
  print('|' + '---|' * 8)
  clip_ms = {r['B']: r['ms'] for r in rows if r['method'] == 'clip'}
  for r in rows:
    tr = r.get('torch') or {}
    torch_ms = tr.get('median_ms')
    print('| ' + ' | '.join([
        str(r['B']), r['method'], cell(r['ms']), cell(r['mb']),
        f'{r["ms"] / clip_ms[r["B"]]:.2f}', cell(torch_ms),
        cell(tr.get('peak_mb')),
        f'{torch_ms / r["ms"]:.1f}' if torch_ms else '-']) + ' |')
  if not args.no_train_step:
    steps = train_steps(args.iters * 4)
    print('\nwhole training step (convnet + text towers, batch 128, '
          'shapes32, fwd + bwd + AdamW):')
    for method, ms in steps.items():
      print(f'  {method}: {ms:.1f} ms ({ms / steps["clip"]:.2f} x CLIP)')


if __name__ == '__main__':
  main()
