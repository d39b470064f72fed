"""Checkpoints for exact resume from a workdir, on top of Orbax.

One :class:`Checkpointer` per run directory. Each step is saved as one Orbax
checkpoint with three items:

- ``state``: the train state pytree (params, target params, optimizer state,
  the sharded memory queue and its pointer, typed PRNG keys, the step), written
  with ``ocp.args.StandardSave`` so that every process writes its own shards;
- ``meta``: a JSON dict (the grain iterator state, the config, ...);
- ``fingerprint``: one uint32 checksum per state leaf and a SHA-256 of the
  meta, used on restore to detect a checkpoint that Orbax reads without error
  but whose bytes changed (Orbax has no checksums: a flipped byte in an array
  file restores silently as wrong values).

Saves are asynchronous and atomic: Orbax writes ``<step>.orbax-checkpoint-tmp``
and renames it to ``<step>`` only when every process has finished, so a run
killed mid-save (``kill -9``) never leaves a checkpoint that ``restore`` would
pick; the leftover temporary directory is deleted the next time a
``Checkpointer`` opens the directory. The arrays are copied off the devices
before :meth:`Checkpointer.save` returns, so the caller may donate the state to
the next step at once.

:meth:`Checkpointer.restore` tries the newest step first; if it is unreadable
(a truncated or deleted file, a broken manifest) or fails its fingerprint, it
logs a warning naming the step and falls back to the previous one. Steps newer
than the one restored are then moved aside to ``<step>.corrupt-<time>`` in the
same directory, so the resumed run can save those step numbers again. If no
step can be restored, it raises instead of returning ``None``: starting afresh
would overwrite a run whose checkpoints are only unreadable with *this*
abstract state.

Multi-process use. Every process constructs the ``Checkpointer`` and calls
``save``/``restore`` with the same arguments; Orbax synchronises them. Every
state leaf must be a *global* ``jax.Array`` (one whose sharding spans the
devices of all processes). Eager ``jnp.array(5)`` or ``jax.random.key(0)`` is
process-local and Orbax refuses it ("Cannot serialize host local jax.Array");
make replicated scalars and keys with
``jax.jit(lambda: jax.random.key(0), out_shardings=NamedSharding(mesh, P()))()``
or ``jax.make_array_from_process_local_data(NamedSharding(mesh, P()), x)``
(``jax.device_put`` cannot target other processes' devices). ``meta`` should be
identical on all processes; process 0's copy is the one written. The
processes vote after each restore attempt, so they fall back together. Not
handled (nor tested): a step that only *some* processes fail to read; the
others then wait in Orbax's restore barrier until it times out.

Restoring onto another device count: pass an abstract state whose leaves
carry the new shardings (:func:`abstract_state`); Orbax reads each array's
global value and reshards it, so a queue saved over 8 devices restores onto 4
or 1.

Example::

  ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', max_to_keep=3)
  restored = ckpt.restore(checkpoint.abstract_state(state))
  if restored is not None:
    step, state, meta = restored
    data_iter.set_state(meta['data'])
  for step in range(step + 1, total_steps + 1):
    state, metrics = train_step(state, next(data_iter))
    ckpt.save(step, state, {'data': data_iter.get_state()})
  ckpt.close()
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

_STATE, _META, _FINGERPRINT = 'state', 'meta', 'fingerprint'


# ------------------------------------------------------------- abstract state


def abstract_state(tree: PyTree, shardings: PyTree = None) -> PyTree:
  """Turns a state (or its ``jax.eval_shape``) into a restore target.

  Args:
    tree: pytree whose leaves have ``shape`` and ``dtype``: concrete
      ``jax.Array`` s, or ``jax.ShapeDtypeStruct`` s from ``jax.eval_shape``.
      Typed PRNG keys keep their key dtype.
    shardings: ``None`` to keep each leaf's own ``.sharding``; a single
      ``jax.sharding.Sharding`` for every leaf; or a pytree of shardings with
      the structure of ``tree`` (or a prefix of it, e.g. one sharding per
      top-level field).

  Returns:
    A pytree with the structure of ``tree`` whose leaves are
    ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``.

  Raises:
    ValueError: if a leaf has no sharding and ``shardings`` gives none.
  """
  if shardings is None:
    shardings = jax.tree.map(lambda x: getattr(x, 'sharding', None), tree)
  elif isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  else:
    shardings = jax.tree.broadcast(
        shardings, tree, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
    )

  def make(path, x, sharding):
    if sharding is None:
      raise ValueError(
          f'abstract_state: leaf {jax.tree_util.keystr(path)} has no sharding;'
          ' pass shardings=...'
      )
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map_with_path(make, tree, shardings)


# ---------------------------------------------------------------- fingerprint


def _leaf_words(x: jax.Array) -> jax.Array:
  """Bit pattern of ``x`` as uint32 words (8-byte types give 2 words each)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """sum_i word_i * (2 i + 1) mod 2**32 over the row-major flat index i.

  The odd multipliers make every single-word change and most swaps visible,
  and a wrapping sum does not depend on the summation order, so the value is
  the same for any sharding and device count. It is a checksum against
  corruption, not a cryptographic hash.
  """
  w = _leaf_words(x)
  idx = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(w.ndim)):
    idx += jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * np.uint32(stride)
    stride *= w.shape[d]
  return jnp.sum(w * (2 * idx + 1), dtype=jnp.uint32)


_fingerprints = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def _fingerprint(state: PyTree) -> dict[str, list[Any]]:
  """``{keystr(path): [checksum, dtype name]}`` for every leaf of ``state``.

  One jitted reduction per leaf on the devices, so it works on global arrays
  in multi-process runs (all processes must call it). The dtype is kept so
  that a restore that casts (float32 saved, bfloat16 requested) is not taken
  for corruption.
  """
  leaves = jax.tree.leaves_with_path(state)
  sums = _fingerprints([jnp.asarray(x) for _, x in leaves])
  return {
      jax.tree_util.keystr(p): [int(v), str(x.dtype)]
      for (p, x), v in zip(leaves, sums)
  }


def _meta_digest(meta: dict[str, Any]) -> str:
  return hashlib.sha256(
      json.dumps(meta, sort_keys=True).encode('utf-8')
  ).hexdigest()


class FingerprintMismatchError(ValueError):
  """A restored checkpoint's contents differ from what was saved."""


class SaveError(RuntimeError):
  """A checkpoint could not be written (disk full, permission, ...).

  Attributes:
    step: the step whose checkpoint failed; the checkpoints before it are
      untouched and restorable.
  """

  def __init__(self, step: int | None, directory: Any, cause: BaseException):
    self.step = step
    detail = (f'[Errno {cause.errno}] {cause.strerror}'
              if isinstance(cause, OSError) and cause.strerror else
              f'{type(cause).__name__}: {first_line(cause)}')
    super().__init__(f'the checkpoint of step {step} could not be written to '
                     f'{directory}: {detail}')


# --------------------------------------------------------------- checkpointer


class Checkpointer:
  """Saves and restores ``(step, state, meta)`` in one directory.

  Attributes:
    directory: the checkpoint directory (created if missing).
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      max_to_keep: int | None = 3,
      save_interval_steps: int = 1,
      async_save: bool = True,
      verify: bool = True,
  ):
    """Opens (or creates) a checkpoint directory.

    Args:
      directory: where the step directories live, e.g. ``workdir/ckpt``.
      max_to_keep: number of newest checkpoints kept; ``None`` keeps all.
      save_interval_steps: :meth:`save` writes only at multiples of this
        (``force=True`` overrides), so the loop may call it every step.
      async_save: write in a background thread (the arrays are copied to host
        memory first). ``False`` blocks in :meth:`save` until written.
      verify: store a fingerprint of every leaf on save and check it on
        restore; a mismatch counts as corruption.

    Raises:
      ValueError: on a non-positive ``max_to_keep`` or ``save_interval_steps``.
    """
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1 or None, got {max_to_keep}')
    if save_interval_steps < 1:
      raise ValueError(
          f'save_interval_steps must be >= 1, got {save_interval_steps}'
      )
    self.directory = epath.Path(directory)
    self._verify = verify
    self._save_interval_steps = save_interval_steps
    self._pending = None  # step of the save that may still be running
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        # Removes `<step>.orbax-checkpoint-tmp` left by a killed save.
        cleanup_tmp_directories=True,
        create=True,
    )
    self._mngr = ocp.CheckpointManager(
        self.directory,
        item_names=(_STATE, _META, _FINGERPRINT),
        options=options,
    )

  # -- queries

  def all_steps(self) -> list[int]:
    """Steps with a finished checkpoint, ascending (not checked for damage)."""
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    """Newest finished step, or ``None``; :meth:`restore` may fall back."""
    return self._mngr.latest_step()

  # -- save

  def save(
      self,
      step: int,
      state: PyTree,
      meta: dict[str, Any] | None = None,
      *,
      force: bool = False,
  ) -> bool:
    """Starts saving ``state`` and ``meta`` as checkpoint ``step``.

    Call on every process. Returns once the arrays are in host memory; the
    files are written in the background (see :meth:`wait`).

    Args:
      step: training step, a non-negative int.
      state: pytree of global ``jax.Array`` s (typed keys allowed).
      meta: JSON-serialisable dict; tuples come back as lists.
      force: save even if ``step`` is not a multiple of
        ``save_interval_steps`` (e.g. on preemption or at the last step).

    Returns:
      Whether a checkpoint was started. ``False`` when the interval says no,
      or when ``step`` is already saved (so a final forced save after a
      periodic one at the same step is harmless).

    Raises:
      ValueError: on a negative step, a non-JSON ``meta``, or (multi-process)
        a leaf that is not a global ``jax.Array``.
    """
    step = int(step)
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    if step in self._mngr.all_steps():
      logging.info('Checkpoint for step %d already exists; not saving.', step)
      return False
    if not force and step % self._save_interval_steps:
      return False
    try:
      # Normalise once so the digest matches what JSON gives back on restore.
      meta = json.loads(json.dumps({} if meta is None else meta))
    except (TypeError, ValueError) as e:
      raise ValueError(f'meta must be JSON-serialisable: {e}') from e
    if jax.process_count() > 1:
      _check_global(state)
    digests = {}
    if self._verify:
      digests = {'state': _fingerprint(state), 'meta': _meta_digest(meta)}
    self.wait()  # a failure of the previous save is reported as its own
    self._pending = step
    try:
      return self._mngr.save(
          step,
          args=ocp.args.Composite(
              **{
                  _STATE: ocp.args.StandardSave(state),
                  _META: ocp.args.JsonSave(meta),
                  _FINGERPRINT: ocp.args.JsonSave(digests),
              }
          ),
          force=True,  # Decided above; Orbax's own policy differs.
      )
    except OSError as e:
      self._pending = None
      raise SaveError(step, self.directory, e) from e

  # -- restore

  def restore(
      self, abstract: PyTree, *, step: int | None = None
  ) -> tuple[int, PyTree, dict[str, Any]] | None:
    """Restores the newest readable checkpoint onto ``abstract``'s shardings.

    Call on every process. Waits for a pending save first.

    Args:
      abstract: pytree of ``jax.ShapeDtypeStruct`` with shardings (see
        :func:`abstract_state`), with the structure of the saved state.
      step: restore exactly this step, with no fallback; ``None`` (default)
        means the newest step that restores and verifies.

    Returns:
      ``(step, state, meta)``, with the state's arrays laid out as
      ``abstract`` says; or ``None`` when the directory has no checkpoint.

    Raises:
      RuntimeError: if checkpoints exist but none could be restored (each
        step's error is in the message).
      FileNotFoundError: if ``step`` is given and not saved.
    """
    self.wait()
    if step is not None:
      if step not in self._mngr.all_steps():
        raise FileNotFoundError(
            f'No checkpoint for step {step} in {self.directory}; have'
            f' {self.all_steps()}'
        )
      return step, *self._restore_step(step, abstract)
    steps = sorted(self._mngr.all_steps(), reverse=True)
    if not steps:
      return None
    errors = []
    for s in steps:
      try:
        state, meta = self._restore_step(s, abstract)
      except Exception as e:  # pylint: disable=broad-exception-caught
        # Orbax and TensorStore raise many types here (ValueError, KeyError,
        # FileNotFoundError, JSONDecodeError, plain Exception), so we catch
        # all; a wrong `abstract` fails on every step and ends in the raise.
        ok, err = False, e
      else:
        ok, err = True, None
      if jax.process_count() > 1:
        # A file damaged on one process only must not split the processes
        # between two steps.
        ok = bool(np.all(multihost_utils.process_allgather(np.array(ok))))
        err = err or RuntimeError('restore failed on another process')
      if ok:
        if errors:
          self._quarantine([e_step for e_step, _ in errors])
        return s, state, meta
      logging.warning(
          'Checkpoint at step %d in %s could not be restored (%s: %s); '
          'falling back to the previous checkpoint.',
          s,
          self.directory,
          type(err).__name__,
          first_line(err),
      )
      errors.append((s, err))
    details = '; '.join(
        f'step {s}: {type(e).__name__}: {first_line(e)}' for s, e in errors
    )
    raise RuntimeError(
        f'No checkpoint in {self.directory} could be restored ({details}). If'
        ' the saved state has another structure or shapes than the abstract'
        ' state, the config probably changed.'
    ) from errors[-1][1]

  def _restore_step(
      self, step: int, abstract: PyTree
  ) -> tuple[PyTree, dict[str, Any]]:
    has_fingerprint = (self.directory / str(step) / _FINGERPRINT).exists()
    items = {
        _STATE: ocp.args.StandardRestore(abstract),
        _META: ocp.args.JsonRestore(),
    }
    if has_fingerprint:
      items[_FINGERPRINT] = ocp.args.JsonRestore()
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    state, meta = out[_STATE], out[_META]
    saved = out[_FINGERPRINT] if has_fingerprint else {}
    if self._verify and saved:
      if saved['meta'] != _meta_digest(meta):
        raise FingerprintMismatchError(f'meta of step {step} changed on disk')
      bad = []
      for path, (value, dtype) in _fingerprint(state).items():
        saved_value, saved_dtype = saved['state'].get(path, (value, dtype))
        # A restore that casts changes the bits legitimately.
        if saved_dtype == dtype and saved_value != value:
          bad.append(path)
      if bad:
        raise FingerprintMismatchError(
            f'leaves {bad} of step {step} differ from what was saved'
        )
    return state, meta

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unreadable step directories aside so they can be re-saved."""
    if jax.process_index() == 0:
      stamp = time.strftime('%Y%m%d-%H%M%S')
      for s in steps:
        src = self.directory / str(s)
        dst = self.directory / f'{s}.corrupt-{stamp}'
        n = 1
        while dst.exists():
          dst, n = self.directory / f'{s}.corrupt-{stamp}-{n}', n + 1
        logging.warning('Moving unreadable checkpoint %s to %s.', src, dst)
        src.rename(dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('hnjax_checkpoint_quarantine')
    self._mngr.reload()

  # -- lifecycle

  def wait(self) -> None:
    """Blocks until a pending asynchronous save is on disk.

    Raises:
      SaveError: the pending save failed (reported once); the step's
        temporary directory is left for the next `Checkpointer` to delete.
    """
    step, self._pending = self._pending, None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Orbax re-raises the background thread's error (an OSError from a
      # full disk, or whatever its writers raise).
      raise SaveError(step, self.directory, _root_cause(e)) from e

  def check(self) -> None:
    """Raises `SaveError` if a background save has failed; never blocks."""
    if self._pending is not None and not self._mngr.is_saving_in_progress():
      self.wait()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's threads.

    Raises:
      SaveError: the pending save failed.
    """
    try:
      self.wait()
    finally:
      self._mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _check_global(state: PyTree) -> None:
  for path, x in jax.tree.leaves_with_path(state):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      raise ValueError(
          f'Leaf {jax.tree_util.keystr(path)} is not a global jax.Array in a'
          f' {jax.process_count()}-process run; checkpointed leaves must be'
          ' global arrays: create them with jax.jit(..., out_shardings=...)'
          ' or jax.make_array_from_process_local_data.'
      )


def _root_cause(e: BaseException) -> BaseException:
  """The innermost OSError of an exception chain, else ``e`` itself."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError):
      return seen
    seen = seen.__cause__ or seen.__context__
  return e


def read_meta(directory: str | os.PathLike[str]
              ) -> tuple[int, dict[str, Any]] | None:
  """The ``meta`` of the newest checkpoint whose meta is readable.

  Read-only and cheap (no arrays, no Orbax manager): for comparing a run's
  config with the one it would resume before anything is written. Reads the
  JSON file Orbax's ``JsonSave`` writes, ``<step>/meta/metadata``, of the
  finished (integer-named) step directories.

  Args:
    directory: a :class:`Checkpointer` directory (it may not exist).

  Returns:
    ``(step, meta)``, or None when there is no finished checkpoint.
  """
  if not os.path.isdir(directory):
    return None
  steps = sorted((int(n) for n in os.listdir(directory) if n.isdigit()),
                 reverse=True)
  for step in steps:
    try:
      with open(os.path.join(directory, str(step), _META, 'metadata')) as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue  # restore() falls back past this step too
    if isinstance(meta, dict):
      return step, meta
  return None


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (at most 300 characters)."""
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ''


def restore_fields(
    directory: str | os.PathLike[str],
    abstract: dict[str, PyTree],
    *,
    step: int | None = None,
) -> tuple[int, dict[str, PyTree]]:
  """Reads some top-level fields of a saved state, e.g. only ``params``.

  For starting a run from another run's parameters: the other state may
  have fields this one lacks (another optimizer, a queue). Read-only: the
  directory is never modified.

  Args:
    directory: a :class:`Checkpointer` directory.
    abstract: ``{field: abstract pytree}`` (see :func:`abstract_state`) of
      the fields to read, with the shapes and shardings wanted.
    step: the step to read; default the newest.

  Returns:
    ``(step, {field: restored pytree})``.

  Raises:
    FileNotFoundError: no checkpoint (or not ``step``) in ``directory``.
    ValueError: the fields are missing or their shapes differ.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoint directory {directory}')
  # Opening read-only is the point; Orbax warns about it three times.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    mngr = ocp.CheckpointManager(
        epath.Path(directory), item_names=(_STATE, _META, _FINGERPRINT),
        options=ocp.CheckpointManagerOptions(read_only=True))
  finally:
    logging.set_verbosity(verbosity)
  try:
    steps = mngr.all_steps()
    if not steps or (step is not None and step not in steps):
      raise FileNotFoundError(
          f'no checkpoint{"" if step is None else f" for step {step}"} in'
          f' {directory}')
    step = max(steps) if step is None else step
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype),
        abstract)
    # A parameter that cannot fit fails here, before Orbax's readers (which
    # report it as a storm of asynchronous errors).
    why = _first_mismatch(os.path.join(directory, str(step), _STATE),
                          abstract)
    if why:
      raise ValueError(f'step {step} in {directory} does not fit: {why}')
    try:
      out = mngr.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.PyTreeRestore(
              item=abstract, restore_args=restore_args,
              partial_restore=True)}))
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Orbax raises many types for a structure or shape mismatch.
      raise ValueError(
          f'step {step} in {directory} does not fit '
          f'{sorted(abstract)}: {type(e).__name__}: {first_line(e)}') from e
    return step, dict(out[_STATE])
  finally:
    mngr.close()


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _first_mismatch(state_dir: str, abstract: dict[str, PyTree]
                    ) -> str | None:
  """The first parameter whose saved shape differs from ``abstract``.

  Reads Orbax's tree metadata (key paths and written shapes); None when
  it cannot tell (unreadable metadata). The written shape of a sharded
  array is a shard's, so a saved shape that divides the wanted one is not
  called a mismatch.
  """
  try:
    with open(os.path.join(state_dir, '_METADATA')) as f:
      tree = json.load(f)['tree_metadata']
    saved = {}
    for entry in tree.values():
      path = tuple(str(k['key']) for k in entry['key_metadata'])
      saved[path] = entry['value_metadata'].get('write_shape')
  except (OSError, ValueError, KeyError, TypeError):
    return None
  wanted = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    wanted[tuple(_key_name(k) for k in path)] = tuple(leaf.shape)
  for path, shape in wanted.items():
    name = '/'.join(path)
    if path not in saved:
      return f'parameter {name} {list(shape)} is not in the checkpoint'
    got = saved[path]
    if got is not None and (len(got) != len(shape) or any(
        g <= 0 or w % g for g, w in zip(got, shape))):
      return (f'parameter {name} has shape {list(got)} in the '
              f'checkpoint, {list(shape)} here')
  fields = {p[0] for p in wanted}
  for path in saved:
    if path[0] in fields and path not in wanted:
      return (f'the checkpoint has parameter {"/".join(path)}, which this '
              'model lacks')
  return None
