"""CLIP-style transformers: a small ViT image tower and a causal text tower.

Both are pre-LN transformers as in CLIP (Radford et al., 2021): each block
is ``x + attn(LN(x))`` then ``x + mlp(LN(x))`` with QuickGELU
(``x * sigmoid(1.702 x)``, the activation of OpenAI's checkpoints) or GELU
(OpenCLIP's), so that pretrained CLIP towers load into them
(`hnjax.models.clip.from_pretrained`).

* `VisionTransformer` (``'vit_tiny'``, ``'vit_small'`` in the backbone
  registry): patches → linear embedding, a class token, learned positions,
  ``LN_pre``, the blocks, ``LN_post`` on the class token. It has the
  backbone interface (``(x [B, H, W, C], train) -> [B, F]``), so it also
  serves MoCo and SupReMix.
* `TextTransformer`: token and position embeddings, blocks with CLIP's
  causal mask, ``LN_final``, then the features at each caption's end token
  (EOT pooling). With the causal mask the end token has read the whole
  caption and nothing after it, so padding never changes a caption's
  features.
"""

from typing import Any

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""
  return x * jax.nn.sigmoid(1.702 * x)


# The MLP activations of CLIP checkpoints, by their Hugging Face names.
ACTIVATIONS = {
    'quick_gelu': quick_gelu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
}
POOLINGS = ('end', 'argmax')


def _activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'activation={name!r}: unknown; known: '
                     f'{sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


class Block(nn.Module):
  """One pre-LN transformer block.

  Attributes:
    width: model width ``W``.
    heads: attention heads (``W`` must be divisible by it).
    mlp_ratio: hidden width of the MLP over ``W`` (if ``mlp_dim`` is None).
    mlp_dim: hidden width of the MLP.
    activation: the MLP's, a name of `ACTIVATIONS`.
    layer_norm_eps: epsilon of the layer norms.
    dtype: compute dtype (LayerNorm and softmax statistics in float32).
    param_dtype: dtype of the parameters.
  """

  width: int
  heads: int
  mlp_ratio: int = 4
  mlp_dim: int | None = None
  activation: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None
               ) -> jax.Array:
    """``[B, L, W] -> [B, L, W]``; ``mask`` ``[B, 1, L, L]`` bool or None."""
    ln = lambda name: nn.LayerNorm(  # pylint: disable=unnecessary-lambda-assignment
        epsilon=self.layer_norm_eps, dtype=jnp.float32,
        param_dtype=self.param_dtype, name=name)
    h = ln('ln_1')(x).astype(self.dtype)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, qkv_features=self.width, dtype=self.dtype,
        param_dtype=self.param_dtype, name='attn')(h, h, mask=mask)
    x = x + h
    h = ln('ln_2')(x).astype(self.dtype)
    h = nn.Dense(self.mlp_dim or self.width * self.mlp_ratio,
                 dtype=self.dtype, param_dtype=self.param_dtype,
                 name='c_fc')(h)
    h = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 name='c_proj')(_activation(self.activation)(h))
    return x + h


class VisionTransformer(nn.Module):
  """A ViT image tower with a class token (CLIP's ``VisionTransformer``).

  Attributes:
    patch_size: side of the square patches (the image side must be a
      multiple of it).
    width: model width ``F`` (the feature size).
    depth: number of blocks.
    heads: attention heads.
    bn_splits: ignored (no batch norm; accepted so that the backbone
      registry can pass it).
    mlp_dim: hidden width of the blocks' MLPs (None: ``4 * width``).
    activation: the MLPs', a name of `ACTIVATIONS`.
    layer_norm_eps: epsilon of the layer norms.
    image_size: the one image side it accepts (its positions are learned
      for it), or None: any multiple of ``patch_size`` at ``init``.
    dtype: compute dtype; the output is float32.
    param_dtype: dtype of the parameters.
  """

  patch_size: int = 4
  width: int = 64
  depth: int = 2
  heads: int = 4
  bn_splits: int = 1
  mlp_dim: int | None = None
  activation: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  image_size: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    """``F``, the size of the output feature vector."""
    return self.width

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Encodes images.

    Args:
      x: ``[B, H, W, C]`` normalised images, ``H`` and ``W`` multiples of
        ``patch_size``.
      train: unused (no dropout, no batch statistics).

    Returns:
      ``[B, F]`` float32 features of the class token after ``LN_post``.
    """
    del train
    b, h, w, _ = x.shape
    p = self.patch_size
    if self.image_size is not None and (h, w) != (self.image_size,) * 2:
      raise ValueError(f'images must be {self.image_size}x{self.image_size} '
                       f'(the size its positions were learned for), got '
                       f'{h}x{w}')
    if h % p or w % p:
      raise ValueError(f'image size {h}x{w} is not a multiple of the patch '
                       f'size {p}')
    x = nn.Conv(self.width, (p, p), (p, p), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name='conv1')(
                    jnp.asarray(x, self.dtype))
    x = x.reshape(b, -1, self.width)
    scale = self.width ** -0.5
    cls = self.param('class_embedding', nn.initializers.normal(scale),
                     (self.width,), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype),
                                          (b, 1, self.width)), x], axis=1)
    pos = self.param('positional_embedding', nn.initializers.normal(scale),
                     x.shape[1:], self.param_dtype)
    x = x + pos.astype(x.dtype)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                     param_dtype=self.param_dtype, name='ln_pre')(x)
    for i in range(self.depth):
      x = _block(self, f'block_{i}')(x.astype(self.dtype))
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                     param_dtype=self.param_dtype, name='ln_post')(x[:, 0])
    return x.astype(jnp.float32)


def _block(tower: nn.Module, name: str) -> Block:
  """A `Block` with the sizes, activation and dtypes of ``tower``."""
  return Block(tower.width, tower.heads, mlp_dim=tower.mlp_dim,
               activation=tower.activation,
               layer_norm_eps=tower.layer_norm_eps, dtype=tower.dtype,
               param_dtype=tower.param_dtype, name=name)


def end_positions(tokens: jax.Array, end_id: int) -> jax.Array:
  """Index of the first ``end_id`` in each row (0 if there is none).

  Args:
    tokens: ``[B, L]`` int token ids.
    end_id: the end-of-text id.

  Returns:
    ``[B]`` int32 positions.
  """
  return jnp.argmax(tokens == end_id, axis=-1).astype(jnp.int32)


class TextTransformer(nn.Module):
  """CLIP's text tower: causal pre-LN transformer with end-token pooling.

  Attributes:
    vocab_size: number of token ids.
    context_length: ``L``, tokens per caption (the positions learned).
    end_id: the end-of-text token id, whose features are pooled.
    width: model width ``W`` (the feature size).
    depth: number of blocks.
    heads: attention heads.
    mlp_dim: hidden width of the blocks' MLPs (None: ``4 * width``).
    activation: the MLPs', a name of `ACTIVATIONS`.
    layer_norm_eps: epsilon of the layer norms.
    pool: ``'end'``: the features at the first ``end_id``; ``'argmax'``: at
      the largest id of each row (OpenAI's rule, which Hugging Face keeps
      for checkpoints whose config says ``eos_token_id: 2``; the same
      position when the end token has the largest id).
    dtype: compute dtype; the output is float32.
    param_dtype: dtype of the parameters.
  """

  vocab_size: int
  context_length: int
  end_id: int
  width: int = 64
  depth: int = 2
  heads: int = 4
  mlp_dim: int | None = None
  activation: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  pool: str = 'end'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    """``W``, the size of the output feature vector."""
    return self.width

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Encodes captions.

    Args:
      tokens: ``[B, L]`` int token ids as the tokenizer writes them (start,
        words, end, padding), ``L = context_length``.

    Returns:
      ``[B, W]`` float32 features at each caption's end token.
    """
    if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
      raise ValueError(f'tokens must be [B, {self.context_length}], got shape '
                       f'{tokens.shape}')
    x = nn.Embed(self.vocab_size, self.width,
                 embedding_init=nn.initializers.normal(0.02),
                 param_dtype=self.param_dtype, name='token_embedding')(tokens)
    pos = self.param('positional_embedding', nn.initializers.normal(0.01),
                     (self.context_length, self.width), self.param_dtype)
    x = (x + pos).astype(self.dtype)
    mask = nn.make_causal_mask(tokens)  # [B, 1, L, L]
    for i in range(self.depth):
      x = _block(self, f'block_{i}')(x, mask)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                     param_dtype=self.param_dtype, name='ln_final')(x)
    if self.pool == 'argmax':
      where = jnp.argmax(tokens, axis=-1).astype(jnp.int32)
    elif self.pool == 'end':
      where = end_positions(tokens, self.end_id)
    else:
      raise ValueError(f'pool={self.pool!r}: must be one of {POOLINGS}')
    pooled = jnp.take_along_axis(x, where[:, None, None], axis=1)[:, 0]
    return pooled.astype(jnp.float32)
