r"""CLIP-mixup: CLIP pretraining, then fine-tuning with and without m²-mix.

Paper: Oh et al., "Geodesic Multi-Modal Mixup for Robust Fine-Tuning",
NeurIPS 2023, https://arxiv.org/abs/2203.03897 (ALGORITHMS.md §5). The
launcher's default (``stage=both``) pretrains a small CLIP on shapes32's
captioned images, then fine-tunes it twice at the same budget, with the
plain CLIP loss and with the method, and compares zero-shot, plain
fine-tuning and the method on the test split.

Run:

  python -m launch.clip_mixup                          # m2mix vs clip
  python -m launch.clip_mixup --config=configs/clip_mixup.py:method=m3mix
  python -m launch.clip_mixup --config=configs/clip_mixup.py:stage=finetune \
      --config.init_from=runs/m2mix/pretrain --workdir=runs/my_finetune

Presets after the colon, comma separated:

  method=clip|m2mix|m3mix|siglip   the fine-tuning objective
  stage=pretrain|finetune|both     pretrain: only the first stage, with
                                   the pretraining recipe (config.pretrain)
                                   in the top-level fields; finetune needs
                                   --config.init_from=<run>
  data=shapes|coco|flickr30k       coco: tfds coco_captions (Karpathy
                                   splits) in --config.data.data_dir;
                                   flickr30k: dataset_flickr30k.json and
                                   flickr30k-images/ in data.data_dir
  tower=convnet|vit                the image tower (vit: a small ViT)
  init=clip_vit_b32|clip_vit_b16|pretrained
                                   start from a pretrained CLIP in
                                   --config.init_path=<folder> (Hugging
                                   Face layout, downloaded once by you)
                                   with the m²-mix paper's fine-tuning
                                   protocol (ALGORITHMS.md §5.6): zero-shot
                                   evaluation, then CLIP and the method
                                   fine-tuned for 9 epochs at batch 128
                                   (AdamW lr 1e-5, wd 0.2, cosine with 10%
                                   warm-up, τ = 0.01, τ₂ = 0.07, seed 1);
                                   image size, context length, tokenizer
                                   and normalisation are the checkpoint's.
                                   The names only say which checkpoint the
                                   paper used (ViT-B/32); any CLIP folder
                                   works with any of them.
  negatives=mined|dynamic          fine-tune the method with 4 hard
                                   negative captions per image, mined
                                   among the training captions (relative
                                   margin 0.05 against false negatives):
                                   mined: once, from the towers it starts
                                   from (static, STAR); dynamic: again
                                   every 50 steps from the current towers
                                   (ADORE). Or mine offline with
                                   python -m launch.mine and pass
                                   --config.mining.path=<its .npz>
  batches=neighbour|cluster|topic  fine-tune the method on batches of
                                   similar images (Sample4Geo, NGAME,
                                   TAS-B) from its towers' image
                                   embeddings, refreshed with the
                                   negatives (mining.every_steps); with
                                   tower=vit: the convnet's BatchNorm
                                   collapses on such batches (README)
  smoke                            a tiny run (under a minute) writing
                                   several checkpoints; combines with the
                                   others: configs/clip_mixup.py:smoke,method=m3mix

With negatives or batches, the study names the method's run
``finetune_<method>_mined``; pretraining and the plain-CLIP fine-tuning it
is compared with use neither (the same runs as without them, reused in the
same workdir).

shapes32 recipe: CLIP pretraining (learnable temperature, clamped at 100)
on 9000 pairs for 400 steps at batch 128; fine-tuning on 9000 other pairs
for 200 steps with the m²-mix paper's fine-tuning recipe (AdamW, a fixed
temperature, τ₂ = 0.07, w = 0.01, cosine with 10% warm-up; the mixing
weight divided by epoch + 1), except τ = 0.05 instead of the paper's 0.01
(see ``temperature`` below; ``--config.temperature=0.01`` for the paper's).
coco / flickr30k: the same protocol with small towers from scratch, or
with pretrained towers (init=...; the paper's experiment).
"""

import ml_collections as mlc

from configs import common

_DATA = {
    'shapes': dict(name='shapes32', image_size=32, context_length=16,
                   batch_size=128, pretrain_steps=400, finetune_steps=200),
    'coco': dict(name='coco', image_size=64, context_length=32,
                 batch_size=128, pretrain_steps=20000, finetune_steps=8000),
    'flickr30k': dict(name='flickr30k', image_size=64, context_length=32,
                      batch_size=128, pretrain_steps=8000,
                      finetune_steps=2000),
}
_TOWERS = {'convnet': 'convnet', 'vit': 'vit_tiny'}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The CLIP-mixup config; ``arg`` selects presets (module docstring)."""
  arg = common.parse_arg(arg, method='m2mix', stage='both', data='shapes',
                         tower='convnet', init='', smoke=False,
                         negatives='', batches='random')
  if arg.data not in _DATA:
    raise ValueError(f'unknown data preset {arg.data!r}; known: '
                     f'{", ".join(_DATA)}')
  if arg.tower not in _TOWERS:
    raise ValueError(f'unknown tower preset {arg.tower!r}; known: '
                     f'{", ".join(_TOWERS)}')
  if arg.batches not in ('random', 'neighbour', 'cluster', 'topic'):
    raise ValueError(f'unknown batches preset {arg.batches!r}; known: '
                     'neighbour, cluster, topic')
  if arg.negatives not in ('', 'mined', 'dynamic'):
    raise ValueError(f'unknown negatives preset {arg.negatives!r}; known: '
                     'mined, dynamic')
  if arg.init and arg.init not in _INITS:
    raise ValueError(f'unknown init preset {arg.init!r}; known: '
                     f'{", ".join(_INITS)}')
  d = _DATA[arg.data]
  siglip = arg.method == 'siglip'
  c = common.base(
      method=arg.method,  # clip, m2mix, m3mix or siglip (fine-tuning)
      batch_size=d['batch_size'], num_epochs=1,
      # Fine-tuning's fixed τ (SigLIP: the initial 1 / scale). The paper's
      # 0.01 suits OpenAI's CLIP, whose learned scale is at the clamp
      # (100); the small towers pretrained here learn a scale near 17,
      # and τ = 0.01 makes fine-tuning lose about 1 R1Sum (README).
      temperature=0.1 if siglip else 0.05)
  c.num_steps = d['finetune_steps']
  c.stage = arg.stage  # pretrain, finetune (needs init_from) or both
  c.learn_temperature = siglip  # else the fixed temperature above
  # A pretrained CLIP folder (Hugging Face layout) to fine-tune; its
  # architecture, tokenizer, image size and normalisation replace model.*,
  # text.* (but context_length 0: the checkpoint's) and data.image_size.
  c.init_path = ''

  c.data = common.data(d['name'], image_size=d['image_size'])
  c.model = mlc.ConfigDict(dict(
      backbone=_TOWERS[arg.tower],  # image tower (any registry backbone)
      embed_dim=64, dtype='float32'))
  c.text = mlc.ConfigDict(dict(
      context_length=d['context_length'],  # start and end included
      width=64, depth=2, heads=4,
      vocab_size=8192))  # coco / flickr30k BPE vocabulary

  c.m2mix = mlc.ConfigDict(dict(
      weight=0.01,  # w of L_CLIP + w * L_m2 / (epoch + 1)
      beta=0.5,  # lambda ~ Beta(beta, beta), one per step
      temperature=0.07,  # tau_2 of the mixed logits
      schedule=True))  # divide the mixing terms by epoch + 1
  c.m3mix = mlc.ConfigDict(dict(
      vmix=0.05, lmix=0.05, vlmix=0.1,  # weights (method=m3mix)
      beta=0.5,  # their lambda ~ Beta(beta, beta)
      original_negatives=False))  # --original_neg
  if arg.method == 'm3mix':
    c.m2mix.weight, c.m2mix.beta = 0.01, 0.2  # scripts/m3mix.sh

  # Fine-tuning optimizer: AdamW, cosine with 10% linear warm-up (§5.6).
  c.optim = common.optim(
      name='adamw', learning_rate=1e-4, lr_base_batch=d['batch_size'],
      weight_decay=0.2)
  c.optim.warmup_fraction = 0.1  # of the run's steps

  # Pretraining (stage=pretrain, and the first stage of stage=both).
  c.pretrain = mlc.ConfigDict(dict(
      method='siglip' if siglip else 'clip',
      num_steps=d['pretrain_steps'], learning_rate=1e-3,
      warmup_fraction=0.1,
      temperature=0.1 if siglip else 0.07,  # initial learnable value
      learn_temperature=True))

  # Hard negatives from the training pairs (ALGORITHMS.md §9), for the
  # method's fine-tuning run (stage=both: not pretraining, not the
  # plain-CLIP run it is compared with).
  c.mining = mlc.ConfigDict(dict(
      # Mined captions per image, extra negatives of its image->text
      # cross-entropy (0: none).
      negatives=4 if arg.negatives else 0,
      # Records of `python -m launch.mine` (static); '': the run mines
      # from its own towers.
      path='',
      # Re-mine (and refresh the batch order) every N steps from the
      # current towers (dynamic, ADORE); 0: once, before the first step.
      every_steps=50 if arg.negatives == 'dynamic' else 0,
      # Batch composition from image embeddings: random, neighbour
      # (Sample4Geo), cluster (NGAME) or topic (TAS-B).
      batches=arg.batches,
      cluster_size=8,  # batches=cluster: images per balanced cluster
      num_topics=32,  # batches=topic: k-means topics
      # hnjax.mining.mine_hard_negatives' filters (sentence-transformers'
      # meanings): skip / keep the most similar (range_max 0: all), drop
      # scores above / below, drop within a margin of the positive's
      # score (< 0: off). A duplicate of the positive caption scores
      # exactly its score: a margin > 0 removes it.
      range_min=0, range_max=0, max_score=float('inf'),
      min_score=float('-inf'), absolute_margin=-1.0, relative_margin=0.05,
      sampling='top'))  # the best survivors, or 'random' among them

  if arg.stage == 'pretrain':  # a pretraining run on its own: its recipe
    p = c.pretrain
    c.method, c.num_steps, c.temperature = p.method, p.num_steps, p.temperature
    c.learn_temperature = p.learn_temperature
    c.optim.learning_rate = p.learning_rate
    c.optim.warmup_fraction = p.warmup_fraction

  c.eval = mlc.ConfigDict(dict(
      every_steps=-1,  # validation retrieval 4 times per run; 0: the end
      batch_size=512,
      baselines=True))  # the final metrics of untrained towers too
  common.add_logging(c, log_every_steps=10, hist_every_steps=50,
                     ckpt_every_steps=100)

  if arg.init:
    _pretrained_protocol(c, siglip)

  if arg.smoke:
    c.data.name = 'shapes32/small' if d['name'] == 'shapes32' else d['name']
    c.batch_size = 32
    c.num_steps = 12
    c.pretrain.num_steps = 12
    c.model.embed_dim = 32
    c.text.width, c.text.depth = 32, 1
    c.log_every_steps = 4
    c.hist_every_steps = 8
    c.ckpt.every_steps = 4
    c.eval.every_steps = 6
    if c.mining.every_steps:
      c.mining.every_steps = 4
    c.mining.num_topics = 8
    if arg.init:
      c.num_steps, c.num_epochs = 12, 1
      c.eval.batch_size = 64
  return c


# Pretrained checkpoints the presets name (all get the same protocol).
_INITS = {
    'clip_vit_b32': 'openai/clip-vit-base-patch32 (the paper\'s)',
    'clip_vit_b16': 'openai/clip-vit-base-patch16',
    'pretrained': 'any CLIP ViT checkpoint folder',
}


def _pretrained_protocol(c: mlc.ConfigDict, siglip: bool) -> None:
  """The m²-mix paper's fine-tuning of a pretrained CLIP (§5.6)."""
  c.batch_size = 128
  c.num_steps = 0  # epochs
  c.num_epochs = 9
  c.seed = 1
  c.learn_temperature = siglip
  c.temperature = 0.1 if siglip else 0.01
  c.m2mix.temperature = 0.07
  c.optim.learning_rate = 1e-5  # the paper sweeps {1e-5, 7e-6}
  c.optim.weight_decay = 0.2  # and {0.2, 0.01}
  c.optim.lr_base_batch = 128
  c.optim.warmup_fraction = 0.1
  c.text.context_length = 0  # the checkpoint's (77 for OpenAI's)
  c.data.image_size = 0  # the checkpoint's (224)
  # The untrained row of a ViT-B costs a full test pass and says nothing
  # the zero-shot row does not.
  c.eval.baselines = False
  c.eval.every_steps = 0  # the paper evaluates at the last epoch
  c.ckpt.every_steps = 500
