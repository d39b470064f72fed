"""hnjax: hard negatives for contrastive learning in JAX.

``hnjax.losses`` and ``hnjax.samplers`` are the functional core;
``hnjax.queue``, ``hnjax.bank`` and ``hnjax.parallel`` the sharded memory
queue and its collectives; ``hnjax.mining`` mines hard negatives from a
corpus. Training code (``hnjax.train``, ``hnjax.data``,
``hnjax.models``, ``hnjax.eval``) is imported on demand.
"""

from hnjax import bank
from hnjax import losses
from hnjax import mining
from hnjax import parallel
from hnjax import queue
from hnjax import samplers

__version__ = '0.1.0'
