r"""MoCo v2 (He et al. 2020; Chen et al. 2020), the baseline of MoCHi.

Papers: https://arxiv.org/abs/1911.05722, https://arxiv.org/abs/2003.04297

Run (the embedded shapes data; 2-core CPU, see README for the numbers):

  python -m launch.moco --config=configs/moco_v2.py --workdir=runs/moco_v2

Presets after the colon, comma separated:

  data=shapes|digits|cifar10|cifar100|imagenet100|imagenet
  model=convnet|resnet18_cifar|resnet50_cifar|resnet50|...
  dtype=float32|bfloat16  compute dtype (default: bfloat16 for the
             accelerator datasets cifar10, cifar100, imagenet100,
             imagenet; float32 for shapes and digits, run on CPUs)
  smoke      a tiny run (under a minute on one CPU) that still writes
             several checkpoints, for tests and for trying things out.

Expected results:
  data=shapes   convnet, 12 epochs, batch 256, K=2048, T=0.1, key view from
                alt_image (the same shape over another background): MoCHi
                kNN top-1 0.4875 (shape 0.49, colour 0.999) and linear probe
                0.471 in under 4 minutes on a 2-core x86-64 CPU VM; the
                untrained encoder 0.2225 / 0.252, raw pixels 0.2565 / 0.3055,
                chance 0.05 (README, "Results"). MoCo v2 against MoCHi over 5
                seeds: `launch/mochi_study.py`.
  data=cifar10  ResNet-18, 200 epochs, batch 512: the official MoCo CIFAR demo
                reports kNN 82.6 (asymmetric loss); not run here (no GPU).
  data=imagenet ResNet-50, 200 epochs, batch 256 on 8 accelerators: 67.5
                linear top-1 in the MoCo repository; not run here.
"""

import ml_collections as mlc

from configs import common

# Per-dataset recipes. CIFAR follows the official MoCo CIFAR-10 demo
# (facebookresearch/moco colab-notebook branch), ImageNet-100 the MoCHi
# configuration of MaugrimEP/MocoAndMochi, ImageNet MoCo v2.
_DATA = {
    # Small objects whose colour is half the label: view k from alt_image
    # (the same shape over another background; without it both views share
    # their background, which alone pairs them), crops of >= 90% (smaller
    # ones cut the shape off), hue jitter 0.05 (less than the 55 degrees
    # between colour classes), no grayscale. README, "Results".
    'shapes': dict(
        name='shapes32', image_size=32, backbone='convnet', batch_size=256,
        num_epochs=12, queue_size=2048, temperature=0.1, momentum=0.99,
        learning_rate=0.06, weight_decay=5e-4, blur_prob=0.0,
        scale_min=0.9, hue=0.05, grayscale_prob=0.0,
        mochi=(128, 128, 32), mochi_warmup_epochs=1, probe_epochs=30,
        key_image='alt_image', knn_factors='shape,colour'),
    # 8x8 digits: a flip or a crop to 20% of the area makes another digit
    # (or none); no flips, crops of at least 60%.
    'digits': dict(
        name='digits', image_size=8, backbone='convnet', batch_size=128,
        flip_prob=0.0, scale_min=0.6,
        num_epochs=60, queue_size=1024, temperature=0.2, momentum=0.99,
        learning_rate=0.06, weight_decay=5e-4, blur_prob=0.0,
        mochi=(64, 64, 32), mochi_warmup_epochs=5, probe_epochs=50),
    'cifar10': dict(
        name='cifar10', image_size=32, backbone='resnet18_cifar',
        dtype='bfloat16',
        batch_size=512, num_epochs=200, queue_size=4096, temperature=0.1,
        momentum=0.99, learning_rate=0.06, weight_decay=5e-4, blur_prob=0.0,
        mochi=(512, 512, 128), mochi_warmup_epochs=10, probe_epochs=100),
    'cifar100': dict(
        name='cifar100', image_size=32, backbone='resnet18_cifar',
        dtype='bfloat16',
        batch_size=512, num_epochs=200, queue_size=4096, temperature=0.1,
        momentum=0.99, learning_rate=0.06, weight_decay=5e-4, blur_prob=0.0,
        mochi=(512, 512, 128), mochi_warmup_epochs=10, probe_epochs=100),
    'imagenet100': dict(
        name='imagenet100', image_size=224, backbone='resnet50',
        dtype='bfloat16',
        batch_size=128, num_epochs=200, queue_size=16384, temperature=0.2,
        momentum=0.999, learning_rate=0.03, weight_decay=1e-4, blur_prob=0.5,
        mochi=(1024, 1024, 128), mochi_warmup_epochs=10, probe_epochs=100,
        diagnostics=False),
    'imagenet': dict(
        name='imagenet2012', image_size=224, backbone='resnet50',
        dtype='bfloat16',
        batch_size=256, num_epochs=200, queue_size=65536, temperature=0.2,
        momentum=0.999, learning_rate=0.03, weight_decay=1e-4, blur_prob=0.5,
        mochi=(1024, 512, 256), mochi_warmup_epochs=10, probe_epochs=100,
        diagnostics=False),
}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The MoCo v2 config; ``arg`` selects presets (see the module docstring)."""
  return build(arg, method='moco_v2')


def build(arg: str | None, method: str) -> mlc.ConfigDict:
  """Shared by moco_v2.py and mochi.py (they differ in ``method``)."""
  arg = common.parse_arg(arg, data='shapes', model='', smoke=False,
                         hardness_range=False, dtype='')
  if arg.data not in _DATA:
    raise ValueError(f'unknown data preset {arg.data!r}; known: '
                     f'{", ".join(_DATA)}')
  d = _DATA[arg.data]
  c = common.base(method=method,  # 'moco_v2' or 'mochi'
                  batch_size=d['batch_size'], num_epochs=d['num_epochs'],
                  temperature=d['temperature'])
  c.momentum = d['momentum']  # of the key encoder (EMA)
  c.shuffle_bn = True  # permute the key batch across BN groups (§2.4)

  c.data = common.data(
      d['name'], image_size=d['image_size'],
      load_size=0,  # ImageNet: host-side square before the crop (0: 256)
      classes='')  # imagenet100: comma-separated synsets ('' = CMC list)
  # The source field that view k is augmented from: 'image' (MoCo), or on
  # shapes32 'alt_image', the same shape over another background (without
  # it the two views share their background, and matching backgrounds
  # solves the pretext task without reading the shape).
  c.data.key_image = d.get('key_image', 'image')

  c.model = mlc.ConfigDict(dict(
      backbone=arg.model or d['backbone'], head='mlp', dim=128,
      hidden=0,  # 0: the backbone's feature width, as MoCo v2
      bn_splits=8,  # BN statistics per group of B/8: shuffle-BN emulation
      # Compute dtype: 'bfloat16' (the accelerator presets) keeps float32
      # parameters, optimizer state, BN statistics and logits.
      dtype=arg.dtype or d.get('dtype', 'float32')))

  c.queue = mlc.ConfigDict(dict(
      size=d['queue_size'],
      mask_same_id=True,  # drop the query's own earlier keys (§8.1)
      block_size=-1))  # bank rows per block: -1 auto, 0 dense

  num_hard, num_mix, num_query_mix = d['mochi']
  c.mochi = mlc.ConfigDict(dict(
      num_hard=num_hard, num_mix=num_mix, num_query_mix=num_query_mix,
      warmup_epochs=d['mochi_warmup_epochs'],  # plain MoCo before mixing
      # Hardness range (a false-negative remedy): never mix the skip_top
      # hardest negatives nor any more similar than max_similarity (>= 1:
      # no ceiling, unit vectors never exceed it).
      skip_top=0, max_similarity=1.0,
      # 'exact' top-k, or 'approx': jax.lax.approx_max_k at recall_target
      # (TPU's fast path; CPU/GPU compute it exactly). The recall achieved
      # is logged per step (selection_recall).
      selection='exact', recall_target=0.95))
  # Per step, with the labels the queue keeps: the share of the
  # mochi.num_hard hardest negatives that have the query's label (false
  # negatives; with a hardness range also of the mixed ones) and the
  # positive's median rank among all candidates. One more pass over the
  # queue per step (off for the 65k-key ImageNet queues).
  c.hardness_diagnostics = d.get('diagnostics', True)
  if arg.hardness_range:  # skip the K / 100 hardest and any above 0.9
    c.mochi.skip_top = max(d['queue_size'] // 100, 1)
    c.mochi.max_similarity = 0.9

  c.optim = common.optim(
      name='sgd',  # or 'lars'
      learning_rate=d['learning_rate'],  # for a batch of lr_base_batch
      lr_base_batch=256 if arg.data.startswith('imagenet') else (
          d['batch_size']),
      weight_decay=d['weight_decay'])  # schedule 'cosine' or 'constant'

  c.augment = mlc.ConfigDict(dict(
      scale_min=d.get('scale_min', 0.2), flip_prob=d.get('flip_prob', 0.5),
      jitter_prob=0.8,
      jitter_strength=0.4, hue=d.get('hue', 0.1),
      grayscale_prob=d.get('grayscale_prob', 0.2), blur_prob=d['blur_prob']))

  c.eval = common.evaluation(
      during='knn', final='knn,linear',  # evaluator names, comma separated
      knn_k=200, knn_temperature=0.1,  # InstDisc protocol
      features='backbone',  # or 'projection'
      probe_epochs=d['probe_epochs'],
      # Label factors also scored by kNN (knn_shape_top1, ...): on shapes32
      # which half of the label the features carry.
      knn_factors=d.get('knn_factors', ''),
      # At the end, the same evaluators on the untrained encoder and on raw
      # pixels (untrained_knn_top1, raw_pixel_knn_top1, ...).
      baselines=True,
      # At the end: alignment and uniformity (Wang & Isola) of two training
      # views of each test image, on the unit projections.
      geometry=True)
  common.add_logging(c)

  if arg.smoke:
    c.data.name = 'shapes32/small' if d['name'] == 'shapes32' else c.data.name
    c.batch_size = 64
    c.num_epochs = 1
    c.num_steps = 24
    c.queue.size = 512
    c.mochi.num_hard, c.mochi.num_mix, c.mochi.num_query_mix = 32, 16, 8
    c.mochi.warmup_epochs = 0
    c.model.dim = 32
    c.log_every_steps = 4
    c.hist_every_steps = 8
    c.ckpt.every_steps = 6
    c.eval.every_steps = 12
    c.eval.probe_epochs = 5
    c.eval.baselines = False
    c.eval.geometry = False
  return c
