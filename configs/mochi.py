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
             the likeliest false negatives).
  ablation=NAME  one arm of the MoCHi-vs-MoCo study (ABLATIONS below:
             moco_v2, mochi, half_N, double_N, half_s, double_s,
             double_s_prime, no_warmup, long_warmup, type1_only,
             type2_only, hardness_range); `launch/mochi_study.py` runs
             them over seeds and writes the table.

Defaults per dataset (see configs/moco_v2.py for the rest of the recipe):
  shapes       MoCHi(128, 128, 32), K=2048, 1 warm-up epoch of plain MoCo,
               12 epochs: kNN top-1 0.4875, linear probe 0.471 (seed 0) in
               under 4 minutes on a 2-core x86-64 CPU VM. At 8 epochs over 5
               seeds (launch/mochi_study.py, README): MoCHi 0.441 kNN, MoCo
               v2 0.453 (paired difference -0.012 +- 0.003), type-1 mixes
               only 0.458 (+0.005 +- 0.003); linear probes equal; proxy-task
               accuracy 0.23 against 0.50.
  imagenet100  MoCHi(1024, 1024, 128), K=16384, 10 warm-up epochs, 200 epochs
               (MaugrimEP/MocoAndMochi); the paper reports about +1 point
               over MoCo v2 (unverified, ALGORITHMS.md §7.2); not run here.
  imagenet     MoCHi(1024, 512, 256), K=65536; not run here.
"""

import ml_collections as mlc

from configs import moco_v2


# The MoCHi paper's ablations (Kalantidis et al. 2020, Table 2 and Fig. 4),
# and the hardness range, relative to the data preset's MoCHi(N, s, s'):
# name -> (what changes, how). `launch/mochi_study.py` runs them over seeds.
def _set(**fields):
  def apply(c):
    for name, value in fields.items():
      if name == 'method':
        c.method = value
      else:
        c.mochi[name] = value(c) if callable(value) else value
  return apply


ABLATIONS = {
    'moco_v2': ('MoCo v2, no mixing (the baseline)', _set(method='moco_v2')),
    'mochi': ("MoCHi(N, s, s') of the data preset", _set()),
    'half_N': ('N / 2 hardest negatives', _set(
        num_hard=lambda c: c.mochi.num_hard // 2)),
    'double_N': ('2 N hardest negatives', _set(
        num_hard=lambda c: 2 * c.mochi.num_hard)),
    'half_s': ('s / 2 type-1 mixes', _set(
        num_mix=lambda c: c.mochi.num_mix // 2)),
    'double_s': ('2 s type-1 mixes', _set(
        num_mix=lambda c: 2 * c.mochi.num_mix)),
    'double_s_prime': ("2 s' type-2 mixes", _set(
        num_query_mix=lambda c: 2 * c.mochi.num_query_mix)),
    'no_warmup': ('mixing from the first step', _set(warmup_epochs=0)),
    'long_warmup': ('4x the warm-up epochs of plain MoCo', _set(
        warmup_epochs=lambda c: 4 * c.mochi.warmup_epochs)),
    'type1_only': ("type-1 mixes only (s' = 0)", _set(num_query_mix=0)),
    'type2_only': ('type-2 mixes only (s = 0)', _set(num_mix=0)),
    'hardness_range': ('skip the K/100 hardest and any above 0.9', _set(
        skip_top=lambda c: max(c.queue.size // 100, 1),
        max_similarity=0.9)),
}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The MoCHi config; ``arg`` selects presets (see the module docstring)."""
  items = [a for a in (arg or '').split(',') if a]
  ablation = [a for a in items if a.partition('=')[0].strip() == 'ablation']
  c = moco_v2.build(','.join(a for a in items if a not in ablation),
                    method='mochi')
  if ablation:
    name = ablation[-1].partition('=')[2].strip()
    if name not in ABLATIONS:
      raise ValueError(f'unknown ablation {name!r}; known: '
                       f'{", ".join(ABLATIONS)}')
    ABLATIONS[name][1](c)
  return c
