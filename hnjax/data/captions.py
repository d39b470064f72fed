"""Hard-negative captions for shapes32, in the spirit of SugarCrepe.

Each negative differs from the true caption in exactly one attribute:

* ``shape``: another shape (SugarCrepe's replace-object);
* ``colour``: another colour (replace-attribute);
* ``size``: another size word (replace-attribute);
* ``position``: another of the nine positions (replace-relation).

Negatives are written by the same `shapes.caption` as the true captions, so
their wording and format cannot give them away: a shape swap is only made
where the new shape's caption could carry the same rotation (circles, which
have no "rotated" clause, and angles outside the new shape's symmetry period
get no shape negative; ``eligible`` says where). shapes32 draws one object
per image, so SugarCrepe's swap of two objects' attributes has no
counterpart here.

A model "passes" a negative when it scores the image higher with the true
caption than with the negative (`hnjax.eval.retrieval.caption_accuracy`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from hnjax.data import shapes

SWAP_TYPES = ('shape', 'colour', 'size', 'position')

_LO, _HI = shapes.SIZE_RANGE
# A size (pixels) inside each third of the range: small, medium, large.
_SIZES = tuple(_LO + (_HI - _LO) * (k + 0.5) / 3 for k in range(3))
# A coordinate inside each position band: left/top, centre, right/bottom.
_COORDS = (4.0, shapes.IMAGE_SIZE / 2, shapes.IMAGE_SIZE - 4.0)


def _band(v):
  lo, hi = shapes.IMAGE_SIZE / 2 - 3.5, shapes.IMAGE_SIZE / 2 + 3.5
  return 0 if v < lo else (2 if v > hi else 1)


def _size_bin(size):
  t = (size - _LO) / (_HI - _LO)
  return 0 if t < 1 / 3 else (1 if t < 2 / 3 else 2)


def hard_negatives(
    factors: Mapping[str, np.ndarray],
    *,
    seed: int = 0,
) -> dict[str, tuple[list[str], np.ndarray]]:
  """One hard-negative caption per example and swap type.

  Args:
    factors: shapes32 fields ``shape``, ``colour``, ``size``, ``angle``,
      ``x``, ``y``, each ``[N]`` (a source's batch, or `shapes.generate`).
    seed: which replacement is drawn; the same seed gives the same
      negatives.

  Returns:
    ``{swap_type: (captions, eligible)}`` with ``N`` captions and a
    ``[N]`` bool mask of the examples that have a negative of that type
    (ineligible rows repeat the true caption).
  """
  n = len(factors['shape'])
  f = {k: np.asarray(factors[k]) for k in
       ('shape', 'colour', 'size', 'angle', 'x', 'y')}
  rng = np.random.default_rng([seed, 0xC4])
  periods = np.asarray(shapes._PERIODS)  # pylint: disable=protected-access
  out = {}
  for kind in SWAP_TYPES:
    captions, eligible = [], np.zeros(n, bool)
    for i in range(n):
      g = {k: v[i].item() for k, v in f.items()}
      if kind == 'shape':
        # Same rotation clause possible: rotated shapes whose period
        # exceeds the angle (the caption's angle is in [0, period)).
        ok = [s for s in range(len(shapes.SHAPES)) if s != g['shape']
              and periods[s] > 0 and periods[g['shape']] > 0
              and round(g['angle']) < periods[s]]
        if ok:
          g['shape'] = ok[rng.integers(len(ok))]
      elif kind == 'colour':
        ok = [c for c in range(len(shapes.COLOURS)) if c != g['colour']]
        g['colour'] = ok[rng.integers(len(ok))]
      elif kind == 'size':
        ok = [b for b in range(3) if b != _size_bin(g['size'])]
        g['size'] = _SIZES[ok[rng.integers(len(ok))]]
      else:
        here = (_band(g['x']), _band(g['y']))
        ok = [(a, b) for a in range(3) for b in range(3) if (a, b) != here]
        a, b = ok[rng.integers(len(ok))]
        g['x'], g['y'] = _COORDS[a], _COORDS[b]
      negative = shapes.caption(**g)
      truth = shapes.caption(**{k: v[i].item() for k, v in f.items()})
      eligible[i] = negative != truth
      captions.append(negative)
    out[kind] = (captions, eligible)
  return out
