"""Config checks that run before anything is compiled or written.

Every error is a `ConfigError` whose message names the field and its value,
``batch_size=100: must be divisible by the 8 devices``; the launchers print
it as one line and exit with status 2.
"""

import math
from typing import Any

import jax

from hnjax import models
from hnjax.train import optim as optim_lib


class ConfigError(ValueError):
  """A config field has an impossible value. The message names both."""


def require(ok: bool, field: str, value: Any, why: str) -> None:
  """Raises ConfigError(``'field=value: why'``) unless ``ok``."""
  if not ok:
    raise ConfigError(f'{field}={value!r}: {why}')


def get(config: Any, field: str) -> Any:
  """The value of a dotted field, ``get(config, 'optim.learning_rate')``."""
  value = config
  for part in field.split('.'):
    value = value[part]
  return value


def positive(config: Any, *fields: str) -> None:
  """Every named (dotted) field must be a finite number > 0."""
  for field in fields:
    value = get(config, field)
    require(isinstance(value, (int, float)) and not isinstance(value, bool)
            and value > 0, field, value, 'must be > 0')
    # inf passes `> 0` but trains nothing (temperature=inf: loss log K,
    # gradient 0).
    require(math.isfinite(value), field, value, 'must be finite')


def one_of(config: Any, field: str, options: tuple[Any, ...]) -> None:
  """The named field must be one of ``options``."""
  value = get(config, field)
  require(value in options, field, value, f'must be one of {options}')


def in_unit_interval(config: Any, *fields: str) -> None:
  """Every named field must be in ``[0, 1]``."""
  for field in fields:
    value = get(config, field)
    require(0 <= value <= 1, field, value, 'must be in [0, 1]')


def common(config: Any, num_devices: int) -> None:
  """The fields every family's config shares (see ``configs/common.py``).

  Args:
    config: the run's config.
    num_devices: devices of the mesh (the global batch is split over them).

  Raises:
    ConfigError: naming the first impossible field.
  """
  positive(config, 'batch_size', 'log_every_steps', 'hist_every_steps',
           'ckpt.every_steps', 'ckpt.max_to_keep', 'optim.learning_rate',
           'optim.lr_base_batch', 'eval.batch_size')
  if config.num_steps <= 0:
    positive(config, 'num_epochs')
  require(config.eval.every_steps >= -1, 'eval.every_steps',
          config.eval.every_steps, 'must be -1 (4 times), 0 (at the end) '
          'or positive')
  require(config.model.backbone in models.backbone_names(), 'model.backbone',
          config.model.backbone,
          f'unknown model; known: {models.backbone_names()}')
  one_of(config, 'optim.name', optim_lib.OPTIMIZERS)
  one_of(config, 'optim.schedule', optim_lib.SCHEDULES)
  require(config.optim.weight_decay >= 0, 'optim.weight_decay',
          config.optim.weight_decay, 'must be >= 0')
  require(config.optim.warmup_epochs >= 0, 'optim.warmup_epochs',
          config.optim.warmup_epochs, 'must be >= 0')
  g = config.batch_size
  require(g % num_devices == 0, 'batch_size', g,
          f'must be divisible by the {num_devices} devices')
  require(g % jax.process_count() == 0, 'batch_size', g,
          f'must be divisible by the {jax.process_count()} processes')
  e = config.eval.batch_size
  require(e % num_devices == 0, 'eval.batch_size', e,
          f'must be divisible by the {num_devices} devices')
