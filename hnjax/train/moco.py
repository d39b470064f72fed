"""MoCo v2 and MoCHi training: state, step, and ``train_and_evaluate``.

One step (ALGORITHMS.md §2.2, §3.1; DESIGN.md "Data flow of one MoCHi step"):

1. two views of every image, augmented on device from per-example keys;
2. the key encoder's momentum update *first*, then keys from a shuffled
   batch through split batch norm (shuffle-BN), unshuffled, normalised and
   stop-gradient;
3. per device, inside ``shard_map``: logits of the local queries against the
   local queue shard, log-sum-exp and the hardest negatives combined across
   shards in one pass (`hnjax.bank`), MoCHi's synthetic negatives mixed from
   the global hardest set, InfoNCE over ``[q·k | q·queue | q·synthetic] / T``;
4. gradients, optax update, and the keys enqueued into the local shard.

Everything the run needs to resume exactly (params, momentum params, batch
statistics, optimizer state, the sharded queue with its pointer and ids, the
PRNG key and the step) lives in one `TrainState`; the data order is a
function of the step. Re-running the same command resumes from the workdir.
"""

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections as mlc
import optax

from hnjax import data
from hnjax import losses
from hnjax import models
from hnjax import numerics
from hnjax import parallel
from hnjax import queue as queue_lib
from hnjax import samplers
from hnjax.eval import evaluators
from hnjax.eval import features as features_lib
from hnjax.eval import geometry
from hnjax.eval import knn as knn_lib
from hnjax.train import checks
from hnjax.train import optim as optim_lib
from hnjax.train import runner
from hnjax.train import state as state_lib

METHODS = ('moco_v2', 'mochi')
DATA = parallel.DATA


@flax.struct.dataclass
class TrainState:
  """Everything a MoCo/MoCHi run carries from step to step.

  Attributes:
    step: ``[]`` int32, completed optimizer steps.
    params: query encoder parameters (replicated).
    batch_stats: query encoder BN statistics.
    target_params: key (momentum) encoder parameters.
    target_batch_stats: key encoder BN statistics.
    opt_state: optax state.
    queue: `hnjax.queue.MemoryQueue`, keys sharded over ``'data'``.
    rng: typed PRNG key; step ``t`` uses ``fold_in(rng, t)``.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  target_params: Any
  target_batch_stats: Any
  opt_state: Any
  queue: queue_lib.MemoryQueue
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static hyperparameters of a step (hashable)."""
  temperature: float
  momentum: float
  num_hard: int  # 0: plain MoCo v2
  num_mix: int
  num_query_mix: int
  skip_top: int
  max_similarity: float | None
  mask_same_id: bool
  shuffle_bn: bool
  block_size: int | None
  augment: data.AugmentConfig
  key_image: str = 'image'  # the batch field view k is augmented from
  # None: exact hardest negatives; a float: approximate (approx_max_k).
  recall_target: float | None = None
  # The false-negative share of the N hardest negatives and the positive's
  # rank, per step: N (0: off).
  diagnostics: int = 0


# ----------------------------------------------------------------------------
# Config checks: all before any compilation or any file is written.
# ----------------------------------------------------------------------------


def validate(config: mlc.ConfigDict, num_devices: int) -> None:
  """Raises checks.ConfigError naming the first impossible MoCo field.

  The fields every family shares are checked by `checks.common` first.
  """
  checks.one_of(config, 'method', METHODS)
  checks.positive(config, 'temperature', 'queue.size', 'model.dim',
                  'model.bn_splits', 'eval.knn_k', 'eval.knn_temperature')
  checks.require(0 <= config.momentum < 1, 'momentum', config.momentum,
                 'must be in [0, 1)')
  checks.require(config.data.name in data.DATASETS, 'data.name',
                 config.data.name, f'unknown dataset; known: {data.DATASETS}')
  checks.one_of(config, 'eval.features', ('backbone', 'projection'))
  checks.one_of(config, 'model.dtype', ('float32', 'bfloat16'))
  for field in ('eval.during', 'eval.final'):
    try:
      evaluators.parse(checks.get(config, field))
    except ValueError as e:
      raise checks.ConfigError(f'{field}={checks.get(config, field)!r}: '
                               f'{e}') from None
  g = config.batch_size
  checks.require(g % config.model.bn_splits == 0, 'model.bn_splits',
                 config.model.bn_splits, f'must divide batch_size={g}')
  k = config.queue.size
  checks.require(k >= g, 'queue.size', k,
                 f'must be at least the global batch size {g}')
  checks.require(k % num_devices == 0, 'queue.size', k,
                 f'must be divisible by the {num_devices} devices')
  checks.require(config.queue.block_size >= -1, 'queue.block_size',
                 config.queue.block_size, 'must be -1 (auto), 0 or positive')
  if config.method == 'mochi':
    checks.positive(config, 'mochi.num_hard')
    checks.require(config.mochi.num_hard <= k, 'mochi.num_hard',
                   config.mochi.num_hard, f'must be <= queue.size={k}')
    for f in ('num_mix', 'num_query_mix', 'warmup_epochs', 'skip_top'):
      checks.require(config.mochi[f] >= 0, f'mochi.{f}', config.mochi[f],
                     'must be >= 0')
    checks.require(config.mochi.num_hard + config.mochi.skip_top <= k,
                   'mochi.skip_top', config.mochi.skip_top,
                   f'plus mochi.num_hard must be <= queue.size={k}')
    checks.require(-1 <= config.mochi.max_similarity, 'mochi.max_similarity',
                   config.mochi.max_similarity,
                   'must be >= -1 (>= 1: no ceiling)')
    checks.one_of(config, 'mochi.selection', ('exact', 'approx'))
    checks.require(0 < config.mochi.recall_target <= 1,
                   'mochi.recall_target', config.mochi.recall_target,
                   'must be in (0, 1]')
  aug = config.augment
  checks.require(0 < aug.scale_min <= 1, 'augment.scale_min', aug.scale_min,
                 'must be in (0, 1]')
  checks.in_unit_interval(config, 'augment.flip_prob', 'augment.jitter_prob',
                          'augment.grayscale_prob', 'augment.blur_prob')


def _classes(config):
  c = config.data.classes
  return tuple(s.strip() for s in c.split(',') if s.strip()) or None


def _source(config, split):
  d = config.data
  return data.get_source(d.name, split, data_dir=d.data_dir or None,
                         load_size=d.load_size or None,
                         classes=_classes(config))


def _step_config(config, info) -> StepConfig:
  aug = config.augment
  mean, std = info.mean, info.std
  augment = data.AugmentConfig(
      out_size=config.data.image_size, scale=(aug.scale_min, 1.0),
      flip_prob=aug.flip_prob, jitter_prob=aug.jitter_prob,
      brightness=aug.jitter_strength, contrast=aug.jitter_strength,
      saturation=aug.jitter_strength, hue=aug.hue,
      grayscale_prob=aug.grayscale_prob, blur_prob=aug.blur_prob,
      mean=tuple(mean), std=tuple(std))
  block = config.queue.block_size
  return StepConfig(
      temperature=float(config.temperature), momentum=float(config.momentum),
      num_hard=config.mochi.num_hard if config.method == 'mochi' else 0,
      num_mix=config.mochi.num_mix, num_query_mix=config.mochi.num_query_mix,
      skip_top=config.mochi.get('skip_top', 0),
      max_similarity=(None if config.mochi.get('max_similarity', 1.0) >= 1
                      else float(config.mochi.max_similarity)),
      mask_same_id=config.queue.mask_same_id, shuffle_bn=config.shuffle_bn,
      block_size=None if block < 0 else block, augment=augment,
      key_image=config.data.get('key_image', 'image'),
      recall_target=(float(config.mochi.recall_target)
                     if config.mochi.get('selection', 'exact') == 'approx'
                     else None),
      diagnostics=(config.mochi.num_hard
                   if config.get('hardness_diagnostics', False) else 0))


# ----------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------


def _contrastive_body(q, k, queue_keys, queue_ids, queue_labels, ids, labels,
                      key, *, cfg, use_mochi):
  """Per-device body: the MoCo / MoCHi loss of the local queries.

  Local shapes: q, k ``[B, D]``; queue_keys ``[K / n, D]``; queue_ids,
  queue_labels ``[K / n]``; ids, labels ``[B]``.
  `hnjax.losses.mochi_info_nce` makes one pass over the local queue shard
  for the log-sum-exp (with gradient) and the hardest negatives (without),
  combined across devices.
  """
  t = cfg.temperature
  mask = None
  if cfg.mask_same_id:
    all_ids = lax.all_gather(ids, DATA, tiled=True)
    mask = samplers.same_id_mask(all_ids, queue_ids)
  loss, aux = losses.mochi_info_nce(
      key, q, k, queue_keys, temperature=t,
      num_hard=cfg.num_hard if use_mochi else 0, num_mix=cfg.num_mix,
      num_query_mix=cfg.num_query_mix, negative_mask=mask, axis_name=DATA,
      block_size=cfg.block_size, skip_top=cfg.skip_top,
      max_similarity=cfg.max_similarity,
      recall_target=cfg.recall_target if use_mochi else None)
  # Mean negative logit over the whole queue: q . mean(queue) / T.
  n_keys = queue_keys.shape[0] * lax.axis_size(DATA)
  queue_mean = lax.psum(jnp.sum(queue_keys, 0), DATA) / n_keys
  metrics = dict(
      pos_logit=lax.stop_gradient(jnp.sum(q * k, -1)) / t,
      neg_logit=lax.stop_gradient(q @ queue_mean) / t,
      hard_neg_sim=aux['hardest_similarity'],
      proxy_acc=aux['positive_first'].astype(jnp.float32))
  if 'selection_recall' in aux:  # approximate hardest negatives
    metrics['selection_recall'] = aux['selection_recall']
  if cfg.diagnostics:  # the same N hardest for MoCo v2 and MoCHi
    ranged = use_mochi and (cfg.skip_top or cfg.max_similarity is not None)
    diag = samplers.hardness_diagnostics(
        q, k, queue_keys, labels, queue_labels,
        num_hard=cfg.diagnostics,
        negative_mask=mask, axis_name=DATA, block_size=cfg.block_size,
        skip_top=cfg.skip_top if ranged else 0,
        max_similarity=cfg.max_similarity if ranged else None)
    metrics.update(
        false_neg_share=diag['false_negative_share'],
        positive_rank=diag['positive_rank'])
    if 'selected_false_negative_share' in diag:
      metrics['mixed_false_neg_share'] = diag['selected_false_negative_share']
  return loss, metrics


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               model: Any, tx: optax.GradientTransformation,
               cfg: StepConfig, use_mochi: bool,
               mesh: jax.sharding.Mesh) -> tuple[TrainState, dict[str, Any]]:
  """One MoCo v2 (``use_mochi=False``) or MoCHi optimizer step.

  Args:
    state: the `TrainState` (donated when jitted by the runner).
    batch: global batch: ``image`` uint8 ``[G, H, W, C]``, ``index`` int
      ``[G]`` (dataset indices), sharded over ``'data'``.
    model: the flax encoder (query and key encoders share it).
    tx: the optax optimizer.
    cfg: static hyperparameters.
    use_mochi: add MoCHi's synthetic negatives.
    mesh: the device mesh.

  Returns:
    ``(new_state, metrics)``: scalar metrics and the per-query similarity
    of the hardest real negative, ``hard_neg_sim [G]``.
  """
  key = jax.random.fold_in(state.rng, state.step)
  k_aug, k_shuffle, k_mochi = jax.random.split(key, 3)
  views_q, views_k = data.two_views(
      data.example_keys(k_aug, batch['index']), batch['image'], cfg.augment,
      images_k=batch[cfg.key_image])

  # Momentum update before the key forward pass, as in MoCo.
  target = optax.incremental_update(state.params, state.target_params,
                                    1.0 - cfg.momentum)
  xk, perm = (models.shuffle(k_shuffle, views_k) if cfg.shuffle_bn else
              (views_k, None))
  out_k, target_vars = model.apply(
      {'params': target, 'batch_stats': state.target_batch_stats}, xk,
      train=True, mutable=['batch_stats'])
  k = out_k['projection']
  if cfg.shuffle_bn:
    k = models.unshuffle(k, perm)
  k = lax.stop_gradient(numerics.l2_normalize(k))

  body = jax.shard_map(
      functools.partial(_contrastive_body, cfg=cfg, use_mochi=use_mochi),
      mesh=mesh, in_specs=(P(DATA),) * 7 + (P(),),
      out_specs=(P(DATA), P(DATA)))

  def loss_fn(params):
    out_q, new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, views_q,
        train=True, mutable=['batch_stats'])
    q = numerics.l2_normalize(out_q['projection'])
    loss, metrics = body(q, k, state.queue.keys, state.queue.ids,
                         state.queue.labels, batch['index'], batch['label'],
                         k_mochi)
    return jnp.mean(loss), (metrics, new_vars['batch_stats'])

  (loss, (per_query, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Keys join the queue after the loss that used the old queue (§2.2.4).
  new_queue = jax.shard_map(
      lambda qu, kk, ii, ll: queue_lib.enqueue(qu, kk, ii, ll,
                                               axis_name=DATA),
      mesh=mesh, in_specs=(queue_lib.specs(DATA), P(DATA), P(DATA),
                           P(DATA)),
      out_specs=queue_lib.specs(DATA))(state.queue, k, batch['index'],
                                       batch['label'])
  metrics = {name: jnp.mean(v) for name, v in per_query.items()
             if name != 'hard_neg_sim'}
  if 'positive_rank' in per_query:  # heavy-tailed: the typical query's
    metrics['positive_rank'] = jnp.median(per_query['positive_rank'])
  metrics.update(loss=loss, hard_neg_sim=per_query['hard_neg_sim'],
                 grad_norm=optax.tree.norm(grads))
  new_state = TrainState(
      step=state.step + 1, params=params, batch_stats=batch_stats,
      target_params=target, target_batch_stats=target_vars['batch_stats'],
      opt_state=opt_state, queue=new_queue, rng=state.rng)
  return new_state, metrics


def create_state(config, model, tx, info, mesh) -> TrainState:
  """A fresh `TrainState`: replicated, except the queue rows (sharded)."""
  c = info.image_shape[-1]
  size = config.data.image_size

  def init():
    key = jax.random.key(config.seed)
    k_init, k_queue, k_run = jax.random.split(key, 3)
    variables = model.init(k_init, jnp.zeros((1, size, size, c)),
                           train=False)
    params, stats = variables['params'], variables['batch_stats']
    q = queue_lib.init(k_queue, config.queue.size, config.model.dim)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
        target_params=params, target_batch_stats=stats,
        opt_state=tx.init(params), queue=q, rng=k_run)

  def shardings(shapes):
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA))
    return jax.tree.map(lambda _: rep, shapes).replace(
        queue=queue_lib.MemoryQueue(keys=rows, ids=rows, labels=rows,
                                    ptr=rep))

  return state_lib.create(init, mesh, shardings)


# ----------------------------------------------------------------------------
# Evaluation: kNN monitor during training, kNN and linear probe at the end.
# ----------------------------------------------------------------------------


def _make_encoder_fn(model, config, info):
  size = config.data.image_size
  feature = config.eval.features

  @jax.jit
  def encode(params, batch_stats, batch):
    x = data.eval_transform(batch['image'], out_size=size, mean=info.mean,
                            std=info.std)
    out = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                      train=False)
    return out['features' if feature == 'backbone' else 'projection']

  return encode


def _make_raw_fn(config):
  size = config.data.image_size

  @jax.jit
  def raw(batch):
    # Pixels in [0, 1] at the encoder's input size, flattened.
    x = data.eval_transform(batch['image'], out_size=size, mean=(0.0,),
                            std=(1.0,))
    return x.reshape(x.shape[0], -1)

  return raw


def _make_views_fn(model, cfg, seed):
  """Jitted ``(params, batch_stats, batch) -> [G, 2 * dim]``: the unit
  projections of the two training views of each example, side by side."""

  @jax.jit
  def views(params, batch_stats, batch):
    keys = data.example_keys(jax.random.key(seed), batch['index'])
    xq, xk = data.two_views(keys, batch['image'], cfg.augment,
                            images_k=batch[cfg.key_image])
    z = [numerics.l2_normalize(model.apply(
        {'params': params, 'batch_stats': batch_stats}, x,
        train=False)['projection']) for x in (xq, xk)]
    return jnp.concatenate(z, axis=1)

  return views


def geometry_of_views(state, views_fn, source, cfg, config, mesh):
  """Wang & Isola's alignment and uniformity of the test views.

  Alignment: mean squared distance between the unit projections of two
  training-augmented views of each test image (lower: views agree);
  uniformity: log of the mean Gaussian potential (t=2) between the first
  views of all test images (lower: more uniform on the sphere).
  """
  split = features_lib.extract(
      lambda b: views_fn(state.params, state.batch_stats, b), source,
      mesh=mesh, batch_size=config.eval.batch_size,
      inputs=tuple(dict.fromkeys(('image', cfg.key_image, 'index'))),
      fields=())
  z1, z2 = jnp.split(jnp.asarray(split['features']), 2, axis=1)
  return {'alignment': geometry.alignment(z1, z2),
          'uniformity': float(geometry.uniformity(z1))}


def evaluate(state, encode, sources, config, info, mesh, names, *,
             baselines=None):
  """Runs the named evaluators on the encoder's features of ``sources``.

  Args:
    state: the `TrainState` whose query encoder is evaluated.
    encode: jitted ``(params, batch_stats, batch) -> features``.
    sources: ``{'train': source, 'test': source}``.
    config: the run's config.
    info: the dataset's `DatasetInfo`.
    mesh: the device mesh.
    names: evaluator names, comma separated (``'knn,linear'``).
    baselines: optional ``{prefix: batch -> features}``; each runs the same
      evaluators, results named ``prefix_`` + name (``untrained_knn_top1``).

  Returns:
    ``{'knn_top1': ..., 'linear_top1': ..., ...}``.
  """
  names = evaluators.parse(names)
  needed = {s: sources[s] for s in evaluators.splits_needed(names)}
  options = dict(config.eval, num_classes=info.num_classes, seed=config.seed)
  # Label factors read by kNN too (shapes32: 'shape,colour'), so that a
  # monitor can tell which half of the label the features carry.
  factors = tuple(filter(None, config.eval.get('knn_factors', '').split(',')))
  if 'knn' not in names or 'test' not in needed:
    factors = ()

  def run(fn):
    splits = features_lib.extract_splits(
        fn, needed, mesh=mesh, batch_size=config.eval.batch_size,
        fields=('label',) + factors)
    if not factors:
      return evaluators.run(names, splits, options)
    train, test = splits['train'], splits['test']
    # One neighbour search votes for the label and each factor.
    accs = knn_lib.knn_accuracies(
        test['features'], train['features'],
        {f: (test[f], train[f]) for f in ('label',) + factors},
        k=config.eval.knn_k, temperature=config.eval.knn_temperature)
    out = {'knn_top1': accs.pop('label')}
    out.update({f'knn_{f}_top1': v for f, v in accs.items()})
    rest = tuple(n for n in names if n != 'knn')
    if rest:
      out.update(evaluators.run(rest, splits, options))
    return out

  out = run(lambda batch: encode(state.params, state.batch_stats, batch))
  for prefix, fn in (baselines or {}).items():
    out.update({f'{prefix}_{k}': v for k, v in run(fn).items()})
  return out


# ----------------------------------------------------------------------------
# The family: what the shared runner needs from MoCo v2 / MoCHi.
# ----------------------------------------------------------------------------


def open_data(config: mlc.ConfigDict) -> runner.Data:
  """Opens the train and test splits; a missing dataset raises here."""
  info = data.get_info(config.data.name, data_dir=config.data.data_dir or None,
                       load_size=config.data.load_size or None,
                       classes=_classes(config))
  sources = dict(train=_source(config, info.train_split),
                 test=_source(config, info.eval_split))
  fields = ('image', 'label', 'index')
  key_image = config.data.get('key_image', 'image')
  factors = config.eval.get('knn_factors', '')
  if key_image != 'image' or factors:
    available = sources['train'].get_batch([0])
    listed = ', '.join(sorted(available))
    checks.require(key_image in available, 'data.key_image', key_image,
                   f'must name an image field of {config.data.name} '
                   f'(it has {listed})')
    for f in filter(None, factors.split(',')):
      checks.require(f in available and available[f].dtype.kind in 'iu',
                     'eval.knn_factors', factors,
                     f'{f!r} is not an integer field of {config.data.name} '
                     f'(it has {listed})')
  if key_image != 'image':
    fields += (key_image,)
  return runner.Data(train=sources['train'], fields=fields,
                     info=(info, sources))


def build(setup: runner.Setup) -> runner.Pieces:
  """Model, optimizer, state, steps and evaluation of one run."""
  config, mesh = setup.config, setup.mesh
  info, sources = setup.data.info
  cfg = _step_config(config, info)
  model = models.create_encoder(
      config.model.backbone, head=config.model.head, dim=config.model.dim,
      hidden=config.model.hidden or None, bn_splits=config.model.bn_splits,
      dtype=jnp.dtype(config.model.dtype))
  schedule = optim_lib.learning_rate_schedule(
      config.optim, batch_size=config.batch_size,
      steps_per_epoch=setup.steps_per_epoch, total_steps=setup.total_steps)
  tx = optim_lib.make_optimizer(config.optim, schedule)
  # Plain MoCo for the warm-up epochs, then MoCHi.
  warmup = (int(config.mochi.warmup_epochs * setup.steps_per_epoch)
            if config.method == 'mochi' else setup.total_steps)
  encode = _make_encoder_fn(model, config, info)
  fresh = lambda: create_state(config, model, tx, info, mesh)
  views = _make_views_fn(model, cfg, config.seed)

  def baselines():
    """What training must beat: its own initial encoder, and raw pixels."""
    if not config.eval.get('baselines', False):
      return None
    untrained = fresh()
    return {'untrained': lambda b: encode(untrained.params,
                                          untrained.batch_stats, b),
            'raw_pixel': _make_raw_fn(config)}

  def step(use_mochi):
    return functools.partial(train_step, model=model, tx=tx, cfg=cfg,
                             use_mochi=use_mochi, mesh=mesh)

  def run_eval(state, final, plot_dir):
    del plot_dir  # The runner's curves are all MoCo plots.
    names = config.eval.final if final else config.eval.during
    out = evaluate(state, encode, sources, config, info, mesh, names,
                   baselines=baselines() if final else None)
    if final and config.eval.get('geometry', False):
      out.update(geometry_of_views(state, views, sources['test'], cfg,
                                   config, mesh))
    return out

  return runner.Pieces(
      init_state=fresh,
      step=step,
      variant=lambda t: t > warmup,
      evaluate=run_eval,
      learning_rate=schedule,
      fingerprint=lambda state: {'params': state.params, 'queue': state.queue},
      scalars=lambda t: {'mochi': float(t > warmup)},
      progress=('loss', 'proxy_acc'),
      init_fields=('params', 'batch_stats', 'target_params',
                   'target_batch_stats'))


FAMILY = runner.Family(name='moco', validate=validate, open_data=open_data,
                       build=build)


def prepare(config: mlc.ConfigDict) -> runner.Setup:
  """Checks the config and opens the data; writes nothing."""
  return runner.prepare(FAMILY, config)


def train_and_evaluate(config: mlc.ConfigDict, workdir: str, *,
                       allow_changes: tuple[str, ...] = ()) -> dict[str, Any]:
  """Trains MoCo v2 / MoCHi per ``config`` in ``workdir``, resuming if needed.

  Usable from Colab without absl: ``train_and_evaluate(get_config(),
  '/tmp/run')``. Re-running with the same workdir resumes from the newest
  good checkpoint. SIGTERM and Ctrl-C save a checkpoint and return early.

  Args:
    config: a config from ``configs/moco_v2.py`` or ``configs/mochi.py``.
    workdir: run directory (checkpoints, metrics.jsonl, TensorBoard events,
      plots, config.json).
    allow_changes: config fields allowed to differ from the checkpoint
      being resumed (see `hnjax.train.workdir.check_resume`).

  Returns:
    A summary dict: ``step``, ``knn_top1``, ``linear_top1`` (with the
    linear evaluator), ``state_fingerprint``, ``interrupted``, ``wall_s``.
  """
  return runner.train_and_evaluate(FAMILY, config, workdir,
                                  allow_changes=allow_changes)
