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
import json
import os
import time
from typing import Any

from absl import logging
import flax.struct
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections as mlc
import numpy as np
import optax

from hnjax import checkpoint
from hnjax import data
from hnjax import losses
from hnjax import models
from hnjax import parallel
from hnjax import queue as queue_lib
from hnjax import samplers
from hnjax.eval import knn as knn_lib
from hnjax.eval import linear as linear_lib
from hnjax.train import loop
from hnjax.train import optim as optim_lib
from hnjax.train import preemption
from hnjax.train import writer as writer_lib

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
  mask_same_id: bool
  shuffle_bn: bool
  block_size: int | None
  augment: data.AugmentConfig


# ----------------------------------------------------------------------------
# Config checks: all before any compilation or any file is written.
# ----------------------------------------------------------------------------


def validate(config: mlc.ConfigDict, num_devices: int) -> None:
  """Raises loop.ConfigError naming the first impossible field."""
  loop.require(config.method in METHODS, 'method', config.method,
               f'must be one of {METHODS}')
  loop.positive(config, 'batch_size', 'temperature', 'queue.size',
                'model.dim', 'model.bn_splits', 'log_every_steps',
                'hist_every_steps', 'ckpt.every_steps', 'ckpt.max_to_keep',
                'optim.learning_rate', 'optim.lr_base_batch',
                'eval.batch_size', 'eval.knn_k', 'eval.knn_temperature')
  if config.num_steps <= 0:
    loop.positive(config, 'num_epochs')
  loop.require(0 <= config.momentum < 1, 'momentum', config.momentum,
               'must be in [0, 1)')
  loop.require(config.data.name in data.DATASETS, 'data.name',
               config.data.name, f'unknown dataset; known: {data.DATASETS}')
  loop.require(config.model.backbone in models.backbone_names(),
               'model.backbone', config.model.backbone,
               f'unknown model; known: {models.backbone_names()}')
  loop.require(config.optim.name in optim_lib.OPTIMIZERS, 'optim.name',
               config.optim.name, f'must be one of {optim_lib.OPTIMIZERS}')
  loop.require(config.optim.schedule in optim_lib.SCHEDULES,
               'optim.schedule', config.optim.schedule,
               f'must be one of {optim_lib.SCHEDULES}')
  loop.require(config.eval.features in ('backbone', 'projection'),
               'eval.features', config.eval.features,
               "must be 'backbone' or 'projection'")
  g = config.batch_size
  loop.require(g % num_devices == 0, 'batch_size', g,
               f'must be divisible by the {num_devices} devices')
  loop.require(g % jax.process_count() == 0, 'batch_size', g,
               f'must be divisible by the {jax.process_count()} processes')
  loop.require(g % config.model.bn_splits == 0, 'model.bn_splits',
               config.model.bn_splits, f'must divide batch_size={g}')
  k = config.queue.size
  loop.require(k >= g, 'queue.size', k,
               f'must be at least the global batch size {g}')
  loop.require(k % num_devices == 0, 'queue.size', k,
               f'must be divisible by the {num_devices} devices')
  loop.require(config.queue.block_size >= -1, 'queue.block_size',
               config.queue.block_size, 'must be -1 (auto), 0 or positive')
  if config.method == 'mochi':
    loop.positive(config, 'mochi.num_hard')
    loop.require(config.mochi.num_hard <= k, 'mochi.num_hard',
                 config.mochi.num_hard, f'must be <= queue.size={k}')
    for f in ('num_mix', 'num_query_mix', 'warmup_epochs'):
      loop.require(config.mochi[f] >= 0, f'mochi.{f}', config.mochi[f],
                   'must be >= 0')
  aug = config.augment
  loop.require(0 < aug.scale_min <= 1, 'augment.scale_min', aug.scale_min,
               'must be in (0, 1]')
  for f in ('flip_prob', 'jitter_prob', 'grayscale_prob', 'blur_prob'):
    loop.require(0 <= aug[f] <= 1, f'augment.{f}', aug[f], 'must be in [0, 1]')


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
      mask_same_id=config.queue.mask_same_id, shuffle_bn=config.shuffle_bn,
      block_size=None if block < 0 else block, augment=augment)


# ----------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------


def _normalize(x):
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


def _contrastive_body(q, k, queue_keys, queue_ids, ids, key, *, cfg,
                      use_mochi):
  """Per-device body: the MoCo / MoCHi loss of the local queries.

  Local shapes: q, k ``[B, D]``; queue_keys ``[K / n, D]``; queue_ids
  ``[K / n]``; ids ``[B]``. `hnjax.losses.mochi_info_nce` makes one pass
  over the local queue shard for the log-sum-exp (with gradient) and the
  hardest negatives (without), combined across devices.
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
      block_size=cfg.block_size)
  # Mean negative logit over the whole queue: q . mean(queue) / T.
  n_keys = queue_keys.shape[0] * lax.axis_size(DATA)
  queue_mean = lax.psum(jnp.sum(queue_keys, 0), DATA) / n_keys
  metrics = dict(
      pos_logit=lax.stop_gradient(jnp.sum(q * k, -1)) / t,
      neg_logit=lax.stop_gradient(q @ queue_mean) / t,
      hard_neg_sim=aux['hardest_similarity'],
      proxy_acc=aux['positive_first'].astype(jnp.float32))
  return loss, metrics


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               model: Any, tx: optax.GradientTransformation,
               cfg: StepConfig, use_mochi: bool,
               mesh: jax.sharding.Mesh) -> tuple[TrainState, dict[str, Any]]:
  """One MoCo v2 (``use_mochi=False``) or MoCHi optimizer step.

  Args:
    state: the `TrainState` (donated when jitted by `train_and_evaluate`).
    batch: global batch: ``image`` uint8 ``[G, H, W, C]``, ``index`` int
      ``[G]`` (dataset indices), sharded over ``'data'``.
    model: the flax encoder (query and key encoders share it).
    tx: the optax optimizer.
    cfg: static hyperparameters.
    use_mochi: add MoCHi's synthetic negatives.
    mesh: the device mesh.

  Returns:
    ``(new_state, metrics)``: scalar metrics and the per-query
    ``hard_neg_sim [G]``.
  """
  key = jax.random.fold_in(state.rng, state.step)
  k_aug, k_shuffle, k_mochi = jax.random.split(key, 3)
  views_q, views_k = data.two_views(
      data.example_keys(k_aug, batch['index']), batch['image'], cfg.augment)

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
  k = lax.stop_gradient(_normalize(k))

  body = jax.shard_map(
      functools.partial(_contrastive_body, cfg=cfg, use_mochi=use_mochi),
      mesh=mesh, in_specs=(P(DATA),) * 5 + (P(),),
      out_specs=(P(DATA), P(DATA)))

  def loss_fn(params):
    out_q, new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, views_q,
        train=True, mutable=['batch_stats'])
    q = _normalize(out_q['projection'])
    loss, metrics = body(q, k, state.queue.keys, state.queue.ids,
                         batch['index'], k_mochi)
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
  metrics.update(loss=loss, hard_neg_sim=jnp.mean(per_query['hard_neg_sim']),
                 hard_neg_sims=per_query['hard_neg_sim'],
                 grad_norm=optax.tree.norm(grads))
  new_state = TrainState(
      step=state.step + 1, params=params, batch_stats=batch_stats,
      target_params=target, target_batch_stats=target_vars['batch_stats'],
      opt_state=opt_state, queue=new_queue, rng=state.rng)
  return new_state, metrics


def create_state(config, model, tx, info, mesh) -> TrainState:
  """A fresh `TrainState`, created directly with its global shardings."""
  h, w, c = info.image_shape
  size = config.data.image_size
  rep = NamedSharding(mesh, P())

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

  del h, w
  shapes = jax.eval_shape(init)
  shardings = jax.tree.map(lambda _: rep, shapes)
  rows = NamedSharding(mesh, P(DATA))
  shardings = shardings.replace(queue=queue_lib.MemoryQueue(
      keys=rows, ids=rows, labels=rows, ptr=rep))
  return jax.jit(init, out_shardings=shardings)()


# ----------------------------------------------------------------------------
# Evaluation.
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


def _features(encode, state, source, config, mesh):
  it = data.eval_iterator(source, global_batch_size=config.eval.batch_size,
                          fields=('image', 'label'))
  fn = lambda batch: encode(state.params, state.batch_stats, batch)
  return loop.extract_features(fn, it, mesh)


def evaluate(state, encode, sources, config, info, mesh, *, probe=False):
  """kNN top-1 (InstDisc protocol) and, optionally, the linear probe."""
  train_x, train_y = _features(encode, state, sources['train'], config, mesh)
  test_x, test_y = _features(encode, state, sources['eval'], config, mesh)
  out = dict(knn_top1=knn_lib.knn_accuracy(
      test_x, test_y, train_x, train_y, num_classes=info.num_classes,
      k=config.eval.knn_k, temperature=config.eval.knn_temperature))
  if probe:
    res = linear_lib.linear_probe(
        train_x, train_y, test_x, test_y, num_classes=info.num_classes,
        epochs=config.eval.probe_epochs, seed=config.seed)
    out['linear_top1'] = res['top1']
  return out


# ----------------------------------------------------------------------------
# train_and_evaluate.
# ----------------------------------------------------------------------------


def _schedule_lengths(config, num_train):
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise loop.ConfigError(
        f'batch_size={config.batch_size}: larger than the training set '
        f'({num_train} examples)')
  total = (config.num_steps if config.num_steps > 0 else
           int(round(config.num_epochs * steps_per_epoch)))
  return steps_per_epoch, total


def _eval_steps(config, total):
  every = config.eval.knn_every_steps
  if every == 0:
    return {total}
  if every < 0:
    every = max(total // 4, 1)
  return set(range(every, total + 1, every)) | {total}


def prepare(config: mlc.ConfigDict):
  """Checks the config and opens the data; writes nothing.

  Returns:
    ``(mesh, info, sources)``.

  Raises:
    loop.ConfigError: an impossible config field.
    FileNotFoundError / ValueError: a missing dataset (from hnjax.data).
  """
  mesh = parallel.make_mesh()
  validate(config, mesh.size)
  info = data.get_info(config.data.name, data_dir=config.data.data_dir or None,
                       load_size=config.data.load_size or None,
                       classes=_classes(config))
  sources = dict(train=_source(config, info.train_split),
                 eval=_source(config, info.eval_split))
  _schedule_lengths(config, len(sources['train']))
  return mesh, info, sources


def train_and_evaluate(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains MoCo v2 / MoCHi per ``config`` in ``workdir``, resuming if needed.

  Usable from Colab without absl: ``train_and_evaluate(get_config(),
  '/tmp/run')``. Re-running with the same workdir resumes from the newest
  good checkpoint. SIGTERM and Ctrl-C save a checkpoint and return early.

  Args:
    config: a config from ``configs/moco_v2.py`` or ``configs/mochi.py``.
    workdir: run directory (checkpoints, metrics.jsonl, TensorBoard events,
      plots, config.json).

  Returns:
    A summary dict: ``step``, ``knn_top1``, ``linear_top1`` (when probed),
    ``state_fingerprint``, ``interrupted``, ``wall_s``.
  """
  t0 = time.time()
  workdir = os.path.abspath(workdir)  # Orbax needs absolute paths.
  mesh, info, sources = prepare(config)
  steps_per_epoch, total = _schedule_lengths(config, len(sources['train']))
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  writer = writer_lib.MetricWriter(workdir, enabled=is_main)
  writer.write_config(json.loads(config.to_json_best_effort()))

  cfg = _step_config(config, info)
  model = models.create_encoder(
      config.model.backbone, head=config.model.head, dim=config.model.dim,
      hidden=config.model.hidden or None, bn_splits=config.model.bn_splits,
      dtype=jnp.dtype(config.model.dtype))
  schedule = optim_lib.learning_rate_schedule(
      config.optim, batch_size=config.batch_size,
      steps_per_epoch=steps_per_epoch, total_steps=total)
  tx = optim_lib.make_optimizer(config.optim, schedule)
  state = create_state(config, model, tx, info, mesh)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 max_to_keep=config.ckpt.max_to_keep)
  restored = ckpt.restore(checkpoint.abstract_state(state))
  start = 0
  if restored is not None:
    start, state, _ = restored
    logging.info('resumed from step %d', start)
  writer.truncate_after(start)
  last_saved = start or None

  warmup = (int(config.mochi.warmup_epochs * steps_per_epoch)
            if config.method == 'mochi' else total)
  steps = {}

  def step_fn(use_mochi):
    if use_mochi not in steps:
      steps[use_mochi] = jax.jit(
          functools.partial(train_step, model=model, tx=tx, cfg=cfg,
                            use_mochi=use_mochi, mesh=mesh),
          donate_argnums=0)
    return steps[use_mochi]

  encode = _make_encoder_fn(model, config, info)
  eval_at = _eval_steps(config, total)
  it = data.train_iterator(
      sources['train'], global_batch_size=config.batch_size, seed=config.seed,
      start_step=start, num_steps=total, fields=('image', 'label', 'index'),
      num_workers=config.data.num_workers)

  def save(step):
    ckpt.save(step, state, {'data': {'next_index': step},
                            'config': json.loads(config.to_json_best_effort())},
              force=True)

  interrupted, pending = False, None
  bar = writer_lib.progress_bar(total, initial=start, enabled=is_main,
                                desc=config.method)
  try:
    with preemption.PreemptionGuard(
        sync_every=config.log_every_steps) as guard:
      for step in range(start + 1, total + 1):
        batch = parallel.global_batch(next(it), mesh)
        state, metrics = step_fn(step > warmup)(state, batch)
        # Check the previous step's loss while this one runs (no stall).
        if pending is not None:
          loop.check_finite(float(pending[1]), pending[0], last_saved)
        pending = (step, metrics['loss'])
        bar.update(1)
        if step % config.log_every_steps == 0 or step == total:
          scalars = {k: float(v) for k, v in metrics.items()
                     if k != 'hard_neg_sims'}
          loop.check_finite(scalars['loss'], step, last_saved)
          scalars['learning_rate'] = float(schedule(step - 1))
          scalars['mochi'] = float(step > warmup)
          writer.write_scalars(step, scalars)
          bar.set_postfix(loss=f'{scalars["loss"]:.3f}',
                          proxy=f'{scalars["proxy_acc"]:.2f}')
        if step % config.hist_every_steps == 0 or step == total:
          writer.write_histogram(step, 'hard_neg_sim',
                                 loop.to_host(metrics['hard_neg_sims']))
        if step in eval_at and step != total:
          writer.write_scalars(
              step, evaluate(state, encode, sources, config, info, mesh))
        stop = guard.should_stop(step)
        if step % config.ckpt.every_steps == 0 or step == total or stop:
          # Never save a state whose loss went non-finite.
          loop.check_finite(float(metrics['loss']), step, last_saved)
          save(step)
          last_saved = step
        if stop and step < total:
          interrupted = True
          break
  finally:
    # Also on errors: finish writing the last good checkpoint and the logs.
    bar.close()
    ckpt.wait()
    writer.flush()

  final_step = int(loop.to_host(state.step))
  summary = dict(step=final_step, interrupted=interrupted)
  if not interrupted:
    results = evaluate(state, encode, sources, config, info, mesh,
                       probe=config.eval.linear_probe)
    writer.write_scalars(final_step, results)
    summary.update(results)
  summary['state_fingerprint'] = loop.fingerprint(
      {'params': state.params, 'queue': state.queue})
  summary['wall_s'] = round(time.time() - t0, 1)
  writer.close()
  ckpt.close()
  if is_main and not interrupted:
    try:
      from hnjax.eval import plots  # pylint: disable=g-import-not-at-top
      plots.plot_run(workdir)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('plotting failed: %s', e)
  return summary
