"""SupReMix and its baselines for contrastive regression: state and step.

One step (ALGORITHMS.md §4, §9; the same backbone, budget and probe for
every method):

1. two views of every example (images: on-device augmentation from
   per-example keys; tables: noise and feature dropout), stacked as
   ``[view₀ of all; view₁ of all]`` with the targets repeated;
2. one forward pass of the encoder over the ``2G`` views;
3. the method's loss:

   * ``supremix``: `hnjax.losses.supremix` on the normalised projections,
     hard negative and hard positive mixtures, distance weights;
   * ``supcon``: `hnjax.losses.sup_con` with targets binned by
     ``supcon.bin_width``;
   * ``rnc``: `hnjax.losses.rank_n_contrast` on the unnormalised
     projections;
   * ``l1``: plain end-to-end regression, a linear head trained with the
     L1 loss on standardised targets;

   the contrastive losses run inside ``shard_map`` with ``axis_name``: each
   device's anchors against the whole batch, equal to one device;
4. gradients and the optax update.

Evaluation (§4.7): the frozen backbone's features, a linear regression
probe selected on the validation split, test MAE, RMSE, Pearson,
Spearman, G-mean and per-shot-group metrics, next to the same probe on an
untrained encoder and on the raw inputs; a cosine-kNN regressor on the
validation split monitors training.
"""

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections as mlc
import numpy as np
import optax

from hnjax import data
from hnjax import losses
from hnjax import models
from hnjax import numerics
from hnjax import parallel
from hnjax.eval import evaluators
from hnjax.eval import features as features_lib
from hnjax.train import checks
from hnjax.train import optim as optim_lib
from hnjax.train import runner
from hnjax.train import state as state_lib

METHODS = ('supremix', 'supcon', 'rnc', 'l1')
DATA = parallel.DATA


@flax.struct.dataclass
class TrainState:
  """Everything a contrastive-regression run carries from step to step.

  Attributes:
    step: ``[]`` int32, completed optimizer steps.
    params: encoder parameters (replicated).
    batch_stats: encoder BN statistics.
    opt_state: optax state.
    rng: typed PRNG key; step ``t`` uses ``fold_in(rng, t)``.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static hyperparameters of a step (hashable)."""
  method: str
  temperature: float
  window: float
  beta: tuple[float, float]
  distance_weighting: str
  mix_negatives: bool
  mix_positives: bool
  variant: str
  supcon_bin_width: float
  input: str  # 'image' or 'features'
  augment: data.AugmentConfig | None
  noise: float
  dropout: float
  mean: tuple[float, ...]
  std: tuple[float, ...]
  target_mean: float
  target_std: float


# ----------------------------------------------------------------------------
# Config checks: all before any compilation or any file is written.
# ----------------------------------------------------------------------------


def validate(config: mlc.ConfigDict, num_devices: int) -> None:
  """Raises checks.ConfigError naming the first impossible SupReMix field.

  The fields every family shares are checked by `checks.common` first.
  """
  del num_devices  # Views, not examples, are what the losses split.
  checks.one_of(config, 'method', METHODS)
  checks.positive(config, 'temperature', 'supremix.window', 'model.dim',
                  'eval.knn_k', 'eval.probe_epochs', 'eval.probe_batch_size',
                  'eval.probe_learning_rate')
  beta = config.supremix.beta
  checks.require(len(beta) == 2 and all(
      isinstance(b, (int, float)) and b > 0 for b in beta),
                 'supremix.beta', tuple(beta), 'must be two numbers > 0')
  checks.one_of(config, 'supremix.distance_weighting', losses.DISTANCE_WEIGHTINGS)
  checks.one_of(config, 'supremix.variant', losses.SUPREMIX_VARIANTS)
  checks.require(config.supcon.bin_width >= 0, 'supcon.bin_width',
                 config.supcon.bin_width, 'must be >= 0 (0: data.bin_width)')
  checks.require(config.data.name in data.regression.DATASETS, 'data.name',
                 config.data.name, 'not a dataset with a continuous target; '
                 f'known: {data.regression.DATASETS}')
  names = data.regression.target_names(config.data.name)
  checks.require(not config.data.target or not names
                 or config.data.target in names, 'data.target',
                 config.data.target, f'{config.data.name} has the targets '
                 f'{names}')
  checks.require(config.data.long_tail >= 0, 'data.long_tail',
                 config.data.long_tail, 'must be >= 0')
  checks.require(config.data.bin_width >= 0, 'data.bin_width',
                 config.data.bin_width, 'must be >= 0 (0: the default)')
  for field in ('eval.during', 'eval.final'):
    try:
      evaluators.parse(checks.get(config, field))
    except ValueError as e:
      raise checks.ConfigError(
          f'{field}={checks.get(config, field)!r}: {e}') from None
  aug = config.augment
  checks.require(0 < aug.scale_min <= 1, 'augment.scale_min', aug.scale_min,
                 'must be in (0, 1]')
  checks.in_unit_interval(config, 'augment.flip_prob', 'augment.jitter_prob',
                          'augment.grayscale_prob', 'augment.blur_prob',
                          'augment.dropout')
  checks.require(aug.noise >= 0, 'augment.noise', aug.noise, 'must be >= 0')


# ----------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------


def _two_views(key, batch, cfg):
  """``[2G, ...]`` model inputs: view 0 of every example, then view 1."""
  keys = data.example_keys(key, batch['index'])
  if cfg.input == 'features':
    views = data.tabular_views(keys, batch['features'], mean=cfg.mean,
                               std=cfg.std, noise=cfg.noise,
                               dropout=cfg.dropout)
  else:
    views = data.two_views(keys, batch['image'], cfg.augment)
  return jnp.concatenate(views)


def _contrastive_body(z, y, key, *, cfg):
  """Per-device body: per-anchor losses of the local views ``[2G / n]``."""
  if cfg.method == 'rnc':
    return losses.rank_n_contrast(z, y, temperature=cfg.temperature,
                                  axis_name=DATA)
  z = numerics.l2_normalize(z)
  if cfg.method == 'supcon':
    labels = jnp.floor(y / cfg.supcon_bin_width).astype(jnp.int32)
    return losses.sup_con(z, labels, temperature=cfg.temperature,
                          axis_name=DATA)
  return losses.supremix(
      key, z, y, temperature=cfg.temperature, window=cfg.window,
      beta=cfg.beta, distance_weighting=cfg.distance_weighting,
      mix_negatives=cfg.mix_negatives, mix_positives=cfg.mix_positives,
      variant=cfg.variant, axis_name=DATA)


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               model: Any, tx: optax.GradientTransformation,
               cfg: StepConfig, mesh: jax.sharding.Mesh
               ) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step of SupReMix, SupCon, RnC or L1 regression.

  Args:
    state: the `TrainState` (donated when jitted by the runner).
    batch: global batch, sharded over ``'data'``: ``image`` uint8
      ``[G, H, W, C]`` (or ``features`` ``[G, F]``), ``target`` float32
      ``[G]``, ``index`` int ``[G]``.
    model: the flax encoder.
    tx: the optax optimizer.
    cfg: static hyperparameters.
    mesh: the device mesh.

  Returns:
    ``(new_state, metrics)``: ``loss``, ``grad_norm`` and the per-view
    losses ``view_loss [2G]``.
  """
  key = jax.random.fold_in(state.rng, state.step)
  k_aug, k_loss = jax.random.split(key)
  x = _two_views(k_aug, batch, cfg)
  y = jnp.concatenate([batch['target'], batch['target']]).astype(jnp.float32)

  body = jax.shard_map(functools.partial(_contrastive_body, cfg=cfg),
                       mesh=mesh, in_specs=(P(DATA), P(DATA), P()),
                       out_specs=P(DATA))

  def loss_fn(params):
    out, new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, x,
        train=True, mutable=['batch_stats'])
    if cfg.method == 'l1':
      y_std = (y - cfg.target_mean) / cfg.target_std
      per_view = jnp.abs(out['projection'][:, 0] - y_std)
    else:
      per_view = body(out['projection'], y, k_loss)
    return jnp.mean(per_view), (per_view, new_vars['batch_stats'])

  (loss, (per_view, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats, opt_state=opt_state)
  return new_state, dict(loss=loss, grad_norm=optax.tree.norm(grads),
                         view_loss=per_view)


def create_state(config, model, tx, info, mesh) -> TrainState:
  """A fresh, replicated `TrainState` from ``config.seed``."""
  def init():
    k_init, k_run = jax.random.split(jax.random.key(config.seed))
    shape = info.input_shape
    if info.input == 'image':
      size = config.data.image_size
      shape = (size, size, shape[-1])
    variables = model.init(k_init, jnp.zeros((1,) + shape), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables['batch_stats'],
                      opt_state=tx.init(params), rng=k_run)

  return state_lib.create(init, mesh)


# ----------------------------------------------------------------------------
# Evaluation: the regression probe on frozen features, and its baselines.
# ----------------------------------------------------------------------------


def _inputs(batch, cfg, image_size):
  """Deterministic model inputs of an evaluation batch."""
  if cfg.input == 'features':
    return data.standardize(batch['features'], mean=cfg.mean, std=cfg.std)
  return data.eval_transform(batch['image'], out_size=image_size,
                             mean=cfg.mean, std=cfg.std)


def _encoders(model, cfg, image_size):
  """Jitted ``(params, batch_stats, batch) -> features`` and raw inputs."""

  @jax.jit
  def encode(params, batch_stats, batch):
    out = model.apply({'params': params, 'batch_stats': batch_stats},
                      _inputs(batch, cfg, image_size), train=False)
    return out['features']

  @jax.jit
  def raw(batch):
    x = _inputs(batch, cfg, image_size)
    return x.reshape(x.shape[0], -1)

  return encode, raw


def _regression_eval(encode_fn, splits, names, config, info, mesh):
  feats = features_lib.extract_splits(
      encode_fn, splits, mesh=mesh, batch_size=config.eval.batch_size,
      inputs=(info.input,), fields=('target',))
  options = dict(config.eval, bin_width=info.bin_width, seed=config.seed)
  return evaluators.run(names, feats, options), feats


def evaluate(state, fresh, encoders, config, info, mesh, *, final, plot_dir):
  """The named evaluators on the trained encoder (and, at the end, baselines).

  During training: ``eval.during`` on the train and validation splits
  (validation in the role of the test split). At the end: ``eval.final``
  on train/val/test, and with ``eval.baselines`` the same probe on an
  untrained encoder (``untrained_*``) and on the raw inputs (``raw_*``).
  """
  encode, raw = encoders
  trained = lambda b: encode(state.params, state.batch_stats, b)
  if not final:
    names = evaluators.parse(config.eval.during)
    splits = {'train': info.splits['train'], 'test': info.splits['val']}
    return _regression_eval(trained, splits, names, config, info, mesh)[0]
  names = evaluators.parse(config.eval.final)
  needed = evaluators.splits_needed(names)
  splits = {s: info.splits[s] for s in needed}
  results, feats = _regression_eval(trained, splits, names, config, info,
                                    mesh)
  out = dict(results)
  if config.eval.baselines and 'regression' in names:
    untrained = fresh()
    for prefix, fn in (
        ('untrained', lambda b: encode(untrained.params,
                                       untrained.batch_stats, b)),
        ('raw', raw)):
      res, _ = _regression_eval(fn, splits, ('regression',), config, info,
                                mesh)
      out.update({f'{prefix}_{k}': res[k] for k in ('mae', 'spearman')})
  if plot_dir is not None and 'regression' in names:
    try:
      from hnjax.eval import plots  # pylint: disable=g-import-not-at-top
      plots.plot_regression(
          plot_dir, train_targets=feats['train']['target'],
          test_targets=feats['test']['target'],
          predictions=results['predictions'],
          test_features=feats['test']['features'], bin_width=info.bin_width,
          target=info.target, show=False)
    except Exception as e:  # pylint: disable=broad-except
      from absl import logging  # pylint: disable=g-import-not-at-top
      logging.warning('regression plots failed: %s', e)
  return out


# ----------------------------------------------------------------------------
# The family: what the shared runner needs from contrastive regression.
# ----------------------------------------------------------------------------


def open_data(config: mlc.ConfigDict) -> runner.Data:
  """Opens the train, validation and test splits; bad data raises here."""
  d = config.data
  info = data.open_regression(
      d.name, target=d.target, data_dir=d.data_dir or None, csv_path=d.csv,
      image_root=d.image_root, load_size=d.load_size or None,
      long_tail=d.long_tail, bin_width=d.bin_width)
  if info.input == 'image' and config.model.backbone == 'mlp':
    raise checks.ConfigError(
        f"model.backbone='mlp': {d.name} has images; use a convnet or ResNet")
  if info.input == 'features' and config.model.backbone != 'mlp':
    raise checks.ConfigError(
        f'model.backbone={config.model.backbone!r}: {d.name} is tabular; '
        "use 'mlp'")
  return runner.Data(train=info.splits['train'],
                     fields=(info.input, 'target', 'index'), info=info)


def _step_config(config, info) -> StepConfig:
  aug = config.augment
  augment = None
  if info.input == 'image':
    augment = data.AugmentConfig(
        out_size=config.data.image_size, scale=(aug.scale_min, 1.0),
        flip_prob=aug.flip_prob, jitter_prob=aug.jitter_prob,
        brightness=aug.jitter_strength, contrast=aug.jitter_strength,
        saturation=aug.jitter_strength, hue=aug.hue,
        grayscale_prob=aug.grayscale_prob, blur_prob=aug.blur_prob,
        mean=tuple(info.mean), std=tuple(info.std))
  y = info.splits['train'].targets()
  return StepConfig(
      method=config.method, temperature=float(config.temperature),
      window=float(config.supremix.window),
      beta=tuple(float(b) for b in config.supremix.beta),
      distance_weighting=config.supremix.distance_weighting,
      mix_negatives=bool(config.supremix.mix_negatives),
      mix_positives=bool(config.supremix.mix_positives),
      variant=config.supremix.variant,
      supcon_bin_width=float(config.supcon.bin_width or info.bin_width),
      input=info.input, augment=augment, noise=float(aug.noise),
      dropout=float(aug.dropout), mean=tuple(info.mean), std=tuple(info.std),
      target_mean=float(np.mean(y)), target_std=float(max(np.std(y), 1e-6)))


def build(setup: runner.Setup) -> runner.Pieces:
  """Model, optimizer, state, step and evaluation of one run."""
  config, mesh, info = setup.config, setup.mesh, setup.data.info
  cfg = _step_config(config, info)
  l1 = config.method == 'l1'
  model = models.create_encoder(
      config.model.backbone, head='linear' if l1 else config.model.head,
      dim=1 if l1 else config.model.dim, hidden=config.model.hidden or None,
      dtype=jnp.dtype(config.model.dtype))
  schedule = optim_lib.learning_rate_schedule(
      config.optim, batch_size=config.batch_size,
      steps_per_epoch=setup.steps_per_epoch, total_steps=setup.total_steps)
  tx = optim_lib.make_optimizer(config.optim, schedule)
  fresh = lambda: create_state(config, model, tx, info, mesh)
  encoders = _encoders(model, cfg, config.data.image_size)
  step = functools.partial(train_step, model=model, tx=tx, cfg=cfg,
                           mesh=mesh)
  return runner.Pieces(
      init_state=fresh,
      step=lambda variant: step,
      evaluate=lambda state, final, plot_dir: evaluate(
          state, fresh, encoders, config, info, mesh, final=final,
          plot_dir=plot_dir),
      learning_rate=schedule,
      fingerprint=lambda state: {'params': state.params,
                                 'batch_stats': state.batch_stats,
                                 'opt_state': state.opt_state},
      histogram_ranges={'view_loss': (0.0, 10.0)},
      summary=('mae', 'rmse', 'pearson', 'spearman', 'gmean', 'mae_many',
               'mae_medium', 'mae_few', 'untrained_mae', 'raw_mae'))


FAMILY = runner.Family(name='supremix', validate=validate,
                       open_data=open_data, build=build)


def prepare(config: mlc.ConfigDict) -> runner.Setup:
  """Checks the config and opens the data; writes nothing."""
  return runner.prepare(FAMILY, config)


def train_and_evaluate(config: mlc.ConfigDict, workdir: str, *,
                       allow_changes: tuple[str, ...] = ()) -> dict[str, Any]:
  """Trains SupReMix (or a baseline) per ``config`` in ``workdir``.

  Usable from Colab without absl: ``train_and_evaluate(get_config(),
  '/tmp/run')`` with ``from configs.supremix import get_config``.
  Re-running with the same workdir resumes from the newest good checkpoint.

  Args:
    config: a config from ``configs/supremix.py``.
    workdir: run directory.
    allow_changes: config fields allowed to differ from the checkpoint
      being resumed (see `hnjax.train.workdir.check_resume`).

  Returns:
    A summary dict: ``step``, ``interrupted``, the probe's test metrics
    (``mae``, ``rmse``, ``pearson``, ``spearman``, ``gmean``, per shot
    group), the baselines' ``untrained_mae`` / ``raw_mae``,
    ``state_fingerprint``, ``wall_s``.
  """
  return runner.train_and_evaluate(FAMILY, config, workdir,
                                  allow_changes=allow_changes)
