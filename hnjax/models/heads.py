"""Projection heads that map backbone features to the contrastive space.

* ``'mlp'``: MoCo v2, Linear(F, hidden) → ReLU → Linear(hidden, dim), no BN
  (facebookresearch/moco ``--mlp``; ALGORITHMS.md §2.1).
* ``'mlp_bn'``: SupReMix, Linear → BN → ReLU → Linear → BN
  (ALGORITHMS.md §4.1).
* ``'linear'``: Linear(F, dim), MoCo v1 and the MoCo CIFAR-10 demo.
* ``'identity'``: the features themselves.

Heads return unnormalised projections; the trainer L2-normalises them.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hnjax.models import norm as norm_lib


class MLPHead(nn.Module):
  """Two-layer MLP head, optionally with BN after each linear layer.

  ``Linear(F, hidden) → [BN] → ReLU → Linear(hidden, dim) → [BN]``. Linear
  layers have biases, as ``torch.nn.Linear`` in both reference codebases.

  Attributes:
    hidden: width of the hidden layer.
    dim: ``D``, the output dimension.
    use_bn: add `SplitBatchNorm` after both linear layers (SupReMix).
    bn_splits: ``num_splits`` of the norm layers (same as the backbone's, so
      that the head also has per-device statistics).
    bn_momentum: running-statistics decay (flax convention).
    dtype: compute dtype; parameters stay ``param_dtype``.
    param_dtype: dtype of the parameters.
  """

  hidden: int
  dim: int = 128
  use_bn: bool = False
  bn_splits: int = 1
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Projects features.

    Args:
      x: ``[B, F]`` features.
      train: batch statistics if True, running ones if False (only matters
        with ``use_bn``).

    Returns:
      ``[B, dim]`` projections in ``dtype``, not normalised.
    """
    dense = functools.partial(
        nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype
    )
    norm = functools.partial(
        norm_lib.SplitBatchNorm,
        num_splits=self.bn_splits,
        use_running_average=not train,
        momentum=self.bn_momentum,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    x = dense(self.hidden, name='fc1')(x)
    if self.use_bn:
      x = norm(name='bn1')(x)
    x = nn.relu(x)
    x = dense(self.dim, name='fc2')(x)
    if self.use_bn:
      x = norm(name='bn2')(x)
    return x


class LinearHead(nn.Module):
  """A single linear layer, ``Linear(F, dim)`` (MoCo v1, CIFAR demo).

  Attributes:
    dim: ``D``, the output dimension.
    dtype: compute dtype.
    param_dtype: dtype of the parameters.
  """

  dim: int = 128
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """``[B, F] -> [B, dim]``; ``train`` is unused."""
    del train  # No batch statistics.
    return nn.Dense(
        self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name='fc'
    )(x)


class IdentityHead(nn.Module):
  """No projection: returns the features (``dim`` is the feature size)."""

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """``[B, F] -> [B, F]``; ``train`` is unused."""
    del train
    return x


HEADS = ('mlp', 'mlp_bn', 'linear', 'identity')


def get_head(
    name: str,
    *,
    dim: int = 128,
    hidden: int = 2048,
    bn_splits: int = 1,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> nn.Module:
  """Builds a projection head by name.

  Args:
    name: one of ``'mlp'``, ``'mlp_bn'``, ``'linear'``, ``'identity'``.
    dim: output dimension ``D`` (ignored by ``'identity'``).
    hidden: hidden width of the MLP heads.
    bn_splits: groups of the ``'mlp_bn'`` norm layers.
    dtype: compute dtype.
    param_dtype: dtype of the parameters.

  Returns:
    A module called as ``head(features [B, F], train=...) -> [B, D]``.
  """
  if name in ('mlp', 'mlp_bn'):
    return MLPHead(
        hidden=hidden,
        dim=dim,
        use_bn=name == 'mlp_bn',
        bn_splits=bn_splits,
        dtype=dtype,
        param_dtype=param_dtype,
    )
  if name == 'linear':
    return LinearHead(dim=dim, dtype=dtype, param_dtype=param_dtype)
  if name == 'identity':
    return IdentityHead()
  raise ValueError(f'Unknown head {name!r}; known: {list(HEADS)}.')
