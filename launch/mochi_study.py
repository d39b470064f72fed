r"""MoCHi against MoCo v2 and the paper's ablations, over seeds, equal budget.

  python -m launch.mochi_study                       # 5 seeds, the core arms
  python -m launch.mochi_study --arms=all --seeds=5  # every ablation
  python -m launch.mochi_study --presets=data=digits --workdir=runs/study_d

Each arm is a preset of ``configs/mochi.py`` (``ablation=NAME``, see its
``ABLATIONS``); every arm runs the same data, schedule, steps and seeds, so
seed ``s`` of two arms shares its initial weights, data order and
augmentations: differences are paired by seed. Each run is an ordinary
resumable workdir ``<workdir>/<arm>/seed<s>``; re-running the command skips
the finished ones and resumes an interrupted one.

Writes to ``--workdir``: ``study.json`` (every run's results),
``study.md`` (per arm: mean and 95% interval over seeds of kNN and linear
top-1, proxy-task accuracy and the false-negative share at the end of
training, alignment and uniformity; and each arm's difference to MoCo v2
with its paired 95% interval) and ``study.png``.
"""

import json
import math
import os
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

_ARMS = flags.DEFINE_list(
    'arms', ['moco_v2', 'mochi', 'type1_only', 'type2_only', 'no_warmup',
             'hardness_range'],
    'Ablations of configs/mochi.py to run ("all": every one).')
_SEEDS = flags.DEFINE_integer('seeds', 5, 'Seeds per arm (0 .. seeds-1).')
_PRESETS = flags.DEFINE_string(
    'presets', '', 'Presets of configs/mochi.py shared by every arm, e.g. '
    '"data=digits".')
_NUM_EPOCHS = flags.DEFINE_integer(
    'num_epochs', 0, 'Training epochs of every run (0: the data preset\'s).')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/mochi_study',
                               'Directory of the study.')

# Results per run: final evaluation, and the mean of the last 10% of the
# logged training values for the per-step statistics.
EVALUATED = ('knn_top1', 'linear_top1', 'alignment', 'uniformity')
TRAINING = ('proxy_acc', 'false_neg_share', 'mixed_false_neg_share',
            'positive_rank')
# Two-sided 95% quantiles of Student's t, by degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262,
         2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101,
         2.093, 2.086)


def interval(values):
  """Mean and half-width of the 95% t-interval (NaN below 2 values)."""
  x = np.asarray([v for v in values if v is not None], float)
  if len(x) < 2:
    return (float(x.mean()) if len(x) else math.nan), math.nan
  t = _T975[min(len(x) - 1, len(_T975)) - 1]
  return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def _tail_mean(records, name):
  values = [r[name] for r in records if name in r]
  if not values:
    return None
  return float(np.mean(values[-max(1, len(values) // 10):]))


def run_one(arm, seed, workdir):
  """Trains (or resumes, or reads) one run; returns its results."""
  from configs import mochi  # pylint: disable=g-import-not-at-top
  from hnjax import runlog  # pylint: disable=g-import-not-at-top
  from hnjax.train import moco  # pylint: disable=g-import-not-at-top
  done = os.path.join(workdir, 'result.json')
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  presets = ','.join(filter(None, (_PRESETS.value, f'ablation={arm}')))
  config = mochi.get_config(presets)
  config.seed = seed
  if _NUM_EPOCHS.value:
    config.num_epochs = _NUM_EPOCHS.value
  # What training must beat does not depend on the arm: once per seed.
  config.eval.baselines = arm == 'moco_v2'
  config.eval.every_steps = 0  # the final evaluation only (the demo's
  # kNN curve is `python -m launch.moco`'s)
  summary = moco.train_and_evaluate(config, workdir)
  if summary['interrupted']:
    raise KeyboardInterrupt
  records = [r for r in runlog.read_metrics(workdir) if 'loss' in r]
  result = {k: v for k, v in summary.items()
            if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
  result.update({k: _tail_mean(records, k) for k in TRAINING})
  for name in ('false_neg_share', 'proxy_acc'):
    result[f'{name}_curve'] = [(r['step'], r[name]) for r in records
                               if name in r]
  result.update(arm=arm, seed=seed)
  with open(done + '.tmp', 'w') as f:
    json.dump(result, f)
  os.replace(done + '.tmp', done)
  return result


def table(results, arms):
  """The study's Markdown table."""
  by_arm = {a: sorted((r for r in results if r['arm'] == a),
                      key=lambda r: r['seed']) for a in arms}
  names = EVALUATED + TRAINING

  def fmt(mean, half, digits=4):
    if math.isnan(mean):
      return '–'
    if math.isnan(half):
      return f'{mean:.{digits}f}'
    return f'{mean:.{digits}f} ± {half:.{digits}f}'

  lines = ['| arm | seeds | ' + ' | '.join(names) + ' | wall s |',
           '|---|---|' + '---|' * len(names) + '---|']
  for a in arms:
    rs = by_arm[a]
    cells = [fmt(*interval(r.get(n) for r in rs),
                 digits=1 if n == 'positive_rank' else 4) for n in names]
    wall = np.mean([r['wall_s'] for r in rs])
    lines.append(f'| {a} | {len(rs)} | ' + ' | '.join(cells) +
                 f' | {wall:.0f} |')
  base = {r['seed']: r for r in by_arm.get('moco_v2', [])}
  if base:
    lines += ['', 'Difference to MoCo v2, paired by seed (mean ± 95% '
              'interval; an interval that contains 0 is no evidence of a '
              'difference):', '',
              '| arm | ' + ' | '.join(n for n in names) + ' |',
              '|---|' + '---|' * len(names)]
    for a in arms:
      if a == 'moco_v2':
        continue
      pairs = [(r, base[r['seed']]) for r in by_arm[a] if r['seed'] in base]
      cells = []
      for n in names:
        d = [r[n] - b[n] for r, b in pairs
             if r.get(n) is not None and b.get(n) is not None]
        cells.append(fmt(*interval(d), digits=1 if n == 'positive_rank'
                         else 4) if d else '–')
      lines.append(f'| {a} | ' + ' | '.join(cells) + ' |')
    b0 = by_arm['moco_v2']
    for prefix in ('untrained', 'raw_pixel'):
      knn = interval(r.get(f'{prefix}_knn_top1') for r in b0)
      lin = interval(r.get(f'{prefix}_linear_top1') for r in b0)
      lines.append(f'\nBaseline {prefix}: kNN {fmt(*knn)}, linear '
                   f'{fmt(*lin)}.')
  return '\n'.join(lines)


def plot(results, arms, path):
  """Accuracy per arm with intervals; false-negative share and proxy-task
  accuracy over training, mean over seeds."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(19, 5))
  axes = fig.subplots(1, 3)
  ax_bar = axes[0]
  x = np.arange(len(arms))
  for j, (name, offset) in enumerate((('knn_top1', -0.2),
                                      ('linear_top1', 0.2))):
    stats = [interval(r[name] for r in results if r['arm'] == a)
             for a in arms]
    ax_bar.bar(x + offset, [m for m, _ in stats], 0.4,
               yerr=[0 if math.isnan(h) else h for _, h in stats],
               capsize=3, label=name, color=f'C{j}')
  ax_bar.set_xticks(x, arms, rotation=30, ha='right')
  ax_bar.set_ylabel('top-1 (mean, 95% interval)')
  ax_bar.set_ylim(bottom=max(0.0, min(r['knn_top1'] for r in results) - 0.1))
  ax_bar.legend()
  ax_bar.set_title('final accuracy per arm')
  for ax, name, title in ((axes[1], 'false_neg_share',
                           'share of the N hardest with the query\'s label'),
                          (axes[2], 'proxy_acc', 'proxy-task accuracy')):
    for i, a in enumerate(arms):
      curves = [np.asarray(r[f'{name}_curve']) for r in results
                if r['arm'] == a and r.get(f'{name}_curve')]
      if not curves or any(c.shape != curves[0].shape for c in curves):
        continue
      ax.plot(curves[0][:, 0], np.mean([c[:, 1] for c in curves], axis=0),
              label=a, color=f'C{i}')
    ax.set_xlabel('step')
    ax.set_title(title + ' (mean over seeds)')
    ax.legend(fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  from configs import mochi  # pylint: disable=g-import-not-at-top
  arms = list(mochi.ABLATIONS) if _ARMS.value == ['all'] else _ARMS.value
  unknown = [a for a in arms if a not in mochi.ABLATIONS]
  if unknown or _SEEDS.value < 1:
    print(f'hnjax: error: --arms: unknown {unknown}; known: '
          f'{", ".join(mochi.ABLATIONS)}' if unknown else
          f'hnjax: error: --seeds={_SEEDS.value}: must be >= 1',
          file=sys.stderr)
    sys.exit(2)
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  root = os.path.abspath(_WORKDIR.value)
  os.makedirs(root, exist_ok=True)
  results = []
  for seed in range(_SEEDS.value):  # seed-major: partial studies are paired
    for arm in arms:
      r = run_one(arm, seed, os.path.join(root, arm, f'seed{seed}'))
      print(f'{arm} seed {seed}: knn {r["knn_top1"]:.4f} linear '
            f'{r.get("linear_top1", math.nan):.4f} ({r["wall_s"]:.0f} s)',
            flush=True)
      results.append(r)
  with open(os.path.join(root, 'study.json'), 'w') as f:
    json.dump(results, f, indent=1)
  text = table(results, arms)
  with open(os.path.join(root, 'study.md'), 'w') as f:
    f.write(text + '\n')
  plot(results, arms, os.path.join(root, 'study.png'))
  print(text)


if __name__ == '__main__':
  app.run(main)
