"""Optimizers and learning-rate schedules shared by the trainers."""

from typing import Any, Callable

import optax

OPTIMIZERS = ('sgd', 'lars', 'adam', 'adamw')
SCHEDULES = ('cosine', 'constant', 'step')


def learning_rate_schedule(optim: Any, *, batch_size: int,
                           steps_per_epoch: int,
                           total_steps: int) -> Callable[[int], float]:
  """Linear warm-up then cosine (or constant) decay, scaled by batch size.

  The warm-up lasts ``optim.warmup_epochs`` epochs, or, when the config has
  a non-zero ``optim.warmup_fraction``, that fraction of ``total_steps``.

  The peak learning rate is ``learning_rate * batch_size / lr_base_batch``
  (the linear scaling rule of Goyal et al.).

  Args:
    optim: the ``config.optim`` ConfigDict.
    batch_size: global batch size.
    steps_per_epoch: optimizer steps per epoch.
    total_steps: length of the run.

  Returns:
    An optax schedule ``step -> learning rate``.
  """
  peak = optim.learning_rate * batch_size / optim.lr_base_batch
  warmup = int(optim.warmup_epochs * steps_per_epoch)
  if optim.get('warmup_fraction', 0):  # CLIP fine-tuning: 10% of the run
    warmup = int(optim.warmup_fraction * total_steps)
  warmup = min(warmup, total_steps - 1)
  if optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  elif optim.schedule == 'step':
    # x0.1 at each fraction of the run in optim.decay_at: (0.6, 0.8) for
    # MoCo v1, (0.8,) for SupReMix pretraining (epoch 80 of 100).
    decay_at = optim.get('decay_at', (0.6, 0.8))
    decay = optax.piecewise_constant_schedule(
        peak, {int(f * (total_steps - warmup)): 0.1 for f in decay_at})
  else:
    decay = optax.constant_schedule(peak)
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(optim: Any, schedule: Callable[[int], float]
                   ) -> optax.GradientTransformation:
  """The optimizer named by ``optim.name``.

  ``'sgd'`` applies weight decay to the gradient before momentum, as
  ``torch.optim.SGD`` does (the MoCo recipe); ``'lars'`` is optax's LARS;
  ``'adam'`` couples weight decay like torch Adam, ``'adamw'`` decouples it.

  Args:
    optim: the ``config.optim`` ConfigDict.
    schedule: the learning-rate schedule.

  Returns:
    An optax GradientTransformation.
  """
  wd = optim.weight_decay
  if optim.name == 'sgd':
    return optax.chain(optax.add_decayed_weights(wd),
                       optax.sgd(schedule, momentum=optim.momentum))
  if optim.name == 'lars':
    return optax.lars(schedule, weight_decay=wd, momentum=optim.momentum)
  if optim.name == 'adam':
    return optax.chain(optax.add_decayed_weights(wd), optax.adam(schedule))
  return optax.adamw(schedule, weight_decay=wd)
