"""The MoCHi study's statistics: intervals over seeds, paired differences."""

import math
import os
import tempfile

from absl.testing import absltest
import numpy as np

from launch import mochi_study


def _result(arm, seed, knn, **more):
  r = dict(arm=arm, seed=seed, knn_top1=knn, linear_top1=knn + 0.05,
           alignment=0.5, uniformity=-2.0, proxy_acc=0.5,
           false_neg_share=0.1, positive_rank=3.0, wall_s=100.0)
  r.update(more)
  return r


class StudyStatisticsTest(absltest.TestCase):

  def test_t_interval(self):
    mean, half = mochi_study.interval([1.0, 2.0, 3.0])
    # sd 1, t(0.975, df=2) = 4.303: 4.303 / sqrt(3).
    self.assertAlmostEqual(mean, 2.0)
    self.assertAlmostEqual(half, 4.303 / math.sqrt(3), places=6)
    self.assertTrue(math.isnan(mochi_study.interval([1.0])[1]))
    self.assertTrue(math.isnan(mochi_study.interval([None])[0]))

  def test_differences_are_paired_by_seed(self):
    base = [0.30, 0.32, 0.34]
    other = [0.31, 0.34, 0.35]  # differences 0.01, 0.02, 0.01
    results = ([_result('moco_v2', s, v, untrained_knn_top1=0.2,
                        raw_pixel_knn_top1=0.25)
                for s, v in enumerate(base)] +
               [_result('mochi', s, v) for s, v in reversed(
                   list(enumerate(other)))])
    text = mochi_study.table(results, ['moco_v2', 'mochi'])
    d = np.array(other) - np.array(base)
    half = 4.303 * d.std(ddof=1) / math.sqrt(3)
    row = [l for l in text.splitlines() if l.startswith('| mochi |')][-1]
    self.assertIn(f'{d.mean():.4f} ± {half:.4f}', row)
    # Unpaired, the interval would be much wider than the paired one.
    self.assertGreater(mochi_study.interval(other)[1], 2 * half)
    self.assertIn('Baseline untrained: kNN 0.2000', text)

  def test_plot_writes_the_figure(self):
    curve = [(20, 0.1), (40, 0.12)]
    results = [_result(a, s, 0.3 + 0.01 * s, false_neg_share_curve=curve,
                       proxy_acc_curve=curve)
               for a in ('moco_v2', 'mochi') for s in range(2)]
    path = os.path.join(tempfile.mkdtemp(), 'study.png')
    mochi_study.plot(results, ['moco_v2', 'mochi'], path)
    self.assertGreater(os.path.getsize(path), 10_000)


if __name__ == '__main__':
  absltest.main()
