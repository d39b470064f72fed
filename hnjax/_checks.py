"""Trace-time argument checks shared by losses, samplers and the queue.

Every check runs on static Python values or on array *shapes*, so it costs
nothing under `jax.jit` and fails before any compilation. Messages name the
argument and the offending value, e.g. ``temperature must be > 0, got 0.0``.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core


def concrete_or_none(x: Any) -> float | None:
  """Returns ``x`` as a Python float if it is known at trace time."""
  if isinstance(x, (int, float)):
    return float(x)
  try:
    return float(jax_core.concrete_or_error(None, x))
  except Exception:  # pylint: disable=broad-except
    # Traced (e.g. a learnable temperature): it cannot be checked here.
    return None


def positive(name: str, value: Any) -> None:
  """Raises ValueError if a known scalar ``value`` is not > 0 and finite."""
  v = concrete_or_none(value)
  if v is not None and not v > 0:
    raise ValueError(f'{name} must be > 0, got {v}')
  if v is not None and not math.isfinite(v):
    raise ValueError(f'{name} must be finite, got {v}')


def non_negative_int(name: str, value: Any) -> int:
  """Returns ``value`` as an int, raising ValueError if it is not an int >= 0."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'{name} must be an int >= 0, got {value!r}')
  return value


def positive_int(name: str, value: Any) -> int:
  """Returns ``value`` as an int, raising ValueError if it is not an int > 0."""
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f'{name} must be an int > 0, got {value!r}')
  return value


def one_of(name: str, value: Any, options: tuple[str, ...]) -> str:
  """Raises ValueError unless ``value`` is one of ``options``."""
  if value not in options:
    raise ValueError(f'{name} must be one of {options}, got {value!r}')
  return value


def rank(name: str, x: jax.typing.ArrayLike, ndim: int, shape: str) -> None:
  """Raises ValueError unless ``x`` has ``ndim`` dimensions."""
  if jnp.ndim(x) != ndim:
    raise ValueError(
        f'{name} must have shape {shape}, got shape {jnp.shape(x)}')


def floating(name: str, x: jax.typing.ArrayLike) -> None:
  """Raises ValueError unless ``x`` has a floating dtype."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(
        f'{name} must be a floating array, got dtype {jnp.result_type(x)}')


def same_shape(name_a: str, a: Any, name_b: str, b: Any) -> None:
  """Raises ValueError unless ``a`` and ``b`` have the same shape."""
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(
        f'{name_a} and {name_b} must have the same shape, got '
        f'{jnp.shape(a)} and {jnp.shape(b)}')


def embeddings(name: str, x: jax.typing.ArrayLike) -> None:
  """Checks that ``x`` is a floating ``[n, dim]`` array with ``n >= 1``."""
  rank(name, x, 2, '[n, dim]')
  floating(name, x)
  non_empty(name, x)


def non_empty(name: str, x: jax.typing.ArrayLike) -> None:
  """Raises ValueError if ``x`` has no elements (an empty batch or bank)."""
  if jnp.size(x) == 0:
    raise ValueError(f'{name} is empty (shape {jnp.shape(x)}): needs at least '
                     'one row')


def axis_size(axis_name: str | None) -> int:
  """Size of a named mesh axis; 1 when ``axis_name`` is None.

  Raises a ValueError (instead of JAX's NameError) when called outside
  ``jax.shard_map`` over that axis, i.e. when the mesh has no such axis.
  """
  if axis_name is None:
    return 1
  try:
    return jax.lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
        f'axis_name={axis_name!r} is not a mesh axis here: call this inside '
        f'jax.shard_map over a mesh with that axis, or pass axis_name=None'
    ) from None
