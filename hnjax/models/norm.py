"""Split batch norm and the batch shuffle of MoCo's shuffle-BN.

MoCo computes the key encoder's batch-norm statistics per device, and
permutes the key batch across devices first, so that a query and its key are
normalised with statistics of different sub-batches; otherwise the model can
"cheat" through the statistics (He et al., 2020, §3.3). `SplitBatchNorm`
gets the same per-sub-batch statistics from a single global batch, whatever
the number of devices: the batch is cut into ``num_splits`` contiguous groups
and each group is normalised with its own statistics. On a ``'data'`` mesh
with ``num_splits`` a multiple of the device count, every group lives on one
device, so the statistics need no communication. `shuffle` and `unshuffle`
are the permutation around the key encoder (ALGORITHMS.md §2.2 step 2, §2.4).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

PyTree = Any


class SplitBatchNorm(nn.Module):
  """Batch norm with separate training statistics for groups of the batch.

  In training mode the ``[B, ..., C]`` input is cut into ``G = num_splits``
  contiguous groups of ``B / G`` examples, and group ``g`` is normalised with
  its own mean and (biased) variance over every axis but the last:

  .. math::

    y = \\gamma \\, (x - \\mu_g) / \\sqrt{\\sigma^2_g + \\epsilon} + \\beta

  The running statistics take the average over groups of the group
  statistics, ``r <- m r + (1 - m) mean_g(s_g)``, as in the MoCo CIFAR demo's
  ``SplitBatchNorm``. In evaluation mode (``use_running_average=True``) the
  running statistics are used and nothing is split. ``num_splits=1`` is
  ordinary batch norm, equal to ``flax.linen.BatchNorm`` with the same
  ``momentum`` and ``epsilon``; the variables have the same names
  (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``).

  Differences to the PyTorch demo: groups are contiguous (the demo's
  ``view(-1, C * G, H, W)`` takes every G-th example), so that they align
  with contiguous device shards; and the running variance is the biased one
  (flax convention; PyTorch stores the unbiased one). Statistics are computed
  in float32 whatever ``dtype`` is. Running statistics are not updated while
  the module is initialised (as in flax).

  Per-device BN (shuffle-BN) with ``n`` devices: choose ``num_splits`` a
  multiple of ``n`` (e.g. 8 for 1, 2, 4 or 8 devices) and shard the batch
  over ``'data'``; results then do not depend on ``n``. With fewer groups
  than devices XLA reduces across devices, i.e. synchronised BN.

  Attributes:
    num_splits: ``G``, the number of groups; must divide the batch size in
      training mode.
    use_running_average: if True use the running statistics (evaluation);
      may instead be given to ``__call__``.
    momentum: decay of the running statistics (flax convention: 0.9 here is
      PyTorch's ``momentum=0.1``).
    epsilon: added to the variance.
    dtype: dtype of the output (None: the input's, promoted with float32
      params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: whether to add ``bias`` (beta).
    use_scale: whether to multiply by ``scale`` (gamma).
    bias_init: initialiser of ``bias``.
    scale_init: initialiser of ``scale``.
  """

  num_splits: int = 1
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros
  scale_init: Callable[..., jax.Array] = nn.initializers.ones

  @nn.compact
  def __call__(
      self, x: jax.Array, use_running_average: bool | None = None
  ) -> jax.Array:
    """Normalises ``x``.

    Args:
      x: ``[B, ..., C]`` activations, features last.
      use_running_average: overrides the attribute of the same name.

    Returns:
      ``[B, ..., C]`` normalised activations.
    """
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average
    )
    if self.num_splits < 1:
      raise ValueError(f'num_splits must be >= 1, got {self.num_splits}.')
    c = x.shape[-1]
    ra_mean = self.variable(
        'batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32)
    )
    ra_var = self.variable(
        'batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32)
    )
    dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value  # [C]
      xg = x.astype(jnp.float32)
    else:
      b, g = x.shape[0], self.num_splits
      if b % g:
        raise ValueError(
            f'SplitBatchNorm: batch size {b} is not divisible by '
            f'num_splits={g}.'
        )
      # [G, N, C] with N = B / G * (spatial size): a leading group axis
      # keeps the reshape local to each device when B is sharded over
      # devices and G is a multiple of their number.
      xg = x.reshape(g, -1, c).astype(jnp.float32)
      mean = jnp.mean(xg, axis=1, keepdims=True)  # [G, 1, C]
      # Two-pass variance: no cancellation for inputs with a large mean.
      var = jnp.mean(jnp.square(xg - mean), axis=1, keepdims=True)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, (0, 1))
        ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var, (0, 1))

    mul = lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      scale = self.param('scale', self.scale_init, (c,), self.param_dtype)
      mul = mul * scale.astype(jnp.float32)
    y = (xg - mean) * mul
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (c,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.reshape(x.shape).astype(dtype)


def shuffle(key: jax.Array, x: PyTree) -> tuple[PyTree, jax.Array]:
  """Randomly permutes a batch, the first half of MoCo's shuffle-BN.

  Apply to the key view before the key encoder and `unshuffle` its outputs:
  with `SplitBatchNorm`, each key is then normalised with statistics of a
  random sub-batch that does not line up with its query's sub-batch. Under
  ``jax.jit`` on a batch sharded over ``'data'`` this is one global
  permutation (XLA moves the rows between devices), like MoCo's
  gather-permute-scatter; use the same key on every process.

  Args:
    key: a PRNG key.
    x: an array or pytree of arrays, each ``[G, ...]`` (global batch first).

  Returns:
    ``(x_shuffled, perm)``: ``x_shuffled[i] = x[perm[i]]`` leaf-wise, and
    ``perm`` an int32 ``[G]`` permutation.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.arange(4.0)
    >>> xs, perm = shuffle(jax.random.key(0), x)
    >>> bool(jnp.all(unshuffle(xs, perm) == x))
    True
  """
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(x)}
  if len(sizes) != 1:
    raise ValueError(
        f'shuffle: leaves must share one leading batch size, got {sizes}.'
    )
  (n,) = sizes
  perm = jax.random.permutation(key, n).astype(jnp.int32)
  return jax.tree.map(lambda a: jnp.take(a, perm, axis=0), x), perm


def unshuffle(y: PyTree, perm: jax.Array) -> PyTree:
  """Inverts `shuffle`: puts rows back in their original order.

  Args:
    y: an array or pytree of arrays, each ``[G, ...]``, in shuffled order
      (e.g. the key encoder's output dict).
    perm: the ``[G]`` permutation returned by `shuffle`.

  Returns:
    ``y`` with ``out[perm[i]] = y[i]`` leaf-wise.
  """
  inv = jnp.argsort(perm)
  return jax.tree.map(lambda a: jnp.take(a, inv, axis=0), y)
