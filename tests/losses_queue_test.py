"""Tests for hnjax.losses.info_nce and hnjax.losses.hard_contrastive."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from hnjax import losses
from hnjax import samplers
from tests import testing


def np_info_nce(q, k, negs, t, mask=None, extra=None):
  """Plain float64 InfoNCE, one query at a time."""
  q, k, negs = (np.asarray(x, np.float64) for x in (q, k, negs))
  out = []
  for b in range(q.shape[0]):
    logits = [q[b] @ k[b] / t]
    for j in range(negs.shape[0]):
      if mask is None or mask[b, j]:
        logits.append(q[b] @ negs[j] / t)
    if extra is not None:
      for h in np.asarray(extra, np.float64)[b]:
        logits.append(q[b] @ h / t)
    logits = np.array(logits)
    mx = logits.max()
    out.append(mx + np.log(np.sum(np.exp(logits - mx))) - logits[0])
  return np.array(out)


def np_hcl(q, k, negs, t, beta, tau_plus, mask=None, fixed_imp_q=None):
  """joshr17/HCL's formula, literally, in float64.

  With fixed_imp_q the importance weights are computed from those queries
  instead (to check the stop-gradient option by finite differences).
  """
  q, k, negs = (np.asarray(x, np.float64) for x in (q, k, negs))
  out = []
  for b in range(q.shape[0]):
    keep = np.ones(negs.shape[0], bool) if mask is None else mask[b]
    n = int(keep.sum())
    if n == 0:
      out.append(0.0)
      continue
    pos = np.exp(q[b] @ k[b] / t)
    neg = np.exp(negs[keep] @ q[b] / t)
    qi = q[b] if fixed_imp_q is None else fixed_imp_q[b]
    imp = np.exp(beta * (negs[keep] @ qi) / t)
    r = np.sum(imp * neg) / np.mean(imp)
    ng = (-tau_plus * n * pos + r) / (1 - tau_plus)
    ng = max(ng, n * math.e ** (-1 / t))
    out.append(-np.log(pos / (pos + ng)))
  return np.array(out)


class InfoNCETest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.q = testing.unit(rng, 4, 8)
    self.k = testing.unit(rng, 4, 8)
    self.negs = testing.unit(rng, 6, 8)
    self.extra = testing.unit(rng, 4, 3, 8)
    self.mask = rng.random((4, 6)) > 0.3

  def test_hand_computed(self):
    q = jnp.array([[1., 0.]])
    out = losses.info_nce(q, q, jnp.array([[0., 1.], [-1., 0.]]),
                          temperature=1.0)
    np.testing.assert_allclose(
        out, [math.log(1 + math.exp(-1) + math.exp(-2))], rtol=1e-6)

  @parameterized.parameters(0.07, 0.2, 1.0)
  def test_matches_numpy(self, t):
    out = losses.info_nce(self.q, self.k, self.negs, temperature=t,
                          negative_mask=self.mask,
                          extra_negatives=self.extra)
    ref = np_info_nce(self.q, self.k, self.negs, t, self.mask, self.extra)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    self.assertEqual(out.shape, (4,))
    self.assertEqual(out.dtype, jnp.float32)

  def test_jit_equals_eager(self):
    f = lambda q: losses.info_nce(q, self.k, self.negs, temperature=0.2,
                                  negative_mask=self.mask,
                                  extra_negatives=self.extra)
    np.testing.assert_allclose(jax.jit(f)(self.q), f(self.q), rtol=1e-5)

  def test_gradients_match_finite_differences(self):
    t = 0.5

    def f(q, k, negs, extra):
      return jnp.sum(losses.info_nce(q, k, negs, temperature=t,
                                     negative_mask=self.mask,
                                     extra_negatives=extra))

    grads = jax.grad(f, argnums=(0, 1, 2, 3))(self.q, self.k, self.negs,
                                              self.extra)
    args = [self.q, self.k, self.negs, self.extra]
    for i, g in enumerate(grads):
      def ref(x, i=i):
        a = list(args)
        a[i] = x
        return np.sum(np_info_nce(a[0], a[1], a[2], t, self.mask, a[3]))
      np.testing.assert_allclose(g, testing.numeric_grad(ref, args[i]),
                                 atol=2e-4, err_msg=f'argument {i}')

  def test_mask_equals_slicing(self):
    keep = np.array([True, False, True, True, False, True])
    mask = np.broadcast_to(keep, (4, 6))
    masked = losses.info_nce(self.q, self.k, self.negs, temperature=0.2,
                             negative_mask=mask)
    sliced = losses.info_nce(self.q, self.k, self.negs[keep], temperature=0.2)
    np.testing.assert_allclose(masked, sliced, rtol=1e-6)

  def test_fully_masked_row_is_zero_and_finite(self):
    mask = self.mask.copy()
    mask[1] = False
    f = lambda q: losses.info_nce(q, self.k, self.negs, temperature=0.1,
                                  negative_mask=mask)
    out = f(self.q)
    self.assertAlmostEqual(float(out[1]), 0.0, places=6)
    g = jax.grad(lambda q: jnp.sum(f(q)))(self.q)
    self.assertTrue(testing.all_finite(g))
    np.testing.assert_allclose(g[1], 0.0, atol=1e-7)

  @parameterized.parameters(1e-3, 10.0)
  def test_extreme_temperatures(self, t):
    f = lambda q: losses.info_nce(q, self.k, self.negs, temperature=t,
                                  extra_negatives=self.extra)
    out = f(self.q)
    np.testing.assert_allclose(
        out, np_info_nce(self.q, self.k, self.negs, t, None, self.extra),
        rtol=1e-4, atol=1e-4)
    self.assertTrue(testing.all_finite(jax.grad(lambda q: f(q).sum())(self.q)))

  def test_bfloat16_inputs_give_float32(self):
    cast = lambda x: jnp.asarray(x, jnp.bfloat16)
    out = losses.info_nce(cast(self.q), cast(self.k), cast(self.negs),
                          temperature=0.05)
    self.assertEqual(out.dtype, jnp.float32)
    ref = np_info_nce(*(np.asarray(cast(x), np.float64)
                        for x in (self.q, self.k, self.negs)), 0.05)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda q: losses.info_nce(
        q, cast(self.k), cast(self.negs), temperature=0.05).sum())(
            cast(self.q))
    self.assertEqual(g.dtype, jnp.bfloat16)
    self.assertTrue(testing.all_finite(g))

  def test_learnable_temperature_gets_gradient(self):
    f = lambda t: losses.info_nce(self.q, self.k, self.negs,
                                  temperature=t).sum()
    g = jax.jit(jax.grad(f))(0.3)
    ref = (np.sum(np_info_nce(self.q, self.k, self.negs, 0.3 + 1e-5)) -
           np.sum(np_info_nce(self.q, self.k, self.negs, 0.3 - 1e-5))) / 2e-5
    np.testing.assert_allclose(g, ref, rtol=1e-3)

  @parameterized.named_parameters(
      ('temperature_zero', dict(temperature=0.0), 'temperature must be > 0'),
      ('temperature_negative', dict(temperature=-1.0), 'got -1.0'),
      ('mask_shape', dict(temperature=1.0, negative_mask=np.ones((4, 5), bool)),
       r'negative_mask must have shape \[batch, bank\] = \(4, 6\)'),
      ('mask_dtype', dict(temperature=1.0, negative_mask=np.ones((4, 6))),
       'negative_mask must be boolean'),
      ('extra_shape', dict(temperature=1.0, extra_negatives=np.ones((4, 3, 7))),
       'extra_negatives must have shape'),
  )
  def test_bad_input(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      losses.info_nce(self.q, self.k, self.negs, **kwargs)

  def test_bad_shapes(self):
    with self.assertRaisesRegex(ValueError, 'query and positive must have'):
      losses.info_nce(self.q, self.k[:3], self.negs, temperature=1.0)
    with self.assertRaisesRegex(ValueError, 'same dim'):
      losses.info_nce(self.q, self.k, self.negs[:, :5], temperature=1.0)
    with self.assertRaisesRegex(ValueError, r'query must have shape \[n, dim\]'):
      losses.info_nce(self.q[0], self.k[0], self.negs, temperature=1.0)

  def test_errors_at_trace_time(self):
    f = jax.jit(lambda q: losses.info_nce(q, self.k, self.negs[:, :5],
                                          temperature=1.0))
    with self.assertRaisesRegex(ValueError, 'same dim'):
      f.lower(self.q)

  def test_sharded_axis_outside_shard_map(self):
    with self.assertRaisesRegex(ValueError, "axis_name='data' is not a mesh"):
      losses.info_nce(self.q, self.k, self.negs, temperature=1.0,
                      axis_name='data')


class MochiInfoNCETest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(2)
    self.q = testing.unit(rng, 5, 8)
    self.k = testing.unit(rng, 5, 8)
    self.negs = testing.unit(rng, 30, 8)
    self.mask = rng.random((5, 30)) > 0.2
    self.key = jax.random.key(7)

  @parameterized.parameters(0, 4)
  def test_equals_info_nce_with_mochi_negatives(self, block_size):
    kw = dict(num_hard=6, num_mix=5, num_query_mix=3)

    def fused(q):
      return losses.mochi_info_nce(self.key, q, self.k, self.negs,
                                   temperature=0.2, negative_mask=self.mask,
                                   block_size=block_size, **kw)[0]

    def composed(q):
      h = samplers.mochi(self.key, q, self.negs, negative_mask=self.mask, **kw)
      return losses.info_nce(q, self.k, self.negs, temperature=0.2,
                             negative_mask=self.mask, extra_negatives=h)

    np.testing.assert_allclose(fused(self.q), composed(self.q), rtol=1e-6)
    # Jitted gradients: op by op they took seconds.
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda q: fused(q).sum()))(self.q),
        jax.jit(jax.grad(lambda q: composed(q).sum()))(self.q), atol=1e-6)

  def test_plain_moco_and_aux(self):
    loss, aux = losses.mochi_info_nce(
        self.key, self.q, self.k, self.negs, temperature=0.2, num_hard=0,
        num_mix=0, num_query_mix=0)
    np.testing.assert_allclose(
        loss, np_info_nce(self.q, self.k, self.negs, 0.2), rtol=1e-5)
    sims = self.q.astype(np.float64) @ self.negs.T
    np.testing.assert_allclose(aux['hardest_similarity'], sims.max(1),
                               atol=1e-6)
    pos = np.sum(self.q * self.k, 1)
    np.testing.assert_array_equal(aux['positive_first'], pos > sims.max(1))

  def test_proxy_accuracy_counts_synthetic_negatives(self):
    # A positive that beats the bank but not a type-2 mix of the query
    # with the hardest negative (which leans towards the query).
    q = np.array([[1., 0.]], np.float32)
    k = np.array([[0.8, 0.6]], np.float32)
    bank = np.array([[0.6, -0.8], [-1., 0.]], np.float32)
    _, aux = losses.mochi_info_nce(self.key, q, k, bank, temperature=0.1,
                                   num_hard=1, num_mix=0, num_query_mix=0)
    self.assertTrue(bool(aux['positive_first'][0]))
    _, aux = losses.mochi_info_nce(self.key, q, k, bank, temperature=0.1,
                                   num_hard=1, num_mix=0, num_query_mix=64)
    self.assertFalse(bool(aux['positive_first'][0]))

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, 'num_hard must be an int >= 0'):
      losses.mochi_info_nce(self.key, self.q, self.k, self.negs,
                            temperature=0.2, num_hard=-1, num_mix=1,
                            num_query_mix=1)
    with self.assertRaisesRegex(ValueError, 'larger than the bank'):
      losses.mochi_info_nce(self.key, self.q, self.k, self.negs,
                            temperature=0.2, num_hard=31, num_mix=1,
                            num_query_mix=1)


class HardContrastiveTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(1)
    self.q = testing.unit(rng, 5, 6)
    self.k = testing.unit(rng, 5, 6)
    self.negs = testing.unit(rng, 7, 6)
    self.mask = rng.random((5, 7)) > 0.3
    self.mask[:, 0] = True

  def test_hand_computed_dcl(self):
    # One negative, T=1, tau+=0.5: Ng = max((e^0 - .5 e^1) / .5, e^-1) = e^-1
    # because the debiased sum is negative; loss = log(1 + e^-1 / e).
    q = jnp.array([[1., 0.]])
    out = losses.hard_contrastive(q, q, jnp.array([[0., 1.]]), temperature=1.,
                                  beta=0., tau_plus=0.5)
    np.testing.assert_allclose(out, [math.log(1 + math.exp(-2))], rtol=1e-6)

  @parameterized.parameters((1.0, 0.1, 0.5), (0.5, 0.0, 0.2), (0.0, 0.1, 0.5),
                            (2.0, 0.05, 0.1))
  def test_matches_official_formula(self, beta, tau_plus, t):
    out = losses.hard_contrastive(self.q, self.k, self.negs, temperature=t,
                                  beta=beta, tau_plus=tau_plus,
                                  negative_mask=self.mask)
    ref = np_hcl(self.q, self.k, self.negs, t, beta, tau_plus, self.mask)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)

  def test_clamp_branch(self):
    # A large class prior makes the debiased estimate negative: the clamp
    # N e^{-1/T} must take over, as in the official code.
    q = self.q.copy()
    k = q.copy()  # pos = e^{1/T} is large
    out = losses.hard_contrastive(q, k, self.negs, temperature=0.5, beta=1.0,
                                  tau_plus=0.9)
    ref = np_hcl(q, k, self.negs, 0.5, 1.0, 0.9)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    n = self.negs.shape[0]
    clamp = np.log1p(n * math.exp(-2) / math.exp(2))
    np.testing.assert_allclose(out, clamp, rtol=1e-5)

  def test_reduces_to_info_nce(self):
    out = losses.hard_contrastive(self.q, self.k, self.negs, temperature=0.2,
                                  beta=0.0, tau_plus=0.0)
    ref = losses.info_nce(self.q, self.k, self.negs, temperature=0.2)
    np.testing.assert_allclose(out, ref, rtol=1e-5)

  def test_jit_equals_eager(self):
    f = lambda q: losses.hard_contrastive(q, self.k, self.negs,
                                          temperature=0.5, beta=1.0,
                                          tau_plus=0.1)
    np.testing.assert_allclose(jax.jit(f)(self.q), f(self.q), rtol=1e-5)

  @parameterized.parameters(False, True)
  def test_gradients(self, stop_gradient_weights):
    t, beta, tp = 0.5, 1.0, 0.1
    g = jax.grad(lambda q: jnp.sum(losses.hard_contrastive(
        q, self.k, self.negs, temperature=t, beta=beta, tau_plus=tp,
        negative_mask=self.mask,
        stop_gradient_weights=stop_gradient_weights)))(self.q)
    fixed = self.q.astype(np.float64) if stop_gradient_weights else None
    ref = testing.numeric_grad(
        lambda q: np.sum(np_hcl(q, self.k, self.negs, t, beta, tp, self.mask,
                                fixed_imp_q=fixed)), self.q)
    np.testing.assert_allclose(g, ref, atol=2e-4)

  def test_weights_carry_gradient_by_default(self):
    f = lambda sg: jax.grad(lambda q: jnp.sum(losses.hard_contrastive(
        q, self.k, self.negs, temperature=0.5, beta=1.0, tau_plus=0.1,
        stop_gradient_weights=sg)))(self.q)
    self.assertGreater(float(jnp.max(jnp.abs(f(True) - f(False)))), 1e-3)

  def test_fully_masked_row(self):
    mask = self.mask.copy()
    mask[2] = False
    f = lambda q: jnp.sum(losses.hard_contrastive(
        q, self.k, self.negs, temperature=0.5, beta=1.0, tau_plus=0.1,
        negative_mask=mask))
    out = losses.hard_contrastive(self.q, self.k, self.negs, temperature=0.5,
                                  beta=1.0, tau_plus=0.1, negative_mask=mask)
    self.assertEqual(float(out[2]), 0.0)
    g = jax.grad(f)(self.q)
    self.assertTrue(testing.all_finite(g))
    np.testing.assert_allclose(g[2], 0.0)

  @parameterized.parameters(1e-3, 10.0)
  def test_extreme_temperatures_finite(self, t):
    f = lambda q: losses.hard_contrastive(q, self.k, self.negs, temperature=t,
                                          beta=1.0, tau_plus=0.1)
    self.assertTrue(testing.all_finite(f(self.q)))
    self.assertTrue(testing.all_finite(jax.grad(lambda q: f(q).sum())(self.q)))
    if t == 10.0:
      np.testing.assert_allclose(
          f(self.q), np_hcl(self.q, self.k, self.negs, t, 1.0, 0.1),
          rtol=1e-5)

  def test_bfloat16(self):
    cast = lambda x: jnp.asarray(x, jnp.bfloat16)
    out = losses.hard_contrastive(cast(self.q), cast(self.k), cast(self.negs),
                                  temperature=0.5, beta=1.0, tau_plus=0.1)
    self.assertEqual(out.dtype, jnp.float32)
    ref = np_hcl(*(np.asarray(cast(x), np.float64)
                   for x in (self.q, self.k, self.negs)), 0.5, 1.0, 0.1)
    np.testing.assert_allclose(out, ref, rtol=1e-4)

  @parameterized.named_parameters(
      ('tau_plus_one', dict(tau_plus=1.0), r'tau_plus must be in \[0, 1\)'),
      ('tau_plus_negative', dict(tau_plus=-0.1), 'got -0.1'),
      ('beta_negative', dict(beta=-1.0), 'beta must be >= 0, got -1.0'),
      ('temperature', dict(temperature=0.0), 'temperature must be > 0'),
  )
  def test_bad_input(self, override, message):
    kwargs = dict(temperature=0.5, beta=1.0, tau_plus=0.1)
    kwargs.update(override)
    with self.assertRaisesRegex(ValueError, message):
      losses.hard_contrastive(self.q, self.k, self.negs, **kwargs)


if __name__ == '__main__':
  absltest.main()
