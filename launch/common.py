"""What every launcher shares: flags, one-line errors, the summary line.

A launcher names its family and default config and calls `run`::

  if __name__ == '__main__':
    common.run('supremix', 'configs/supremix.py')

Flags: ``--config=configs/x.py:preset,...`` (default: the family's),
``--config.<field>=value`` overrides (the config is locked, so a typo is an
error), ``--workdir`` (default ``runs/<method>``), ``--distributed`` (or
``HNJAX_DISTRIBUTED=1``) on every host of a multi-host job. A bad flag,
config field or value, or missing data prints one line ``hnjax: error: ...``
and exits with status 2 before anything is written, and so does a workdir that
is a file, not writable, used by another run, or holding a run with another
config (``--allow_changes=field,...`` resumes it anyway); a non-finite loss
exits with status 3 and a checkpoint that cannot be written (a full disk)
with status 4.
"""

import importlib
import logging as logging_lib
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, with presets after a colon '
    '(default: the launcher\'s).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (default: runs/<method>).')
_ALLOW_CHANGES = flags.DEFINE_list(
    'allow_changes', [], 'Config fields (dotted, or a prefix) allowed to '
    'differ from the checkpoint being resumed, e.g. num_steps.')
DISTRIBUTED = flags.DEFINE_bool(
    'distributed', None, 'Call jax.distributed.initialize (multi-host); '
    'default: only if HNJAX_DISTRIBUTED=1.')


def error(message: str) -> None:
  """Prints ``hnjax: error: <message>`` and exits with status 2."""
  print(f'hnjax: error: {message}', file=sys.stderr)
  sys.exit(2)


class _DropOrbaxErrors(logging_lib.Filter):
  """Orbax logs a failed background save as tracebacks from several threads;
  the runner reports it as one `checkpoint.SaveError` line instead."""

  def filter(self, record):
    return not (record.levelno >= logging_lib.ERROR
                and f'{os.sep}orbax{os.sep}' in record.pathname)


def _quiet_orbax_errors() -> None:
  if logging.get_verbosity() < logging.INFO:  # unless --verbosity asks
    for handler in logging_lib.getLogger().handlers:
      handler.addFilter(_DropOrbaxErrors())


def load_config():
  """``--config``'s config, or one line and exit 2 if it cannot load."""
  try:
    config = CONFIG.value
    config.get('method')  # the flag loads the file lazily: fail here
  except OSError as e:  # a missing or unreadable config file
    reason = re.findall(r'\[Errno \d+\][^\n]*', str(e)) or [str(e)]
    error(f'--config: cannot load the config file: {reason[-1].strip()}')
  return config


def _main(argv, family: str) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
  # Before any other JAX call (multi-host rule).
  from hnjax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize(enabled=DISTRIBUTED.value)
  import jax  # pylint: disable=g-import-not-at-top
  trainer = importlib.import_module(f'hnjax.train.{family}')
  # pylint: disable=g-import-not-at-top
  from hnjax import checkpoint
  from hnjax.data import sources
  from hnjax.train import workdir as workdir_lib
  # pylint: enable=g-import-not-at-top
  jax.config.parse_flags_with_absl()

  config = load_config()
  workdir = _WORKDIR.value or os.path.join('runs', config.method)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # tfds warns about missing files
  try:  # Bad config or missing data: one line, exit 2, nothing written.
    trainer.prepare(config)
    workdir_lib.check_usable(os.path.abspath(workdir))
  except (ValueError, FileNotFoundError, workdir_lib.WorkdirError) as e:
    error(' '.join(str(e).split()))
  logging.set_verbosity(verbosity)
  if jax.process_index() == 0:
    print(f'hnjax: {config.method} on {config.data.name}, '
          f'{jax.process_count()} process(es), {jax.device_count()} '
          f'device(s); workdir {workdir}', flush=True)
  _quiet_orbax_errors()
  try:
    summary = trainer.train_and_evaluate(
        config, workdir, allow_changes=tuple(_ALLOW_CHANGES.value))
  except (workdir_lib.WorkdirError, sources.DataReadError) as e:
    error(str(e))
  except FloatingPointError as e:
    print(f'hnjax: stopped: {e}', file=sys.stderr)
    sys.exit(3)
  except checkpoint.SaveError as e:
    print(f'hnjax: stopped: {e}; the earlier checkpoints are intact',
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Orbax's writer threads of the failed save may still be running; a
    # normal interpreter exit would wait on them and print their errors.
    os._exit(4)  # pylint: disable=protected-access
  if jax.process_index() == 0:
    if summary['interrupted']:
      print(f'hnjax: interrupted at step {summary["step"]}; checkpoint saved. '
            'Run the same command to resume.')
    table = getattr(trainer, 'format_summary', lambda s: None)(summary)
    if table:
      print(table)
    print(' '.join(f'{k}={format_value(v)}' for k, v in summary.items()
                   if not isinstance(v, (dict, list))), flush=True)


def format_value(value):
  """Four significant digits for long floats (metrics.jsonl keeps all)."""
  if isinstance(value, float) and len(repr(value)) > 7:
    return f'{value:.4g}'
  return value


def parse_flags(argv, default_config: str):
  """Flag parsing that reports a bad flag or config field in one line."""
  if not any(a == '--config' or a.startswith('--config=') for a in argv):
    argv = [argv[0], f'--config={os.path.join(ROOT, default_config)}',
            *argv[1:]]
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    msg = ' '.join(str(e).replace('\\n', ' ').split())
    typo = re.search(r'Did you mean "(.+?)" instead of "(.+?)"', msg)
    raised = re.findall(r'(\w+Error: .*?)(?= File "|$)', msg)
    if typo:
      msg = f'unknown config field {typo[2]!r}; did you mean {typo[1]!r}?'
    elif 'Traceback' in msg and raised:  # raised inside the config file
      msg = f'{msg.split(": ")[0]}: {raised[-1].strip()}'
    error(msg)


def run(family: str, default_config: str) -> None:
  """Parses the flags and trains ``hnjax.train.<family>``.

  Args:
    family: module name under ``hnjax.train`` (``'moco'``, ``'supremix'``).
    default_config: config file used without ``--config``, relative to the
      repository root.
  """
  app.run(lambda argv: _main(argv, family),
          flags_parser=lambda argv: parse_flags(argv, default_config))
