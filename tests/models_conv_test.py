"""The fast-kernel-gradient convolution equals XLA's, values and gradients."""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from hnjax.models import conv


class ConvTest(parameterized.TestCase):

  @parameterized.parameters(
      ((3, 3), (1, 1), ((1, 1), (1, 1))),
      ((3, 3), (2, 2), ((1, 1), (1, 1))),
      ((1, 1), (2, 2), ((0, 0), (0, 0))),
      ((7, 7), (2, 2), ((3, 3), (3, 3))),
      ((3, 3), (2, 2), 'SAME'),
      ((3, 3), (1, 1), 'VALID'),
  )
  def test_equals_xla(self, kernel, strides, padding):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 10, 3)).astype(np.float32)
    w = rng.normal(size=kernel + (3, 5)).astype(np.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))

    def f(fn):
      return lambda x, w: fn(x, w, strides, padding, dimension_numbers=dn)

    ref = f(lax.conv_general_dilated)
    fast = f(conv.conv_general_dilated)
    np.testing.assert_allclose(fast(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    cot = rng.normal(size=ref(x, w).shape).astype(np.float32)
    g_ref = jax.grad(lambda x, w: jnp.sum(cot * ref(x, w)), (0, 1))(x, w)
    g_fast = jax.jit(jax.grad(lambda x, w: jnp.sum(cot * fast(x, w)),
                              (0, 1)))(x, w)
    for a, b in zip(g_fast, g_ref):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

  def test_flax_conv_and_fallback(self):
    x = jnp.ones((2, 8, 8, 3))
    layer = nn.Conv(4, (3, 3), (2, 2), conv_general_dilated=(
        conv.conv_general_dilated))
    ref = nn.Conv(4, (3, 3), (2, 2))
    v = ref.init(jax.random.key(0), x)
    np.testing.assert_allclose(layer.apply(v, x), ref.apply(v, x), atol=1e-5)
    # Dilated kernels are XLA's own path.
    dil = nn.Conv(4, (3, 3), kernel_dilation=(2, 2), conv_general_dilated=(
        conv.conv_general_dilated))
    ref = nn.Conv(4, (3, 3), kernel_dilation=(2, 2))
    v = ref.init(jax.random.key(0), x)
    np.testing.assert_allclose(dil.apply(v, x), ref.apply(v, x), atol=1e-5)

  def test_cpu_workaround_only_on_cpu(self):
    # On TPU and GPU XLA's own convolution gradient is fast: never replace it.
    x = jnp.ones((2, 8, 8, 3))
    w = jnp.ones((3, 3, 3, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
    calls = []

    def fake_conv(*args):
      calls.append(args)
      return jnp.zeros((2, 8, 8, 4))

    with mock.patch.object(conv, '_conv', fake_conv):
      for backend in ('tpu', 'gpu', 'cpu'):
        with mock.patch.object(jax, 'default_backend', return_value=backend):
          conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                    dimension_numbers=dn)
        self.assertLen(calls, int(backend == 'cpu'), backend)


if __name__ == '__main__':
  absltest.main()
