"""Encoder = backbone + projection head, and the model registry.

Models are flax linen modules used only through pure ``init`` / ``apply``::

  model = create_encoder('resnet18_cifar', head='mlp', dim=128, bn_splits=8)
  variables = model.init(key, images, train=False)
  out, updates = model.apply(
      variables, images, train=True, mutable=['batch_stats'])
  out['features']    # [B, F] backbone features (kNN / linear probe)
  out['projection']  # [B, D] head output, not normalised

``variables`` holds ``'params'`` and ``'batch_stats'``, each with a
``'backbone'`` and a ``'head'`` subtree.
"""

from collections.abc import Callable
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hnjax.models import convnet
from hnjax.models import heads
from hnjax.models import mlp
from hnjax.models import resnet
from hnjax.models import transformer

_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    'convnet': convnet.ConvNet,
    'mlp': mlp.MLP,
    'resnet18': resnet.ResNet18,
    'resnet34': resnet.ResNet34,
    'resnet50': resnet.ResNet50,
    'resnet18_cifar': resnet.ResNet18Cifar,
    'resnet34_cifar': resnet.ResNet34Cifar,
    'resnet50_cifar': resnet.ResNet50Cifar,
    # CLIP-style ViTs for 32x32 images: 4x4 patches, 65 tokens.
    'vit_tiny': functools.partial(transformer.VisionTransformer, width=64,
                                  depth=2, heads=4),
    'vit_small': functools.partial(transformer.VisionTransformer, width=128,
                                   depth=4, heads=4),
}


class Encoder(nn.Module):
  """A backbone followed by a projection head.

  Attributes:
    backbone: module called as ``backbone(x, train=...) -> [B, F]``.
    head: module called as ``head(features, train=...) -> [B, D]``.
  """

  backbone: nn.Module
  head: nn.Module

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Encodes a batch.

    Args:
      x: ``[B, H, W, C]`` images.
      train: batch statistics (pass ``mutable=['batch_stats']`` to
        ``apply``) if True, running statistics if False.

    Returns:
      A dict with float32 ``'features'`` ``[B, F]`` (pooled backbone output)
      and ``'projection'`` ``[B, D]`` (head output, *not* normalised).
    """
    features = self.backbone(x, train=train)
    projection = self.head(features, train=train)
    return {
        'features': features.astype(jnp.float32),
        # Float32 even for bfloat16 compute: logits are formed from it.
        'projection': projection.astype(jnp.float32),
    }


def backbone_names() -> list[str]:
  """Names accepted by `get_model` and `create_encoder`."""
  return sorted(_BACKBONES)


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a backbone by name.

  Args:
    name: one of `backbone_names` (``'convnet'``, ``'resnet18_cifar'``,
      ``'resnet50_cifar'``, ``'resnet50'``, ...).
    **kwargs: module attributes, e.g. ``bn_splits``, ``dtype``, ``width``
      (ResNets) or ``widths`` / ``strides`` (convnet).

  Returns:
    A module called as ``model(x [B, H, W, C], train=...) -> [B, F]``,
    with a ``num_features`` property giving ``F``.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in _BACKBONES:
    raise ValueError(
        f'Unknown model {name!r}; known: {backbone_names()}.'
    )
  return _BACKBONES[name](**kwargs)


def create_encoder(
    backbone: str,
    *,
    head: str = 'mlp',
    dim: int = 128,
    hidden: int | None = None,
    bn_splits: int = 1,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    **backbone_kwargs: Any,
) -> Encoder:
  """Builds an `Encoder` from a backbone name and a head name.

  Args:
    backbone: a name from `backbone_names`.
    head: ``'mlp'`` (MoCo v2, default), ``'mlp_bn'`` (SupReMix), ``'linear'``
      (MoCo v1 / CIFAR demo) or ``'identity'`` (projection = features).
    dim: projection dimension ``D``.
    hidden: hidden width of the MLP heads; None means ``F``, the backbone's
      feature size (2048 for ResNet-50, as in MoCo v2 and SupReMix).
    bn_splits: ``num_splits`` of every `SplitBatchNorm`, backbone and head
      (use a multiple of the device count for per-device BN).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); outputs are float32.
    param_dtype: dtype of the parameters.
    **backbone_kwargs: further backbone attributes (e.g. ``width``).

  Returns:
    An `Encoder`: ``encoder(x [B, H, W, C], train=...)`` returns
    ``{'features': [B, F], 'projection': [B, D]}``.

  Raises:
    ValueError: for an unknown backbone or head name.
  """
  net = get_model(
      backbone,
      bn_splits=bn_splits,
      dtype=dtype,
      param_dtype=param_dtype,
      **backbone_kwargs,
  )
  proj = heads.get_head(
      head,
      dim=dim,
      hidden=net.num_features if hidden is None else hidden,
      bn_splits=bn_splits,
      dtype=dtype,
      param_dtype=param_dtype,
  )
  return Encoder(backbone=net, head=proj)
