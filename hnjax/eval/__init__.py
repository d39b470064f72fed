"""Evaluation of learned embeddings.

kNN, linear and regression probes, image-text retrieval, embedding
geometry, an evaluator registry (``evaluators``) fed by one feature
extractor (``features``), and plots (imported on demand: they need matplotlib, an optional dependency).
"""

from hnjax.eval import evaluators
from hnjax.eval import features
from hnjax.eval import geometry
from hnjax.eval import knn
from hnjax.eval import linear
from hnjax.eval import regression
from hnjax.eval import retrieval
