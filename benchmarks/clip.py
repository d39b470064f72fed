r"""CLIP + m²-mix loss step: hnjax vs the authors' PyTorch code path.

  HNJAX_TORCH_PYTHON=/tmp/tvenv/bin/python python benchmarks/clip.py \
      --batches 256,1024,4096                   # the README's numbers
  python benchmarks/clip.py --batches 256 --no-torch --no-train-step \
      --no-retrieval                            # quick look

Times (median ms) forward + backward with respect to both embedding matrices
(random unit vectors, D = 512, one CPU device) of

* hnjax CLIP: ``mean(losses.symmetric_info_nce(v, t, temperature=0.01))``;
* hnjax CLIP + m²-mix: ``+ 0.01 * mean(losses.m2mix(v, t, λ,
  temperature=0.07)) / (epoch + 1)`` at epoch 0, ``λ ~ Beta(0.5, 0.5)``
  drawn inside the jitted step from a key argument (ALGORITHMS.md §5.3);
* hnjax CLIP + m²-mix + the V-, L- and VL-mix terms of ``losses.m3mix``
  (weights 0.05, 0.05, 0.1, τ = 0.01, each term its own λ), as
  ``scripts/m3mix.sh`` combines them;
* a PyTorch eager peer following the authors' ``main.py`` / ``loss.py``
  (benchmarks/peers/torch_clip.py, 2 threads), in its own venv
  ($HNJAX_TORCH_PYTHON, see benchmarks/peers/README.md); its loss is first
  checked equal to hnjax's on the same inputs and λs (B = 64).

Memory: XLA's temporary buffers of the compiled step; for the peer, the
peak resident memory growth of its first step. The table gives each loss
relative to CLIP at the same B (the issue's goal: m²-mix ≤ 1.3 × CLIP) and
hnjax's speed-up over the peer (goal ≥ 3 ×). Then the whole CLIP-mixup
training step (both towers, batch 128, shapes32) with each objective, and
the retrieval evaluation benchmark (5k images × 25k captions), run as
``python benchmarks/retrieval.py``. Numbers go in the README.
"""

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hnjax import losses

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

M3 = (('vmix', 0.05), ('lmix', 0.05), ('vlmix', 0.1))
METHODS = {'clip': 'CLIP', 'm2mix': '+ m²-mix', 'm3mix': '+ m²- and m³-mix'}


def embeddings(b, d, seed=0):
  # The peer draws the same arrays (torch_clip._inputs).
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, b, d)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  return jnp.asarray(x[0]), jnp.asarray(x[1])


def total_loss(v, t, lams, method, epoch=0):
  """§5.3's objective; ``lams`` are the λs of vmix, lmix, vlmix, m²-mix."""
  loss = jnp.mean(losses.symmetric_info_nce(v, t, temperature=0.01))
  mix = 0.0
  if method == 'm3mix':
    for (term, w), lam in zip(M3, lams[:3]):
      mix += w * jnp.mean(losses.m3mix(v, t, lam, term=term,
                                       temperature=0.01))
  if method in ('m2mix', 'm3mix'):
    mix += 0.01 * jnp.mean(losses.m2mix(v, t, lams[3], temperature=0.07))
  return loss + mix / (epoch + 1)


def step_fn(method):
  def step(v, t, key):
    lams = jax.random.beta(key, 0.5, 0.5, shape=(4,))  # traced, per step
    return jax.value_and_grad(total_loss, argnums=(0, 1))(v, t, lams, method)
  return jax.jit(step)


def check_peer(d, b=64, lams=(0.3, 0.7, 0.45, 0.2)):
  """Whether the peer runs; fails loudly if its loss differs from hnjax's."""
  if not os.path.exists(common.TORCH_PY):
    print(f'no PyTorch venv at {common.TORCH_PY} (set HNJAX_TORCH_PYTHON): '
          'peer skipped')
    return False
  v, t = embeddings(b, d, seed=1)
  for method in METHODS:
    ours = float(total_loss(v, t, jnp.asarray(lams), method))
    theirs = common.run_peer('torch_clip', (
        f't.loss_value({b}, {d}, 1, {list(lams)}, m2={method != "clip"}, '
        f'm3={method == "m3mix"})'))
    if theirs is None:
      raise RuntimeError('the PyTorch peer failed (stderr above)')
    if abs(ours - theirs) > 1e-5 * abs(ours):
      raise AssertionError(f'{method}: peer {theirs} != hnjax {ours}')
  print(f'peer agrees with hnjax (clip, m2mix, m3mix; B={b}, rel. tol 1e-5)')
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
  p.add_argument('--retrieval', action=argparse.BooleanOptionalAction,
                 default=True, help='also run benchmarks/retrieval.py '
                 '(5k x 25k)')
  args = p.parse_args()
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, '
        f'{os.cpu_count()} CPUs; D={args.D}', flush=True)
  peer = not args.no_torch and check_peer(args.D)
  rows = []
  key = jax.random.key(0)
  for b in args.batches:
    v, t = embeddings(b, args.D)
    for method in METHODS:
      fn = step_fn(method)
      ms, min_ms = common.time_ms(fn, v, t, key, iters=args.iters)
      row = dict(B=b, method=method, ms=ms, min_ms=min_ms,
                 mb=common.temp_mb(fn, v, t, key))
      if peer:
        row['torch'] = common.run_peer('torch_clip', (
            f't.time_loss({b}, {args.D}, {args.iters}, '
            f'm2={method != "clip"}, m3={method == "m3mix"})'))
      rows.append(row)
      print(json.dumps(row), flush=True)

  cell = lambda x: '-' if x is None else (f'{x:,.0f}' if x >= 10 else  # pylint: disable=unnecessary-lambda-assignment
                                          f'{x:.2f}')
  print('\n| B | loss | hnjax ms | hnjax MB | / CLIP | torch ms | torch MB '
        '| torch / hnjax |')
  print('|' + '---|' * 8)
  clip_ms = {r['B']: r['ms'] for r in rows if r['method'] == 'clip'}
  for r in rows:
    tr = r.get('torch') or {}
    torch_ms = tr.get('median_ms')
    r['speedup'] = torch_ms / r['ms'] if torch_ms else None
    print('| ' + ' | '.join([
        f'{r["B"]:,}', METHODS[r['method']], cell(r['ms']), cell(r['mb']),
        f'{r["ms"] / clip_ms[r["B"]]:.2f}', cell(torch_ms),
        cell(tr.get('peak_mb')),
        f'{r["speedup"]:.1f}' if r['speedup'] else '-']) + ' |')
  m2 = [r for r in rows if r['method'] == 'm2mix']
  ratio = max(r['ms'] / clip_ms[r['B']] for r in m2)
  print(f'\ngoal m²-mix ≤ 1.3 × CLIP: {"holds" if ratio <= 1.3 else "missed"}'
        f' (worst {ratio:.2f} ×)')
  if peer:
    worst = min(r['speedup'] or 0 for r in rows)
    print(f'goal hnjax ≥ 3 × peer: {"holds" if worst >= 3 else "missed"} '
          f'(worst {worst:.1f} ×)')
  if not args.no_train_step:
    steps = train_steps(args.iters * 4)
    print('\nwhole training step (convnet + text towers, batch 128, '
          'shapes32, fwd + bwd + AdamW):')
    for method, ms in steps.items():
      print(f'  {method}: {ms:.1f} ms ({ms / steps["clip"]:.2f} x CLIP)')
  if args.retrieval:
    # benchmarks/retrieval.py has no function to import, only main().
    print('\nretrieval evaluation: python benchmarks/retrieval.py', flush=True)
    subprocess.run([sys.executable, os.path.join(common.ROOT, 'benchmarks',
                                                 'retrieval.py')], check=True)


if __name__ == '__main__':
  main()
