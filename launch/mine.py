r"""Mines hard negative captions for a CLIP-mixup training set (static).

  python -m launch.clip_mixup --config=configs/clip_mixup.py:stage=pretrain \
      --workdir=runs/pretrain                    # towers to mine with
  python -m launch.mine --config=configs/clip_mixup.py:negatives=mined \
      --config.init_from=runs/pretrain --out=runs/mined.npz
  python -m launch.clip_mixup \
      --config=configs/clip_mixup.py:stage=finetune,method=clip,negatives=mined \
      --config.init_from=runs/pretrain --config.mining.path=runs/mined.npz \
      --workdir=runs/finetune_mined

Embeds every fine-tuning pair with ``init_from``'s towers (or a pretrained
CLIP's, ``--config.init_path``), mines each image's ``mining.negatives``
hardest captions among all the training captions with
`hnjax.mining.mine_hard_negatives` and ``mining.*``'s false-negative
filters, and writes them (`hnjax.data.mined.Mined`). The logic is
`hnjax.train.clip_mixup.mine` (callable from Colab). A bad flag, field or
path prints one line and exits with status 2, writing nothing.
"""

import os

from absl import app
from absl import flags
from absl import logging

from launch import common

_OUT = flags.DEFINE_string('out', None, 'The .npz of mined negatives to '
                           'write (read back by --config.mining.path).')


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from hnjax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize(enabled=common.DISTRIBUTED.value)
  from hnjax.train import clip_mixup  # pylint: disable=g-import-not-at-top
  config = common.load_config()
  if not _OUT.value:
    common.error('--out: where to write the mined negatives (an .npz)')
  out = os.path.abspath(_OUT.value)
  parent = os.path.dirname(out)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if os.path.isdir(out) or not os.access(parent, os.W_OK):
    common.error(f'--out={_OUT.value}: not a writable file path')
  logging.set_verbosity(logging.ERROR)  # tfds warns about missing files
  try:
    summary = clip_mixup.mine(config, out)
  except (ValueError, FileNotFoundError) as e:
    common.error(' '.join(str(e).split()))
  print(f'hnjax: wrote {out}')
  print(' '.join(f'{k}={common.format_value(v)}' for k, v in summary.items()),
        flush=True)


if __name__ == '__main__':
  app.run(_main, flags_parser=lambda argv: common.parse_flags(
      argv, 'configs/clip_mixup.py'))
