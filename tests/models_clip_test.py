"""The CLIP towers: causal text tower with end-token pooling, ViT, CLIP."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from hnjax import models
from hnjax.models import clip as clip_lib
from hnjax.models import transformer

_END = 2


def _tokens(rows, length=8):
  """Token rows ``[1, w..., 2, 0...]`` from word-id lists."""
  out = np.zeros((len(rows), length), np.int32)
  for i, words in enumerate(rows):
    row = [1, *words, _END]
    out[i, :len(row)] = row
  return jnp.asarray(out)


class TextTowerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tower = transformer.TextTransformer(
        vocab_size=20, context_length=8, end_id=_END, width=16, depth=2,
        heads=2)
    self.params = self.tower.init(jax.random.key(0), _tokens([[5]]))

  def test_padding_after_the_end_token_changes_nothing(self):
    # The causal mask: the end token reads only what comes before it.
    a = _tokens([[5, 6, 7]])
    b = a.at[0, 6:].set(jnp.array([9, 11]))  # junk after <end>
    fa = self.tower.apply(self.params, a)
    fb = self.tower.apply(self.params, b)
    np.testing.assert_allclose(fa, fb, atol=1e-6)

  def test_every_word_before_the_end_matters(self):
    a = _tokens([[5, 6, 7]])
    for pos in (1, 2, 3):
      b = a.at[0, pos].set(12)
      diff = np.abs(self.tower.apply(self.params, a) -
                    self.tower.apply(self.params, b)).max()
      self.assertGreater(diff, 1e-4, pos)

  def test_pools_the_end_token_of_each_row(self):
    toks = _tokens([[5], [5, 6, 7, 8]])
    got = self.tower.apply(self.params, toks)
    # The same rows alone: pooling follows each row's own end position.
    for i in range(2):
      np.testing.assert_allclose(
          got[i], self.tower.apply(self.params, toks[i:i + 1])[0],
          atol=1e-5)
    np.testing.assert_array_equal(transformer.end_positions(toks, _END),
                                  [2, 5])

  def test_jit_equals_eager_and_shape_errors(self):
    toks = _tokens([[5, 6], [7]])
    np.testing.assert_allclose(
        jax.jit(self.tower.apply)(self.params, toks),
        self.tower.apply(self.params, toks), atol=1e-5)
    with self.assertRaisesRegex(ValueError, r'tokens must be \[B, 8\]'):
      self.tower.apply(self.params, toks[:, :6])


class VisionTransformerTest(absltest.TestCase):

  def test_registry_backbone_for_every_family(self):
    self.assertIn('vit_tiny', models.backbone_names())
    enc = models.create_encoder('vit_tiny', head='mlp', dim=8)
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    variables = enc.init(jax.random.key(1), x, train=False)
    out = enc.apply(variables, x, train=True)
    self.assertEqual(out['features'].shape, (3, 64))
    self.assertEqual(out['projection'].shape, (3, 8))
    # Each image is encoded on its own (no batch statistics).
    alone = enc.apply(variables, x[:1], train=True)
    np.testing.assert_allclose(alone['features'][0], out['features'][0],
                               atol=1e-5)

  def test_patch_size_must_divide_the_image(self):
    vit = transformer.VisionTransformer(patch_size=5)
    with self.assertRaisesRegex(ValueError, 'multiple of the patch size 5'):
      vit.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


class ClipTest(parameterized.TestCase):

  @parameterized.parameters('convnet', 'vit_tiny')
  def test_methods_equal_the_joint_call(self, tower):
    model = clip_lib.create_clip(image_tower=tower, vocab_size=20,
                                 context_length=8, end_id=_END, embed_dim=12,
                                 text_width=16, text_heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    toks = _tokens([[5, 6], [7]])
    variables = model.init(jax.random.key(1), x, toks, train=False)
    out = model.apply(variables, x, toks, train=False)
    self.assertEqual(out['image'].shape, (2, 12))
    self.assertEqual(out['text'].shape, (2, 12))
    np.testing.assert_allclose(
        model.apply(variables, x, method=model.encode_image), out['image'],
        atol=1e-5)
    np.testing.assert_allclose(
        model.apply(variables, toks, method=model.encode_text), out['text'],
        atol=1e-5)
    np.testing.assert_allclose(out['logit_scale'], 1 / 0.07, rtol=1e-5)
    self.assertEqual(float(out['logit_bias']), -10.0)
    self.assertEqual('batch_stats' in variables, tower == 'convnet')

  def test_logit_scale_is_clamped_at_100(self):
    model = clip_lib.create_clip(image_tower='vit_tiny', vocab_size=20,
                                 context_length=8, end_id=_END)
    x, toks = jnp.zeros((1, 32, 32, 3)), _tokens([[5]])
    variables = model.init(jax.random.key(0), x, toks, train=False)
    params = dict(variables['params'], logit_scale=jnp.log(1000.0))
    out = model.apply({'params': params}, x, toks, train=False)
    self.assertEqual(float(out['logit_scale']), 100.0)


if __name__ == '__main__':
  absltest.main()
