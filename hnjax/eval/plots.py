"""PNG plots of a run's logs: training curves and hard-negative statistics.

Reads a run's logs (``metrics.jsonl`` and ``histograms.jsonl``, see
`hnjax.runlog`) and draws, into the workdir:

- ``<metric>.png`` for each curve present among ``loss``, ``knn_top1``,
  ``proxy_acc`` (accuracy of the contrastive proxy task: how often the
  positive has the largest logit), ``pos_logit``, ``neg_logit`` and
  ``hard_neg_sim``, or for the metrics named by the caller;
- ``hist_<name>.png`` for each histogram, e.g. of the similarities of the
  hardest negatives: a heat map of the distribution against the step, and the
  distributions at a few steps overlaid;
- ``hardness.png`` when the run logged hardness diagnostics: the hardest
  similarities over training next to the share of the hardest negatives
  that are false negatives (same label as the query) and the positive's
  median rank among all candidates.

These are the analyses of the MoCHi paper (Kalantidis et al., 2020, Figs. 2-3):
proxy-task accuracy and the hardness of the negatives over training.
:func:`plot_comparison` puts several runs (e.g. MoCo v2 and MoCHi) in one
figure. Nothing here crashes on a run with one logged step or missing files.

The figures are drawn on `matplotlib.figure.Figure` objects, never through
pyplot, so importing this module leaves the user's matplotlib backend alone
(a notebook's inline backend stays inline). In a notebook (an IPython
kernel: Jupyter, Colab) every public function also shows what it wrote
inline, unless called with ``show=False``; :func:`show` displays PNGs that
are already written (e.g. the figures of a run's final evaluation).

References:
  Kalantidis et al., Hard Negative Mixing for Contrastive Learning, 2020.
  https://arxiv.org/abs/2010.01028
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import matplotlib
from matplotlib import figure as mpl_figure
import numpy as np

from hnjax import notebook
from hnjax import runlog

DEFAULT_METRICS = (
    'loss',
    'knn_top1',
    'proxy_acc',
    'pos_logit',
    'neg_logit',
    'hard_neg_sim',
    'knn_mae',
    'r1sum',
    'logit_scale',
    'modality_gap',
)


def _curves(
    records: Sequence[dict[str, Any]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """name -> (steps, values) over the records that have the name."""
  curves = {}
  for r in records:
    for name, value in r.items():
      if name != 'step' and isinstance(value, (int, float)):
        curves.setdefault(name, ([], []))
        curves[name][0].append(r['step'])
        curves[name][1].append(value)
  out = {}
  for name, (steps, values) in curves.items():
    order = np.argsort(steps, kind='stable')
    out[name] = (np.asarray(steps)[order], np.asarray(values, float)[order])
  return out


def _plot_curve(ax, steps, values, label=None):
  # Markers make a single logged step visible.
  ax.plot(
      steps,
      values,
      marker='o' if len(steps) < 30 else None,
      markersize=3,
      label=label,
  )


def plot_run(
    workdir: str | os.PathLike[str],
    *,
    metrics: Sequence[str] | None = None,
    show: bool | None = None,
) -> list[str]:
  """Draws the curves and histograms of one run into its workdir.

  Args:
    workdir: a run directory with ``metrics.jsonl`` and/or
      ``histograms.jsonl``.
    metrics: metric names to plot; ``None`` plots those of
      :data:`DEFAULT_METRICS` that were logged. Names that were never logged
      are skipped.
    show: also show the figures inline (``None``: when in a notebook).

  Returns:
    Paths of the PNG files written (empty if there was nothing to plot).
  """
  workdir = os.fspath(workdir)
  curves = _curves(
      runlog.read_metrics(workdir)
  )
  names = DEFAULT_METRICS if metrics is None else metrics
  written = []
  for name in names:
    if name not in curves:
      continue
    fig, ax = _subplots(figsize=(6, 4))
    _plot_curve(ax, *curves[name])
    ax.set_xlabel('step')
    ax.set_ylabel(name)
    ax.set_title(name)
    ax.grid(alpha=0.3)
    written.append(_save(fig, os.path.join(workdir, f'{name}.png')))
  histograms = _histograms(
      runlog.read_histograms(workdir)
  )
  for name, records in histograms.items():
    written.append(
        _plot_histograms(
            name, records, os.path.join(workdir, f'hist_{name}.png')
        )
    )
  if 'false_neg_share' in curves:
    written.append(_plot_hardness(
        curves, histograms.get('hard_neg_sim'),
        os.path.join(workdir, 'hardness.png')))
  return _shown(written, show)


def _plot_hardness(curves, hard_sim_records, path):
  """Hardest similarities, false-negative share and positive rank."""
  fig, axes = _subplots(1, 3, figsize=(16, 4.5))
  ax_sim, ax_share, ax_rank = axes
  if hard_sim_records:
    edges = np.asarray(hard_sim_records[-1]['edges'], float)
    centres = (edges[1:] + edges[:-1]) / 2
    picks = sorted(set(np.linspace(0, len(hard_sim_records) - 1, 5)
                       .round().astype(int)))
    colors = matplotlib.colormaps['plasma'](np.linspace(0, 0.9, len(picks)))
    for color, i in zip(colors, picks):
      counts = np.asarray(hard_sim_records[i]['counts'], float)
      ax_sim.plot(centres, counts / max(counts.sum(), 1), color=color,
                  label=f'step {hard_sim_records[i]["step"]}')
    ax_sim.legend()
  ax_sim.set_xlabel('similarity of the hardest negative')
  ax_sim.set_ylabel('fraction of queries')
  ax_sim.set_title('hardest negatives')
  for name, label in (('false_neg_share', 'hardest N'),
                      ('mixed_false_neg_share', 'mixed (hardness range)')):
    if name in curves:
      _plot_curve(ax_share, *curves[name], label=label)
  ax_share.set_xlabel('step')
  ax_share.set_ylabel('share with the query\'s label')
  ax_share.set_title('false negatives among the hardest')
  ax_share.legend()
  if 'positive_rank' in curves:
    _plot_curve(ax_rank, *curves['positive_rank'])
    ax_rank.set_yscale('log')
  ax_rank.set_xlabel('step')
  ax_rank.set_ylabel('median rank (1: first)')
  ax_rank.set_title('rank of the positive among all candidates')
  for ax in axes:
    ax.grid(alpha=0.3)
  return _save(fig, path)


def _histograms(records):
  """name -> records with the latest edges, sorted by step."""
  by_name = {}
  for r in records:
    if {'name', 'edges', 'counts'} <= r.keys():
      by_name.setdefault(r['name'], []).append(r)
  out = {}
  for name, rs in by_name.items():
    # Edges changed mid-run (a config edit): plot the latest ones only.
    rs = [r for r in rs if r['edges'] == rs[-1]['edges']]
    out[name] = sorted(rs, key=lambda r: r['step'])
  return out


def _plot_histograms(name, records, path):
  edges = np.asarray(records[-1]['edges'], float)
  steps = np.asarray([r['step'] for r in records], float)
  counts = np.asarray([r['counts'] for r in records], float)  # [T, bins]
  density = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  fig, (ax_map, ax_lines) = _subplots(1, 2, figsize=(12, 4.5))

  # Heat map: column t is the distribution at steps[t].
  if len(steps) > 1:
    mid = (steps[1:] + steps[:-1]) / 2
    step_edges = np.concatenate(
        [
            [steps[0] - (mid[0] - steps[0])],
            mid,
            [steps[-1] + (steps[-1] - mid[-1])],
        ]
    )
  else:
    step_edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
  mesh = ax_map.pcolormesh(
      step_edges, edges, density.T, shading='flat', cmap='viridis'
  )
  fig.colorbar(mesh, ax=ax_map, label='fraction')
  ax_map.set_xlabel('step')
  ax_map.set_ylabel(name)
  ax_map.set_title(f'{name} over training')

  # A few distributions overlaid: first, last and evenly spaced between.
  picks = sorted(set(np.linspace(0, len(records) - 1, 5).round().astype(int)))
  centres = (edges[1:] + edges[:-1]) / 2
  colors = matplotlib.colormaps['plasma'](np.linspace(0, 0.9, len(picks)))
  for color, i in zip(colors, picks):
    ax_lines.plot(
        centres, density[i], color=color, label=f'step {int(steps[i])}'
    )
  ax_lines.set_xlabel(name)
  ax_lines.set_ylabel('fraction')
  ax_lines.set_title(f'{name} at a few steps')
  ax_lines.legend()
  ax_lines.grid(alpha=0.3)
  return _save(fig, path)


def plot_comparison(
    workdirs: Sequence[str | os.PathLike[str]],
    out_png: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    show: bool | None = None,
) -> str | None:
  """Overlays several runs' curves, one panel per metric, in one PNG.

  Besides the metrics, each histogram name gets a panel of its mean over
  training (e.g. how similar the hardest negatives are under MoCo v2 and
  under MoCHi).

  Args:
    workdirs: run directories.
    out_png: output file.
    labels: legend names, one per workdir; default the directory names.
    metrics: as in :func:`plot_run`.
    show: as in :func:`plot_run`.

  Returns:
    ``out_png``, or ``None`` if no run had anything to plot.

  Raises:
    ValueError: if ``labels`` and ``workdirs`` differ in length.
  """
  workdirs = [os.fspath(w) for w in workdirs]
  if labels is None:
    labels = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(labels) != len(workdirs):
    raise ValueError(
        f'labels has {len(labels)} entries for {len(workdirs)} workdirs'
    )
  names = DEFAULT_METRICS if metrics is None else metrics
  runs = []  # (label, {panel: (steps, values)})
  for label, w in zip(labels, workdirs):
    curves = _curves(
        runlog.read_metrics(w)
    )
    panels = {n: curves[n] for n in names if n in curves}
    for hname, records in _histograms(
        runlog.read_histograms(w)
    ).items():
      means = [
          (r['step'], r['mean']) for r in records if r.get('mean') is not None
      ]
      if means:
        steps, values = zip(*means)
        panels[f'{hname} (mean)'] = (np.asarray(steps), np.asarray(values))
    runs.append((label, panels))
  panel_names = list(dict.fromkeys(n for _, p in runs for n in p))
  if not panel_names:
    return None
  cols = min(3, len(panel_names))
  rows = math.ceil(len(panel_names) / cols)
  fig, axes = _subplots(
      rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False
  )
  for ax, panel in zip(axes.flat, panel_names):
    for label, panels in runs:
      if panel in panels:
        _plot_curve(ax, *panels[panel], label=label)
    ax.set_title(panel)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend()
  for ax in list(axes.flat)[len(panel_names) :]:
    ax.axis('off')
  return _shown(_save(fig, os.fspath(out_png)), show)


def plot_regression(
    workdir: str | os.PathLike[str],
    *,
    train_targets: np.ndarray,
    test_targets: np.ndarray,
    predictions: np.ndarray,
    test_features: np.ndarray,
    bin_width: float,
    target: str = 'target',
    max_pairs: int = 20000,
    seed: int = 0,
    show: bool | None = None,
) -> list[str]:
  """The figures of a contrastive-regression run, into its workdir.

  - ``regression_bins.png``: test MAE per target bin, over the training
    examples per bin (the DIR shot groups: many > 100, few < 20);
  - ``embedding_2d.png``: the test features projected on their first two
    principal components, coloured by target (a smooth colour gradient is
    an ordered embedding);
  - ``ordinality.png``: feature distance (cosine, normalised features)
    against target distance over random test pairs, median and quartiles
    per target-distance bin: it rises monotonically when the embedding
    orders the targets.

  Args:
    workdir: where to write.
    train_targets: ``[N]`` training targets (for the bin counts).
    test_targets: ``[M]`` test targets.
    predictions: ``[M]`` the probe's test predictions.
    test_features: ``[M, F]`` frozen test features.
    bin_width: target bin width.
    target: the target's name, for the axis labels.
    max_pairs: random test pairs in the ordinality plot.
    seed: seed of those pairs.
    show: as in :func:`plot_run`.

  Returns:
    Paths of the PNG files written.
  """
  workdir = os.fspath(workdir)
  y = np.asarray(test_targets, np.float64)
  err = np.abs(np.asarray(predictions, np.float64) - y)
  train_bins = np.floor(np.asarray(train_targets, np.float64) / bin_width)
  test_bins = np.floor(y / bin_width)
  bins = np.unique(np.concatenate([train_bins, test_bins]))
  counts = np.array([np.sum(train_bins == b) for b in bins])
  mae = np.array([err[test_bins == b].mean() if np.any(test_bins == b)
                  else np.nan for b in bins])
  centres = (bins + 0.5) * bin_width
  written = []

  fig, ax = _subplots(figsize=(7, 4))
  colours = np.where(counts > 100, 'tab:green',
                     np.where(counts < 20, 'tab:red', 'tab:orange'))
  ax.bar(centres, mae, width=bin_width * 0.9, color=colours)
  ax.set_xlabel(target)
  ax.set_ylabel('test MAE (green many, orange medium, red few-shot)')
  twin = ax.twinx()
  twin.plot(centres, counts, color='k', lw=1)
  twin.set_ylabel('training examples per bin')
  ax.set_title('MAE per target bin')
  written.append(_save(fig, os.path.join(workdir, 'regression_bins.png')))

  x = np.asarray(test_features, np.float64)
  x = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  xy = x @ vt[:2].T
  fig, ax = _subplots(figsize=(5.5, 4.5))
  points = ax.scatter(xy[:, 0], xy[:, 1], c=y, s=4, cmap='viridis')
  fig.colorbar(points, ax=ax, label=target)
  ax.set_xlabel('PC 1')
  ax.set_ylabel('PC 2')
  ax.set_title('test features, coloured by target')
  written.append(_save(fig, os.path.join(workdir, 'embedding_2d.png')))

  rng = np.random.default_rng(seed)
  i, j = rng.integers(0, len(y), (2, max_pairs))
  keep = i != j
  i, j = i[keep], j[keep]
  unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  dist = 1.0 - np.sum(unit[i] * unit[j], axis=1)
  dy = np.abs(y[i] - y[j])
  edges = np.linspace(0, dy.max() + 1e-12, 21)
  which = np.digitize(dy, edges) - 1
  mid, q = [], []
  for b in range(20):
    d = dist[which == b]
    if d.size:
      mid.append((edges[b] + edges[b + 1]) / 2)
      q.append(np.percentile(d, [25, 50, 75]))
  q = np.asarray(q)
  fig, ax = _subplots(figsize=(6, 4))
  ax.plot(mid, q[:, 1], marker='o', markersize=3)
  ax.fill_between(mid, q[:, 0], q[:, 2], alpha=0.3)
  ax.set_xlabel(f'|Δ {target}|')
  ax.set_ylabel('feature cosine distance')
  ax.set_title('ordinality: feature distance vs target distance')
  ax.grid(alpha=0.3)
  written.append(_save(fig, os.path.join(workdir, 'ordinality.png')))
  return _shown(written, show)


def plot_clip_comparison(
    workdir: str | os.PathLike[str],
    rows: dict[str, dict[str, float]],
    embeddings: dict[str, str | os.PathLike[str]],
    *,
    max_points: int = 500,
    show: bool | None = None,
) -> list[str]:
  """The CLIP-mixup study's figures (m²-mix paper, Figs. 1 and 4).

  Writes into ``workdir``:

  - ``uniformity_alignment.png``: one point per row (zero-shot, fine-tuned,
    m²-mix, ...), Wang & Isola's alignment against uniformity (lower is
    better for both);
  - ``recall_at_k.png``: image→text and text→image R@1/5/10 per row;
  - ``modality_gap.png``: a 2-D PCA of each run's test image and text
    embeddings (``max_points`` of each), centroids marked, the gap in the
    title.

  Args:
    workdir: output directory.
    rows: ``{label: metrics}`` with ``uniformity``, ``alignment``,
      ``i2t_r{1,5,10}``, ``t2i_r{1,5,10}`` where known.
    embeddings: ``{label: .npz path}`` with ``image`` and ``text``
      ``[N, D]`` arrays (missing files are skipped).
    max_points: points per modality in the projection.
    show: as in :func:`plot_run`.

  Returns:
    The paths written.
  """
  workdir = os.fspath(workdir)
  written = []
  pts = {k: r for k, r in rows.items()
         if 'uniformity' in r and 'alignment' in r}
  if pts:
    fig, ax = _subplots(figsize=(5, 4))
    for label, r in pts.items():
      ax.scatter(r['alignment'], r['uniformity'], s=50, label=label)
    ax.set_xlabel('alignment (lower is better)')
    ax.set_ylabel('uniformity (lower is better)')
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, os.path.join(workdir,
                                           'uniformity_alignment.png')))
  ks = (1, 5, 10)
  curves = {k: r for k, r in rows.items() if 'i2t_r1' in r}
  if curves:
    fig, axes = _subplots(1, 2, figsize=(9, 3.8))
    for ax, side in zip(axes, ('i2t', 't2i')):
      for label, r in curves.items():
        ax.plot(ks, [r.get(f'{side}_r{k}', np.nan) for k in ks], marker='o',
                label=label)
      ax.set_title({'i2t': 'image → text', 't2i': 'text → image'}[side])
      ax.set_xlabel('k')
      ax.set_ylabel('R@k (%)')
      ax.set_xticks(ks)
      ax.grid(alpha=0.3)
    axes[0].legend()
    written.append(_save(fig, os.path.join(workdir, 'recall_at_k.png')))
  loaded = {}
  for label, path in embeddings.items():
    if os.path.exists(path):
      with np.load(path) as z:
        loaded[label] = (z['image'][:max_points], z['text'][:max_points])
  if loaded:
    fig, axes = _subplots(1, len(loaded), figsize=(4 * len(loaded), 4),
                             squeeze=False)
    for ax, (label, (v, t)) in zip(axes[0], loaded.items()):
      x = np.concatenate([v, t]).astype(np.float64)
      x = x - x.mean(0)
      _, _, vt = np.linalg.svd(x, full_matrices=False)
      p = x @ vt[:2].T
      pv, pt = p[:len(v)], p[len(v):]
      ax.scatter(*pv.T, s=4, alpha=0.5, label='image')
      ax.scatter(*pt.T, s=4, alpha=0.5, label='text')
      ax.scatter(*pv.mean(0), marker='x', s=80, c='k')
      ax.scatter(*pt.mean(0), marker='x', s=80, c='k')
      gap = np.linalg.norm(v.mean(0) - t.mean(0))
      ax.set_title(f'{label}: gap {gap:.2f}')
      ax.set_xticks([])
      ax.set_yticks([])
    axes[0, 0].legend()
    written.append(_save(fig, os.path.join(workdir, 'modality_gap.png')))
  return _shown(written, show)


def _subplots(*args, figsize, **kwargs):
  """``pyplot.subplots`` without pyplot: no backend, no global figures."""
  fig = mpl_figure.Figure(figsize=figsize)
  return fig, fig.subplots(*args, **kwargs)


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def show(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
         ) -> None:
  """Shows written PNG files inline in a notebook; does nothing elsewhere.

  Args:
    paths: one path or several (e.g. what a plot function returned);
      ``None`` entries and missing files are skipped.
  """
  if not notebook.in_notebook() or paths is None:
    return
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  from IPython import display  # pylint: disable=g-import-not-at-top
  for path in paths:
    if path is not None and os.path.exists(path):
      display.display(display.Image(filename=os.fspath(path)))


def _shown(written, show_inline: bool | None):
  """``written``, shown inline first if asked (None: in a notebook)."""
  if show_inline or show_inline is None:
    show(written)
  return written
