"""Caption tokenisation and shapes32's hard-negative captions."""

from absl.testing import absltest
import numpy as np

from hnjax.data import captions
from hnjax.data import shapes
from hnjax.data import text
from hnjax.eval import retrieval


class WordTokenizerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tok = text.WordTokenizer.from_captions(
        ['a red circle', 'A blue square, rotated 10 degrees.'],
        context_length=6)

  def test_vocabulary_is_sorted_after_the_special_tokens(self):
    self.assertEqual(self.tok.vocabulary, text.SPECIAL + (
        '10', 'a', 'blue', 'circle', 'degrees', 'red', 'rotated', 'square'))

  def test_ids_padding_and_unknown_words(self):
    ids = self.tok(['a red circle', 'a green circle'])
    # <start>=1, a=5, red=9, circle=7, <end>=2, <pad>=0; green is <unk>=3.
    np.testing.assert_array_equal(ids, [[1, 5, 9, 7, 2, 0],
                                        [1, 5, 3, 7, 2, 0]])
    self.assertEqual(ids.dtype, np.int32)
    self.assertEqual(self.tok.decode(ids[0]), 'a red circle')

  def test_truncation_keeps_the_end_token(self):
    ids = self.tok(['a blue square rotated 10 degrees'])
    np.testing.assert_array_equal(ids, [[1, 5, 6, 11, 10, 2]])  # 4 words

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "caption 1 has no words: '...'"):
      self.tok(['a red circle', '...'])
    with self.assertRaisesRegex(ValueError, 'context_length must be >= 2'):
      text.WordTokenizer.from_captions(['a'], context_length=1)
    with self.assertRaisesRegex(ValueError, 'sequence of strings'):
      self.tok('a red circle')


class HardNegativesTest(absltest.TestCase):

  def test_exactly_one_attribute_changes(self):
    data = shapes.generate(200, seed=3)
    negs = captions.hard_negatives(data, seed=0)
    self.assertEqual(tuple(negs), captions.SWAP_TYPES)
    changed_word_sets = {'shape': set(shapes.SHAPES),
                         'colour': set(shapes.COLOURS),
                         'size': {'small', 'medium', 'large'},
                         'position': {'top', 'bottom', 'left', 'right',
                                      'center'}}
    for kind, (caps, eligible) in negs.items():
      self.assertLen(caps, 200)
      for truth, neg, ok in zip(data['caption'], caps, eligible):
        if not ok:
          self.assertEqual(neg, truth)
          continue
        a, b = truth.split(), neg.split()
        self.assertNotEqual(a, b)
        self.assertTrue(set(a) ^ set(b) <= changed_word_sets[kind],
                        (kind, truth, neg))
        # The same template: the words outside the attribute line up.
        if kind != 'position':
          self.assertLen(b, len(a))
          self.assertEqual(sum(x != y for x, y in zip(a, b)), 1)
    # Every example has colour, size and position negatives; circles and
    # large angles have no shape negative.
    for kind in ('colour', 'size', 'position'):
      self.assertTrue(negs[kind][1].all(), kind)
    shape_ok = negs['shape'][1]
    self.assertFalse(shape_ok[data['shape'] == 0].any())  # circles
    self.assertGreater(shape_ok.mean(), 0.5)
    again = captions.hard_negatives(data, seed=0)
    self.assertEqual(again['colour'][0], negs['colour'][0])

  def test_caption_accuracy(self):
    v = np.array([[1., 0.], [0., 1.], [0.6, 0.8]])
    t = np.array([[1., 0.], [0., 1.], [0., 1.]])
    n = np.array([[0., 1.], [1., 0.], [0.6, 0.8]])
    # Image 2 scores its negative (1.0) above its caption (0.8).
    self.assertAlmostEqual(retrieval.caption_accuracy(v, t, n), 200 / 3)
    self.assertEqual(
        retrieval.caption_accuracy(v, t, n, np.array([1, 1, 0], bool)),
        100.0)
    self.assertTrue(np.isnan(retrieval.caption_accuracy(
        v, t, n, np.zeros(3, bool))))
    self.assertEqual(retrieval.caption_accuracy(v, t, t), 0.0)  # ties wrong


if __name__ == '__main__':
  absltest.main()
