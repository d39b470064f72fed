"""The training loop every experiment family shares.

A family (`hnjax.train.moco`, `hnjax.train.supremix`, ...) describes itself
with a `Family` record: its config checks, how to open its data, and how to
build the `Pieces` of a run (initial state, the step of each variant,
evaluation). The runner owns the rest, the same for every family:

1. prepare: the mesh, the config checks, the data, the schedule length;
   all before anything is written, so a bad config leaves no trace;
   then the workdir (`hnjax.train.workdir`): usable, locked for this run,
   and, when it holds checkpoints, saved by this same config;
2. restore or init: the newest good checkpoint of the workdir; otherwise a
   fresh state, optionally with the parameters of another run
   (``config.init_from``);
3. the loop: one jitted step per variant (MoCHi's warm-up is a variant),
   donating the state; a progress bar; scalars every ``log_every_steps``
   and histograms of per-example metrics every ``hist_every_steps``; a stop
   on a non-finite loss that names the step; evaluation every
   ``eval.every_steps``; checkpoints every ``ckpt.every_steps`` (a failed
   one stops the run); SIGTERM or Ctrl-C save and return;
4. the summary: final evaluation, the state fingerprint, plots.

A family's step is a plain function ``step(state, batch) -> (state,
metrics)``; ``metrics`` holds ``loss`` (scalar) and any other scalars, and
per-example metrics as ``[G]`` arrays (logged as their mean and as
histograms). Everything the run needs to resume exactly is in the state
and the step number: the data order is a function of the step and, for a
family whose input depends on its encoder (mined hard negatives, batches
of neighbours), of the tables its ``refresh`` piece keeps in the state.
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Hashable, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections as mlc
import numpy as np

from hnjax import checkpoint
from hnjax import data as data_lib
from hnjax import parallel
from hnjax.train import checks
from hnjax.train import preemption
from hnjax.train import state as state_lib
from hnjax.train import workdir as workdir_lib
from hnjax.train import writer as writer_lib

State = Any
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Data:
  """A family's opened data.

  Attributes:
    train: random-access training source (``len`` and ``get_batch``).
    fields: the fields of a training batch.
    info: whatever else the family needs (dataset facts, eval sources).
  """
  train: Any
  fields: tuple[str, ...]
  info: Any = None


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `Family.build` gets: the checked config and the opened data."""
  config: mlc.ConfigDict
  mesh: jax.sharding.Mesh
  data: Data
  steps_per_epoch: int
  total_steps: int


@dataclasses.dataclass(frozen=True)
class Pieces:
  """The family-specific parts of one run.

  Attributes:
    init_state: ``() -> state``, a fresh state with global shardings.
    step: ``variant -> step(state, batch) -> (state, metrics)`` (not
      jitted; the runner jits and donates).
    evaluate: ``(state, final, plot_dir) -> results``; the final call may
      draw figures into ``plot_dir`` (process 0 only, else None). Scalars
      are logged and the final ones summarised.
    learning_rate: the schedule, ``step -> learning rate``.
    fingerprint: ``state -> pytree`` hashed into ``state_fingerprint``.
    variant: ``step -> variant`` of that (1-based) step.
    scalars: ``step -> extra scalars`` logged with the metrics.
    progress: metric names shown on the progress bar.
    histogram_ranges: value range per per-example metric (default
      ``(-1, 1)``, similarities).
    init_fields: state fields taken from ``config.init_from``.
    summary: final results kept in the summary (None: all; every one is
      logged to ``metrics.jsonl`` anyway).
    refresh: ``state -> state`` recomputing, from the current parameters,
      what the input pipeline reads from the state (mined hard negatives,
      the embeddings of a batch order); None: nothing. Called before the
      first step of a fresh run and after every ``refresh_every``-th step,
      before that step's checkpoint (so a resumed run reads the same).
    refresh_every: steps between refreshes (0: only before the first).
    train_data: ``state -> (source, order)`` of `data.train_iterator`;
      None: ``setup.data.train`` in the seeded random order.
  """
  init_state: Callable[[], State]
  step: Callable[[Hashable], Callable[[State, Any], tuple[State, Metrics]]]
  evaluate: Callable[[State, bool, str | None], dict[str, Any]]
  learning_rate: Callable[[int], float]
  fingerprint: Callable[[State], Any] = lambda state: state
  variant: Callable[[int], Hashable] = lambda step: None
  scalars: Callable[[int], Mapping[str, float]] = lambda step: {}
  progress: tuple[str, ...] = ('loss',)
  histogram_ranges: Mapping[str, tuple[float, float]] = dataclasses.field(
      default_factory=dict)
  init_fields: tuple[str, ...] = ('params', 'batch_stats')
  summary: tuple[str, ...] | None = None
  refresh: Callable[[State], State] | None = None
  refresh_every: int = 0
  train_data: Callable[[State], tuple[Any, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
  """A family of experiments, as the runner sees it (no base class).

  Attributes:
    name: e.g. ``'moco'``.
    validate: ``(config, num_devices) -> None``; raises
      `checks.ConfigError` naming the field.
    open_data: ``config -> Data``; raises FileNotFoundError / ValueError
      for missing or bad data.
    build: ``Setup -> Pieces``.
  """
  name: str
  validate: Callable[[mlc.ConfigDict, int], None]
  open_data: Callable[[mlc.ConfigDict], Data]
  build: Callable[[Setup], Pieces]


def schedule_length(config: mlc.ConfigDict, num_train: int) -> tuple[int, int]:
  """``(steps_per_epoch, total_steps)``; the last partial batch is dropped."""
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise checks.ConfigError(
        f'batch_size={config.batch_size}: larger than the training set '
        f'({num_train} examples)')
  total = (config.num_steps if config.num_steps > 0 else
           int(round(config.num_epochs * steps_per_epoch)))
  return steps_per_epoch, total


def eval_steps(every: int, total: int) -> set[int]:
  """Steps that evaluate: every ``every`` (-1: four times; 0: the end)."""
  if every == 0:
    return {total}
  if every < 0:
    every = max(total // 4, 1)
  return set(range(every, total + 1, every)) | {total}


def validate(family: Family, config: mlc.ConfigDict, num_devices: int) -> None:
  """The shared checks (`checks.common`), then the family's own.

  Raises:
    checks.ConfigError: naming the first impossible field and its value.
  """
  checks.common(config, num_devices)
  family.validate(config, num_devices)


def prepare(family: Family, config: mlc.ConfigDict) -> Setup:
  """Checks the config and opens the data; writes nothing.

  Raises:
    checks.ConfigError: an impossible config field.
    FileNotFoundError / ValueError: missing or bad data.
  """
  mesh = parallel.make_mesh()
  validate(family, config, mesh.size)
  data = family.open_data(config)
  steps_per_epoch, total = schedule_length(config, len(data.train))
  return Setup(config, mesh, data, steps_per_epoch, total)


def _check_finite(value: float, step: int, last_good: int | None) -> None:
  """Stops a run whose loss went NaN or infinite, naming the step."""
  if not np.isfinite(value):
    where = (f'the last good checkpoint is step {last_good}' if last_good
             else 'no checkpoint was saved')
    raise FloatingPointError(
        f'non-finite loss {value} at step {step}; {where} (it was not '
        f'overwritten). Lower the learning rate or check the data.')


def _scalars(metrics: Metrics) -> dict[str, float]:
  """Scalar metrics as floats; per-example ones as their mean."""
  return {k: float(np.mean(parallel.to_host(v))) for k, v in metrics.items()}


def _agree(fn: Callable[[], None], *, enabled: bool = True) -> None:
  """Runs ``fn`` (if ``enabled``) and stops every process if it fails.

  In multi-process runs only process 0 may know that, e.g., the workdir is
  locked; the others must not go on into a collective that never comes.
  """
  error = None
  if enabled:
    try:
      fn()
    except workdir_lib.WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    ok = multihost_utils.process_allgather(np.array(error is None))
    if error is None and not np.all(ok):
      error = workdir_lib.WorkdirError(
          'another process could not use the workdir (see its error)')
  if error is not None:
    raise error


def _restore(ckpt, state, workdir):
  """The newest good checkpoint (or None), one-line error if none fits."""
  try:
    return ckpt.restore(checkpoint.abstract_state(state))
  except RuntimeError as e:  # every step failed: shapes or structure differ
    raise workdir_lib.WorkdirError(
        f'workdir {workdir!r}: {checkpoint.first_line(e)}') from None


def train_and_evaluate(family: Family, config: mlc.ConfigDict, workdir: str,
                       *, allow_changes: tuple[str, ...] = ()
                       ) -> dict[str, Any]:
  """Trains ``family`` per ``config`` in ``workdir``, resuming if needed.

  Re-running with the same workdir resumes from the newest good
  checkpoint, if its config is this one (`workdir.check_resume`). One run
  per workdir (`workdir.Lock`). SIGTERM and Ctrl-C save a checkpoint and
  return early; further signals are only logged until it is written.

  Args:
    family: the experiment family.
    config: the run's config.
    workdir: run directory (checkpoints, metrics.jsonl, TensorBoard events,
      plots, config.json).
    allow_changes: dotted config fields (or prefixes) allowed to differ from
      the checkpoint being resumed, besides `workdir.SAFE_FIELDS`.

  Returns:
    A summary dict: ``step``, ``interrupted``, the final evaluation's
    scalars, ``state_fingerprint``, ``wall_s``.

  Raises:
    checks.ConfigError: an impossible config (nothing written).
    workdir.WorkdirError: the workdir is unusable, in use, or holds a run
      with another config or state shapes (nothing written).
    checkpoint.SaveError: a checkpoint could not be written; the earlier
      ones are intact.
    FloatingPointError: the loss went non-finite.
  """
  t0 = time.time()
  workdir = os.path.abspath(workdir)  # Orbax needs absolute paths.
  setup = prepare(family, config)
  is_main = jax.process_index() == 0
  _agree(lambda: workdir_lib.check_usable(workdir))
  config_json = json.loads(config.to_json_best_effort())
  lock = workdir_lib.Lock(workdir, enabled=is_main)
  _agree(lock.acquire, enabled=is_main)
  try:
    saved = checkpoint.read_meta(state_lib.checkpoint_dir(workdir))
    if saved is not None:
      _agree(lambda: workdir_lib.check_resume(
          saved[1].get('config'), config_json, workdir=workdir,
          step=saved[0], allow=allow_changes))
    return _run(family, setup, config, config_json, workdir, t0)
  finally:
    lock.release()


def _run(family, setup, config, config_json, workdir, t0):
  """`train_and_evaluate` once the workdir is ours and the config checked."""
  total = setup.total_steps
  is_main = jax.process_index() == 0
  pieces = family.build(setup)
  state = pieces.init_state()
  ckpt = checkpoint.Checkpointer(state_lib.checkpoint_dir(workdir),
                                 max_to_keep=config.ckpt.max_to_keep)
  try:
    restored = _restore(ckpt, state, workdir)
  except workdir_lib.WorkdirError:
    ckpt.close()
    raise
  start = 0
  if restored is not None:
    start, state, _ = restored
    logging.info('resumed from step %d', start)
  elif config.get('init_from'):
    state = state_lib.load_params(state, config.init_from,
                                  pieces.init_fields)
    logging.info('parameters from %s', config.init_from)
  if start == 0 and pieces.refresh is not None:
    try:
      state = pieces.refresh(state)
    except BaseException:
      ckpt.close()
      raise
  writer = writer_lib.MetricWriter(workdir, enabled=is_main)
  writer.write_config(config_json)  # only now: the resume check passed
  writer.truncate_after(start)
  last_saved = start or None

  @functools.cache
  def step_fn(variant):
    return jax.jit(pieces.step(variant), donate_argnums=0)

  def iterator(state, start):
    source, order = (pieces.train_data(state) if pieces.train_data
                     else (setup.data.train, None))
    return data_lib.train_iterator(
        source, global_batch_size=config.batch_size, seed=config.seed,
        start_step=start, num_steps=total, fields=setup.data.fields,
        order=order, num_workers=config.data.num_workers)

  eval_at = eval_steps(config.eval.every_steps, total)
  it = iterator(state, start)

  def save(step):
    ckpt.save(step, state, {'data': {'next_index': step},
                            'config': config_json}, force=True)

  interrupted, pending = False, None
  bar = writer_lib.progress_bar(total, initial=start, enabled=is_main,
                                desc=config.method)
  guard = preemption.PreemptionGuard(sync_every=config.log_every_steps)
  try:
    with guard:
      try:
        for step in range(start + 1, total + 1):
          batch = parallel.global_batch(next(it), setup.mesh)
          state, metrics = step_fn(pieces.variant(step))(state, batch)
          # Check the previous step's loss while this one runs (no stall).
          if pending is not None:
            _check_finite(float(pending[1]), pending[0], last_saved)
          pending = (step, metrics['loss'])
          ckpt.check()  # a failed background save stops within a step
          bar.update(1)
          if step % config.log_every_steps == 0 or step == total:
            scalars = _scalars(metrics)
            _check_finite(scalars['loss'], step, last_saved)
            scalars['learning_rate'] = float(pieces.learning_rate(step - 1))
            scalars.update(pieces.scalars(step))
            writer.write_scalars(step, scalars)
            bar.set_postfix({k: f'{scalars[k]:.3f}' for k in pieces.progress
                             if k in scalars})
          if step % config.hist_every_steps == 0 or step == total:
            for name, value in metrics.items():
              if value.ndim:
                writer.write_histogram(
                    step, name, parallel.to_host(value),
                    value_range=pieces.histogram_ranges.get(name, (-1., 1.)))
          if step in eval_at and step != total:
            writer.write_scalars(step, only_scalars(
                pieces.evaluate(state, False, None)))
          if (pieces.refresh is not None and pieces.refresh_every
              and step % pieces.refresh_every == 0 and step < total):
            state = pieces.refresh(state)
            # Batches read ahead came from the old state: read them again.
            it = iterator(state, step)
          stop = guard.should_stop(step)
          if step % config.ckpt.every_steps == 0 or step == total or stop:
            # Never save a state whose loss went non-finite.
            _check_finite(float(metrics['loss']), step, last_saved)
            if stop:
              guard.protect()  # more signals must not kill this save
            save(step)
            last_saved = step
          if stop and step < total:
            interrupted = True
            break
      finally:
        # Also on errors: finish writing the last good checkpoint (under
        # the guard: a second SIGTERM now is only logged) and the logs.
        bar.close()
        writer.flush()
        ckpt.wait()
  except BaseException:
    # The error being raised says what went wrong; a second one from
    # Orbax's shutdown would only bury it.
    try:
      ckpt.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('closing the checkpointer: %s', e)
    writer.close()
    raise

  final_step = int(parallel.to_host(state.step))
  summary = dict(step=final_step, interrupted=interrupted)
  if not interrupted:
    results = only_scalars(
        pieces.evaluate(state, True, workdir if is_main else None))
    writer.write_scalars(final_step, results)
    summary.update({k: v for k, v in results.items()
                    if pieces.summary is None or k in pieces.summary})
  summary['state_fingerprint'] = state_lib.fingerprint(
      pieces.fingerprint(state))
  summary['wall_s'] = round(time.time() - t0, 1)
  writer.close()
  ckpt.close()
  if is_main and not interrupted:
    try:
      from hnjax.eval import plots  # pylint: disable=g-import-not-at-top
      plots.plot_run(workdir, show=False)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('plotting failed: %s', e)
  return summary


def only_scalars(results: Mapping[str, Any]) -> dict[str, Any]:
  """The int / float results (arrays are for plots, not logs)."""
  return {k: v for k, v in results.items()
          if isinstance(v, (int, float, np.integer, np.floating))}
