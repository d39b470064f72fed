"""The notebook's kernel inherits this environment: 8 fake CPU devices.

Set before any kernel starts, so the sharded-queue section of the notebook
really shards; optimisation passes off as in tests/conftest.py (the runs
are tiny and compile time dominates).
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
