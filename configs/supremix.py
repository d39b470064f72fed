r"""SupReMix and its baselines: contrastive regression, one command per row.

Paper: Wu et al., "Mixup Your Own Pairs" (SupReMix), 2023,
https://arxiv.org/abs/2309.16633 (ALGORITHMS.md §4; baselines §9: SupCon,
Rank-N-Contrast). Every method trains the same backbone for the same
number of steps and is read out by the same linear regression probe on
frozen features (best validation epoch), next to the same probe on an
untrained encoder and on raw inputs.

Run (the launcher's default: SupReMix on shapes32's shape size):

  python -m launch.supremix
  python -m launch.supremix --config=configs/supremix.py:method=supcon
  python -m launch.supremix --config=configs/supremix.py:method=rnc
  python -m launch.supremix --config=configs/supremix.py:method=l1

Presets after the colon, comma separated:

  method=supremix|supcon|rnc|l1
  data=shapes|diabetes|shapes3d|dsprites|agedb|imdb_wiki|folder
  target=<name>   shapes: size|angle|x|y; shapes3d: scale|orientation|
                  floor_hue|wall_hue|object_hue; dsprites: scale|
                  orientation|x_position|y_position; folder: a CSV column
  smoke           a tiny run (under a minute on one CPU) writing several
                  checkpoints; combines with the others:
                  configs/supremix.py:smoke,method=rnc

Expected results (README, "SupReMix: contrastive regression", 3 seeds;
2-core x86-64 CPU VM, about 1.5 minutes per run): data=shapes predicts the
size of the shape (4.5-12 px) from a convnet trained for 600 steps at batch
128 (256 views); the training split is long-tailed (DIR style), validation
and test are balanced. Probe test MAE: supremix 1.30 +- 0.02 px, supcon
1.30 +- 0.03, rnc 1.31 +- 0.04, l1 1.19 +- 0.03 (untrained encoder 2.03, raw
pixels 2.55); few-shot MAE 1.84, 1.89, 1.88, 1.60.

  data=agedb     the authors' AgeDB-DIR recipe (ResNet-50 from scratch,
                 224 px, batch 128, Adam 1e-3, 100 epochs, x0.1 at epoch 80,
                 T=0.5, window 5; probe Adam 0.1, batch 16, 100 epochs):
                 MAE 7.12 in the authors' repository; not run here (needs
                 a GPU). Put agedb.csv (YyzHarry/imbalanced-regression)
                 and the AgeDB/ image folder in --config.data.data_dir.
  data=imdb_wiki the same with T=0.3 and batch 64.
  data=folder    your data: --config.data.csv=path/to/file.csv with the
                 columns path, split (train/val/test) and the target
                 (--config.data.target=<column>).
"""

import ml_collections as mlc

from configs import common

# Per-dataset recipes. Augmentations must keep the target: no crops that
# rescale when the target is a size, no flips when it is a position or an
# angle, no hue jitter when it is a hue.
_DATA = {
    'shapes': dict(
        name='shapes32', image_size=32, backbone='convnet', batch_size=128,
        num_steps=600, temperature=0.5, window=0.4, learning_rate=1e-3,
        knn_k=20, probe=(30, 64, 1e-2)),
    'diabetes': dict(
        name='diabetes', image_size=0, backbone='mlp', batch_size=64,
        num_steps=400, temperature=0.5, window=10.0, learning_rate=1e-3,
        knn_k=10, probe=(100, 16, 1e-2)),
    'shapes3d': dict(
        name='shapes3d', image_size=64, backbone='convnet', batch_size=128,
        num_epochs=10, temperature=0.5, window=0.05, learning_rate=1e-3,
        knn_k=20, probe=(30, 64, 1e-2)),
    'dsprites': dict(
        name='dsprites', image_size=64, backbone='convnet', batch_size=128,
        num_epochs=10, temperature=0.5, window=0.05, learning_rate=1e-3,
        knn_k=20, probe=(30, 64, 1e-2)),
    'agedb': dict(
        name='agedb', image_size=224, backbone='resnet50', batch_size=128,
        num_epochs=100, temperature=0.5, window=5.0, learning_rate=1e-3,
        knn_k=20, probe=(100, 16, 0.1), authors_augment=True),
    'imdb_wiki': dict(
        name='imdb_wiki', image_size=224, backbone='resnet50', batch_size=64,
        num_epochs=100, temperature=0.3, window=5.0, learning_rate=1e-3,
        knn_k=20, probe=(100, 16, 0.1), authors_augment=True),
    'folder': dict(
        name='folder', image_size=224, backbone='resnet50', batch_size=128,
        num_epochs=100, temperature=0.5, window=5.0, learning_rate=1e-3,
        knn_k=20, probe=(100, 16, 0.1), authors_augment=True),
}
# Targets that a horizontal flip changes, and those hue jitter changes.
_FLIP_CHANGES = ('x', 'angle', 'orientation', 'x_position')
_HUE_TARGETS = ('floor_hue', 'wall_hue', 'object_hue')


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The SupReMix config; ``arg`` selects presets (module docstring)."""
  arg = common.parse_arg(arg, method='supremix', data='shapes', target='',
                         smoke=False)
  if arg.data not in _DATA:
    raise ValueError(f'unknown data preset {arg.data!r}; known: '
                     f'{", ".join(_DATA)}')
  d = _DATA[arg.data]
  c = common.base(method=arg.method,  # supremix, supcon, rnc or l1
                  batch_size=d['batch_size'],  # examples; 2x views
                  num_epochs=d.get('num_epochs', 1),
                  # Rank-N-Contrast's own temperature for its distances.
                  temperature=2.0 if arg.method == 'rnc' else d['temperature'])
  c.num_steps = d.get('num_steps', -1)

  c.data = common.data(
      d['name'],
      target=arg.target,  # '' for the dataset's first target
      image_size=d['image_size'],
      load_size=0,  # image folders: host-side square (0: 224)
      csv='',  # data=folder (or agedb/imdb_wiki elsewhere): the CSV file
      image_root='',  # where the CSV's paths start ('' = its folder)
      long_tail=5.0,  # shapes32: exp(-long_tail * t) keeps the tail rare
      bin_width=0.0)  # target bin of the shot groups (0: the default)

  c.model = mlc.ConfigDict(dict(
      backbone=d['backbone'],
      head='mlp_bn',  # SupReMix's Linear-BN-ReLU-Linear-BN
      dim=128, hidden=0,  # 0: the backbone's feature width
      dtype='float32'))

  c.supremix = mlc.ConfigDict(dict(
      window=d['window'],  # ε in target units: hard-positive partners
      beta=(2.0, 8.0),  # Beta of the anchor weight of hard negatives
      distance_weighting='l1_inv',  # w = |Δy| + 1; or 'l2_inv', 'none'
      mix_negatives=True, mix_positives=True,
      variant='clean'))  # or 'authors': what their code computes (§4.6)
  c.supcon = mlc.ConfigDict(dict(bin_width=0.0))  # 0: data.bin_width

  c.optim = common.optim(
      name='adam', learning_rate=d['learning_rate'],
      lr_base_batch=d['batch_size'], weight_decay=0.0, schedule='step')
  c.optim.decay_at = (0.8,)  # x0.1 at 80% of the run, as the authors

  target = arg.target
  authors = d.get('authors_augment', False)
  c.augment = mlc.ConfigDict(dict(
      scale_min=0.2 if authors else 1.0,  # 1: no crop (sizes stay sizes)
      flip_prob=0.0 if target in _FLIP_CHANGES else 0.5,
      jitter_prob=0.8, jitter_strength=0.4,
      hue=0.0 if (target in _HUE_TARGETS or not authors) else 0.1,
      grayscale_prob=0.2 if authors and target not in _HUE_TARGETS else 0.0,
      blur_prob=0.0,
      noise=0.1, dropout=0.1))  # tabular views: noise and feature dropout

  epochs, batch, lr = d['probe']
  c.eval = common.evaluation(
      during='knn_mae', final='regression',
      knn_k=d['knn_k'], probe_epochs=epochs, probe_batch_size=batch,
      probe_learning_rate=lr,
      baselines=True)  # the probe on an untrained encoder and raw inputs
  common.add_logging(c)

  if arg.smoke:
    c.data.name = 'shapes32/small' if d['name'] == 'shapes32' else c.data.name
    c.batch_size = 32
    c.num_steps = 24
    c.model.dim = 32
    c.log_every_steps = 4
    c.hist_every_steps = 8
    c.ckpt.every_steps = 6
    c.eval.every_steps = 12
    c.eval.probe_epochs = 5
  return c
