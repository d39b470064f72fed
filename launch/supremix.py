r"""SupReMix launcher: flags -> config -> train_and_evaluate.

  python -m launch.supremix                                # shapes32 size
  python -m launch.supremix --config=configs/supremix.py:method=rnc
  python -m launch.supremix --config=configs/supremix.py:data=agedb \
      --config.data.data_dir=/data/agedb --workdir=runs/agedb_supremix

Re-running the same command resumes from the workdir; on every host of a
multi-host job run it with ``HNJAX_DISTRIBUTED=1``. The logic lives in
`hnjax.train.supremix` (callable from Colab), the flags in `launch.common`.
"""

from launch import common

if __name__ == '__main__':
  common.run('supremix', 'configs/supremix.py')
