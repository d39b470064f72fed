r"""MoCHi: MoCo v2 with hard negative mixing (Kalantidis et al., NeurIPS 2020).

Paper: https://arxiv.org/abs/2010.01028 (no official code; ALGORITHMS.md §3).
Notation MoCHi(N, s, s'): N hardest queue negatives per query, s type-1
mixes of two of them, s' type-2 mixes of the query with one of them.

Run (the launcher's default; the embedded shapes data on a 2-core CPU):

  python -m launch.moco
  python -m launch.moco --config=configs/mochi.py --workdir=runs/mochi

Presets after the colon, comma separated:

  data=shapes|digits|cifar10|cifar100|imagenet100|imagenet
  model=convnet|resnet18_cifar|resnet50_cifar|resnet50|...
  smoke      a tiny run (under a minute on one CPU) writing several
             checkpoints.
  hardness_range  mix a hardness range instead of the very hardest
             negatives: skip the K/100 most similar, and any above a
             similarity of 0.9 (mochi.skip_top, mochi.max_similarity;
             the likeliest false negatives). Not yet studied.

Defaults per dataset (see configs/moco_v2.py for the rest of the recipe):
  shapes       MoCHi(128, 128, 32), K=2048, 1 warm-up epoch of plain MoCo,
               8 epochs: kNN top-1 0.286 +- 0.002, linear probe 0.339 +-
               0.010 (3 seeds; MoCo v2 0.284 / 0.340 at the same budget), in
               about 2.5 minutes on a 2-core x86-64 CPU VM; proxy-task
               accuracy drops from 0.62 (MoCo v2) to 0.25.
  imagenet100  MoCHi(1024, 1024, 128), K=16384, 10 warm-up epochs, 200 epochs
               (MaugrimEP/MocoAndMochi); the paper reports about +1 point
               over MoCo v2 (unverified, ALGORITHMS.md §7.2); not run here.
  imagenet     MoCHi(1024, 512, 256), K=65536; not run here.
"""

import ml_collections as mlc

from configs import moco_v2


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The MoCHi config; ``arg`` selects presets (see the module docstring)."""
  return moco_v2.build(arg, method='mochi')
