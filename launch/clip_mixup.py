r"""CLIP-mixup launcher: flags -> config -> train_and_evaluate.

  python -m launch.clip_mixup          # pretrain, fine-tune: clip vs m2mix
  python -m launch.clip_mixup --config=configs/clip_mixup.py:method=m3mix
  python -m launch.clip_mixup --config=configs/clip_mixup.py:stage=finetune \
      --config.init_from=runs/m2mix/pretrain --workdir=runs/my_finetune
  python -m launch.clip_mixup \
      --config=configs/clip_mixup.py:data=coco,init=clip_vit_b32 \
      --config.init_path=$HOME/ckpt/clip-vit-base-patch32  # the paper's

Re-running the same command resumes from the workdir (each stage from its
own checkpoints); on every host of a multi-host job run it with
``HNJAX_DISTRIBUTED=1``. The logic lives in `hnjax.train.clip_mixup`
(callable from Colab), the flags in `launch.common`.
"""

from launch import common

if __name__ == '__main__':
  common.run('clip_mixup', 'configs/clip_mixup.py')
