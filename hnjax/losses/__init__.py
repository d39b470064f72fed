"""Contrastive objectives: pure functions with per-example outputs.

Every loss returns one value per example (``[B]`` or ``[N]``); reduce with
``jnp.mean`` (or a masked mean) yourself. Logits and log-sum-exps are
computed in float32 whatever the input dtype.
"""

from hnjax.losses._in_batch import M3MIX_TERMS
from hnjax.losses._in_batch import m2mix
from hnjax.losses._in_batch import m3mix
from hnjax.losses._in_batch import sigmoid_contrastive
from hnjax.losses._in_batch import symmetric_info_nce
from hnjax.losses._queue import hard_contrastive
from hnjax.losses._queue import info_nce
from hnjax.losses._queue import mochi_info_nce
from hnjax.losses._supervised import DISTANCE_WEIGHTINGS
from hnjax.losses._supervised import rank_n_contrast
from hnjax.losses._supervised import sup_con
from hnjax.losses._supervised import supremix
from hnjax.losses._supervised import SUPREMIX_VARIANTS

__all__ = [
    'hard_contrastive',
    'info_nce',
    'm2mix',
    'm3mix',
    'mochi_info_nce',
    'rank_n_contrast',
    'sigmoid_contrastive',
    'sup_con',
    'supremix',
    'symmetric_info_nce',
]
