"""Evaluation of learned embeddings: kNN, linear probe, geometry, plots."""

from hnjax.eval import geometry
from hnjax.eval import knn
from hnjax.eval import linear

# `plots` is imported on demand (it needs matplotlib, an optional dependency).
