"""ResNet backbones (He et al., 2016) with split batch norm.

The layers follow torchvision's ``resnet.py`` (v1.5: the stride of a
bottleneck is on its 3x3 convolution; convolutions have no bias; a 1x1
convolution + BN projects the shortcut when the shape changes; explicit
PyTorch padding), so parameter counts and shapes match torchvision and the
MoCo / SupReMix reference encoders. Every norm layer is a `SplitBatchNorm`
with ``bn_splits`` groups. The classifier is left out: the module returns the
globally average-pooled features.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hnjax.models import conv as conv_lib
from hnjax.models import norm as norm_lib

ModuleDef = Any

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _same_pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # PyTorch's symmetric padding (k - 1) // 2; flax 'SAME' pads stride-2
  # convolutions asymmetrically, which would shift the sampling grid.
  p = (kernel - 1) // 2
  return ((p, p), (p, p))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (ResNet-18/34).

  Attributes:
    filters: output channels.
    conv: convolution constructor (``nn.Conv`` with fixed options).
    norm: norm-layer constructor (``SplitBatchNorm`` with fixed options).
    strides: stride of the first convolution.
    zero_init_residual: start the block's last BN scale at zero.
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = False

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, H / strides, W / strides, filters]``."""
    s = self.strides
    y = self.conv(self.filters, (3, 3), (s, s), padding=_same_pad(3))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=_same_pad(3))(y)
    last_init = (
        nn.initializers.zeros
        if self.zero_init_residual
        else nn.initializers.ones
    )
    y = self.norm(scale_init=last_init)(y)
    if x.shape != y.shape:
      x = self.conv(self.filters, (1, 1), (s, s), name='proj_conv')(x)
      x = self.norm(name='proj_norm')(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 → 3x3 (strided) → 1x1 convolutions, 4x expansion (ResNet-50+).

  Attributes:
    filters: channels of the inner convolutions; the output has
      ``4 * filters``.
    conv: convolution constructor.
    norm: norm-layer constructor.
    strides: stride of the 3x3 convolution (torchvision v1.5).
    zero_init_residual: start the block's last BN scale at zero.
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = False

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, H / strides, W / strides, 4 * filters]``."""
    s = self.strides
    y = self.conv(self.filters, (1, 1))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), (s, s), padding=_same_pad(3))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * self.expansion, (1, 1))(y)
    last_init = (
        nn.initializers.zeros
        if self.zero_init_residual
        else nn.initializers.ones
    )
    y = self.norm(scale_init=last_init)(y)
    if x.shape != y.shape:
      x = self.conv(
          self.filters * self.expansion, (1, 1), (s, s), name='proj_conv'
      )(x)
      x = self.norm(name='proj_norm')(x)
    return nn.relu(x + y)


_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class ResNet(nn.Module):
  """ResNet feature extractor: stem, 4 (or more) stages, global average pool.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18 and
      ``(3, 4, 6, 3)`` for ResNet-50. Stage ``i > 0`` halves the resolution.
    block: ``'basic'`` (`BasicBlock`) or ``'bottleneck'`` (`Bottleneck`).
    width: channels of the stem and of the first stage (64 in torchvision);
      stage ``i`` has ``width * 2**i`` (times 4 after a bottleneck).
    stem: ``'cifar'`` (3x3 convolution, stride 1, no max-pool; for 32x32
      images) or ``'imagenet'`` (7x7 convolution, stride 2, then a 3x3
      stride-2 max-pool).
    bn_splits: ``num_splits`` of every `SplitBatchNorm` (1: ordinary BN).
    bn_momentum: running-statistics decay (flax convention).
    zero_init_residual: start each residual branch's last BN scale at zero
      (torchvision's option of the same name; off by default, as in MoCo).
    dtype: compute dtype of the convolutions and activations (e.g.
      ``jnp.bfloat16``); parameters stay ``param_dtype``, norm statistics and
      the pooled output are float32.
    param_dtype: dtype of the parameters.
  """

  stage_sizes: Sequence[int]
  block: str = 'basic'
  width: int = 64
  stem: str = 'cifar'
  bn_splits: int = 1
  bn_momentum: float = 0.9
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    """``F``, the size of the output feature vector."""
    block_cls = _BLOCKS[self.block]
    last = self.width * 2 ** (len(self.stage_sizes) - 1)
    return last * block_cls.expansion

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Computes pooled features.

    Args:
      x: ``[B, H, W, 3]`` images (any float dtype).
      train: use batch statistics (and update the running ones, so
        ``apply(..., mutable=['batch_stats'])``) if True, the running ones
        otherwise.

    Returns:
      ``[B, F]`` float32 features, ``F = num_features``.
    """
    if self.block not in _BLOCKS:
      raise ValueError(
          f'Unknown block {self.block!r}; known: {sorted(_BLOCKS)}.'
      )
    if self.stem not in ('cifar', 'imagenet'):
      raise ValueError(
          f"Unknown stem {self.stem!r}; known: ['cifar', 'imagenet']."
      )
    block_cls = _BLOCKS[self.block]
    conv = functools.partial(
        nn.Conv,
        conv_general_dilated=conv_lib.conv_general_dilated,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=conv_kernel_init,
    )
    norm = functools.partial(
        norm_lib.SplitBatchNorm,
        num_splits=self.bn_splits,
        use_running_average=not train,
        momentum=self.bn_momentum,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )

    x = jnp.asarray(x, self.dtype)
    if self.stem == 'cifar':
      x = conv(self.width, (3, 3), padding=_same_pad(3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_norm')(x))
    else:
      x = conv(
          self.width, (7, 7), (2, 2), padding=_same_pad(7), name='stem_conv'
      )(x)
      x = nn.relu(norm(name='stem_norm')(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=_same_pad(3))

    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = block_cls(
            filters=self.width * 2**i,
            conv=conv,
            norm=norm,
            strides=2 if i > 0 and j == 0 else 1,
            zero_init_residual=self.zero_init_residual,
            name=f'stage{i + 1}_block{j + 1}',
        )(x)
    # Pool in float32: a bfloat16 sum over H * W positions loses precision.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _resnet(
    stage_sizes: Sequence[int], block: str, stem: str
) -> Callable[..., ResNet]:
  return functools.partial(
      ResNet, stage_sizes=tuple(stage_sizes), block=block, stem=stem
  )


ResNet18 = _resnet((2, 2, 2, 2), 'basic', 'imagenet')
ResNet34 = _resnet((3, 4, 6, 3), 'basic', 'imagenet')
ResNet50 = _resnet((3, 4, 6, 3), 'bottleneck', 'imagenet')
ResNet18Cifar = _resnet((2, 2, 2, 2), 'basic', 'cifar')
ResNet34Cifar = _resnet((3, 4, 6, 3), 'basic', 'cifar')
ResNet50Cifar = _resnet((3, 4, 6, 3), 'bottleneck', 'cifar')
