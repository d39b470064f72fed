"""CLIP-mixup end to end: objectives, configs, stages, resume, launcher."""

import functools
import os
import random
import tempfile
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import clip_mixup as clip_config
from hnjax import losses
from hnjax import parallel
from hnjax.data import mined
from hnjax.data import paired
from hnjax.data import text
from hnjax.train import checks
from hnjax.train import clip_mixup
from hnjax.train import runner
from tests import data_real_captions_test
from tests import testing

# The study killed and resumed: its method run mines negatives again every
# 4 steps and draws cluster batches (a checkpoint right after a refresh).
_MINED_STUDY = ['--config=configs/clip_mixup.py:smoke,negatives=dynamic,'
                'batches=cluster', '--config.eval.baselines=False',
                '--config.eval.every_steps=0']
_TINY_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          'fixtures', 'tiny_clip')


def _launch(workdir, *args, wait=True):
  return testing.launch('launch.clip_mixup', workdir, *args, wait=wait)


def _unit(key, shape):
  x = jax.random.normal(key, shape)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _cfg(method, **kw):
  base = dict(
      method=method, temperature=0.01, learn_temperature=False,
      m2mix_weight=0.3, m2mix_beta=0.5, m2mix_temperature=0.07,
      m3mix_weights=(('vmix', 0.05), ('lmix', 0.07), ('vlmix', 0.1)),
      m3mix_beta=0.5, original_negatives=False, schedule=True,
      steps_per_epoch=10, image_size=32, context_length=16, mean=(0.,) * 3,
      std=(1.,) * 3)
  base.update(kw)
  return clip_mixup.StepConfig(**base)


class ObjectiveTest(parameterized.TestCase):
  """The total loss is §5.3's sum, the same on 1 and 8 devices."""

  def _body(self, cfg, mesh):
    return jax.shard_map(
        functools.partial(clip_mixup._objective_body, cfg=cfg), mesh=mesh,
        in_specs=(P('data'),) * 4 + (P(),) * 5,
        out_specs=(P('data'), P('data')))

  @parameterized.parameters(0.0, 2.0)
  def test_total_is_clip_plus_decayed_mixing_terms(self, epoch):
    k1, k2 = jax.random.split(jax.random.key(0))
    v, t = _unit(k1, (16, 8)), _unit(k2, (16, 8))
    lam, lam3, scale = 0.3, jnp.array([0.6, 0.2, 0.9]), 100.0
    cfg = _cfg('m3mix')
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    total, terms = jax.jit(self._body(cfg, mesh))(v, t, None, None, scale,
                                                  -10.0, lam, lam3, epoch)

    @jax.jit
    def reference(v, t):
      clip = losses.symmetric_info_nce(v, t, temperature=0.01)
      m2 = losses.m2mix(v, t, lam, temperature=0.07)
      m3 = {k: losses.m3mix(v, t, lam3[i], term=k, temperature=0.01)
            for i, k in enumerate(losses.M3MIX_TERMS)}
      return clip, m2, m3

    clip, m2, m3 = reference(v, t)
    mix = 0.3 * m2 + 0.05 * m3['vmix'] + 0.07 * m3['lmix'] + 0.1 * m3['vlmix']
    np.testing.assert_allclose(total, clip + mix / (epoch + 1), rtol=1e-5)
    np.testing.assert_allclose(terms['m2mix'], m2, rtol=1e-5)
    # Without the schedule the weight never decays.
    total, _ = jax.jit(self._body(_cfg('m3mix', schedule=False), mesh))(
        v, t, None, None, scale, -10.0, lam, lam3, epoch)
    np.testing.assert_allclose(total, clip + mix, rtol=1e-5)

  def test_mined_negatives_join_the_clip_term(self):
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    v, t, neg = _unit(k1, (8, 4)), _unit(k2, (8, 4)), _unit(k3, (8, 3, 4))
    mask = jnp.arange(24).reshape(8, 3) % 4 != 0
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    total, terms = jax.jit(self._body(_cfg('m2mix'), mesh))(
        v, t, neg, mask, 100.0, 0.0, 0.3, jnp.zeros(3), 0.0)
    clip = losses.symmetric_info_nce(v, t, temperature=0.01,
                                     extra_negatives=neg,
                                     extra_negative_mask=mask)
    np.testing.assert_allclose(terms['clip'], clip, rtol=1e-5)
    np.testing.assert_allclose(
        total, clip + 0.3 * losses.m2mix(v, t, 0.3, temperature=0.07),
        rtol=1e-5)
    # They make it harder than in-batch negatives alone.
    self.assertTrue(np.all(np.asarray(clip) >= np.asarray(
        losses.symmetric_info_nce(v, t, temperature=0.01)) - 1e-6))

  def test_hardest_in_batch_similarity_on_one_and_eight_devices(self):
    k1, k2 = jax.random.split(jax.random.key(3))
    v, t = _unit(k1, (16, 4)), _unit(k2, (16, 4))
    sims = np.asarray(v) @ np.asarray(t).T
    np.fill_diagonal(sims, -np.inf)
    for n in (1, 8):
      mesh = parallel.make_mesh(devices=jax.devices()[:n])
      fn = jax.jit(jax.shard_map(clip_mixup.hardest_in_batch, mesh=mesh,
                                 in_specs=(P('data'), P('data')),
                                 out_specs=P('data')))
      np.testing.assert_allclose(fn(v, t), sims.max(axis=1), rtol=1e-6)

  # m3mix's terms on 8 devices: sharded_test.
  @parameterized.parameters('clip', 'm2mix', 'siglip', 'mined')
  def test_eight_devices_equal_one(self, method):
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    v, t = _unit(k1, (16, 8)), _unit(k2, (16, 8))
    neg = mask = None
    if method == 'mined':
      method, neg = 'clip', _unit(k3, (16, 2, 8))
      mask = jnp.arange(32).reshape(16, 2) % 3 != 0
    cfg = _cfg(method)

    def loss(mesh, v, t, neg):
      total, _ = self._body(cfg, mesh)(v, t, neg, mask, 10.0, -5.0, 0.4,
                                       jnp.array([0.7, 0.1, 0.5]), 1.0)
      return jnp.mean(total)

    one = parallel.make_mesh(devices=jax.devices()[:1])
    eight = parallel.make_mesh(devices=jax.devices()[:8])
    argnums = (0, 1) if neg is None else (0, 1, 2)
    l1, g1 = jax.jit(jax.value_and_grad(functools.partial(loss, one),
                                        argnums=argnums))(v, t, neg)
    l8, g8 = jax.jit(jax.value_and_grad(functools.partial(loss, eight),
                                        argnums=argnums))(v, t, neg)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(g8, g1):  # both towers' gradients (and the mined)
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('weight', {'m2mix.weight': -0.1}, 'm2mix.weight=-0.1'),
      ('beta', {'m2mix.beta': 0.0}, 'm2mix.beta=0.0'),
      ('m3_beta', {'m3mix.beta': -1.0}, 'm3mix.beta=-1.0'),
      ('vlmix', {'m3mix.vlmix': -1.0}, 'm3mix.vlmix=-1.0'),
      ('temperature', {'temperature': 0.0}, 'temperature=0.0'),
      ('tau2', {'m2mix.temperature': -0.07}, 'm2mix.temperature=-0.07'),
      ('tower', {'model.backbone': 'vit_huge'}, "model.backbone='vit_huge'"),
      ('context', {'text.context_length': 1}, 'text.context_length=1'),
      ('heads', {'text.heads': 3}, 'text.width=64'),
      ('method', {'method': 'simclr'}, "method='simclr'"),
      ('stage', {'stage': 'train'}, "stage='train'"),
      ('finetune', {'stage': 'finetune'}, "init_from=''"),
      ('data', {'data.name': 'digits'}, "data.name='digits'"),
      ('batch', {'batch_size': 12}, 'batch_size=12'),
      ('negatives', {'mining.negatives': -1}, 'mining.negatives=-1'),
      ('every', {'mining.every_steps': -4}, 'mining.every_steps=-4'),
      ('batches', {'mining.batches': 'knn'}, "mining.batches='knn'"),
      ('cluster', {'mining.cluster_size': 0}, 'mining.cluster_size=0'),
      ('sampling', {'mining.sampling': 'hard'}, "mining.sampling='hard'"),
      ('range', {'mining.range_min': 5, 'mining.range_max': 5},
       'mining.range_max=5'),
      ('margin', {'mining.relative_margin': float('nan')},
       'mining.relative_margin=nan'),
      ('siglip', {'method': 'siglip', 'mining.negatives': 2},
       'mining.negatives=2: mined negatives join'),
      ('path', {'mining.path': 'x.npz'}, 'mining.negatives=0: must be > 0'),
      ('refresh', {'mining.every_steps': 10}, 'mining.every_steps=10: '
       'nothing to refresh'),
  )
  def test_validate_names_field_and_value(self, overrides, expected):
    config = clip_config.get_config()
    testing.set_fields(config, overrides)
    with self.assertRaises(checks.ConfigError) as cm:
      runner.validate(clip_mixup.FAMILY, config, num_devices=8)
    self.assertIn(expected, str(cm.exception))
    self.assertNotIn('\n', str(cm.exception))

  def test_presets_are_valid(self):
    for method in clip_mixup.METHODS:
      for stage in ('pretrain', 'both'):
        for data in ('shapes', 'coco', 'flickr30k'):
          runner.validate(clip_mixup.FAMILY, clip_config.get_config(
              f'method={method},stage={stage},data={data}'), num_devices=8)
    c = clip_config.get_config('smoke,method=m3mix,tower=vit')
    runner.validate(clip_mixup.FAMILY, c, num_devices=8)
    self.assertEqual((c.method, c.model.backbone), ('m3mix', 'vit_tiny'))
    with self.assertRaisesRegex(ValueError, "unknown tower preset 'vitt'"):
      clip_config.get_config('tower=vitt')

  def test_stage_both_plans_three_runs(self):
    c = clip_config.get_config('method=m3mix')
    runs = clip_mixup.plan(c, '/w')
    self.assertEqual([(n, r.method, r.stage, r.init_from, d)
                      for n, r, d in runs],
                     [('pretrain', 'clip', 'pretrain', '', '/w/pretrain'),
                      ('finetune_clip', 'clip', 'finetune', '/w/pretrain',
                       '/w/finetune_clip'),
                      ('finetune_m3mix', 'm3mix', 'finetune', '/w/pretrain',
                       '/w/finetune_m3mix')])
    pre = runs[0][1]
    self.assertTrue(pre.learn_temperature)
    self.assertEqual(pre.num_steps, c.pretrain.num_steps)
    self.assertLen(clip_mixup.plan(clip_config.get_config('method=clip'),
                                   '/w'), 2)

  def test_mine_needs_negatives_and_towers(self):
    for overrides, expected in [
        ({}, 'mining.negatives=0: must be > 0'),
        ({'mining.negatives': 2}, "init_from='': mining needs trained"),
        ({'mining.negatives': 2, 'init_from': '/r', 'mining.path': 'a.npz'},
         "mining.path='a.npz': is what training reads")]:
      config = clip_config.get_config()
      testing.set_fields(config, overrides)
      with self.assertRaisesRegex(checks.ConfigError, expected):
        clip_mixup.mine(config, os.path.join(tempfile.mkdtemp(), 'm.npz'))

  def test_mining_presets_apply_to_the_methods_run_only(self):
    for preset, every, batches in (('negatives=mined', 0, 'random'),
                                   ('negatives=dynamic', 50, 'random'),
                                   ('batches=topic', 0, 'topic')):
      c = clip_config.get_config(f'method=clip,{preset}')
      runner.validate(clip_mixup.FAMILY, c, num_devices=8)
      runs = clip_mixup.plan(c, '/w')
      self.assertEqual([n for n, _, _ in runs],
                       ['pretrain', 'finetune_clip', 'finetune_clip_mined'])
      mining = [(r.mining.negatives, r.mining.every_steps, r.mining.batches)
                for _, r, _ in runs]
      k = 0 if batches != 'random' else 4
      self.assertEqual(mining, [(0, 0, 'random')] * 2 + [(k, every, batches)])
      # The runs without mining are the study's without it (reused).
      plain = clip_mixup.plan(clip_config.get_config('method=clip'), '/w')
      self.assertEqual(runs[1][1].to_dict(), plain[1][1].to_dict())
    with self.assertRaisesRegex(ValueError, "unknown negatives preset 'hard'"):
      clip_config.get_config('negatives=hard')


class CaptionDataTest(absltest.TestCase):

  def test_long_captions_keep_the_end_token_and_empty_ones_are_named(self):
    d = paired.open_paired('shapes32/small', part='finetune',
                           context_length=6,
                           data_dir=testing.launcher_env()['HNJAX_DATA_DIR'])
    tokens = d.train.get_batch(np.arange(8), ('tokens',))['tokens']
    end = d.tokenizer.end_id
    self.assertEqual(tokens.shape, (8, 6))
    np.testing.assert_array_equal(tokens[:, -1], end)  # truncated, kept
    self.assertEqual(len(d.train), 900)  # the fine-tuning half
    self.assertEqual(len(d.val.images), 200)
    self.assertEqual(set(d.test.negatives), {'shape', 'colour', 'size',
                                             'position'})
    tok = text.WordTokenizer.from_captions(['a red star'], context_length=6)
    with self.assertRaisesRegex(ValueError, "coco test: caption 1 has no "
                                "words: '...'"):
      paired._tokenize(tok, ['a star', '...'], 'coco test')


  def test_real_captions_both_protocols(self):
    root = self.enter_context(tempfile.TemporaryDirectory())
    data_real_captions_test._write_flickr(root)
    d = paired.open_paired('flickr30k', context_length=12, data_dir=root,
                           image_size=8, vocab_size=300)
    self.assertLen(d.train, 3)  # one caption per training image
    batch = d.train.get_batch(np.arange(3))
    self.assertEqual(batch['image'].shape, (3, 8, 8, 3))
    self.assertEqual(batch['tokens'].shape, (3, 12))
    self.assertEqual(d.tokenizer.decode(batch['tokens'][0]).strip(),
                     'image 0, caption 0.')
    tokens, t2i = d.test.protocols['all']
    self.assertEqual(tokens.shape, (10, 12))
    np.testing.assert_array_equal(t2i, np.repeat([0, 1], 5))
    np.testing.assert_array_equal(d.test.protocols['first'][1], [0, 1])
    self.assertEqual(list(d.test.protocols), ['all', 'first'])
    self.assertEqual(d.test.negatives, {})


@pytest.mark.slow
class EndToEndTest(absltest.TestCase):

  def test_killed_study_resumes_to_the_same_state(self):
    root = tempfile.mkdtemp()
    ref_dir, run_dir = os.path.join(root, 'ref'), os.path.join(root, 'run')
    ref_proc = _launch(ref_dir, *_MINED_STUDY, wait=False)
    # Killed -9 at a random moment after a checkpoint of the m²-mix
    # fine-tuning (with mined negatives and cluster batches, refreshed at
    # steps 4 and 8): the pretraining and plain fine-tuning are finished,
    # and the stage must resume from its own checkpoint, not from
    # init_from, with the negatives and batches of the uninterrupted run.
    # (Resuming an ordinary run, as pretraining is: runner_test and the
    # MoCo test.)
    for stage in ('finetune_m2mix_mined',):
      proc = _launch(run_dir, *_MINED_STUDY, wait=False)
      path = os.path.join(run_dir, stage, 'checkpoints', '4')
      t0 = time.time()
      while not os.path.isdir(path):
        if proc.poll() is not None or time.time() - t0 > 300:
          raise AssertionError(f'no checkpoint: {proc.communicate()}')
        time.sleep(0.1)
      time.sleep(random.uniform(0.0, 0.5))
      proc.kill()
      proc.communicate()
    out, err = ref_proc.communicate(timeout=600)
    self.assertEqual(ref_proc.returncode, 0, err[-3000:])
    ref = testing.summary(out)
    for key in ('r1sum', 'hard_negative_acc', 'zeroshot_r1sum',
                'finetune_clip_r1sum', 'uniformity', 'modality_gap'):
      self.assertTrue(np.isfinite(float(ref[key])), key)
    # the comparison table
    self.assertIn('fine-tune (m2mix, 4 mined negatives, cluster batches)', out)
    for name in ('uniformity_alignment.png', 'recall_at_k.png',
                 'modality_gap.png', 'comparison.json',
                 'pretrain/loss.png', 'finetune_m2mix_mined/r1sum.png'):
      self.assertTrue(os.path.exists(os.path.join(ref_dir, name)), name)

    code, out, err = _launch(run_dir, *_MINED_STUDY)
    self.assertEqual(code, 0, err[-3000:])
    self.assertEqual(testing.summary(out)['state_fingerprint'],
                     ref['state_fingerprint'])

    # The static driver mines the fine-tuning pairs with the pretrained
    # towers (the launcher ignores --workdir).
    records_path = os.path.join(root, 'records', 'mined.npz')
    code, out, err = testing.launch(
        'launch.mine', root, '--config=configs/clip_mixup.py:smoke,'
        'negatives=mined', f'--config.init_from={ref_dir}/pretrain',
        f'--out={records_path}')
    self.assertEqual(code, 0, err[-3000:])
    self.assertIn('pairs=900 negatives=4 found=', out)
    records = mined.Mined.load(records_path)
    self.assertEqual(records.negatives.shape, (900, 4))
    found = records.negatives >= 0
    self.assertGreater(found.mean(), 0.99)  # the margin drops a few
    self.assertFalse(np.any(records.negatives == np.arange(900)[:, None]))
    s = np.where(found, records.scores, -2.0)
    self.assertTrue(np.all(np.diff(s, axis=1) <= 0))  # best first

    # init_from: missing, incompatible towers, corrupted: one line naming
    # the path (and the parameter); checked before anything is written.
    pre = os.path.join(ref_dir, 'pretrain')
    bad = os.path.join(root, 'corrupt')
    os.makedirs(os.path.join(bad, 'checkpoints', '4', 'state'))
    with open(os.path.join(bad, 'checkpoints', '4', 'state', '_METADATA'),
              'w') as f:
      f.write('{not json')
    for overrides, expected in [
        ({'init_from': pre, 'text.depth': 2}, 'params/text_tower/block_1'),
        ({'init_from': pre, 'model.embed_dim': 16},
         'params/image_projection/kernel has shape [128, 32]'),
        ({'init_from': bad}, bad),
    ]:
      config = clip_config.get_config('smoke,stage=finetune')
      config.data.data_dir = testing.launcher_env()['HNJAX_DATA_DIR']
      testing.set_fields(config, overrides)
      with self.assertRaises(checks.ConfigError) as cm:
        clip_mixup.prepare(config)
      self.assertIn(f'init_from={overrides["init_from"]!r}',
                    str(cm.exception))
      self.assertIn(expected, str(cm.exception))
      self.assertNotIn('\n', str(cm.exception))
    # A relative init_from works (Orbax itself needs absolute paths).
    config = clip_config.get_config('smoke,stage=finetune')
    config.data.data_dir = testing.launcher_env()['HNJAX_DATA_DIR']
    config.init_from = os.path.relpath(pre)
    clip_mixup.prepare(config)
    # The launcher: one line, exit 2, no workdir.
    workdir = os.path.join(root, 'bad')
    code, _, err = _launch(
        workdir, '--config=configs/clip_mixup.py:smoke,stage=finetune',
        f'--config.init_from={root}/nothing')
    self.assertEqual(code, 2, err)
    lines = [l for l in err.splitlines() if l.strip()]
    self.assertLen(lines, 1, err)
    self.assertTrue(lines[0].startswith('hnjax: error: init_from='),
                    lines[0])
    self.assertIn(f'{root}/nothing', lines[0])
    self.assertFalse(os.path.exists(workdir))


class PretrainedConfigTest(parameterized.TestCase):
  """init=...: the checkpoint decides the towers; mistakes are one line."""

  def _config(self, arg='init=pretrained,smoke', **overrides):
    config = clip_config.get_config(arg)
    config.init_path = _TINY_CLIP
    testing.set_fields(config, overrides)
    return config

  def test_presets_follow_the_papers_protocol(self):
    for data in ('shapes', 'coco', 'flickr30k'):
      for init in ('clip_vit_b32', 'clip_vit_b16', 'pretrained'):
        c = self._config(f'data={data},init={init}')
        runner.validate(clip_mixup.FAMILY, c, num_devices=8)
        self.assertEqual(
            (c.batch_size, c.num_epochs, c.optim.name,
             c.optim.learning_rate, c.optim.weight_decay,
             c.optim.warmup_fraction, c.temperature, c.m2mix.temperature,
             c.learn_temperature, c.seed),
            (128, 9, 'adamw', 1e-5, 0.2, 0.1, 0.01, 0.07, False, 1))
    with self.assertRaisesRegex(ValueError, "unknown init preset 'vit_l'"):
      clip_config.get_config('init=vit_l')

  @parameterized.named_parameters(
      ('missing', {'init_path': '/nope'},
       "init_path='/nope': /nope/config.json: not found"),
      ('both_inits', {'init_from': '/runs/pre'},
       "init_from='/runs/pre': init_path is set too"),
      ('pretrain', {'stage': 'pretrain'}, "stage='pretrain': init_path"),
      ('context', {'text.context_length': 77},
       'text.context_length=77: the checkpoint has 16 text positions'),
      ('dtype', {'model.dtype': 'float16'}, "model.dtype='float16'"),
  )
  def test_mistakes_name_field_and_value(self, overrides, expected):
    with self.assertRaises(checks.ConfigError) as cm:
      runner.validate(clip_mixup.FAMILY, self._config(**overrides),
                      num_devices=8)
    self.assertIn(expected, str(cm.exception))
    self.assertNotIn('\n', str(cm.exception))

  def test_zero_shot_then_two_fine_tunings_from_the_checkpoint(self):
    runs = clip_mixup.plan(self._config(), '/w')
    self.assertEqual(
        [(n, r.method, r.stage, r.init_from, r.init_path, d)
         for n, r, d in runs],
        [('zeroshot', 'clip', 'finetune', '', _TINY_CLIP, '/w/zeroshot'),
         ('finetune_clip', 'clip', 'finetune', '', _TINY_CLIP,
          '/w/finetune_clip'),
         ('finetune_m2mix', 'm2mix', 'finetune', '', _TINY_CLIP,
          '/w/finetune_m2mix')])

  def test_data_takes_the_checkpoints_tokenizer_and_normalisation(self):
    config = self._config()
    config.data.data_dir = testing.launcher_env()['HNJAX_DATA_DIR']
    info = clip_mixup.open_data(config).info
    self.assertEqual(info.tokenizer.context_length, 16)
    self.assertEqual(info.tokenizer.vocab_size, 714)
    self.assertEqual(info.mean, (0.48145466, 0.4578275, 0.40821073))
    tokens = info.train.get_batch(np.arange(2), ('tokens',))['tokens']
    self.assertTrue(np.all(tokens[:, 0] == info.tokenizer.start_id))
    # A checkpoint whose tensors do not fit its config: before any write.
    bad = tempfile.mkdtemp()
    for f in os.listdir(_TINY_CLIP):
      os.symlink(os.path.join(_TINY_CLIP, f), os.path.join(bad, f))
    os.remove(os.path.join(bad, 'config.json'))
    with open(os.path.join(_TINY_CLIP, 'config.json')) as f:
      text_ = f.read().replace('"intermediate_size": 64', '"intermediate_size"'
                               ': 48', 1)
    with open(os.path.join(bad, 'config.json'), 'w') as f:
      f.write(text_)
    config.init_path = bad
    with self.assertRaisesRegex(checks.ConfigError,
                                r'init_path=.*model\.safetensors: '
                                r'text_model\.encoder\.layers\.0\.mlp\.fc1'):
      clip_mixup.prepare(config)

  def test_zero_shot_is_evaluated_once(self):
    config = clip_mixup.plan(self._config(), '/w')[0][1]
    config.unlock()
    config.data.data_dir = testing.launcher_env()['HNJAX_DATA_DIR']
    workdir = tempfile.mkdtemp()
    summary = clip_mixup.zero_shot(config, workdir)
    self.assertEqual((summary['step'], summary['interrupted']), (0, False))
    self.assertTrue(np.isfinite(summary['r1sum']))
    self.assertTrue(os.path.exists(os.path.join(workdir,
                                                'test_embeddings.npz')))
    with mock.patch.object(clip_mixup, 'build', side_effect=AssertionError):
      self.assertEqual(clip_mixup.zero_shot(config, workdir), summary)
      config.seed = 2  # another config: evaluated again
      with self.assertRaises(AssertionError):
        clip_mixup.zero_shot(config, workdir)


@pytest.mark.slow
class PretrainedEndToEndTest(absltest.TestCase):

  def test_fine_tunes_the_tiny_checkpoint_and_resumes_exactly(self):
    root = tempfile.mkdtemp()
    # bf16 compute (float32 parameters and logits), as on accelerators.
    preset = '--config=configs/clip_mixup.py:init=pretrained,smoke,method=clip'
    flags = [f'--config.init_path={_TINY_CLIP}',
             '--config.eval.every_steps=0', '--config.model.dtype=bfloat16']
    # The study: zero-shot, then CLIP fine-tuned from the checkpoint (with
    # method=m2mix a third stage, the same code path).
    study = os.path.join(root, 'study')
    code, out, err = _launch(study, preset, *flags)
    self.assertEqual(code, 0, err[-3000:])
    ref = testing.summary(out)
    self.assertIn('zero-shot', out)
    self.assertTrue(np.isfinite(float(ref['zeroshot_r1sum'])))
    with open(os.path.join(study, 'zeroshot', 'summary.json')) as f:
      self.assertIn('r1sum', f.read())
    # The fine-tuning alone, killed after a checkpoint, then resumed: the
    # same state as the study's.
    alone = os.path.join(root, 'alone')
    flags.insert(0, preset + ',stage=finetune')
    proc = _launch(alone, *flags, wait=False)
    t0 = time.time()
    while not os.path.isdir(os.path.join(alone, 'checkpoints', '4')):
      if proc.poll() is not None or time.time() - t0 > 300:
        raise AssertionError(f'no checkpoint: {proc.communicate()}')
      time.sleep(0.1)
    proc.kill()
    proc.communicate()
    self.assertFalse(os.path.isdir(os.path.join(alone, 'checkpoints', '12')))
    code, out, err = _launch(alone, *flags)
    self.assertEqual(code, 0, err[-3000:])
    self.assertEqual(testing.summary(out)['state_fingerprint'],
                     ref['state_fingerprint'])

if __name__ == '__main__':
  absltest.main()
