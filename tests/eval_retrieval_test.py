"""Retrieval recall against a dense NumPy reference written here."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from hnjax.eval import retrieval
from tests import testing


def _reference(img, txt, t2i, ks):
  """Dense similarity, stable descending sort (ties: lower index first)."""
  s = img.astype(np.float64) @ txt.astype(np.float64).T  # [N_img, N_txt]
  order_i2t = np.argsort(-s, axis=1, kind='stable')
  order_t2i = np.argsort(-s.T, axis=1, kind='stable')
  out = {}
  for k in ks:
    hit = [np.isin(np.flatnonzero(t2i == i), order_i2t[i, :k]).any()
           for i in range(len(img))]
    out[f'i2t_r{k}'] = 100.0 * np.mean(hit)
  for k in ks:
    hit = [t2i[j] in order_t2i[j, :k] for j in range(len(txt))]
    out[f't2i_r{k}'] = 100.0 * np.mean(hit)
  out['r1sum'] = out['i2t_r1'] + out['t2i_r1']
  return out


class RetrievalTest(parameterized.TestCase):

  def test_hand_computed(self):
    # Image 0 has captions 0 and 3; caption 3 is its best match, caption 0
    # is nobody's. Image 1's only caption (1) is closer to image 2.
    img = np.array([[1., 0.], [0., 1.], [0.6, 0.8]])
    txt = np.array([[-1., 0.], [0.6, 0.8], [0., 1.], [1., 0.]])
    t2i = np.array([0, 1, 2, 0])
    m = retrieval.retrieval_metrics(img, txt, t2i, ks=(1, 2))
    # I2T@1: image 0 -> caption 3 (hit), image 1 -> caption 2 (miss),
    # image 2 -> caption 1 (miss); @2: image 1 -> {2, 1} hit, image 2 ->
    # {1, 2} hit.
    self.assertAlmostEqual(m['i2t_r1'], 100 / 3)
    self.assertAlmostEqual(m['i2t_r2'], 100.0)
    # T2I@1: caption 0 -> image 1 (0 beats -0.6 and -1; miss),
    # caption 1 -> image 2 (miss), caption 2 -> image 1 (miss), caption 3
    # -> image 0 (hit).
    self.assertAlmostEqual(m['t2i_r1'], 25.0)
    self.assertAlmostEqual(m['r1sum'], 100 / 3 + 25.0)

  @parameterized.parameters((40, 1, None), (37, 5, 8), (23, 3, 1), (16, 1, 7))
  def test_equals_dense_reference(self, n_img, per_image, block_size):
    rng = np.random.default_rng(n_img)
    img = testing.unit(rng, n_img, 6)
    t2i = rng.permutation(np.repeat(np.arange(n_img), per_image))
    # Captions near their image, with noise, so recall is neither 0 nor 100.
    txt = img[t2i] + 0.6 * rng.normal(size=(len(t2i), 6)).astype(np.float32)
    ks = (1, 5, 10)
    got = retrieval.retrieval_metrics(img, txt, t2i, ks=ks,
                                      block_size=block_size)
    want = _reference(img, txt, t2i, ks)
    self.assertEqual(sorted(got), sorted(want))
    for key, value in want.items():
      self.assertAlmostEqual(got[key], value, msg=key)
    self.assertGreater(got['t2i_r1'], 0)
    self.assertLess(got['t2i_r1'], 100)

  def test_ties_go_to_the_lower_index(self):
    img = np.array([[1., 0.], [1., 0.]])  # two identical images
    txt = np.array([[1., 0.], [1., 0.]])
    m = retrieval.retrieval_metrics(img, txt, np.array([0, 1]), ks=(1, 2))
    # Both captions rank image 0 first; both images rank caption 0 first.
    self.assertEqual((m['t2i_r1'], m['i2t_r1']), (50.0, 50.0))
    self.assertEqual((m['t2i_r2'], m['i2t_r2']), (100.0, 100.0))

  def test_non_finite_gives_nan(self):
    img = np.eye(3, dtype=np.float32)
    txt = img.copy()
    txt[1, 0] = np.nan  # would rank first everywhere (comparisons fail)
    m = retrieval.retrieval_metrics(img, txt, np.arange(3), ks=(1,))
    self.assertTrue(all(np.isnan(v) for v in m.values()), m)

  def test_bad_input(self):
    img, txt = np.eye(3), np.eye(3)
    for args, kwargs, message in [
        ((img, txt[:, :2], np.arange(3)), {}, 'same D'),
        ((img, txt, np.arange(2)), {}, r'text_to_image must be \[N_txt\]'),
        ((img, txt, np.array([0, 1, 3])), {}, r'must be in \[0, 3\)'),
        ((img, txt, np.array([0, 1, 1])), {}, '1 images have no caption '
         r'\(first: image 2\)'),
        ((img, txt, np.arange(3)), {'ks': (4,)}, r'k=4 must be in \[1, 3\]'),
        ((img, txt, np.arange(3.)), {}, 'ints'),
    ]:
      with self.assertRaisesRegex(ValueError, message):
        retrieval.retrieval_metrics(*args, **kwargs)


if __name__ == '__main__':
  absltest.main()
