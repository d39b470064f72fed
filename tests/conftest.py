"""Test configuration: 8 fake CPU devices before JAX initialises."""

import os

# Must happen before the first `import jax` anywhere in the test process.
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# Keep the suite fast on 2 cores: tests check semantics, not kernels.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_num_cpu_devices', 8)
# Tests check semantics on tiny arrays: compile time dominates, so skip
# XLA's expensive optimisation passes (as the flax examples' tests do).
jax.config.update('jax_disable_most_optimizations', True)

# The fixture generators need PyTorch and transformers (never installed for
# the tests): not imported by --doctest-modules.
collect_ignore_glob = ['fixtures/*.py']


def pytest_collection_modifyitems(config, items):
  """Slow end-to-end tests first (stable order otherwise).

  With ``-n 2`` the tests that start last set the suite's wall time: a
  minute-long launcher test collected last keeps one worker busy while the
  other is idle. Started first, they overlap with the many short tests.
  """
  del config
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)
