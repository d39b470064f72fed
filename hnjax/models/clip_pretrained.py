"""Pretrained CLIP towers from a checkpoint folder in the Hugging Face layout.

A folder as ``huggingface-cli download openai/clip-vit-base-patch32``
writes it (hnjax never downloads)::

  config.json          # CLIPConfig: text_config, vision_config, projection_dim
  model.safetensors    # CLIPModel's weights (float32, float16 or bfloat16)
  tokenizer.json       # or vocab.json + merges.txt
  tokenizer_config.json

`from_pretrained` reads it into hnjax's own modules (`VisionTransformer`,
`TextTransformer`, `CLIP`): the same computation as the reference
``CLIPModel`` (ViT with a class token, pre-LN blocks, QuickGELU or GELU, a
causal text transformer pooled at the end token, bias-free projections),
checked to 1e-4 on a random checkpoint that the reference saved
(tests/fixtures/make_tiny_clip.py). Parameters are float32 whatever the
file stores; ``dtype`` is the towers' compute dtype (``jnp.bfloat16`` on
accelerators), with float32 layer norms, outputs and logits.

The weight mapping (``[out, in]`` PyTorch matrices become ``[in, out]``
kernels, attention projections are split into heads, the patch embedding
becomes an HWIO convolution kernel) is checked tensor by tensor: a missing
or misshapen tensor, or one the architecture has no place for, is a
``ValueError`` naming the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from hnjax.models import clip as clip_lib
from hnjax.models import clip_tokenizer
from hnjax.models import transformer

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
# CLIP's image normalisation, used when the folder has no
# preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """The architecture a checkpoint's ``config.json`` describes.

  Attributes:
    image_size, patch_size: the image tower's input side and patch side.
    vision_width, vision_depth, vision_heads, vision_mlp: its sizes.
    vision_activation: its MLP activation (`transformer.ACTIVATIONS`).
    vocab_size, context_length: the text tower's ids and positions.
    text_width, text_depth, text_heads, text_mlp: its sizes.
    text_activation: its MLP activation.
    text_pool: ``'argmax'`` for configs with ``eos_token_id: 2`` (OpenAI's
      pooling at the largest id, as Hugging Face keeps it), else ``'end'``.
    eos_token_id: the config's end token id.
    embed_dim: the projections' output size.
    layer_norm_eps: epsilon of every layer norm (vision, text).
    mean, std: image normalisation (``preprocessor_config.json``, else
      CLIP's).
  """
  image_size: int
  patch_size: int
  vision_width: int
  vision_depth: int
  vision_heads: int
  vision_mlp: int
  vision_activation: str
  vocab_size: int
  context_length: int
  text_width: int
  text_depth: int
  text_heads: int
  text_mlp: int
  text_activation: str
  text_pool: str
  eos_token_id: int
  embed_dim: int
  layer_norm_eps: tuple[float, float]
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD


def _openai_vit(patch_size: int) -> ClipSpec:
  return ClipSpec(
      image_size=224, patch_size=patch_size, vision_width=768,
      vision_depth=12, vision_heads=12, vision_mlp=3072,
      vision_activation='quick_gelu', vocab_size=49408, context_length=77,
      text_width=512, text_depth=12, text_heads=8, text_mlp=2048,
      text_activation='quick_gelu', text_pool='argmax', eos_token_id=49407,
      embed_dim=512, layer_norm_eps=(1e-5, 1e-5))


# Sizes without a checkpoint (e.g. to benchmark or to train from scratch):
# OpenAI's ViT-B/32 (151,277,313 parameters in transformers' CLIPModel, one
# more here: SigLIP's bias), ViT-B/16, and the tiny test checkpoint's.
ARCHITECTURES = {
    'vit_b32': _openai_vit(32),
    'vit_b16': _openai_vit(16),
    'tiny': ClipSpec(
        image_size=32, patch_size=8, vision_width=32, vision_depth=2,
        vision_heads=4, vision_mlp=64, vision_activation='quick_gelu',
        vocab_size=714, context_length=16, text_width=32, text_depth=2,
        text_heads=4, text_mlp=64, text_activation='quick_gelu',
        text_pool='argmax', eos_token_id=2, embed_dim=24,
        layer_norm_eps=(1e-5, 1e-5)),
}


def _field(config: dict[str, Any], key: str, where: str) -> int:
  """A positive integer field of a config.json section."""
  if key not in config:
    raise ValueError(f'{where}: no {key!r} field')
  value = config[key]
  if not (isinstance(value, int) and value > 0):
    raise ValueError(f'{where}: {key}={value!r} must be a positive integer')
  return value


def read_spec(path: str) -> ClipSpec:
  """The architecture of the checkpoint folder ``path``.

  Raises:
    FileNotFoundError: no ``config.json`` in ``path``.
    ValueError: not a CLIP ViT config, naming the file and the field.
  """
  config_path = os.path.join(path, CONFIG)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path}: not found (a CLIP checkpoint '
                            'folder in the Hugging Face layout has config.json '
                            'and model.safetensors)')
  with open(config_path, encoding='utf-8') as f:
    config = json.load(f)
  if config.get('model_type') != 'clip':
    raise ValueError(f'{config_path}: model_type={config.get("model_type")!r}'
                     "; only CLIP ('clip', ViT image towers) is supported")
  vision, text = config.get('vision_config'), config.get('text_config')
  if not isinstance(vision, dict) or not isinstance(text, dict):
    raise ValueError(f'{config_path}: needs vision_config and text_config')
  v_where, t_where = f'{config_path} vision_config', f'{config_path} text_config'
  activations = []
  for sub, where in ((vision, v_where), (text, t_where)):
    act = sub.get('hidden_act', 'quick_gelu')
    if act not in transformer.ACTIVATIONS:
      raise ValueError(f'{where}: hidden_act={act!r} is not supported; '
                       f'known: {sorted(transformer.ACTIVATIONS)}')
    activations.append(act)
    if _field(sub, 'hidden_size', where) % _field(
        sub, 'num_attention_heads', where):
      raise ValueError(f'{where}: hidden_size={sub["hidden_size"]} is not '
                       f'divisible by num_attention_heads='
                       f'{sub["num_attention_heads"]}')
  if _field(vision, 'image_size', v_where) % _field(vision, 'patch_size',
                                                    v_where):
    raise ValueError(f'{v_where}: image_size={vision["image_size"]} is not a '
                     f'multiple of patch_size={vision["patch_size"]}')
  eos = text.get('eos_token_id', 2)
  mean, std = CLIP_MEAN, CLIP_STD
  pre_path = os.path.join(path, 'preprocessor_config.json')
  if os.path.exists(pre_path):
    with open(pre_path, encoding='utf-8') as f:
      pre = json.load(f)
    mean = tuple(float(x) for x in pre.get('image_mean', mean))
    std = tuple(float(x) for x in pre.get('image_std', std))
  return ClipSpec(
      image_size=vision['image_size'], patch_size=vision['patch_size'],
      vision_width=vision['hidden_size'],
      vision_depth=_field(vision, 'num_hidden_layers', v_where),
      vision_heads=vision['num_attention_heads'],
      vision_mlp=_field(vision, 'intermediate_size', v_where),
      vision_activation=activations[0],
      vocab_size=_field(text, 'vocab_size', t_where),
      context_length=_field(text, 'max_position_embeddings', t_where),
      text_width=text['hidden_size'],
      text_depth=_field(text, 'num_hidden_layers', t_where),
      text_heads=text['num_attention_heads'],
      text_mlp=_field(text, 'intermediate_size', t_where),
      text_activation=activations[1],
      text_pool='argmax' if eos == 2 else 'end', eos_token_id=eos,
      embed_dim=_field(config, 'projection_dim', config_path),
      layer_norm_eps=(float(vision.get('layer_norm_eps', 1e-5)),
                      float(text.get('layer_norm_eps', 1e-5))),
      mean=mean, std=std)


def create_model(spec: ClipSpec, *, end_id: int, dtype: Any = jnp.float32
                 ) -> clip_lib.CLIP:
  """The `CLIP` module of ``spec`` (parameters float32, compute ``dtype``).

  Args:
    spec: from `read_spec`, or one of `ARCHITECTURES`.
    end_id: the tokenizer's end token (pooled when ``spec.text_pool`` is
      ``'end'``).
    dtype: compute dtype of both towers.

  Returns:
    A `CLIP` whose ``params`` `load_params` fills.
  """
  image_tower = transformer.VisionTransformer(
      patch_size=spec.patch_size, width=spec.vision_width,
      depth=spec.vision_depth, heads=spec.vision_heads,
      mlp_dim=spec.vision_mlp, activation=spec.vision_activation,
      layer_norm_eps=spec.layer_norm_eps[0], image_size=spec.image_size,
      dtype=dtype)
  text_tower = transformer.TextTransformer(
      vocab_size=spec.vocab_size, context_length=spec.context_length,
      end_id=end_id, width=spec.text_width, depth=spec.text_depth,
      heads=spec.text_heads, mlp_dim=spec.text_mlp,
      activation=spec.text_activation, layer_norm_eps=spec.layer_norm_eps[1],
      pool=spec.text_pool, dtype=dtype)
  return clip_lib.CLIP(image_tower=image_tower, text_tower=text_tower,
                       embed_dim=spec.embed_dim)


class _Tensors:
  """The tensors of a safetensors file, each taken once, shape-checked."""

  def __init__(self, path: str):
    if not os.path.exists(path):
      folder = os.path.dirname(path)
      other = [f for f in ('pytorch_model.bin', 'open_clip_pytorch_model.bin')
               if os.path.exists(os.path.join(folder, f))]
      hint = (f' ({other[0]} is there: hnjax reads only safetensors, which '
              'the Hugging Face hub has for every CLIP checkpoint)'
              if other else '')
      raise FileNotFoundError(f'{path}: not found{hint}')
    try:
      from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('pretrained CLIP checkpoints need the safetensors '
                        'package: pip install safetensors') from e
    self.path = path
    self._left = st_numpy.load_file(path)

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self._left:
      raise ValueError(f'{self.path}: no tensor {name!r} (not a Hugging Face '
                       'CLIPModel checkpoint, or its config.json does not '
                       'match it)')
    x = self._left.pop(name)
    if tuple(x.shape) != tuple(shape):
      raise ValueError(f'{self.path}: {name} has shape {tuple(x.shape)}, '
                       f'config.json implies {tuple(shape)}')
    return np.asarray(x, np.float32)

  def check_all_used(self) -> None:
    # Old checkpoints store position_ids buffers: not parameters.
    left = sorted(k for k in self._left if not k.endswith('position_ids'))
    if left:
      raise ValueError(f'{self.path}: tensor {left[0]!r} has no place in the '
                       f'architecture of config.json ({len(left)} unused)')


def _layer_norm(t: _Tensors, name: str, width: int) -> dict[str, np.ndarray]:
  return {'scale': t.take(f'{name}.weight', (width,)),
          'bias': t.take(f'{name}.bias', (width,))}


def _blocks(t: _Tensors, prefix: str, depth: int, width: int, heads: int,
            mlp: int) -> dict[str, Any]:
  """``block_i`` of hnjax's towers from ``<prefix>.encoder.layers.i``."""
  head = width // heads
  out = {}
  for i in range(depth):
    p = f'{prefix}.encoder.layers.{i}'
    attn = {}
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'),
                         ('value', 'v_proj')):
      w = t.take(f'{p}.self_attn.{theirs}.weight', (width, width))
      attn[ours] = {'kernel': w.T.reshape(width, heads, head),
                    'bias': t.take(f'{p}.self_attn.{theirs}.bias',
                                   (width,)).reshape(heads, head)}
    w = t.take(f'{p}.self_attn.out_proj.weight', (width, width))
    attn['out'] = {'kernel': w.T.reshape(heads, head, width),
                   'bias': t.take(f'{p}.self_attn.out_proj.bias', (width,))}
    out[f'block_{i}'] = {
        'ln_1': _layer_norm(t, f'{p}.layer_norm1', width),
        'attn': attn,
        'ln_2': _layer_norm(t, f'{p}.layer_norm2', width),
        'c_fc': {'kernel': t.take(f'{p}.mlp.fc1.weight', (mlp, width)).T,
                 'bias': t.take(f'{p}.mlp.fc1.bias', (mlp,))},
        'c_proj': {'kernel': t.take(f'{p}.mlp.fc2.weight', (width, mlp)).T,
                   'bias': t.take(f'{p}.mlp.fc2.bias', (width,))},
    }
  return out


def load_params(path: str, spec: ClipSpec) -> dict[str, Any]:
  """The `create_model` parameters stored in ``<path>/model.safetensors``.

  Returns:
    A float32 NumPy pytree: ``image_tower``, ``text_tower``,
    ``image_projection``, ``text_projection``, ``logit_scale`` and
    ``logit_bias`` (SigLIP's, not in CLIP checkpoints: its initial -10).

  Raises:
    FileNotFoundError: no ``model.safetensors``.
    ValueError: a tensor missing, misshapen or unused, naming the file and
      the tensor.
  """
  t = _Tensors(os.path.join(path, WEIGHTS))
  vw, tw, p = spec.vision_width, spec.text_width, spec.patch_size
  grid = (spec.image_size // p) ** 2
  image = {
      # [out, in, kh, kw] -> HWIO
      'conv1': {'kernel': t.take(
          'vision_model.embeddings.patch_embedding.weight',
          (vw, 3, p, p)).transpose(2, 3, 1, 0)},
      'class_embedding': t.take('vision_model.embeddings.class_embedding',
                                (vw,)),
      'positional_embedding': t.take(
          'vision_model.embeddings.position_embedding.weight', (grid + 1, vw)),
      'ln_pre': _layer_norm(t, 'vision_model.pre_layrnorm', vw),
      'ln_post': _layer_norm(t, 'vision_model.post_layernorm', vw),
      **_blocks(t, 'vision_model', spec.vision_depth, vw, spec.vision_heads,
                spec.vision_mlp),
  }
  text = {
      'token_embedding': {'embedding': t.take(
          'text_model.embeddings.token_embedding.weight',
          (spec.vocab_size, tw))},
      'positional_embedding': t.take(
          'text_model.embeddings.position_embedding.weight',
          (spec.context_length, tw)),
      'ln_final': _layer_norm(t, 'text_model.final_layer_norm', tw),
      **_blocks(t, 'text_model', spec.text_depth, tw, spec.text_heads,
                spec.text_mlp),
  }
  params = {
      'image_tower': image,
      'text_tower': text,
      'image_projection': {'kernel': t.take('visual_projection.weight',
                                            (spec.embed_dim, vw)).T},
      'text_projection': {'kernel': t.take('text_projection.weight',
                                           (spec.embed_dim, tw)).T},
      'logit_scale': t.take('logit_scale', ()),
      'logit_bias': np.asarray(-10.0, np.float32),
  }
  t.check_all_used()
  return params


def from_pretrained(path: str, *, dtype: Any = jnp.float32
                    ) -> tuple[clip_lib.CLIP, dict[str, Any],
                               clip_tokenizer.ClipTokenizer]:
  """A pretrained CLIP and its tokenizer from a checkpoint folder.

  ::

    model, params, tokenizer = from_pretrained('/ckpt/clip-vit-base-patch32')
    v = model.apply({'params': params}, images, method=model.encode_image)
    t = model.apply({'params': params}, tokenizer(captions),
                    method=model.encode_text)

  Args:
    path: a folder in the Hugging Face layout (module docstring).
    dtype: compute dtype of the towers (parameters stay float32).

  Returns:
    ``(model, params, tokenizer)``: ``encode_image`` takes ``[N, S, S, 3]``
    images already resized to ``S = spec.image_size`` and normalised with
    the checkpoint's mean and std (`read_spec`), ``encode_text`` the
    tokenizer's ``int32 [N, context_length]`` ids; both return projected,
    not yet normalised, float32 ``[N, embed_dim]`` embeddings.

  Raises:
    FileNotFoundError: a missing file, named.
    ValueError: a wrong architecture or a shape mismatch, naming the file
      and the field or tensor.
  """
  spec = read_spec(path)
  tokenizer = clip_tokenizer.ClipTokenizer.from_folder(
      path, context_length=spec.context_length)
  if tokenizer.vocab_size > spec.vocab_size:
    raise ValueError(f'{path}: the tokenizer has {tokenizer.vocab_size} ids, '
                     f'config.json vocab_size={spec.vocab_size}')
  model = create_model(spec, end_id=tokenizer.end_id, dtype=dtype)
  params = load_params(path, spec)
  if not math.isfinite(float(params['logit_scale'])):
    raise ValueError(f'{os.path.join(path, WEIGHTS)}: logit_scale is not '
                     'finite')
  return model, params, tokenizer
