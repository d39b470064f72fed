"""Features of whole splits from a frozen encoder, for every evaluator.

One helper feeds them all (kNN, linear probe, regression probe, retrieval):
it runs a jitted ``encode(global batch) -> [G, F]`` over a split in order,
sharded over the mesh like training batches, and returns numpy arrays on
every process with the padding of the last batch removed.
"""

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from hnjax import notebook
from hnjax import parallel
from hnjax.data import pipeline

Split = dict[str, np.ndarray]


def extract(
    encode: Callable[[dict[str, jax.Array]], jax.Array],
    source: Any,
    *,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    inputs: Sequence[str] = ('image',),
    fields: Sequence[str] = ('label',),
    progress: str | None = None,
) -> Split:
  """Encodes every example of ``source``.

  Args:
    encode: jitted ``global batch dict -> [G, F]`` features; the batch holds
      ``inputs`` (and ``mask``).
    source: a random-access source (``hnjax.data.Source`` or compatible).
    mesh: the mesh the global batches are laid out on.
    batch_size: global examples per batch (a multiple of the devices).
    inputs: fields the encoder reads.
    fields: per-example fields returned beside the features (labels,
      targets).
    progress: the description of a progress bar over the batches (on
      process 0), or None for none.

  Returns:
    ``{'features': [n, F], **{field: [n]}}`` numpy arrays, ``n = len(source)``,
    in source order, identical on every process.
  """
  batches = pipeline.eval_iterator(source, global_batch_size=batch_size,
                                   fields=tuple(dict.fromkeys(
                                       (*inputs, *fields))))
  out = {'features': [], **{f: [] for f in fields}}
  if progress is not None:
    batches = notebook.tqdm_class()(
        batches, total=-(-len(source) // batch_size), desc=progress,
        unit='batch', leave=False, disable=jax.process_index() != 0)
  for local in batches:
    batch = parallel.global_batch(local, mesh)
    keep = parallel.to_host(batch['mask'])
    out['features'].append(parallel.to_host(encode(batch))[keep])
    for f in fields:
      out[f].append(parallel.to_host(batch[f])[keep])
  return {k: np.concatenate(v) for k, v in out.items()}


def extract_splits(
    encode: Callable[[dict[str, jax.Array]], jax.Array],
    sources: Mapping[str, Any],
    **kwargs: Any,
) -> dict[str, Split]:
  """`extract` for each named split: ``{name: extract(encode, source)}``."""
  return {name: extract(encode, source, **kwargs)
          for name, source in sources.items()}
