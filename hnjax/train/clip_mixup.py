"""CLIP pretraining and fine-tuning with geodesic multimodal mixup.

One step (ALGORITHMS.md §5; the same towers, data and budget for every
objective):

1. images normalised (no augmentation: shapes32's captions name the
   position, size and colour that crops, flips and colour jitter change)
   and caption token ids, both from the host;
2. both towers on the batch, projections L2-normalised;
3. the objective, inside ``shard_map`` with ``axis_name`` (each device's
   pairs against the global batch, gathered with gradient; equal to one
   device):

   * ``clip``: `hnjax.losses.symmetric_info_nce` at the learnable
     temperature (``learn_temperature``; CLIP's logit scale clamped at 100)
     or the fixed ``temperature`` (m²-mix fine-tuning: τ = 0.01);
   * ``m2mix``: CLIP + ``m2mix.weight`` · `hnjax.losses.m2mix` (τ₂ =
     ``m2mix.temperature``, λ ~ Beta(β, β) once per step) / (epoch + 1);
   * ``m3mix``: m2mix + the V-, L- and VL-mix terms of
     `hnjax.losses.m3mix` (each its own λ ~ Beta(``m3mix.beta``)), each
     with its weight, all divided by (epoch + 1);
   * ``siglip``: `hnjax.losses.sigmoid_contrastive` with the learnable
     scale and bias;

4. gradients and the optax update (AdamW without weight decay on gains,
   biases, embeddings' positions and the logit scale, as CLIP).

Hard negatives (``mining.*``, ALGORITHMS.md §9): with ``mining.negatives =
k`` each image also gets ``k`` captions of other training pairs, mined by
`hnjax.mining.mine_hard_negatives` (its false-negative filters), as extra
negatives of its image→text cross-entropy, encoded by the text tower with
gradient. They are read from records (``mining.path``, written by `mine` /
``python -m launch.mine``: static, STAR) or mined by the run itself from
its towers before the first step and, with ``mining.every_steps``, again
from the current towers (dynamic, ADORE). ``mining.batches`` draws the
batches from image embeddings instead of at random (Sample4Geo
neighbours, NGAME clusters, TAS-B topics), refreshed with the negatives.
Both live in the state (``TrainState.mined``): a resumed run reads the
same negatives and batches.

Two stages share this step: ``stage=pretrain`` trains both towers from
scratch; ``stage=finetune`` starts from another run's parameters
(``init_from``) or from a pretrained CLIP checkpoint folder (``init_path``,
`hnjax.models.clip.from_pretrained`: its towers, tokenizer, image size and
normalisation). ``stage=both`` (the launcher's default) runs the whole
study in one workdir: ``pretrain/`` (CLIP; with ``init_path``, ``zeroshot/``:
the checkpoint evaluated as it is), ``finetune_clip/`` (plain fine-tuning)
and ``finetune_<method>/``, each an ordinary resumable run, and compares
zero-shot, plain fine-tuning and the method.

Evaluation: image→text and text→image R@1/5/10 and R1Sum over the whole
split (`hnjax.eval.retrieval`), uniformity and alignment (Wang & Isola,
over both modalities) and the m²-mix code's variants, the modality gap,
and hard-negative caption accuracy per swap type (shapes32).
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections as mlc
import numpy as np
import optax

from hnjax import losses
from hnjax import mining as mining_lib
from hnjax import numerics
from hnjax import parallel
from hnjax.data import augment
from hnjax.data import batching
from hnjax.data import mined as mined_lib
from hnjax.data import paired
from hnjax.eval import features as features_lib
from hnjax.eval import geometry
from hnjax.eval import retrieval
from hnjax.models import clip as clip_lib
from hnjax.models import clip_pretrained
from hnjax.models import clip_tokenizer
from hnjax.train import checks
from hnjax.train import optim as optim_lib
from hnjax.train import runner
from hnjax.train import state as state_lib

METHODS = ('clip', 'm2mix', 'm3mix', 'siglip')
STAGES = ('pretrain', 'finetune', 'both')
DATA = parallel.DATA
# Results kept in a run's summary (metrics.jsonl has every one).
SUMMARY = ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10',
           'r1sum', 'uniformity', 'alignment', 'modality_gap',
           'hard_negative_acc')
# Real datasets: the one-caption protocol of the m²-mix paper besides the
# standard one (shapes32 has only one protocol, unprefixed).
PROTOCOL_SUMMARY = ('first_i2t_r1', 'first_t2i_r1', 'first_r1sum')


@flax.struct.dataclass
class TrainState:
  """Everything a CLIP run carries from step to step.

  Attributes:
    step: ``[]`` int32, completed optimizer steps.
    params: both towers, projections, logit scale and bias (replicated).
    batch_stats: the image tower's BN statistics (empty for a ViT).
    opt_state: optax state.
    rng: typed PRNG key; step ``t`` uses ``fold_in(rng, t)``.
    mined: what the input pipeline reads, from the last refresh
      (``mining.*``; replicated): ``negatives`` int32 ``[n, k]`` (each
      training pair's mined captions, rows of the training set) and
      ``embeddings`` ``[n, D]`` (its images', for the batch order); None
      without mining.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  mined: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static hyperparameters of a step (hashable)."""
  method: str
  temperature: float
  learn_temperature: bool
  m2mix_weight: float
  m2mix_beta: float
  m2mix_temperature: float
  m3mix_weights: tuple[tuple[str, float], ...]
  m3mix_beta: float
  original_negatives: bool
  schedule: bool
  steps_per_epoch: int
  image_size: int
  context_length: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  mined_negatives: int = 0


# ----------------------------------------------------------------------------
# Config checks: all before any compilation or any file is written.
# ----------------------------------------------------------------------------


def validate(config: mlc.ConfigDict, num_devices: int) -> None:
  """Raises checks.ConfigError naming the first impossible CLIP-mixup field.

  The fields every family shares are checked by `checks.common` first.
  With ``init_path`` the checkpoint's config.json replaces ``model.*``
  and ``text.*`` (but ``text.context_length``, which must be 0 or the
  checkpoint's), so those are not checked.
  """
  del num_devices
  checks.one_of(config, 'method', METHODS)
  checks.one_of(config, 'stage', STAGES)
  checks.one_of(config, 'model.dtype', ('float32', 'bfloat16'))
  checks.positive(config, 'temperature', 'm2mix.beta', 'm2mix.temperature',
                  'm3mix.beta')
  for field in ('m2mix.weight', 'm3mix.vmix', 'm3mix.lmix', 'm3mix.vlmix'):
    value = checks.get(config, field)
    checks.require(np.isfinite(value) and value >= 0, field, value,
                   'must be >= 0')
  checks.require(0 <= config.optim.get('warmup_fraction', 0) < 1,
                 'optim.warmup_fraction', config.optim.get('warmup_fraction'),
                 'must be in [0, 1)')
  checks.require(config.data.name in paired.DATASETS, 'data.name',
                 config.data.name, f'not an image-caption dataset; known: '
                 f'{paired.DATASETS}')
  _validate_mining(config)
  if config.init_path:
    _validate_pretrained(config)
    return
  checks.positive(config, 'model.embed_dim', 'text.width', 'text.depth',
                  'text.heads', 'text.vocab_size')
  checks.require(config.text.context_length >= 2, 'text.context_length',
                 config.text.context_length,
                 'must be >= 2 (the start and end tokens)')
  checks.require(config.data.image_size > 0, 'data.image_size',
                 config.data.image_size,
                 'must be > 0 (0 means the checkpoint\'s: needs init_path)')
  checks.require(config.text.width % config.text.heads == 0, 'text.width',
                 config.text.width,
                 f'must be divisible by text.heads={config.text.heads}')
  if config.stage == 'finetune':
    checks.require(bool(config.init_from), 'init_from', config.init_from,
                   'stage=finetune starts from another run: set '
                   '--config.init_from=<its workdir> (or init_path=<a '
                   'pretrained CLIP folder>)')
  if config.stage == 'both':
    checks.require(not config.init_from, 'init_from', config.init_from,
                   'stage=both pretrains its own towers; use stage=finetune '
                   'to start from another run')
    checks.positive(config, 'pretrain.num_steps', 'pretrain.learning_rate',
                    'pretrain.temperature')


def _validate_mining(config: mlc.ConfigDict) -> None:
  """The checks of ``mining.*`` (hard negatives, batch composition)."""
  m = config.mining
  for field in ('negatives', 'every_steps', 'range_min', 'range_max'):
    value = m[field]
    checks.require(isinstance(value, int) and value >= 0, f'mining.{field}',
                   value, 'must be an integer >= 0')
  checks.positive(config, 'mining.cluster_size', 'mining.num_topics')
  checks.one_of(config, 'mining.batches', ('random', *batching.ORDERS))
  checks.one_of(config, 'mining.sampling', mining_lib.STRATEGIES)
  checks.require(m.range_max == 0 or m.range_max > m.range_min,
                 'mining.range_max', m.range_max,
                 f'must be 0 (all) or > mining.range_min={m.range_min}')
  for field in ('absolute_margin', 'relative_margin'):
    checks.require(np.isfinite(m[field]), f'mining.{field}', m[field],
                   'must be finite (< 0: off)')
  checks.require(not (m.negatives and config.method == 'siglip'),
                 'mining.negatives', m.negatives,
                 'mined negatives join the softmax of clip, m2mix and '
                 'm3mix; siglip has none (set it to 0)')
  if m.path:
    checks.require(m.negatives > 0, 'mining.negatives', m.negatives,
                   f'must be > 0 to train with mining.path={m.path!r}')
  checks.require(not m.every_steps or fresh_state_has_mined(config),
                 'mining.every_steps', m.every_steps,
                 'nothing to refresh: set mining.negatives (without '
                 'mining.path) or mining.batches')


def mining_on(config: mlc.ConfigDict) -> bool:
  """Whether this run uses mined negatives or a batch order."""
  return config.mining.negatives > 0 or config.mining.batches != 'random'


def _validate_pretrained(config: mlc.ConfigDict) -> None:
  """The checks of a run that starts from a pretrained CLIP folder."""
  checks.require(config.stage != 'pretrain', 'stage', config.stage,
                 'init_path fine-tunes a pretrained CLIP: use stage=both '
                 '(zero-shot, then fine-tuning) or stage=finetune')
  checks.require(not config.init_from, 'init_from', config.init_from,
                 'init_path is set too: start from one of them')
  spec = pretrained_spec(config)
  context = config.text.context_length
  checks.require(context in (0, spec.context_length), 'text.context_length',
                 context, f'the checkpoint has {spec.context_length} text '
                 'positions (0: take them)')
  checks.require(config.data.image_size >= 0, 'data.image_size',
                 config.data.image_size, 'must be >= 0 (0: the checkpoint\'s '
                 f'{spec.image_size})')


@functools.lru_cache(maxsize=4)
def _read_spec(path: str) -> clip_pretrained.ClipSpec:
  return clip_pretrained.read_spec(path)


def pretrained_spec(config: mlc.ConfigDict) -> clip_pretrained.ClipSpec:
  """The architecture of ``config.init_path`` (a one-line ConfigError)."""
  try:
    return _read_spec(os.path.abspath(config.init_path))
  except (FileNotFoundError, ValueError) as e:
    raise checks.ConfigError(f'init_path={config.init_path!r}: {e}') from None


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, context_length: int) -> clip_tokenizer.ClipTokenizer:
  return clip_tokenizer.ClipTokenizer.from_folder(
      path, context_length=context_length)


# ----------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------


def _objective_body(v, t, neg, neg_mask, scale, bias, lam, lam3, epoch, *,
                    cfg):
  """Per-device body: ``(total [B], terms)``, each term ``[B]`` per pair.

  ``neg`` ``[B, k, D]`` are the mined captions of each image (masked by
  ``neg_mask``; None without), extra negatives of the CLIP term; ``lam``
  is m²-mix's λ, ``lam3`` ``[3]`` those of V-, L- and VL-mix.
  """
  if cfg.method == 'siglip':
    loss = losses.sigmoid_contrastive(v, t, scale=scale, bias=bias,
                                      axis_name=DATA)
    return loss, {'siglip': loss}
  clip = losses.symmetric_info_nce(v, t, temperature=1.0 / scale,
                                   extra_negatives=neg,
                                   extra_negative_mask=neg_mask,
                                   axis_name=DATA)
  terms, mix = {'clip': clip}, jnp.zeros_like(clip)
  if cfg.method in ('m2mix', 'm3mix') and cfg.m2mix_weight > 0:
    terms['m2mix'] = losses.m2mix(v, t, lam,
                                  temperature=cfg.m2mix_temperature,
                                  axis_name=DATA)
    mix = mix + cfg.m2mix_weight * terms['m2mix']
  if cfg.method == 'm3mix':
    for i, (term, weight) in enumerate(cfg.m3mix_weights):
      if weight > 0:
        terms[term] = losses.m3mix(
            v, t, lam3[i], term=term, temperature=1.0 / scale,
            original_negatives=cfg.original_negatives, axis_name=DATA)
        mix = mix + weight * terms[term]
  # §5.3: the mixing terms decay as 1, 1/2, 1/3, ... over (0-based) epochs.
  decay = 1.0 / (epoch + 1.0) if cfg.schedule else 1.0
  return clip + decay * mix, terms


def hardest_in_batch(v: jax.Array, t: jax.Array) -> jax.Array:
  """Per-device body: each image's most similar other caption, ``[B]``.

  Inside ``shard_map`` over ``'data'``: this device's images ``v`` ``[B,
  D]`` against the all-gathered captions, ``[B, G]`` per device like the
  loss's logits (never ``[G, G]``). A metric: no gradient.
  """
  v = jax.lax.stop_gradient(v)
  t_all = parallel.gather(jax.lax.stop_gradient(t), DATA)
  sims = v @ t_all.T
  own = parallel.local_rows(v.shape[0], DATA)
  others = jnp.arange(t_all.shape[0])[None, :] != own[:, None]
  return jnp.max(jnp.where(others, sims, -jnp.inf), axis=1)


def _scale(out, cfg):
  if cfg.learn_temperature or cfg.method == 'siglip':
    return out['logit_scale']
  return jnp.asarray(1.0 / cfg.temperature, jnp.float32)


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               model: Any, tx: optax.GradientTransformation,
               cfg: StepConfig, mesh: jax.sharding.Mesh
               ) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step of CLIP, SigLIP, m²-mix or m³-mix.

  Args:
    state: the `TrainState` (donated when jitted by the runner).
    batch: global batch, sharded over ``'data'``: ``image`` uint8
      ``[G, H, W, 3]``, ``tokens`` int32 ``[G, L]``, ``index`` ``[G]``;
      with mined negatives also ``negative_tokens`` ``[G, k, L]`` and
      ``negative_mask`` bool ``[G, k]``.
    model: the `hnjax.models.CLIP` module.
    tx: the optax optimizer.
    cfg: static hyperparameters.
    mesh: the device mesh.

  Returns:
    ``(new_state, metrics)``: ``loss``, each term's batch mean,
    ``logit_scale``, ``lam``, ``grad_norm``, and the per-pair losses
    ``pair_loss [G]``, the mean cosine of an image and its caption
    ``positive_similarity``, of an image and the most similar other
    caption of the batch ``hardest_in_batch_similarity`` (what batch
    composition raises) and, with mined negatives, of an image and its
    mined captions ``mined_similarity``.
  """
  key = jax.random.fold_in(state.rng, state.step)
  k_lam, k_lam3 = jax.random.split(key)
  # One λ per step and term (the authors draw each with its own
  # betavariate), the same on every device (the key is replicated).
  lam = jax.random.beta(k_lam, cfg.m2mix_beta, cfg.m2mix_beta)
  lam3 = jax.random.beta(k_lam3, cfg.m3mix_beta, cfg.m3mix_beta,
                         (len(losses.M3MIX_TERMS),))
  epoch = (state.step // cfg.steps_per_epoch).astype(jnp.float32)
  x = augment.eval_transform(batch['image'], out_size=cfg.image_size,
                             mean=cfg.mean, std=cfg.std)

  k = cfg.mined_negatives
  body = jax.shard_map(
      functools.partial(_objective_body, cfg=cfg), mesh=mesh,
      in_specs=(P(DATA),) * 4 + (P(),) * 5, out_specs=(P(DATA), P(DATA)))

  def loss_fn(params):
    out, new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, x,
        batch['tokens'], train=True, mutable=['batch_stats'])
    v = numerics.l2_normalize(out['image'])
    t = numerics.l2_normalize(out['text'])
    neg = mask = None
    if k:  # the mined captions, through the same text tower (with grad)
      tokens = batch['negative_tokens']
      neg = numerics.l2_normalize(model.apply(
          {'params': params}, tokens.reshape(-1, tokens.shape[-1]),
          method=model.encode_text)).reshape(*tokens.shape[:2], -1)
      mask = batch['negative_mask']
    scale = _scale(out, cfg)
    per_pair, terms = body(v, t, neg, mask, scale, out['logit_bias'], lam,
                           lam3, epoch)
    return jnp.mean(per_pair), (per_pair, terms, scale,
                                new_vars.get('batch_stats', {}), v, t, neg)

  (loss, (per_pair, terms, scale, batch_stats, v, t, neg)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats, opt_state=opt_state)
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                 logit_scale=scale, lam=lam, pair_loss=per_pair)
  metrics.update({f'loss_{name}': jnp.mean(x) for name, x in terms.items()})
  # How hard the negatives are: the true caption's cosine, each image's
  # most similar other caption in the (global) batch, and its mined ones.
  metrics['positive_similarity'] = jnp.mean(jnp.sum(v * t, axis=1))
  hardest = jax.shard_map(hardest_in_batch, mesh=mesh,
                          in_specs=(P(DATA), P(DATA)), out_specs=P(DATA))
  metrics['hardest_in_batch_similarity'] = jnp.mean(hardest(v, t))
  if k:
    mask = batch['negative_mask']
    sim = jnp.einsum('bd,bkd->bk', v, neg)
    found = jnp.sum(mask)  # NaN, not 0, when the filters left none
    metrics['mined_similarity'] = jnp.where(
        found > 0, jnp.sum(jnp.where(mask, sim, 0.0)) / jnp.maximum(found, 1),
        jnp.nan)
  return new_state, metrics


def _decay_mask(params):
  """Weight decay on matrices only (CLIP: not on gains, biases, scales)."""
  def keep(path, x):
    name = jax.tree_util.keystr(path)
    return x.ndim >= 2 and 'positional_embedding' not in name
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config, schedule):
  o = config.optim
  if o.name == 'adamw':
    return optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6,
                       weight_decay=o.weight_decay, mask=_decay_mask)
  return optim_lib.make_optimizer(o, schedule)


def create_state(config, model, tx, cfg, mesh, num_train=0) -> TrainState:
  """A fresh, replicated `TrainState` from ``config.seed``; its ``mined``
  tables (for ``num_train`` training pairs) are zeros until refreshed."""
  def init():
    k_init, k_run = jax.random.split(jax.random.key(config.seed))
    s = cfg.image_size
    images = jnp.zeros((1, s, s, 3))
    variables = model.init(
        k_init, images, jnp.zeros((1, cfg.context_length), jnp.int32),
        train=False)
    params = variables['params']
    mined = {}
    if config.mining.negatives and not config.mining.path:
      mined['negatives'] = jnp.zeros((num_train, config.mining.negatives),
                                     jnp.int32)
    if config.mining.batches != 'random':
      dim = model.apply(variables, images, method=model.encode_image).shape[1]
      mined['embeddings'] = jnp.zeros((num_train, dim), jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params), rng=k_run,
                      mined=mined or None)

  return state_lib.create(init, mesh)


def with_pretrained(state: TrainState, path: str,
                    spec: clip_pretrained.ClipSpec) -> TrainState:
  """``state`` with the parameters of the pretrained CLIP at ``path``.

  The optimizer state stays the fresh one (AdamW's moments are zeros
  whatever the parameters).
  """
  loaded = clip_pretrained.load_params(path, spec)
  fresh = state.params
  if (jax.tree.structure(loaded) != jax.tree.structure(fresh) or any(
      np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(loaded),
                                            jax.tree.leaves(fresh)))):
    raise ValueError(f'{path}: its parameters do not fit the model built '
                     'from its config.json')
  params = jax.tree.map(
      lambda x, like: jax.device_put(jnp.asarray(x, like.dtype),
                                     like.sharding), loaded, fresh)
  return state.replace(params=params)


# ----------------------------------------------------------------------------
# Evaluation: retrieval, geometry and hard-negative captions.
# ----------------------------------------------------------------------------


def _encoders(model, cfg):
  """Jitted, normalised ``encode_image`` and ``encode_text`` of a batch."""

  @jax.jit
  def image(params, batch_stats, batch):
    x = augment.eval_transform(batch['image'], out_size=cfg.image_size,
                               mean=cfg.mean, std=cfg.std)
    v = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                    method=model.encode_image)
    return numerics.l2_normalize(v)

  @jax.jit
  def text(params, batch):
    t = model.apply({'params': params}, batch['tokens'],
                    method=model.encode_text)
    return numerics.l2_normalize(t)

  return image, text


def embed(state, encoders, eval_set, *, batch_size, mesh):
  """Normalised embeddings of an `EvalSet`.

  Returns:
    ``{'image': [N_img, D], 'captions': [N_img, D] (one true caption per
    image), protocol: [N_txt, D] per protocol, 'neg_<type>': [N_img, D]}``.
  """
  image_fn, text_fn = encoders
  kw = dict(mesh=mesh, batch_size=batch_size, fields=())
  out = {'image': features_lib.extract(
      lambda b: image_fn(state.params, state.batch_stats, b),
      eval_set.images, inputs=('image',), **kw)['features']}

  def texts(tokens):
    return features_lib.extract(
        lambda b: text_fn(state.params, b),
        paired.ArraySource(tokens=tokens), inputs=('tokens',),
        **kw)['features']

  out['captions'] = texts(eval_set.caption_tokens)
  for name, (tokens, _) in eval_set.protocols.items():
    out[name] = texts(tokens)
  for kind, (tokens, _) in eval_set.negatives.items():
    out[f'neg_{kind}'] = texts(tokens)
  return out


def metrics_of(emb, eval_set) -> dict[str, float]:
  """Retrieval, geometry and hard-negative metrics of `embed`'s output."""
  v, t = emb['image'], emb['captions']
  out = {}
  for i, (name, (_, t2i)) in enumerate(eval_set.protocols.items()):
    prefix = '' if i == 0 else f'{name}_'
    ks = tuple(k for k in (1, 5, 10) if k <= len(v))  # tiny splits too
    r = retrieval.retrieval_metrics(v, emb[name], t2i, ks=ks)
    out.update({prefix + k: v_ for k, v_ in r.items()})
  # Wang & Isola over both modalities; and m²-mix's code-parity variants.
  out['uniformity'] = geometry.uniformity(np.concatenate([v, t]))
  out['alignment'] = geometry.alignment(v, t)
  out['uniformity_code'] = geometry.uniformity(np.concatenate([v, v]))
  out['alignment_code'] = geometry.relative_alignment(t, v)
  out['modality_gap'] = geometry.modality_gap(v, t)
  accs = []
  for kind, (_, eligible) in eval_set.negatives.items():
    acc = retrieval.caption_accuracy(v, t, emb[f'neg_{kind}'], eligible)
    out[f'hard_negative_acc_{kind}'] = acc
    accs.append(acc)
  if accs:
    out['hard_negative_acc'] = float(np.mean(accs))
  return {k: float(x) for k, x in out.items()}


def evaluate(state, fresh, encoders, config, info, mesh, *, final, plot_dir):
  """Validation metrics during training; test metrics (and baselines) at the
  end, whose embeddings are saved for the stage comparison's plots."""
  eval_set = info.test if final else info.val
  kw = dict(batch_size=config.eval.batch_size, mesh=mesh)
  emb = embed(state, encoders, eval_set, **kw)
  out = metrics_of(emb, eval_set)
  if final and config.eval.baselines:
    untrained = metrics_of(embed(fresh(), encoders, eval_set, **kw),
                           eval_set)
    out.update({f'untrained_{k}': untrained[k] for k in
                ('r1sum', 'hard_negative_acc') if k in untrained})
  if plot_dir is not None:
    np.savez(os.path.join(plot_dir, 'test_embeddings.npz'),
             image=emb['image'], text=emb['captions'])
  return out


# ----------------------------------------------------------------------------
# The family: what the shared runner needs from CLIP-mixup.
# ----------------------------------------------------------------------------


# The stages of a study open the same data (checks, then each run): once.
_open_paired = functools.lru_cache(maxsize=4)(paired.open_paired)


def open_data(config: mlc.ConfigDict) -> runner.Data:
  """Opens the pairs of this stage and the evaluation splits.

  With ``init_path`` the captions are tokenised by the checkpoint's
  tokenizer, real images resized bicubically to its image size (0) and
  every image normalised with its mean and std. With ``mining.path`` the
  training source also gives each pair's mined captions (its first
  ``mining.negatives``); the records must be of this dataset and part.
  """
  d = config.data
  part = 'pretrain' if config.stage == 'pretrain' else 'finetune'
  if config.init_path:
    spec = pretrained_spec(config)
    path = os.path.abspath(config.init_path)
    info = _open_paired(
        d.name, part=part, context_length=spec.context_length,
        data_dir=d.data_dir or None,
        image_size=d.image_size or spec.image_size,
        tokenizer=_tokenizer(path, spec.context_length), resample='bicubic',
        normalization=(spec.mean, spec.std))
  else:
    info = _open_paired(
        d.name, part=part, context_length=config.text.context_length,
        data_dir=d.data_dir or None, image_size=d.image_size,
        vocab_size=config.text.vocab_size)
  fields, train = ('image', 'tokens', 'index'), info.train
  if config.mining.negatives:
    fields += ('negative_tokens', 'negative_mask')
  if config.mining.path:  # static negatives: read once, never refreshed
    records = mined_lib.Mined.load(os.path.abspath(config.mining.path))
    for field, ours in (('data', d.name), ('part', part)):
      theirs = records.info.get(field, ours)
      checks.require(theirs == ours, 'mining.path', config.mining.path,
                     f'mined from the {field} {theirs!r}; this run trains '
                     f'on {ours!r}')
    k = config.mining.negatives
    checks.require(
        records.negatives.shape[1] >= k, 'mining.negatives', k,
        f'{config.mining.path!r} holds {records.negatives.shape[1]} per '
        'pair')
    try:
      table = records.table(len(train))[:, :k]
    except ValueError as e:
      raise ValueError(f'mining.path={config.mining.path!r}: {e} (mined '
                       'from another dataset?)') from None
    train = mined_lib.NegativesSource(train, table)
  return runner.Data(train=train, fields=fields, info=info)


def _step_config(config, setup) -> StepConfig:
  info = setup.data.info
  return StepConfig(
      method=config.method, temperature=float(config.temperature),
      learn_temperature=bool(config.learn_temperature),
      m2mix_weight=float(config.m2mix.weight),
      m2mix_beta=float(config.m2mix.beta),
      m2mix_temperature=float(config.m2mix.temperature),
      m3mix_weights=tuple((t, float(config.m3mix[t]))
                          for t in losses.M3MIX_TERMS),
      m3mix_beta=float(config.m3mix.beta),
      original_negatives=bool(config.m3mix.original_negatives),
      schedule=bool(config.m2mix.schedule),
      steps_per_epoch=setup.steps_per_epoch,
      # A pretrained tower takes its own size (shapes32's 32 px are resized).
      image_size=(pretrained_spec(config).image_size if config.init_path
                  else info.image_shape[0]),
      context_length=info.tokenizer.context_length, mean=tuple(info.mean),
      std=tuple(info.std), mined_negatives=int(config.mining.negatives))


def create_model(config, info) -> clip_lib.CLIP:
  """The two towers this config (or its ``init_path``) asks for."""
  tok = info.tokenizer
  if config.init_path:
    return clip_pretrained.create_model(
        pretrained_spec(config), end_id=tok.end_id,
        dtype=jnp.dtype(config.model.dtype))
  return clip_lib.create_clip(
      image_tower=config.model.backbone, vocab_size=tok.vocab_size,
      context_length=config.text.context_length, end_id=tok.end_id,
      embed_dim=config.model.embed_dim, text_width=config.text.width,
      text_depth=config.text.depth, text_heads=config.text.heads,
      init_temperature=float(config.temperature),
      dtype=jnp.dtype(config.model.dtype))


def build(setup: runner.Setup) -> runner.Pieces:
  """Model, optimizer, state, step and evaluation of one run."""
  config, mesh, info = setup.config, setup.mesh, setup.data.info
  cfg = _step_config(config, setup)
  model = create_model(config, info)
  schedule = optim_lib.learning_rate_schedule(
      config.optim, batch_size=config.batch_size,
      steps_per_epoch=setup.steps_per_epoch, total_steps=setup.total_steps)
  tx = make_optimizer(config, schedule)
  fresh = lambda: create_state(config, model, tx, cfg, mesh,
                               len(setup.data.train))
  init_state = fresh
  if config.init_path:
    init_state = lambda: with_pretrained(
        fresh(), os.path.abspath(config.init_path), pretrained_spec(config))
  encoders = _encoders(model, cfg)
  step = functools.partial(train_step, model=model, tx=tx, cfg=cfg,
                           mesh=mesh)
  refresh = train_data = None
  if fresh_state_has_mined(config):
    refresh = functools.partial(refresh_mined, encoders=encoders,
                                config=config, train=info.train, mesh=mesh)
    train_data = functools.partial(train_data_of, config=config,
                                   train=setup.data.train)
  return runner.Pieces(
      init_state=init_state,
      step=lambda variant: step,
      evaluate=lambda state, final, plot_dir: evaluate(
          state, fresh, encoders, config, info, mesh, final=final,
          plot_dir=plot_dir),
      learning_rate=schedule,
      fingerprint=lambda state: {'params': state.params,
                                 'batch_stats': state.batch_stats,
                                 'opt_state': state.opt_state},
      progress=('loss', 'logit_scale'),
      histogram_ranges={'pair_loss': (0.0, 10.0)},
      summary=SUMMARY + PROTOCOL_SUMMARY + ('untrained_r1sum',
                                           'untrained_hard_negative_acc'),
      refresh=refresh, refresh_every=config.mining.every_steps,
      train_data=train_data)


# ----------------------------------------------------------------------------
# Hard negatives and batch orders from the current towers.
# ----------------------------------------------------------------------------


def fresh_state_has_mined(config: mlc.ConfigDict) -> bool:
  """Whether the state carries tables a refresh recomputes."""
  return bool((config.mining.negatives and not config.mining.path)
              or config.mining.batches != 'random')


def mining_filters(config: mlc.ConfigDict) -> dict[str, Any]:
  """``mining.*`` as `hnjax.mining.mine_hard_negatives`' keyword args."""
  m = config.mining
  return dict(
      range_min=m.range_min, range_max=m.range_max or None,
      max_score=None if m.max_score == np.inf else float(m.max_score),
      min_score=None if m.min_score == -np.inf else float(m.min_score),
      absolute_margin=(None if m.absolute_margin < 0
                       else float(m.absolute_margin)),
      relative_margin=(None if m.relative_margin < 0
                       else float(m.relative_margin)),
      sampling_strategy=m.sampling)


def refresh_mined(state: TrainState, *, encoders, config, train, mesh
                  ) -> TrainState:
  """``state`` with ``mined`` recomputed from its towers.

  Embeds every training pair (images and captions), mines each image's
  ``mining.negatives`` hardest captions among all training captions (its
  own excluded, ``mining.*``'s filters), and keeps the image embeddings
  for the batch order. The same on every process.
  """
  image_fn, text_fn = encoders
  kw = dict(mesh=mesh, batch_size=config.eval.batch_size, fields=())
  step = int(parallel.to_host(state.step))
  images = features_lib.extract(
      lambda b: image_fn(state.params, state.batch_stats, b), train,
      inputs=('image',), progress=f'step {step}: embedding images',
      **kw)['features']
  mined = {}
  if 'negatives' in state.mined:
    captions = features_lib.extract(
        lambda b: text_fn(state.params, b), train, inputs=('tokens',),
        progress=f'step {step}: embedding captions', **kw)['features']
    rows = np.arange(len(train))
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    mined['negatives'], _ = mined_lib.mine_embeddings(
        images, captions, rows, num_negatives=config.mining.negatives,
        key=key, **mining_filters(config))
  if 'embeddings' in state.mined:
    mined['embeddings'] = images
  rep = jax.sharding.NamedSharding(mesh, P())
  return state.replace(mined={
      name: jax.make_array_from_process_local_data(rep, value)
      for name, value in mined.items()})


def mine(config: mlc.ConfigDict, out: str) -> dict[str, Any]:
  """Mines hard negative captions for every training pair; writes ``out``.

  The towers are ``config.init_from``'s (another run) or
  ``config.init_path``'s (a pretrained CLIP); the pairs are those of
  ``config.stage``'s part (fine-tuning's unless ``stage=pretrain``); the
  filters ``mining.*``. Usable from Colab; ``python -m launch.mine`` is the
  command line. Train with the result through ``mining.path``.

  Args:
    config: a config from ``configs/clip_mixup.py`` with
      ``mining.negatives > 0`` and ``init_from`` or ``init_path``.
    out: the ``.npz`` to write (`hnjax.data.mined.Mined`).

  Returns:
    A summary: ``pairs``, ``negatives`` (per pair), ``found`` (the
    fraction of slots filled: filters may leave fewer), the mean cosine of
    the mined captions ``mined_similarity`` and of the true ones
    ``positive_similarity``, ``wall_s``.

  Raises:
    checks.ConfigError: no towers, no negatives asked for, or a bad field.
  """
  t0 = time.time()
  checks.require(config.mining.negatives > 0, 'mining.negatives',
                 config.mining.negatives, 'must be > 0: how many to mine')
  checks.require(not config.mining.path, 'mining.path', config.mining.path,
                 'is what training reads; the file to write is --out')
  checks.require(bool(config.init_from or config.init_path), 'init_from',
                 config.init_from, 'mining needs trained towers: set it to '
                 'a run\'s workdir (or init_path to a pretrained CLIP)')
  c = mlc.ConfigDict(config.to_dict())
  c.stage = 'pretrain' if config.stage == 'pretrain' else 'finetune'
  c.mining.batches = 'random'  # only the negatives are mined here
  c.lock()
  setup = runner.prepare(FAMILY, c)
  info, cfg = setup.data.info, _step_config(c, setup)
  model = create_model(c, info)
  # The towers only: no optimizer state (AdamW's would double the memory).
  state = create_state(c, model, optax.identity(), cfg, setup.mesh)
  if c.init_path:
    state = with_pretrained(state, os.path.abspath(c.init_path),
                            pretrained_spec(c))
  else:
    state = state_lib.load_params(state, c.init_from)
  image_fn, text_fn = _encoders(model, cfg)
  records = mined_lib.mine_pairs(
      info.train,
      embed_query=lambda b: image_fn(state.params, state.batch_stats, b),
      embed_positive=lambda b: text_fn(state.params, b), mesh=setup.mesh,
      batch_size=c.eval.batch_size, num_negatives=c.mining.negatives,
      # The key of a run's own mining before its first step: 'random'
      # draws the same negatives either way.
      key=jax.random.fold_in(jax.random.key(c.seed), 0), info={
          'data': c.data.name, 'part': c.stage,
          'towers': c.init_from or c.init_path}, **mining_filters(c))
  if jax.process_index() == 0:
    records.save(out)
  found = records.negatives >= 0
  return dict(pairs=len(records.query), negatives=c.mining.negatives,
              found=float(found.mean()),
              mined_similarity=float(records.scores[found].mean())
              if found.any() else float('nan'),
              positive_similarity=records.info['mean_positive_score'],
              wall_s=round(time.time() - t0, 1))


def train_data_of(state: TrainState, *, config, train):
  """``(source, order)`` of the input pipeline given ``state.mined``."""
  mined = {k: parallel.to_host(v) for k, v in state.mined.items()}
  source, order = train, None
  if 'negatives' in mined:
    source = mined_lib.NegativesSource(train, mined['negatives'])
  m = config.mining
  if m.batches != 'random':
    if jax.tree.leaves(state.batch_stats):
      logging.log_first_n(
          logging.WARNING, 'mining.batches=%r with an image tower that has '
          'BatchNorm (%s): its batch statistics come from batches of similar '
          'images, not from the data; on shapes32 topic and neighbour '
          'batches make the convnet collapse (README). Prefer a LayerNorm '
          'tower (tower=vit).', 1, m.batches, config.model.backbone)
    emb = mined['embeddings']
    neighbours = None
    if m.batches == 'neighbour':  # Sample4Geo's 128 nearest images
      neighbours, _ = mined_lib.mine_embeddings(
          emb, emb, np.arange(len(emb)),
          num_negatives=min(128, len(emb) - 1))
    order = batching.EpochOrder(
        m.batches, emb, config.batch_size, seed=config.seed,
        cluster_size=m.cluster_size, num_topics=m.num_topics,
        neighbours=neighbours)
  return source, order


FAMILY = runner.Family(name='clip_mixup', validate=validate,
                       open_data=open_data, build=build)


# ----------------------------------------------------------------------------
# Stages: stage=both runs pretraining, plain fine-tuning and the method.
# ----------------------------------------------------------------------------


def stage_config(config: mlc.ConfigDict, stage: str, *, method: str = '',
                 init_from: str = '', mining: bool = True) -> mlc.ConfigDict:
  """The config of one stage of a ``stage=both`` study.

  ``pretrain`` takes ``config.pretrain``'s method, length, learning rate
  and temperature; ``finetune`` keeps the config's own, with ``method``
  and ``init_from`` as given. Pretraining and ``mining=False`` use no
  mined negatives and random batches.
  """
  c = mlc.ConfigDict(config.to_dict())
  c.stage = stage
  if stage == 'pretrain' or not mining:
    c.mining.negatives, c.mining.path, c.mining.every_steps = 0, '', 0
    c.mining.batches = 'random'
  if stage == 'pretrain':
    p = config.pretrain
    c.method = p.method
    c.num_steps = p.num_steps
    c.optim.learning_rate = p.learning_rate
    c.optim.warmup_fraction = p.warmup_fraction
    c.temperature = p.temperature
    c.learn_temperature = p.learn_temperature
    c.init_from = ''
  else:
    c.method = method or config.method
    c.init_from = init_from
  c.lock()
  return c


def _first_stage(config: mlc.ConfigDict) -> str:
  """``'zeroshot'`` (a pretrained checkpoint, evaluated) or ``'pretrain'``."""
  return 'zeroshot' if config.init_path else 'pretrain'


def method_stage(config: mlc.ConfigDict) -> str:
  """The name of the method's fine-tuning run in a ``stage=both`` study."""
  mined = '_mined' if mining_on(config) else ''
  return f'finetune_{config.method}{mined}'


def plan(config: mlc.ConfigDict, workdir: str
         ) -> list[tuple[str, mlc.ConfigDict, str]]:
  """``[(name, config, workdir)]`` of the runs this config asks for."""
  if config.stage != 'both':
    return [(config.stage, config, workdir)]
  workdir = os.path.abspath(workdir)  # init_from must not depend on the cwd
  first = _first_stage(config)
  if first == 'zeroshot':  # the checkpoint as it is; fine-tuned from it
    runs = [(first, stage_config(config, 'finetune', method='clip',
                                 mining=False),
             os.path.join(workdir, first))]
    init_from = ''
  else:
    init_from = os.path.join(workdir, first)
    runs = [(first, stage_config(config, 'pretrain'), init_from)]
  finetunes = {'finetune_clip': stage_config(
      config, 'finetune', method='clip', init_from=init_from, mining=False)}
  finetunes[method_stage(config)] = stage_config(
      config, 'finetune', init_from=init_from)
  runs += [(name, c, os.path.join(workdir, name))
           for name, c in finetunes.items()]
  return runs


def zero_shot(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """The test metrics of ``config.init_path``'s towers, not trained.

  Written to ``<workdir>/summary.json`` with the config; a later call with
  the same config reads them back instead of evaluating again.

  Returns:
    A summary like `runner.train_and_evaluate`'s, at step 0.
  """
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  config_json = json.loads(config.to_json_best_effort())
  path = os.path.join(workdir, 'summary.json')
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get('config') == config_json:
      return saved['summary']
  setup = runner.prepare(FAMILY, config)
  pieces = build(setup)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  results = pieces.evaluate(pieces.init_state(), True,
                            workdir if is_main else None)
  results = runner.only_scalars(results)
  summary = dict(step=0, interrupted=False)
  summary.update({k: float(v) for k, v in results.items()
                  if k in SUMMARY + PROTOCOL_SUMMARY})
  summary['wall_s'] = round(time.time() - t0, 1)
  if is_main:
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
      json.dump({'config': config_json, 'summary': summary,
                 'results': {k: float(v) for k, v in results.items()}}, f,
                indent=1)
    os.replace(tmp, path)  # atomic: a crash never leaves half a summary
  return summary


def prepare(config: mlc.ConfigDict) -> runner.Setup:
  """Checks the config (every stage of ``stage=both``) and opens the data;
  writes nothing. ``init_from`` must hold parameters that fit, and
  ``init_path`` a checkpoint whose tensors fit its config.json."""
  validate(config, 1)
  setups = [runner.prepare(FAMILY, c) for _, c, _ in plan(config, '.')]
  if config.init_path:
    try:
      clip_pretrained.load_params(os.path.abspath(config.init_path),
                                  pretrained_spec(config))
    except (FileNotFoundError, ValueError) as e:
      raise checks.ConfigError(
          f'init_path={config.init_path!r}: {e}') from None
  elif config.stage == 'finetune':
    pieces = build(setups[0])
    state_lib.load_params(pieces.init_state(), config.init_from,
                          pieces.init_fields)
  return setups[-1]


def train_and_evaluate(config: mlc.ConfigDict, workdir: str, *,
                       allow_changes: tuple[str, ...] = ()) -> dict[str, Any]:
  """Trains per ``config`` in ``workdir`` (every stage of ``stage=both``).

  Usable from Colab without absl: ``train_and_evaluate(get_config(),
  '/tmp/run')`` with ``from configs.clip_mixup import get_config``.
  Re-running with the same workdir resumes (each stage from its own
  checkpoints; finished stages are only evaluated again). Another method
  in the same workdir (``method=m3mix`` after ``m2mix``) reuses the
  pretraining and plain fine-tuning runs.

  Args:
    config: a config from ``configs/clip_mixup.py``.
    workdir: run directory (``stage=both``: one subdirectory per stage).
    allow_changes: config fields allowed to differ from the checkpoints
      being resumed (see `hnjax.train.workdir.check_resume`).

  Returns:
    A summary dict: ``step``, ``interrupted``, the test metrics of the
    (last) run (``r1sum``, ``i2t_r1`` ..., ``uniformity``, ``alignment``,
    ``modality_gap``, ``hard_negative_acc``), ``state_fingerprint``,
    ``wall_s``; with ``stage=both`` also each stage's metrics prefixed by
    ``zeroshot_`` and ``finetune_clip_``, and ``stages`` (name -> summary).
  """
  if config.stage != 'both':
    return runner.train_and_evaluate(FAMILY, config, workdir,
                                     allow_changes=allow_changes)
  stages = {}
  for name, c, directory in plan(config, workdir):
    if name == 'zeroshot':
      stages[name] = zero_shot(c, directory)
      continue
    # The mixing fields do not touch the CLIP / SigLIP stages: the study of
    # another method in the same workdir reuses them.
    unused = () if c.method in ('m2mix', 'm3mix') else ('m2mix', 'm3mix')
    if not mining_on(c):  # nor the mining filters a run without mining
      unused += ('mining',)
    stages[name] = runner.train_and_evaluate(
        FAMILY, c, directory, allow_changes=(*allow_changes, *unused))
    if stages[name]['interrupted']:
      out = dict(stages[name])
      out['stage'] = name
      return out
  out = dict(stages[method_stage(config)])
  first = _first_stage(config)
  prefixes = {first: 'zeroshot_', 'finetune_clip': 'finetune_clip_'}
  for name, prefix in prefixes.items():
    if name != method_stage(config):
      out.update({prefix + k: stages[name][k]
                  for k in ('r1sum', 'hard_negative_acc')
                  if k in stages[name]})
  out['wall_s'] = round(sum(s['wall_s'] for s in stages.values()), 1)
  if jax.process_index() == 0:
    rows = comparison_rows(stages, config, first)
    with open(os.path.join(workdir, 'comparison.json'), 'w') as f:
      json.dump(rows, f, indent=1)
    try:
      from hnjax.eval import plots  # pylint: disable=g-import-not-at-top
      plots.plot_clip_comparison(workdir, rows, {
          label: os.path.join(workdir, name, 'test_embeddings.npz')
          for label, name in _labels(config, first)}, show=False)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('comparison plots failed: %s', e)
  out['stages'] = rows
  return out


def _labels(config: mlc.ConfigDict, first: str = 'pretrain'
            ) -> list[tuple[str, str]]:
  """``(row label, stage)`` of a study's trained or loaded towers."""
  rows = [('zero-shot', first), ('fine-tune (clip)', 'finetune_clip')]
  name = method_stage(config)
  if name != 'finetune_clip':
    m = config.mining
    extras = ([f'{m.negatives} mined negatives'] if m.negatives else []) + (
        [f'{m.batches} batches'] if m.batches != 'random' else [])
    label = ', '.join([config.method] + extras)
    rows.append((f'fine-tune ({label})', name))
  return rows


def comparison_rows(stages: dict[str, dict[str, Any]],
                    config: mlc.ConfigDict, first: str = 'pretrain'
                    ) -> dict[str, dict[str, float]]:
  """``{row label: {metric: value}}`` of a ``stage=both`` study.

  ``config`` is the study's (its method and mining name the last row);
  ``first`` is the stage of the zero-shot row (`_first_stage`); the
  untrained row is there when that stage measured baselines.
  """
  rows = {}
  untrained = {k[len('untrained_'):]: v for k, v in stages[first].items()
               if k.startswith('untrained_')}
  if untrained:
    rows['untrained'] = untrained
  for label, name in _labels(config, first):
    rows[label] = {k: stages[name][k] for k in SUMMARY if k in stages[name]}
  return rows


def format_summary(summary: dict[str, Any]) -> str | None:
  """The comparison table of a ``stage=both`` summary (None otherwise)."""
  rows = summary.get('stages')
  if not rows:
    return None
  cols = ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10',
          'r1sum', 'uniformity', 'alignment', 'modality_gap',
          'hard_negative_acc')
  heads = ('I2T@1', '@5', '@10', 'T2I@1', '@5', '@10', 'R1Sum', 'unif',
           'align', 'gap', 'hardneg')
  width = max(len(r) for r in rows) + 2
  lines = [''.ljust(width) + ''.join(h.rjust(8) for h in heads)]
  for label, row in rows.items():
    cells = ''.join((f'{row[c]:8.2f}' if c in row else ' ' * 7 + '-')
                    for c in cols)
    lines.append(label.ljust(width) + cells)
  return '\n'.join(lines)
