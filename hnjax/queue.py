"""MoCo's memory queue as a pytree, sharded over the ``'data'`` mesh axis.

The queue is a ring buffer of ``K`` unit keys with, per slot, the dataset
index (``ids``) and label of the example that produced the key. With ``n``
devices each device stores a ``[K / n, D]`` shard and enqueues its *own*
keys into its *own* shard: no communication, and the number of negatives
grows with the machine instead of being replicated on every device. Queries
are compared with all shards through `hnjax.bank` (log-sum-exp and top-k are
combined across shards).

The write position ``ptr`` counts keys written so far modulo ``K`` (a
multiple of the global batch), so it means the same for every device count;
device ``d`` writes rows ``ptr / n, ..., ptr / n + B - 1`` (wrapping) of its
shard. There is no ``K % batch == 0`` requirement.

Checkpointing: a `MemoryQueue` is plain arrays. Restored on another device
count (give the abstract state the new sharding) every stored key, id and
label is kept. Only the *age order* changes: the global rows are re-split
into the new shards, so for the next ``K / G`` steps (one pass of the ring)
each write evicts whatever sits at the new per-shard pointer, not strictly
the oldest keys; after one pass the queue is FIFO again.
"""

import functools

import flax.struct
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hnjax import _checks


@flax.struct.dataclass
class MemoryQueue:
  """Ring buffer of keys.

  Attributes:
    keys: ``[K, D]`` float32 unit vectors, sharded ``P('data')``.
    ids: ``[K]`` int32 dataset index of each key; -1 for the initial random
      keys.
    labels: ``[K]`` int32 label of each key; -1 if unknown.
    ptr: ``[]`` int32 number of keys written so far, modulo ``K``.
  """
  keys: jax.Array
  ids: jax.Array
  labels: jax.Array
  ptr: jax.Array

  @property
  def size(self) -> int:
    return self.keys.shape[0]

  @property
  def dim(self) -> int:
    return self.keys.shape[1]


def _shard_count(sharding) -> int:
  if sharding is None:
    return 1
  if not isinstance(sharding, NamedSharding):
    raise ValueError(f'sharding must be a NamedSharding, got {sharding!r}')
  spec = tuple(sharding.spec) + (None,)
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  n = 1
  for a in axes:
    if a is not None:
      n *= sharding.mesh.shape[a]
  return n


def init(
    key: jax.Array,
    size: int,
    dim: int,
    *,
    sharding: NamedSharding | None = None,
) -> MemoryQueue:
  """A queue of MoCo-style random unit keys (ids and labels -1).

  Args:
    key: PRNG key for the initial keys.
    size: ``K``, number of keys; a multiple of the number of shards.
    dim: ``D``, key dimension.
    sharding: optional ``NamedSharding`` for the keys, e.g.
      ``NamedSharding(mesh, P('data'))``; the arrays are created already
      sharded (each device generates only its rows) and ``ptr`` replicated.

  Returns:
    A `MemoryQueue`.

  Examples:
    >>> import jax
    >>> from hnjax import queue
    >>> q = queue.init(jax.random.key(0), 8, 3)
    >>> q.keys.shape, int(q.ptr), q.ids.tolist()
    ((8, 3), 0, [-1, -1, -1, -1, -1, -1, -1, -1])
  """
  _checks.positive_int('size', size)
  _checks.positive_int('dim', dim)
  n = _shard_count(sharding)
  if size % n:
    raise ValueError(
        f'queue size {size} is not divisible by the number of shards {n}')

  def make():
    k = jax.random.normal(key, (size, dim), jnp.float32)
    k = k / jnp.linalg.norm(k, axis=1, keepdims=True)
    none = jnp.full((size,), -1, jnp.int32)
    return MemoryQueue(k, none, none, jnp.zeros((), jnp.int32))

  if sharding is None:
    return make()
  rows = NamedSharding(sharding.mesh, P(sharding.spec[0]))
  shardings = MemoryQueue(sharding, rows, rows,
                          NamedSharding(sharding.mesh, P()))
  return jax.jit(make, out_shardings=shardings)()


def enqueue(
    queue: MemoryQueue,
    keys: jax.typing.ArrayLike,
    ids: jax.typing.ArrayLike | None = None,
    labels: jax.typing.ArrayLike | None = None,
    *,
    axis_name: str | None = None,
) -> MemoryQueue:
  """Writes ``keys`` (and their ids and labels) over the oldest slots.

  On one device the ``B`` keys go to rows ``ptr, ..., ptr + B - 1`` modulo
  ``K``. Sharded (inside ``jax.shard_map`` over ``axis_name``, with
  ``queue`` being the device's shard and ``keys`` its rows of the global
  batch), each device writes into its own shard at ``ptr / n``: no
  communication. Called outside ``shard_map`` on a global queue whose rows
  are sharded (``init(..., sharding=...)``), it does the same per shard,
  writing the rows `make_enqueue` writes; that sharding must be visible:
  eagerly on any mesh, under ``jit`` on meshes with explicit axes (the
  default of ``jax.make_mesh``). Under ``jit`` on an ``Auto`` mesh (such
  as `parallel.make_mesh`'s) tracing cannot see it: use `make_enqueue`. Call it after the loss that used the old queue, so a key is
  never its own query's negative. Jit it with the queue donated so the old
  buffer is reused in place (`make_enqueue` does this for a mesh).

  Args:
    queue: the `MemoryQueue` (local shard when sharded).
    keys: ``[B, D]`` new keys (the device's rows when sharded).
    ids: optional ``[B]`` int dataset indices (-1 if omitted).
    labels: optional ``[B]`` int labels (-1 if omitted).
    axis_name: mesh axis of the shards, or None.

  Returns:
    The updated `MemoryQueue`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from hnjax import queue
    >>> q = queue.init(jax.random.key(0), 4, 2)
    >>> q = queue.enqueue(q, jnp.ones((3, 2)), ids=jnp.array([7, 8, 9]))
    >>> q = queue.enqueue(q, jnp.ones((3, 2)), ids=jnp.array([1, 2, 3]))
    >>> q.ids.tolist(), int(q.ptr)  # wrapped around
    ([2, 3, 9, 1], 2)
  """
  if axis_name is None:
    where = _row_sharding(queue.keys)
    if where is not None:
      mesh, axis = where
      return _enqueue_shards(queue, keys, ids, labels, mesh=mesh, axis=axis)
  k_local, dim = queue.keys.shape
  _checks.rank('keys', keys, 2, '[B, D]')
  b = jnp.shape(keys)[0]
  if jnp.shape(keys)[1] != dim:
    raise ValueError(
        f'keys must have dim {dim} like the queue, got shape {jnp.shape(keys)}')
  if b > k_local:
    where = 'queue shard' if axis_name else 'queue'
    raise ValueError(
        f'per-device batch {b} is larger than the {where} ({k_local} rows)')
  for name, x in (('ids', ids), ('labels', labels)):
    if x is not None and jnp.shape(x) != (b,):
      raise ValueError(f'{name} must have shape [B] = ({b},), got '
                       f'{jnp.shape(x)}')
  n = _checks.axis_size(axis_name)
  none = jnp.full((b,), -1, jnp.int32)
  ids = none if ids is None else jnp.asarray(ids, jnp.int32)
  labels = none if labels is None else jnp.asarray(labels, jnp.int32)
  rows = (queue.ptr // n + jnp.arange(b)) % k_local
  keys = lax.stop_gradient(jnp.asarray(keys, jnp.float32))
  return MemoryQueue(
      keys=queue.keys.at[rows].set(keys, unique_indices=True),
      ids=queue.ids.at[rows].set(ids, unique_indices=True),
      labels=queue.labels.at[rows].set(labels, unique_indices=True),
      ptr=(queue.ptr + n * b) % (n * k_local))


def _row_sharding(x) -> tuple[jax.sharding.Mesh, str] | None:
  """``(mesh, axis)`` when ``x``'s rows are split over several devices.

  Known for concrete arrays and, under ``jit``, for meshes with explicit
  axes; ``None`` otherwise (unsharded, or an ``Auto`` mesh under ``jit``,
  whose shardings tracing does not see).
  """
  if isinstance(x, jax.core.Tracer):
    sharding = getattr(jax.typeof(x), 'sharding', None)
  else:
    sharding = getattr(x, 'sharding', None)
  if not isinstance(sharding, NamedSharding) or not len(sharding.spec):
    return None
  axis = sharding.spec[0]
  if not isinstance(axis, str) or sharding.mesh.shape[axis] == 1:
    return None
  return sharding.mesh, axis


def _enqueue_shards(queue, keys, ids, labels, *, mesh, axis):
  """`enqueue` of a global queue sharded over ``axis``: each device writes
  its rows of the batch into its own shard, as `make_enqueue` does."""
  n = mesh.shape[axis]
  _checks.rank('keys', keys, 2, '[B, D]')
  g = jnp.shape(keys)[0]
  if g % n:
    raise ValueError(f'keys has {g} rows: not divisible by the {n} shards '
                     f'of the queue (axis {axis!r})')
  none = jnp.full((g,), -1, jnp.int32)
  ids = none if ids is None else ids
  labels = none if labels is None else labels
  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    # Explicit axes: shard_map takes inputs only as in_specs lays them out.
    rows = NamedSharding(mesh, P(axis))
    keys, ids, labels = (jax.sharding.reshard(x, rows)
                         for x in (keys, ids, labels))
  body = jax.shard_map(
      lambda q, k, i, l: enqueue(q, k, i, l, axis_name=axis), mesh=mesh,
      in_specs=(specs(axis), P(axis), P(axis), P(axis)),
      out_specs=specs(axis))
  return body(queue, keys, ids, labels)


def specs(axis_name: str = 'data') -> MemoryQueue:
  """``shard_map`` partition specs of a queue sharded over ``axis_name``."""
  rows = P(axis_name)
  return MemoryQueue(keys=rows, ids=rows, labels=rows, ptr=P())


def make_enqueue(mesh: jax.sharding.Mesh, axis_name: str = 'data'):
  """A jitted global-view `enqueue` for a queue sharded over ``mesh``.

  The returned function takes a global queue and global ``[G, D]`` keys
  (``[G]`` ids and labels) sharded over ``axis_name`` and donates the queue.

  Args:
    mesh: the device mesh.
    axis_name: the mesh axis the queue and the batch are sharded over.

  Returns:
    ``fn(queue, keys, ids, labels) -> MemoryQueue``.
  """
  if axis_name not in mesh.axis_names:
    raise ValueError(f'axis_name={axis_name!r} is not an axis of the mesh '
                     f'{mesh.axis_names}')
  return jax.jit(functools.partial(_enqueue_shards, mesh=mesh,
                                   axis=axis_name), donate_argnums=0)
