"""hnjax: hard negatives for contrastive learning in JAX."""

from hnjax import losses
from hnjax import samplers

__version__ = '0.1.0'
