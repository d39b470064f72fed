r"""MoCo v2 / MoCHi launcher: flags -> config -> train_and_evaluate.

  python -m launch.moco                                  # MoCHi on shapes32
  python -m launch.moco --config=configs/moco_v2.py --workdir=runs/moco_v2
  python -m launch.moco --config=configs/mochi.py:data=cifar10 \
      --config.data.data_dir=/data/tensorflow_datasets --workdir=runs/c10

Re-running the same command resumes from the workdir. On every host of a TPU
pod (or a multi-node GPU job) run the same command with
``HNJAX_DISTRIBUTED=1`` (or ``--distributed``). This file is kept short: the
logic lives in `hnjax.train.moco`, which a Colab notebook calls directly.
"""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIG = os.path.join(_ROOT, 'configs', 'mochi.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, f'Experiment config file, with presets after a colon '
    f'(default {_DEFAULT_CONFIG}).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (default: runs/<method>).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', None, 'Call jax.distributed.initialize (multi-host); '
    'default: only if HNJAX_DISTRIBUTED=1.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
  # Before any other JAX call (multi-host rule).
  from hnjax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize(enabled=_DISTRIBUTED.value)
  import jax  # pylint: disable=g-import-not-at-top
  from hnjax.train import moco  # pylint: disable=g-import-not-at-top
  jax.config.parse_flags_with_absl()

  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join('runs', config.method)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # tfds warns about missing files
  try:  # Bad config or missing data: one line, exit 2, nothing written.
    moco.prepare(config)
  except (ValueError, FileNotFoundError) as e:
    print(f'hnjax: error: {e}', file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(verbosity)
  if jax.process_index() == 0:
    print(f'hnjax: {config.method} on {config.data.name}, '
          f'{jax.process_count()} process(es), {jax.device_count()} '
          f'device(s); workdir {workdir}', flush=True)
  try:
    summary = moco.train_and_evaluate(config, workdir)
  except FloatingPointError as e:
    print(f'hnjax: stopped: {e}', file=sys.stderr)
    sys.exit(3)
  if jax.process_index() == 0:
    if summary['interrupted']:
      print(f'hnjax: interrupted at step {summary["step"]}; checkpoint saved. '
            'Run the same command to resume.')
    print(' '.join(f'{k}={v}' for k, v in summary.items()), flush=True)


def parse_flags(argv):
  """Flag parsing that reports a bad flag or config field in one line."""
  if not any(a == '--config' or a.startswith('--config=') for a in argv):
    argv = [argv[0], f'--config={_DEFAULT_CONFIG}', *argv[1:]]
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    msg = ' '.join(str(e).replace('\\n', ' ').split())
    typo = re.search(r'Did you mean "(.+?)" instead of "(.+?)"', msg)
    error = re.findall(r'(\w+Error: .*?)(?= File "|$)', msg)
    if typo:
      msg = f'unknown config field {typo[2]!r}; did you mean {typo[1]!r}?'
    elif 'Traceback' in msg and error:  # raised inside the config file
      msg = f'{msg.split(": ")[0]}: {error[-1].strip()}'
    print(f'hnjax: error: {msg}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
