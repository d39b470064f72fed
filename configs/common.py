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
