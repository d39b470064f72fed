"""A two-tower CLIP model: image tower, text tower, projections, logit scale.

Used only through pure ``init`` / ``apply``::

  model = create_clip(image_tower='convnet', vocab_size=40,
                      context_length=16, end_id=2, embed_dim=64)
  variables = model.init(key, images, tokens, train=False)
  out, updates = model.apply(variables, images, tokens, train=True,
                             mutable=['batch_stats'])
  out['image'], out['text']  # [B, D] projected, *not* normalised
  model.apply(variables, images, method=model.encode_image)  # [B, D]
  model.apply(variables, tokens, method=model.encode_text)   # [B, D]

``variables['params']`` holds ``image_tower``, ``text_tower``,
``image_projection``, ``text_projection``, ``logit_scale`` (log of CLIP's
learnable inverse temperature, initialised to ``log(1 / 0.07)`` and used
clamped at 100) and ``logit_bias`` (SigLIP's bias, initialised to -10).
Image towers with batch norm (the convnet, the ResNets) also have
``batch_stats``.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hnjax.models import encoder
from hnjax.models import transformer

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) here


class CLIP(nn.Module):
  """Image and text towers with linear projections to a shared space.

  Attributes:
    image_tower: backbone ``(x [B, H, W, C], train) -> [B, F]``.
    text_tower: ``(tokens [B, L]) -> [B, W]`` (`TextTransformer`).
    embed_dim: ``D``, the shared embedding size.
    init_temperature: initial ``1 / exp(logit_scale)``.
    init_bias: initial SigLIP bias.
  """

  image_tower: nn.Module
  text_tower: nn.Module
  embed_dim: int = 64
  init_temperature: float = 0.07
  init_bias: float = -10.0

  def setup(self):
    self.image_projection = nn.Dense(self.embed_dim, use_bias=False)
    self.text_projection = nn.Dense(self.embed_dim, use_bias=False)
    self.logit_scale = self.param(
        'logit_scale', nn.initializers.constant(
            np.log(1.0 / self.init_temperature)), ())
    self.logit_bias = self.param(
        'logit_bias', nn.initializers.constant(self.init_bias), ())

  def encode_image(self, images: jax.Array, *, train: bool = False
                   ) -> jax.Array:
    """``[B, H, W, C]`` normalised images -> ``[B, D]`` float32 embeddings."""
    features = self.image_tower(images, train=train)
    return self.image_projection(features).astype(jnp.float32)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """``[B, L]`` int token ids -> ``[B, D]`` float32 embeddings."""
    return self.text_projection(self.text_tower(tokens)).astype(jnp.float32)

  def __call__(self, images: jax.Array, tokens: jax.Array, *, train: bool
               ) -> dict[str, jax.Array]:
    """Both towers on a batch of pairs.

    Args:
      images: ``[B, H, W, C]`` normalised images.
      tokens: ``[B, L]`` int token ids.
      train: batch statistics in the image tower if True (pass
        ``mutable=['batch_stats']``), running ones if False.

    Returns:
      ``{'image': [B, D], 'text': [B, D]}`` projected (not normalised)
      float32 embeddings, ``'logit_scale'`` (``exp``, clamped at
      `MAX_LOGIT_SCALE`) and ``'logit_bias'``, scalars.
    """
    return {
        'image': self.encode_image(images, train=train),
        'text': self.encode_text(tokens),
        'logit_scale': jnp.minimum(jnp.exp(self.logit_scale),
                                   MAX_LOGIT_SCALE),
        'logit_bias': self.logit_bias,
    }


def create_clip(
    *,
    image_tower: str,
    vocab_size: int,
    context_length: int,
    end_id: int,
    embed_dim: int = 64,
    text_width: int = 64,
    text_depth: int = 2,
    text_heads: int = 4,
    init_temperature: float = 0.07,
    dtype: Any = jnp.float32,
) -> CLIP:
  """A `CLIP` with a registry image tower and a `TextTransformer`.

  Args:
    image_tower: a name of `encoder.backbone_names` (``'convnet'``,
      ``'resnet18_cifar'``, ``'vit_tiny'``, ...).
    vocab_size: token ids of the tokenizer.
    context_length: ``L``.
    end_id: the tokenizer's end-of-text id (pooled).
    embed_dim: ``D``.
    text_width: text tower width.
    text_depth: text tower blocks.
    text_heads: text tower attention heads.
    init_temperature: initial learnable temperature.
    dtype: compute dtype of both towers.

  Returns:
    A `CLIP` module.

  Raises:
    ValueError: an unknown image tower.
  """
  return CLIP(
      image_tower=encoder.get_model(image_tower, dtype=dtype),
      text_tower=transformer.TextTransformer(
          vocab_size=vocab_size, context_length=context_length,
          end_id=end_id, width=text_width, depth=text_depth,
          heads=text_heads, dtype=dtype),
      embed_dim=embed_dim, init_temperature=init_temperature)


def from_pretrained(path: str, *, dtype: Any = jnp.float32):
  """A pretrained CLIP, its parameters and tokenizer from a checkpoint folder.

  ``model, params, tokenizer = from_pretrained(folder)``: a folder in the
  Hugging Face layout (``config.json``, ``model.safetensors``,
  ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``); see
  `hnjax.models.clip_pretrained.from_pretrained` for the details.

  Args:
    path: the checkpoint folder (downloaded once by the user; hnjax never
      downloads).
    dtype: compute dtype of the towers; parameters are float32.

  Returns:
    ``(model, params, tokenizer)``.
  """
  from hnjax.models import clip_pretrained  # pylint: disable=g-import-not-at-top
  return clip_pretrained.from_pretrained(path, dtype=dtype)
