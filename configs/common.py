"""Helpers shared by the config files (no hnjax imports)."""

import ml_collections as mlc


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
  """Parses ``'key=value,flag'`` preset strings, typed by the defaults.

  ``--config=configs/mochi.py:data=cifar10,smoke`` reaches ``get_config`` as
  ``arg='data=cifar10,smoke'``. A bare name sets a boolean default to True.

  Args:
    arg: the string after the ``:``, or None.
    **defaults: every accepted key with its default value (and type).

  Returns:
    A locked ConfigDict of the presets.

  Raises:
    ValueError: an unknown key or a value of the wrong type.
  """
  out = mlc.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, eq, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config preset {key!r} in {arg!r}; known: '
                       f'{", ".join(sorted(defaults))}')
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f'config preset {key!r} needs a value, e.g. '
                         f'{key}={default}')
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config preset {key}={value!r} is not a boolean')
      out[key] = value.lower() in ('true', '1')
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise ValueError(f'config preset {key}={value!r} is not a '
                         f'{type(default).__name__}') from None
  out.lock()
  return out


# The fields every family's config has, named the same way everywhere
# (checked by hnjax.train.checks.common). A family adds its own next to them.


def base(*, method: str, batch_size: int, num_epochs: float,
         temperature: float, seed: int = 0) -> mlc.ConfigDict:
  """Run-level fields: method, seed, batch size and length, temperature."""
  c = mlc.ConfigDict()
  c.method = method
  c.seed = seed
  c.batch_size = batch_size  # global, over all devices and hosts
  c.num_epochs = num_epochs
  c.num_steps = -1  # > 0 overrides num_epochs
  c.temperature = temperature
  c.init_from = ''  # a run directory whose parameters start this run
  return c


def data(name: str, **fields) -> mlc.ConfigDict:
  """``config.data``: the dataset name, its tfds data dir, reader workers."""
  return mlc.ConfigDict(dict(name=name, data_dir='', num_workers=0, **fields))


def optim(*, name: str, learning_rate: float, lr_base_batch: int,
          weight_decay: float, momentum: float = 0.9,
          warmup_epochs: float = 0, schedule: str = 'cosine'
          ) -> mlc.ConfigDict:
  """``config.optim``; the peak rate is lr * batch_size / lr_base_batch."""
  return mlc.ConfigDict(dict(
      name=name, learning_rate=learning_rate, lr_base_batch=lr_base_batch,
      momentum=momentum, weight_decay=weight_decay,
      warmup_epochs=warmup_epochs, schedule=schedule))


def evaluation(*, during: str, final: str, batch_size: int = 512,
               every_steps: int = -1, **fields) -> mlc.ConfigDict:
  """``config.eval``: evaluator names (comma separated) and their options."""
  return mlc.ConfigDict(dict(
      every_steps=every_steps,  # -1: 4 times per run; 0: only at the end
      during=during, final=final, batch_size=batch_size, **fields))


def add_logging(c: mlc.ConfigDict, *, log_every_steps: int = 20,
                hist_every_steps: int = 100, ckpt_every_steps: int = 200,
                max_to_keep: int = 3) -> None:
  """Logging and checkpoint intervals."""
  c.log_every_steps = log_every_steps
  c.hist_every_steps = hist_every_steps
  c.ckpt = mlc.ConfigDict(dict(every_steps=ckpt_every_steps,
                               max_to_keep=max_to_keep))
