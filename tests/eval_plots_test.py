"""Tests for hnjax.eval.plots."""

import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from IPython import display
from matplotlib import image as mpimg
import numpy as np

from hnjax import notebook
from hnjax.eval import plots
from hnjax.train import writer as writer_lib


def _log_run(workdir, steps, hard_neg_shift=0.0):
  """Logs a MoCHi-like run through the real writer."""
  rng = np.random.RandomState(0)
  with writer_lib.MetricWriter(workdir) as w:
    for i, step in enumerate(steps):
      scalars = {
          'loss': 8.0 / (1 + i),
          'proxy_acc': 0.5 + 0.04 * i,
          'pos_logit': 5.0,
          'neg_logit': 1.0,
          'lr': 0.1,
      }
      if i % 2 == 0:
        scalars['knn_top1'] = 0.3 + 0.05 * i
      w.write_scalars(step, scalars)
      sims = np.tanh(rng.randn(256) * 0.3 + 0.1 * i + hard_neg_shift)
      w.write_histogram(step, 'hard_neg_sim', sims)


def _assert_png(test, path):
  test.assertTrue(os.path.exists(path), path)
  img = mpimg.imread(path)
  test.assertEqual(img.ndim, 3)
  test.assertGreater(img.shape[0], 100)
  # Not a blank canvas.
  test.assertGreater(float(img[..., :3].std()), 0.01)


class PlotRunTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = self.enter_context(tempfile.TemporaryDirectory())

  def test_writes_default_curves_and_histogram(self):
    _log_run(self.workdir, range(0, 1000, 100))
    written = plots.plot_run(self.workdir)
    names = sorted(os.path.basename(p) for p in written)
    # 'lr' is not a default metric; 'neg_logit' etc. are.
    self.assertEqual(
        names,
        [
            'hist_hard_neg_sim.png',
            'knn_top1.png',
            'loss.png',
            'neg_logit.png',
            'pos_logit.png',
            'proxy_acc.png',
        ],
    )
    for p in written:
      _assert_png(self, p)

  def test_named_metrics_and_unknown_names(self):
    _log_run(self.workdir, [1, 2, 3])
    written = plots.plot_run(self.workdir, metrics=['lr', 'not_logged'])
    self.assertEqual(
        sorted(os.path.basename(p) for p in written),
        ['hist_hard_neg_sim.png', 'lr.png'],
    )

  def test_single_step_run(self):
    _log_run(self.workdir, [7])
    written = plots.plot_run(self.workdir, metrics=['loss'])
    self.assertLen(written, 2)
    for p in written:
      _assert_png(self, p)

  def test_empty_workdir(self):
    self.assertEqual(plots.plot_run(self.workdir), [])

  def test_changed_histogram_edges_keep_latest(self):
    with writer_lib.MetricWriter(self.workdir) as w:
      w.write_histogram(1, 'h', [0.1, 0.2], bins=4)
      w.write_histogram(2, 'h', [0.1, 0.2], bins=8)
    _assert_png(self, plots.plot_run(self.workdir)[0])


class PlotComparisonTest(absltest.TestCase):

  def test_two_runs_in_one_figure(self):
    root = self.enter_context(tempfile.TemporaryDirectory())
    moco, mochi = os.path.join(root, 'moco'), os.path.join(root, 'mochi')
    _log_run(moco, range(0, 500, 100))
    _log_run(mochi, range(0, 500, 100), hard_neg_shift=0.5)
    out = plots.plot_comparison([moco, mochi], os.path.join(root, 'cmp.png'))
    _assert_png(self, out)

  def test_nothing_to_plot_and_bad_labels(self):
    root = self.enter_context(tempfile.TemporaryDirectory())
    self.assertIsNone(
        plots.plot_comparison([root], os.path.join(root, 'cmp.png'))
    )
    with self.assertRaisesRegex(ValueError, 'labels has 1 entries for 2'):
      plots.plot_comparison([root, root], 'x.png', labels=['a'])


class NotebookTest(absltest.TestCase):
  """In a notebook the figures are also shown inline; elsewhere only saved."""

  def setUp(self):
    super().setUp()
    self.workdir = self.enter_context(tempfile.TemporaryDirectory())
    _log_run(self.workdir, [10, 20])
    self.shown = []
    self.enter_context(mock.patch.object(display, 'display',
                                         self.shown.append))

  def test_shows_what_it_writes_in_a_notebook(self):
    with mock.patch.object(notebook, 'in_notebook', return_value=True):
      written = plots.plot_run(self.workdir, metrics=['loss'])
    self.assertLen(written, 2)  # loss and the histogram
    self.assertLen(self.shown, 2)
    self.assertIsInstance(self.shown[0], display.Image)
    with open(written[0], 'rb') as f:
      self.assertEqual(self.shown[0].data, f.read())

  def test_show_false_and_outside_a_notebook_only_save(self):
    with mock.patch.object(notebook, 'in_notebook', return_value=True):
      self.assertLen(plots.plot_run(self.workdir, show=False), 6)
    self.assertLen(plots.plot_run(self.workdir), 6)
    self.assertEmpty(self.shown)

  def test_show_skips_missing_files(self):
    path = plots.plot_run(self.workdir, metrics=['loss'], show=False)[0]
    with mock.patch.object(notebook, 'in_notebook', return_value=True):
      plots.show([path, os.path.join(self.workdir, 'missing.png'), None])
      plots.show(path)
    self.assertLen(self.shown, 2)

  def test_import_keeps_the_users_backend(self):
    # Importing the module once forced Agg: a notebook's inline backend
    # stopped showing figures.
    out = subprocess.run(
        [sys.executable, '-c', 'import hnjax.eval.plots, matplotlib; '
         'print(matplotlib.get_backend())'],
        env={**os.environ, 'MPLBACKEND': 'svg'}, capture_output=True,
        text=True, check=True)
    self.assertEqual(out.stdout.strip(), 'svg')


if __name__ == '__main__':
  absltest.main()
