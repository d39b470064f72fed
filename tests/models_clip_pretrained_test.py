"""Pretrained CLIP towers equal the reference implementation's.

The fixture (tests/fixtures/tiny_clip/, written by make_tiny_clip.py with
PyTorch and Hugging Face transformers, neither of which hnjax imports) is
a random CLIPModel and its tokenizer in the Hugging Face layout, with the
reference's embeddings of fixed inputs and its token ids of awkward
strings.
"""

import json
import os
import pickle
import shutil
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st_numpy

from hnjax.models import clip
from hnjax.models import clip_pretrained
from hnjax.models import clip_tokenizer
from hnjax.models import transformer

_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         'fixtures')
_CKPT = os.path.join(_FIXTURES, 'tiny_clip')


def _reference():
  with np.load(os.path.join(_FIXTURES, 'tiny_clip_reference.npz')) as z:
    return dict(z)


def _tokens():
  with open(os.path.join(_FIXTURES, 'tiny_clip_tokens.json'),
            encoding='utf-8') as f:
    return json.load(f)


class FromPretrainedTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.params, cls.tokenizer = clip.from_pretrained(_CKPT)
    cls.ref = _reference()

  def test_embeddings_equal_the_reference(self):
    m, p, ref = self.model, self.params, self.ref
    v = m.apply({'params': p}, ref['images'], method=m.encode_image)
    t = m.apply({'params': p}, ref['input_ids'], method=m.encode_text)
    self.assertEqual(v.dtype, jnp.float32)
    self.assertEqual(v.shape, (4, 24))
    np.testing.assert_allclose(v, ref['image_embeds'], atol=1e-4, rtol=0)
    np.testing.assert_allclose(t, ref['text_embeds'], atol=1e-4, rtol=0)
    self.assertAlmostEqual(float(p['logit_scale']),
                           float(ref['logit_scale']), places=6)

  def test_jit_equals_eager(self):
    m, p, ref = self.model, self.params, self.ref
    encode = jax.jit(lambda p, x: m.apply({'params': p}, x,
                                          method=m.encode_image))
    np.testing.assert_allclose(
        encode(p, ref['images']),
        m.apply({'params': p}, ref['images'], method=m.encode_image),
        atol=1e-5)

  def test_bfloat16_compute_float32_outputs(self):
    m, p, tok = clip.from_pretrained(_CKPT, dtype=jnp.bfloat16)
    del tok
    ref = self.ref
    v = m.apply({'params': p}, ref['images'], method=m.encode_image)
    t = m.apply({'params': p}, ref['input_ids'], method=m.encode_text)
    self.assertEqual(v.dtype, jnp.float32)
    self.assertEqual(p['image_tower']['conv1']['kernel'].dtype, np.float32)
    # bf16 keeps 8 bits of mantissa: close, not equal.
    for got, want in ((v, ref['image_embeds']), (t, ref['text_embeds'])):
      err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
      self.assertLess(err, 0.05)
      self.assertGreater(err, 0)  # it really computed in bf16

  def test_wrong_image_size_is_one_clear_error(self):
    m, p = self.model, self.params
    with self.assertRaisesRegex(ValueError, 'images must be 32x32'):
      m.apply({'params': p}, np.zeros((1, 64, 64, 3), np.float32),
              method=m.encode_image)


class TokenizerTest(absltest.TestCase):

  def test_ids_equal_the_reference_from_tokenizer_json(self):
    ref = _tokens()
    tok = clip_tokenizer.ClipTokenizer.from_folder(_CKPT, context_length=16)
    ids = tok(ref['strings'])
    self.assertEqual(ids.dtype, np.int32)
    np.testing.assert_array_equal(ids, ref['input_ids'])

  def test_ids_equal_the_reference_from_vocab_and_merges(self):
    ref = _tokens()
    with tempfile.TemporaryDirectory() as d:
      for f in ('vocab.json', 'merges.txt', 'tokenizer_config.json'):
        shutil.copy(os.path.join(_CKPT, f), d)
      tok = clip_tokenizer.ClipTokenizer.from_folder(d)  # max length: 16
      np.testing.assert_array_equal(tok(ref['strings']), ref['input_ids'])

  def test_layout_start_end_pad_and_truncation(self):
    tok = clip_tokenizer.ClipTokenizer.from_folder(_CKPT, context_length=8)
    short, long = tok(['a dog', 'a red circle on a blue background ' * 3])
    self.assertEqual(short[0], tok.start_id)
    end = list(short).index(tok.end_id)
    self.assertTrue(np.all(short[end:] == tok.pad_id))
    self.assertEqual((long[0], long[-1]), (tok.start_id, tok.end_id))
    self.assertEqual(tok.decode(short), 'a dog')

  def test_pickles(self):
    tok = clip_tokenizer.ClipTokenizer.from_folder(_CKPT, context_length=16)
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(again(['café ½']), tok(['café ½']))

  def test_bad_input(self):
    tok = clip_tokenizer.ClipTokenizer.from_folder(_CKPT, context_length=16)
    with self.assertRaisesRegex(ValueError, 'one str'):
      tok('a dog')
    with self.assertRaisesRegex(ValueError, 'caption 1 is not a str'):
      tok(['a', 3])
    self.assertEqual(tok([]).shape, (0, 16))


class ErrorsTest(absltest.TestCase):
  """A bad folder is one line naming the file and the field or tensor."""

  def setUp(self):
    super().setUp()
    self.dir = self.enter_context(tempfile.TemporaryDirectory())
    self.ckpt = os.path.join(self.dir, 'ckpt')
    shutil.copytree(_CKPT, self.ckpt)

  def _edit_config(self, edit):
    path = os.path.join(self.ckpt, 'config.json')
    with open(path) as f:
      config = json.load(f)
    edit(config)
    with open(path, 'w') as f:
      json.dump(config, f)

  def _edit_weights(self, edit):
    path = os.path.join(self.ckpt, 'model.safetensors')
    tensors = st_numpy.load_file(path)
    edit(tensors)
    st_numpy.save_file(tensors, path)

  def test_missing_files(self):
    os.remove(os.path.join(self.ckpt, 'model.safetensors'))
    with open(os.path.join(self.ckpt, 'pytorch_model.bin'), 'w'):
      pass
    with self.assertRaisesRegex(FileNotFoundError,
                                r'model\.safetensors: not found '
                                r'\(pytorch_model\.bin is there'):
      clip.from_pretrained(self.ckpt)
    with self.assertRaisesRegex(FileNotFoundError, r'config\.json: not found'):
      clip.from_pretrained(self.dir)
    for f in ('tokenizer.json', 'merges.txt'):
      os.remove(os.path.join(self.ckpt, f))
    with self.assertRaisesRegex(FileNotFoundError, 'no tokenizer'):
      clip.from_pretrained(self.ckpt)

  def test_wrong_architecture(self):
    self._edit_config(lambda c: c.update(model_type='siglip'))
    with self.assertRaisesRegex(ValueError,
                                r"config\.json: model_type='siglip'"):
      clip.from_pretrained(self.ckpt)

  def test_unknown_activation(self):
    self._edit_config(lambda c: c['text_config'].update(hidden_act='relu2'))
    with self.assertRaisesRegex(ValueError, "hidden_act='relu2'"):
      clip.from_pretrained(self.ckpt)

  def test_shape_mismatch_names_the_tensor(self):
    self._edit_config(
        lambda c: c['vision_config'].update(intermediate_size=128))
    with self.assertRaisesRegex(
        ValueError, r'model\.safetensors: vision_model\.encoder\.layers\.0'
        r'\.mlp\.fc1\.weight has shape \(64, 32\), config\.json implies '
        r'\(128, 32\)'):
      clip.from_pretrained(self.ckpt)

  def test_missing_and_unused_tensors(self):
    self._edit_weights(lambda t: t.pop('text_projection.weight'))
    with self.assertRaisesRegex(ValueError, "no tensor 'text_projection"):
      clip.from_pretrained(self.ckpt)
    shutil.copy(os.path.join(_CKPT, 'model.safetensors'), self.ckpt)
    self._edit_config(lambda c: c['text_config'].update(num_hidden_layers=1))
    with self.assertRaisesRegex(ValueError,
                                "tensor 'text_model.encoder.layers.1"):
      clip.from_pretrained(self.ckpt)

  def test_non_finite_logit_scale(self):
    self._edit_weights(lambda t: t.update(
        logit_scale=np.array(np.nan, np.float32)))
    with self.assertRaisesRegex(ValueError, 'logit_scale is not finite'):
      clip.from_pretrained(self.ckpt)

  def test_half_precision_files_load_as_float32(self):
    self._edit_weights(lambda t: t.update(
        {k: v.astype(np.float16) for k, v in t.items()}))
    _, params, _ = clip.from_pretrained(self.ckpt)
    leaves = jax.tree_util.tree_leaves(params)
    self.assertTrue(all(x.dtype == np.float32 for x in leaves))


class PoolingTest(absltest.TestCase):

  def test_argmax_is_the_end_token_when_it_has_the_largest_id(self):
    def pooled(pool, tokens):
      tower = transformer.TextTransformer(
          vocab_size=10, context_length=5, end_id=8, width=8, depth=1,
          heads=2, pool=pool)
      variables = tower.init(jax.random.key(0), tokens)
      return tower.apply(variables, tokens)
    plain = np.array([[7, 3, 8, 8, 8]])  # end token 8 is the largest id
    np.testing.assert_allclose(pooled('end', plain), pooled('argmax', plain))
    # An id above the end token (an added token): OpenAI's rule pools there.
    added = np.array([[7, 9, 8, 8, 8]])
    self.assertFalse(np.allclose(pooled('end', added),
                                 pooled('argmax', added)))
    with self.assertRaisesRegex(ValueError, "pool='first'"):
      pooled('first', plain)


class SpecTest(absltest.TestCase):

  def test_reads_the_architecture(self):
    spec = clip_pretrained.read_spec(_CKPT)
    self.assertEqual((spec.image_size, spec.patch_size, spec.vision_width,
                      spec.vision_depth, spec.vision_mlp), (32, 8, 32, 2, 64))
    self.assertEqual((spec.context_length, spec.vocab_size, spec.embed_dim),
                     (16, 714, 24))
    self.assertEqual(spec.text_pool, 'argmax')  # eos_token_id: 2
    self.assertEqual(spec.mean, clip_pretrained.CLIP_MEAN)


  def test_named_sizes_match_the_reference_parameter_counts(self):
    # transformers' CLIPModel: 151,277,313 (ViT-B/32) and 149,620,737
    # (ViT-B/16) parameters; hnjax adds SigLIP's bias.
    for name, count in (('vit_b32', 151_277_313), ('vit_b16', 149_620_737)):
      spec = clip_pretrained.ARCHITECTURES[name]
      model = clip_pretrained.create_model(spec, end_id=49407)
      shapes = jax.eval_shape(
          model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
          jnp.zeros((1, 77), jnp.int32), train=False)
      total = sum(x.size for x in jax.tree.leaves(shapes['params']))
      self.assertEqual(total, count + 1, name)
    self.assertEqual(clip_pretrained.ARCHITECTURES['tiny'],
                     clip_pretrained.read_spec(_CKPT))


if __name__ == '__main__':
  absltest.main()
