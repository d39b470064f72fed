"""A small MLP backbone for tabular inputs (e.g. the diabetes data).

Each layer is Linear → `SplitBatchNorm` → ReLU; the output of the last
layer is the feature vector, as the convnet's pooled features.
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hnjax.models import norm as norm_lib


class MLP(nn.Module):
  """Stack of Linear-BN-ReLU layers over ``[B, F_in]`` inputs.

  Attributes:
    widths: output width of each layer.
    bn_splits: ``num_splits`` of every `SplitBatchNorm` (1: ordinary BN).
    bn_momentum: running-statistics decay (flax convention).
    dtype: compute dtype; the output is float32.
    param_dtype: dtype of the parameters.
  """

  widths: Sequence[int] = (128, 128)
  bn_splits: int = 1
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    """``F``, the size of the output feature vector."""
    return self.widths[-1]

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Computes features.

    Args:
      x: ``[B, F_in]`` inputs (standardised).
      train: use (and update) batch statistics if True, running ones if
        False.

    Returns:
      ``[B, F]`` float32 features, ``F = widths[-1]``.
    """
    if x.ndim != 2:
      raise ValueError(f'MLP expects [B, F] inputs, got shape {x.shape}')
    norm = functools.partial(
        norm_lib.SplitBatchNorm, num_splits=self.bn_splits,
        use_running_average=not train, momentum=self.bn_momentum,
        dtype=self.dtype, param_dtype=self.param_dtype)
    x = jnp.asarray(x, self.dtype)
    for w in self.widths:
      x = nn.Dense(w, use_bias=False, dtype=self.dtype,
                   param_dtype=self.param_dtype)(x)
      x = nn.relu(norm()(x))
    return x.astype(jnp.float32)
