"""The SupReMix trainer and launcher, as a user runs them.

Subprocess runs of ``launch.supremix`` on 1 CPU device with the ``smoke``
preset: kill -9 then rerun ends bit-identical to an uninterrupted run;
bad configs and bad data fail in one line before anything is written.
In-process runs on 8 devices: every method trains and evaluates, a
non-finite loss stops the run naming the step, and a run can start from
another run's parameters.
"""

import csv
import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
from PIL import Image
import pytest

from configs import supremix as supremix_config
from hnjax import checkpoint
from hnjax.train import checks
from hnjax.train import runner
from hnjax.train import state as state_lib
from hnjax.train import supremix
from tests import testing

_SMOKE = ['--config=configs/supremix.py:smoke',
          '--config.eval.baselines=False']


def _launch(workdir, *args, wait=True):
  return testing.launch('launch.supremix', workdir, *args, wait=wait)


_summary = testing.summary


@pytest.mark.slow
class ArtifactsTest(absltest.TestCase):

  def test_run_writes_every_artifact(self):
    # Killed runs resume exactly through the shared runner: the MoCo and
    # CLIP-mixup resume tests and runner_test cover that path.
    ref_dir = os.path.join(tempfile.mkdtemp(), 'ref')
    code, out, err = _launch(ref_dir, *_SMOKE)
    self.assertEqual(code, 0, err[-3000:])
    ref = _summary(out)
    self.assertEqual(ref['step'], '24')
    for key in ('mae', 'spearman', 'rmse', 'mae_few'):
      self.assertTrue(np.isfinite(float(ref[key])), key)
    for name in ('metrics.jsonl', 'config.json', 'loss.png', 'knn_mae.png',
                 'hist_view_loss.png', 'regression_bins.png',
                 'embedding_2d.png', 'ordinality.png'):
      self.assertTrue(os.path.exists(os.path.join(ref_dir, name)), name)


class BadConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('window', {'supremix.window': 0.0}, 'supremix.window=0.0'),
      ('beta', {'supremix.beta': (2.0, 0.0)}, 'supremix.beta=(2.0, 0.0)'),
      ('method', {'method': 'simclr'}, "method='simclr'"),
      ('target', {'data.target': 'colour'}, "data.target='colour'"),
      ('not_regression', {'data.name': 'digits'}, "data.name='digits'"),
      ('temperature', {'temperature': 0.0}, 'temperature=0.0'),
      ('variant', {'supremix.variant': 'paper'}, "supremix.variant='paper'"),
      ('weighting', {'supremix.distance_weighting': 'L1'},
       "supremix.distance_weighting='L1'"),
      ('batch', {'batch_size': 12}, 'batch_size=12'),
      ('evaluator', {'eval.final': 'regresion'}, "eval.final='regresion'"),
  )
  def test_validate_names_field_and_value(self, overrides, expected):
    config = supremix_config.get_config()
    testing.set_fields(config, overrides)
    with self.assertRaises(checks.ConfigError) as cm:
      runner.validate(supremix.FAMILY, config, num_devices=8)
    self.assertIn(expected, str(cm.exception))
    self.assertNotIn('\n', str(cm.exception))

  def test_presets_are_valid(self):
    for method in supremix.METHODS:
      for data in ('shapes', 'diabetes', 'shapes3d', 'dsprites', 'agedb',
                   'imdb_wiki', 'folder'):
        runner.validate(supremix.FAMILY, supremix_config.get_config(
            f'method={method},data={data}'), num_devices=8)
    runner.validate(supremix.FAMILY, supremix_config.get_config(
        'smoke,method=rnc,target=angle'), num_devices=8)
    with self.assertRaisesRegex(ValueError, "unknown data preset 'age'"):
      supremix_config.get_config('data=age')

  @pytest.mark.slow
  def test_launcher_errors_are_one_line_and_write_nothing(self):
    root = tempfile.mkdtemp()
    os.makedirs(os.path.join(root, 'img'))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
        os.path.join(root, 'img', 'a.png'))
    table = os.path.join(root, 'data.csv')
    with open(table, 'w', newline='') as f:
      w = csv.writer(f)
      w.writerows([['path', 'split', 'age'], ['img/a.png', 'train', '3'],
                   ['img/b.png', 'train', '4']])
    for i, (args, expected) in enumerate([
        (['--config.supremix.windw=1'], "did you mean 'window'"),
        (['--config.supremix.window=-1'], 'supremix.window=-1'),
        (['--config=configs/supremix.py:data=folder',
          f'--config.data.csv={table}', '--config.data.target=age'],
         'data.csv, row 3: image'),
    ]):
      workdir = os.path.join(root, f'run{i}')
      code, _, err = _launch(workdir, *args)
      self.assertEqual(code, 2, err)
      lines = [l for l in err.splitlines() if l.strip()]
      self.assertLen(lines, 1, err)
      self.assertTrue(lines[0].startswith('hnjax: error: '), lines[0])
      self.assertIn(expected, lines[0])
      self.assertFalse(os.path.exists(workdir))


@pytest.mark.slow
class InProcessTest(parameterized.TestCase):
  """train_and_evaluate called directly, as from Colab, on 8 devices."""

  def config(self, arg='smoke', **overrides):
    c = supremix_config.get_config(arg)
    c.num_steps = 6
    c.ckpt.every_steps = 3
    c.eval.every_steps = 0
    c.eval.baselines = False
    testing.set_fields(c, overrides)
    return c

  @parameterized.parameters('smoke,method=supcon', 'smoke,method=rnc',
                            'smoke,method=l1,data=diabetes')
  def test_baselines_train_and_probe(self, arg):
    summary = supremix.train_and_evaluate(self.config(arg, batch_size=32),
                                          tempfile.mkdtemp())
    self.assertEqual(summary['step'], 6)
    self.assertTrue(np.isfinite(summary['mae']))

  def test_supremix_non_finite_stop_and_init_from(self):
    workdir = tempfile.mkdtemp()
    config = self.config(**{'supremix.variant': 'authors'})
    summary = supremix.train_and_evaluate(config, workdir)
    self.assertEqual(summary['step'], 6)
    records = [json.loads(l) for l in open(os.path.join(workdir,
                                                        'metrics.jsonl'))]
    self.assertIn('grad_norm', records[0])
    self.assertIn('mae_few', records[-1])

    # A new run from the first one's parameters: its step-0 state holds
    # them, with a fresh optimizer.
    setup = runner.prepare(supremix.FAMILY, config)
    fresh = supremix.build(setup).init_state()
    loaded = state_lib.load_params(fresh, workdir)
    with checkpoint.Checkpointer(state_lib.checkpoint_dir(workdir)) as c:
      _, saved, _ = c.restore(checkpoint.abstract_state(fresh))
    for a, b in zip(jax.tree.leaves(loaded.params),
                    jax.tree.leaves(saved.params)):
      np.testing.assert_array_equal(a, b)
    self.assertEqual(int(loaded.step), 0)
    with self.assertRaisesRegex(checks.ConfigError, 'init_from=.*nowhere'):
      state_lib.load_params(fresh, '/nowhere')
    config.init_from = workdir
    config.num_steps = 2
    self.assertEqual(
        supremix.train_and_evaluate(config, tempfile.mkdtemp())['step'], 2)

    # A learning rate of 1e30 blows up: the run stops naming the step.
    config.init_from = ''
    config.optim.learning_rate = 1e30
    config.optim.name = 'sgd'
    with self.assertRaisesRegex(FloatingPointError,
                                r'non-finite loss .* at step (\d+)'):
      supremix.train_and_evaluate(config, tempfile.mkdtemp())


if __name__ == '__main__':
  absltest.main()
