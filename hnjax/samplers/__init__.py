"""Hard-negative selection and synthesis: pure ``(key, arrays) -> arrays``."""

from hnjax.samplers.diagnostics import hardness_diagnostics
from hnjax.samplers.geodesic import geodesic_mix
from hnjax.samplers.mochi import mochi
from hnjax.samplers.mochi import mochi_logits
from hnjax.samplers.mochi import mochi_mix
from hnjax.samplers.selection import guide_margin_mask
from hnjax.samplers.selection import hard_top_k_mask
from hnjax.samplers.selection import hardest_negatives
from hnjax.samplers.selection import same_id_mask
from hnjax.samplers.selection import same_label_mask
from hnjax.samplers.supremix import anchor_exclusive_mixtures
from hnjax.samplers.supremix import anchor_inclusive_mixtures

__all__ = [
    'anchor_exclusive_mixtures',
    'anchor_inclusive_mixtures',
    'geodesic_mix',
    'guide_margin_mask',
    'hard_top_k_mask',
    'hardness_diagnostics',
    'hardest_negatives',
    'mochi',
    'mochi_logits',
    'mochi_mix',
    'same_id_mask',
    'same_label_mask',
]
