"""The MoCo / MoCHi trainer and launcher, as a user runs them.

The launcher runs in subprocesses on 1 CPU device with the ``smoke``
preset: an interrupted run (kill -9, SIGTERM, a corrupted newest checkpoint)
must end bit-identical to an uninterrupted one, bad configs must fail in one
line before anything is written, and a non-finite loss must stop the run.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from configs import mochi as mochi_config
from configs import moco_v2 as moco_config
from hnjax import checkpoint
from hnjax import data
from hnjax import models
from hnjax import parallel
from hnjax.train import checks
from hnjax.train import moco
from hnjax.train import optim
from hnjax.train import runner
from tests import testing

_SMOKE = ['--config=configs/mochi.py:smoke', '--config.eval.final=knn']


def _launch(workdir, *args, wait=True):
  return testing.launch('launch.moco', workdir, *args, wait=wait)


_summary = testing.summary


def _wait_for_checkpoint(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, 'checkpoints', str(step))
  t0 = time.time()
  while not os.path.isdir(path):
    if proc.poll() is not None or time.time() - t0 > timeout:
      raise AssertionError(f'no checkpoint {step}: {proc.communicate()}')
    time.sleep(0.2)


@pytest.mark.slow
class ResumeTest(absltest.TestCase):

  def test_interrupted_runs_end_identical(self):
    root = tempfile.mkdtemp()
    ref_dir, run_dir = os.path.join(root, 'ref'), os.path.join(root, 'run')
    code, out, err = _launch(ref_dir, *_SMOKE)
    self.assertEqual(code, 0, err[-3000:])
    ref = _summary(out)
    self.assertEqual(ref['step'], '24')
    self.assertGreater(float(ref['knn_top1']), 0.0)
    for name in ('metrics.jsonl', 'config.json', 'loss.png',
                 'knn_top1.png', 'proxy_acc.png', 'hist_hard_neg_sim.png'):
      self.assertTrue(os.path.exists(os.path.join(ref_dir, name)), name)
    self.assertTrue([f for f in os.listdir(ref_dir) if 'tfevents' in f])

    # kill -9 at a random moment after the first checkpoint.
    proc = _launch(run_dir, *_SMOKE, wait=False)
    _wait_for_checkpoint(run_dir, 6, proc)
    time.sleep(random.uniform(0.0, 3.0))
    proc.kill()
    proc.communicate()
    # Resume, then SIGTERM: saves a checkpoint and exits cleanly.
    proc = _launch(run_dir, *_SMOKE, wait=False)
    _wait_for_checkpoint(run_dir, 12, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    if 'interrupted at step' in out:
      self.assertEqual(proc.returncode, 0, err[-3000:])
      step = int(re.search(r'interrupted at step (\d+)', out)[1])
      self.assertTrue(os.path.isdir(os.path.join(run_dir, 'checkpoints',
                                                 str(step))))
    # Finish: bit-identical to the uninterrupted run.
    code, out, err = _launch(run_dir, *_SMOKE)
    self.assertEqual(code, 0, err[-3000:])
    self.assertEqual(_summary(out)['state_fingerprint'],
                     ref['state_fingerprint'])
    steps = [json.loads(l)['step'] for l in open(
        os.path.join(run_dir, 'metrics.jsonl')) if 'loss' in l]
    self.assertEqual(steps, sorted(set(steps)))  # no duplicated log lines


class BadConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('zero_batch', {'batch_size': 0}, 'batch_size=0'),
      ('negative_queue', {'queue.size': -4}, 'queue.size=-4'),
      ('num_hard', {'mochi.num_hard': 9000}, 'mochi.num_hard=9000'),
      ('temperature', {'temperature': 0.0}, 'temperature=0.0'),
      ('dataset', {'data.name': 'cifar11'}, "data.name='cifar11'"),
      ('model', {'model.backbone': 'resnet7'}, "model.backbone='resnet7'"),
      ('batch_devices', {'batch_size': 100}, 'batch_size=100'),
      ('queue_small', {'queue.size': 128}, 'queue.size=128'),
      ('momentum', {'momentum': 1.0}, 'momentum=1.0'),
      ('selection', {'mochi.selection': 'fast'}, "mochi.selection='fast'"),
      ('recall', {'mochi.recall_target': 0.0}, 'mochi.recall_target=0.0'),
  )
  def test_validate_names_field_and_value(self, overrides, expected):
    config = mochi_config.get_config()
    testing.set_fields(config, overrides)
    with self.assertRaises(checks.ConfigError) as cm:
      runner.validate(moco.FAMILY, config, num_devices=8)
    self.assertIn(expected, str(cm.exception))
    self.assertNotIn('\n', str(cm.exception))

  def test_key_image_must_be_a_field_of_the_data(self):
    config = mochi_config.get_config('smoke')
    self.assertEqual(config.data.key_image, 'alt_image')
    config.data.key_image = 'label_image'
    with self.assertRaisesRegex(
        checks.ConfigError, r"data.key_image='label_image': must name an "
        r'image field of shapes32/small \(it has alt_image, angle,'):
      moco.prepare(config)
    config = mochi_config.get_config('smoke')
    config.eval.knn_factors = 'shape,color'
    with self.assertRaisesRegex(
        checks.ConfigError, r"eval.knn_factors='shape,color': 'color' is "
        r'not an integer field of shapes32/small'):
      moco.prepare(config)

  def test_ablation_presets(self):
    base = mochi_config.get_config()
    for name in mochi_config.ABLATIONS:
      c = mochi_config.get_config(f'ablation={name}')
      runner.validate(moco.FAMILY, c, num_devices=8)
      changed = {k for k in base.mochi if c.mochi[k] != base.mochi[k]}
      self.assertEqual(bool(changed or c.method != base.method),
                       name != 'mochi', name)
    c = mochi_config.get_config('ablation=type2_only')
    self.assertEqual((c.mochi.num_mix, c.mochi.num_query_mix), (0, 32))
    self.assertEqual(mochi_config.get_config('ablation=moco_v2').method,
                     'moco_v2')
    with self.assertRaisesRegex(ValueError, "unknown ablation 'N'"):
      mochi_config.get_config('ablation=N')

  def test_presets_are_valid(self):
    for get in (mochi_config.get_config, moco_config.get_config):
      for arg in ('', 'data=digits', 'data=cifar10', 'data=imagenet100',
                  'data=imagenet,model=resnet50', 'smoke'):
        runner.validate(moco.FAMILY, get(arg), num_devices=8)
    with self.assertRaisesRegex(ValueError, "unknown config preset 'dat'"):
      mochi_config.get_config('dat=shapes')

  @pytest.mark.slow
  def test_launcher_errors_are_one_line_and_write_nothing(self):
    root = tempfile.mkdtemp()
    for i, args in enumerate([
        ['--config.temprature=0.1'],
        ['--config.queue.size=-4'],
        ['--config.mochi.num_hard=100000'],
        ['--config=configs/mochi.py:data=cifar10',
         '--config.data.data_dir=' + os.path.join(root, 'no_tfds')],
    ]):
      workdir = os.path.join(root, f'run{i}')
      code, _, err = _launch(workdir, *args)
      self.assertEqual(code, 2, err)
      lines = [l for l in err.splitlines() if l.strip()]
      self.assertLen(lines, 1, err)
      self.assertTrue(lines[0].startswith('hnjax: error: '), lines[0])
      self.assertFalse(os.path.exists(workdir))
    self.assertIn('cifar10', lines[0])
    self.assertIn('no_tfds', lines[0])


@pytest.mark.slow
class MultiHostTest(absltest.TestCase):

  def test_launcher_on_two_processes(self):
    # The same command on every "host": 2 processes x 1 CPU device over gloo,
    # each reading its own half of every global batch.
    workdir = tempfile.mkdtemp()
    port = testing.free_port()
    procs = []
    for i in range(2):
      env = dict(testing.launcher_env(), HNJAX_DISTRIBUTED='1',
                 HNJAX_COORDINATOR=f'127.0.0.1:{port}',
                 HNJAX_NUM_PROCESSES='2', HNJAX_PROCESS_ID=str(i))
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'launch.moco', f'--workdir={workdir}',
           *_SMOKE, '--config.num_steps=12', '--config.eval.every_steps=0'],
          cwd=testing.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
      self.assertEqual(p.returncode, 0, err[-3000:])
    self.assertIn('2 process(es), 2 device(s)', outs[0][0])
    summary = _summary(outs[0][0])
    self.assertEqual(summary['step'], '12')
    self.assertNotIn('state_fingerprint', outs[1][0])  # process 0 prints
    self.assertTrue(os.path.isdir(os.path.join(workdir, 'checkpoints', '12')))


class BFloat16Test(absltest.TestCase):

  def test_curve_equals_float32_within_seed_noise(self):
    # bf16 compute (float32 parameters, optimizer state and logits): its
    # loss curve stays closer to float32's than another seed's does.
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    info = data.DatasetInfo(
        name='random', num_classes=4, image_shape=(16, 16, 3),
        num_examples={'train': 32}, train_split='train', eval_split='test',
        mean=(0.5,) * 3, std=(0.25,) * 3)
    mesh = parallel.make_mesh(1)  # one device: the dtype is the point
    rng = np.random.default_rng(0)
    batch = parallel.global_batch(dict(
        image=rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8),
        label=rng.integers(0, 4, 32).astype(np.int32),
        index=np.arange(32, dtype=np.int32)), mesh)

    steps = {}  # one compilation per dtype

    def curve(dtype, seed):
      config = mochi_config.get_config('smoke')
      config.data.image_size, config.seed = 16, seed
      config.model.dtype, config.data.key_image = dtype, 'image'
      model = models.create_encoder('convnet', dim=32, bn_splits=8,
                                    dtype=jnp.dtype(dtype))
      tx = optim.make_optimizer(config.optim, lambda s: 0.06)
      state = moco.create_state(config, model, tx, info, mesh)
      self.assertEqual(jax.tree.leaves(state.params)[0].dtype, jnp.float32)
      if dtype not in steps:
        steps[dtype] = jax.jit(lambda st, b: moco.train_step(
            st, b, model=model, tx=tx,
            cfg=moco._step_config(config, info),  # pylint: disable=protected-access
            use_mochi=True, mesh=mesh))
      step = steps[dtype]
      losses = []
      for _ in range(5):
        state, m = step(state, batch)
        losses.append(float(m['loss']))
      self.assertEqual(jax.tree.leaves(state.opt_state)[0].dtype,
                       jnp.float32)
      return np.asarray(losses)

    f32, bf16, other_seed = (curve('float32', 0), curve('bfloat16', 0),
                             curve('float32', 1))
    self.assertLess(np.mean(np.abs(bf16 - f32)),
                    np.mean(np.abs(other_seed - f32)))
    np.testing.assert_allclose(bf16, f32, rtol=0.05)


@pytest.mark.slow
class InProcessTest(absltest.TestCase):
  """train_and_evaluate called directly, as from Colab, on 8 devices."""

  def test_smoke_on_eight_devices_and_non_finite_stop(self):
    workdir = tempfile.mkdtemp()
    config = mochi_config.get_config('smoke,hardness_range')
    config.num_steps = 8
    config.ckpt.every_steps = 4
    config.eval.final = "knn"
    config.eval.every_steps = 0
    config.eval.baselines = config.eval.geometry = True
    config.mochi.selection = 'approx'  # approx_max_k: exact on CPU
    summary = moco.train_and_evaluate(config, workdir)
    self.assertEqual(summary['step'], 8)
    # What training must beat, and Wang & Isola's geometry of the views.
    for key in ('untrained_knn_top1', 'raw_pixel_knn_top1',
                'knn_shape_top1', 'knn_colour_top1',
                'raw_pixel_knn_colour_top1'):
      self.assertBetween(summary[key], 0.05, 1.0)
    # Colour (4 classes) is the easy half of the label for raw pixels.
    self.assertGreater(summary['raw_pixel_knn_colour_top1'],
                       summary['raw_pixel_knn_shape_top1'] + 0.2)
    self.assertNotEqual(summary['untrained_knn_top1'], summary['knn_top1'])
    self.assertBetween(summary['alignment'], 0.0, 4.0)
    self.assertBetween(summary['uniformity'], -4.0, 0.0)
    self.assertFalse(summary['interrupted'])
    self.assertLen(summary['state_fingerprint'], 64)
    records = [json.loads(l) for l in open(
        os.path.join(workdir, 'metrics.jsonl'))]
    losses = [r for r in records if 'loss' in r]
    for key in ('loss', 'pos_logit', 'neg_logit', 'hard_neg_sim',
                'proxy_acc', 'learning_rate', 'grad_norm',
                'false_neg_share', 'mixed_false_neg_share'):
      self.assertIn(key, losses[-1])
      self.assertTrue(np.isfinite(losses[-1][key]))
    self.assertEqual(losses[-1]['mochi'], 1.0)
    # CPU computes approx_max_k exactly: the measured recall says so.
    self.assertEqual(losses[-1]['selection_recall'], 1.0)
    # The hardness diagnostics: shares in [0, 1], a rank among 1 + K.
    for key in ('false_neg_share', 'mixed_false_neg_share'):
      self.assertBetween(losses[-1][key], 0.0, 1.0)
    self.assertBetween(losses[-1]['positive_rank'], 1, 513)
    self.assertTrue(os.path.exists(os.path.join(workdir, 'hardness.png')))

    # The queue is sharded over the 8 devices and restores with it.
    state = moco.create_state(
        config, *self._model_and_tx(config), parallel.make_mesh())
    with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')) as c:
      step, restored, _ = c.restore(checkpoint.abstract_state(state))
    self.assertEqual(step, 8)
    self.assertEqual(restored.queue.keys.addressable_shards[0].data.shape,
                     (512 // 8, 32))
    self.assertTrue(np.all(np.asarray(restored.queue.ids) >= 0))

    # A learning rate of 1e30 blows up: the run stops naming the step and
    # the last checkpoint (saved while finite) stays loadable.
    bad_dir = tempfile.mkdtemp()
    config.optim.learning_rate = 1e30
    config.ckpt.every_steps = 1
    with self.assertRaisesRegex(FloatingPointError,
                                r'non-finite loss .* at step (\d+)') as cm:
      moco.train_and_evaluate(config, bad_dir)
    bad_step = int(re.search(r'at step (\d+)', str(cm.exception))[1])
    with checkpoint.Checkpointer(os.path.join(bad_dir, 'checkpoints')) as c:
      self.assertLess(c.latest_step(), bad_step)
      self.assertIsNotNone(c.restore(checkpoint.abstract_state(state)))

  def _model_and_tx(self, config):
    from hnjax import data  # pylint: disable=g-import-not-at-top
    from hnjax import models  # pylint: disable=g-import-not-at-top
    from hnjax.train import optim  # pylint: disable=g-import-not-at-top
    info = data.get_info(config.data.name)
    model = models.create_encoder(config.model.backbone,
                                  dim=config.model.dim,
                                  bn_splits=config.model.bn_splits)
    tx = optim.make_optimizer(config.optim, lambda s: 0.1)
    return model, tx, info


if __name__ == '__main__':
  absltest.main()
