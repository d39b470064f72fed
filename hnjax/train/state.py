"""Train states: created sharded, fingerprinted, seeded from another run.

A family's state is any pytree (a ``flax.struct.dataclass``) of global
``jax.Array`` s. `create` runs the family's ``init`` under ``jax.jit`` with
output shardings, so every leaf is born a global array on the mesh (what
multi-process checkpointing needs) without a host round trip.
`load_params` starts a run from another run's parameters (fine-tuning);
`fingerprint` hashes a state to compare runs bit for bit.
"""

import hashlib
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from hnjax import checkpoint
from hnjax import parallel
from hnjax.train import checks

PyTree = Any


def create(init: Callable[[], PyTree], mesh: jax.sharding.Mesh,
           shardings: Callable[[PyTree], PyTree] | None = None) -> PyTree:
  """Builds a fresh state directly with its global shardings.

  Args:
    init: ``() -> state``, a pure function (seeds come from the config).
    mesh: the device mesh.
    shardings: ``shapes -> pytree of shardings`` given the state's
      ``jax.eval_shape``; default: every leaf replicated.

  Returns:
    ``init()`` with each leaf a global ``jax.Array`` laid out as asked.
  """
  shapes = jax.eval_shape(init)
  if shardings is None:
    rep = NamedSharding(mesh, P())
    out = jax.tree.map(lambda _: rep, shapes)
  else:
    out = shardings(shapes)
  return jax.jit(init, out_shardings=out)()


def fingerprint(tree: PyTree) -> str:
  """SHA-256 of every leaf's bytes, in tree order: equal states, equal hex.

  Used to check that a resumed run ends bit-identical to an uninterrupted
  one. Typed PRNG keys are hashed through their key data.
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    arr = np.ascontiguousarray(parallel.to_host(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its checkpoints."""
  return os.path.join(workdir, 'checkpoints')


def load_params(state: PyTree, workdir: str,
                fields: Sequence[str] = ('params', 'batch_stats')) -> PyTree:
  """Replaces ``fields`` of ``state`` with those of another run's checkpoint.

  Only the named fields are read (the other run may have another optimizer
  or queue); their structure and shapes must match this state's.

  Args:
    state: a fresh state (its fields give the structure and shardings).
    workdir: the other run's directory (or its ``checkpoints`` folder).
    fields: top-level state fields to take; those the state lacks are
      skipped.

  Returns:
    ``state`` with the fields replaced by the other run's newest ones.

  Raises:
    checks.ConfigError: naming ``init_from`` when the run has no
      checkpoint or its fields do not fit this model.
  """
  where = os.path.abspath(workdir)  # Orbax needs absolute paths.
  directory = checkpoint_dir(where)
  if not os.path.isdir(directory):
    directory = where  # given the checkpoints folder itself
  present = [f for f in fields if hasattr(state, f)]
  abstract = {f: checkpoint.abstract_state(getattr(state, f))
              for f in present}
  try:
    _, restored = checkpoint.restore_fields(directory, abstract)
  except (FileNotFoundError, ValueError) as e:
    raise checks.ConfigError(
        f'init_from={workdir!r}: {checkpoint.first_line(e)}') from e
  return state.replace(**restored)
