r"""MoCo v2 / MoCHi launcher: flags -> config -> train_and_evaluate.

  python -m launch.moco                                  # MoCHi on shapes32
  python -m launch.moco --config=configs/moco_v2.py --workdir=runs/moco_v2
  python -m launch.moco --config=configs/mochi.py:data=cifar10 \
      --config.data.data_dir=/data/tensorflow_datasets --workdir=runs/c10

Re-running the same command resumes from the workdir. On every host of a TPU
pod (or a multi-node GPU job) run the same command with
``HNJAX_DISTRIBUTED=1`` (or ``--distributed``). The logic lives in
`hnjax.train.moco`, which a Colab notebook calls directly; the flags and
errors in `launch.common`.
"""

from launch import common

if __name__ == '__main__':
  common.run('moco', 'configs/mochi.py')
