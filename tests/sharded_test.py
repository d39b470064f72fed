"""Sharded functions equal their single-device references on 1, 2, 8 devices.

The global batch and the bank are sharded over a ``'data'`` mesh axis, the
functions run inside ``jax.shard_map`` with ``axis_name='data'``, and values
and gradients are compared with the same function called on the whole,
unsharded arrays.
"""

import re
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from hnjax import bank as bank_lib
from hnjax import losses
from hnjax import parallel
from hnjax import queue as queue_lib
from hnjax import samplers
from tests import testing

MESH_SIZES = (1, 2, 8)
ROWS, COLS, REP = P('data'), P(None, 'data'), P()


def sharded(fn, n, in_specs, out_specs):
  mesh = parallel.make_mesh(n)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                               out_specs=out_specs))


class ShardedLossTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(30)
    self.q = testing.unit(rng, 16, 8)
    self.k = testing.unit(rng, 16, 8)
    self.bank = testing.unit(rng, 48, 8)
    self.extra = testing.unit(rng, 16, 3, 8)
    self.mask = rng.random((16, 48)) > 0.2
    self.mask[5] = False

  def assert_same(self, fn, n, args, specs, atol=1e-5):
    """fn(*args, axis_name) sharded == fn(*args, None), values and grads."""
    ref_fn = lambda *a: fn(*a, None)
    shard_fn = sharded(lambda *a: fn(*a, 'data'), n, specs, ROWS)
    np.testing.assert_allclose(shard_fn(*args), ref_fn(*args), atol=atol,
                               rtol=1e-5)
    diff = tuple(i for i, a in enumerate(args)
                 if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating))
    g_ref = jax.grad(lambda *a: ref_fn(*a).sum(), diff)(*args)
    g_shard = jax.grad(lambda *a: shard_fn(*a).sum(), diff)(*args)
    for i, a, b in zip(diff, g_shard, g_ref):
      np.testing.assert_allclose(a, b, atol=atol, err_msg=f'grad of arg {i}')

  @parameterized.product(n=MESH_SIZES, block_size=(0, 4))
  def test_info_nce(self, n, block_size):
    fn = lambda q, k, b, m, e, ax: losses.info_nce(
        q, k, b, temperature=0.1, negative_mask=m, extra_negatives=e,
        axis_name=ax, block_size=block_size)
    self.assert_same(fn, n, (self.q, self.k, self.bank, self.mask, self.extra),
                     (ROWS, ROWS, ROWS, COLS, ROWS))

  @parameterized.parameters(*MESH_SIZES)
  def test_hard_contrastive(self, n):
    fn = lambda q, k, b, m, ax: losses.hard_contrastive(
        q, k, b, temperature=0.5, beta=1.0, tau_plus=0.1, negative_mask=m,
        axis_name=ax)
    self.assert_same(fn, n, (self.q, self.k, self.bank, self.mask),
                     (ROWS, ROWS, ROWS, COLS))

  @parameterized.parameters(*MESH_SIZES)
  def test_symmetric_info_nce(self, n):
    fn = lambda a, b, ax: losses.symmetric_info_nce(
        a, b, temperature=0.1, label_smoothing=0.1, axis_name=ax)
    self.assert_same(fn, n, (self.q, self.k), (ROWS, ROWS))

  def test_symmetric_info_nce_extra_negatives(self, n=8):
    fn = lambda a, b, e, m, ax: losses.symmetric_info_nce(
        a, b, temperature=0.1, extra_negatives=e, extra_negative_mask=m,
        axis_name=ax)
    self.assert_same(fn, n, (self.q, self.k, self.extra, self.mask[:, :3]),
                     (ROWS, ROWS, ROWS, ROWS))

  @parameterized.parameters(*MESH_SIZES)
  def test_sigmoid_contrastive(self, n):
    fn = lambda a, b, ax: losses.sigmoid_contrastive(
        a, b, scale=10.0, bias=-10.0, axis_name=ax)
    self.assert_same(fn, n, (self.q, self.k), (ROWS, ROWS), atol=1e-4)

  def test_m2mix(self, n=8):
    # Each device's pairs against the global batch's mixtures; both towers'
    # gradients equal one device's.
    fn = lambda a, b, ax: losses.m2mix(a, b, 0.3, temperature=0.07,
                                       axis_name=ax)
    self.assert_same(fn, n, (self.q, self.k), (ROWS, ROWS), atol=1e-4)

  @parameterized.product(n=(8,), term=('vmix', 'lmix', 'vlmix'))
  def test_m3mix(self, n, term):
    # The flipped partner of a pair lives on another device.
    fn = lambda a, b, ax: losses.m3mix(
        a, b, 0.3, term=term, temperature=0.1, original_negatives=True,
        axis_name=ax)
    self.assert_same(fn, n, (self.q, self.k), (ROWS, ROWS), atol=1e-4)

  @parameterized.product(n=MESH_SIZES, block_size=(0, 4))
  def test_hardest_negatives(self, n, block_size):
    fn = lambda q, b, m, ax: samplers.hardest_negatives(
        q, b, 10, negative_mask=m, axis_name=ax, block_size=block_size)
    ref = fn(self.q, self.bank, self.mask, None)
    out = sharded(lambda *a: fn(*a, 'data'), n, (ROWS, ROWS, COLS),
                  (ROWS, ROWS))(self.q, self.bank, self.mask)
    np.testing.assert_array_equal(out[1], ref[1])  # global indices
    np.testing.assert_allclose(out[0], ref[0], atol=1e-6)

  @parameterized.product(n=MESH_SIZES, num_hard=(1, 7), chunked=(False, True))
  def test_mochi(self, n, num_hard, chunked):
    # Each query draws from fold_in(key, global row): results are equal,
    # not just equal in distribution, for any number of shards.
    if chunked:  # Type-1 rows gathered 3 local queries at a time.
      self.enter_context(mock.patch.object(
          bank_lib, 'GATHER_CHUNK_FLOATS', 3 * n * 5 * 2 * 8))
    key = jax.random.key(4)
    fn = lambda q, b, m, ax: samplers.mochi(
        key, q, b, num_hard=num_hard, num_mix=5, num_query_mix=4,
        negative_mask=m, axis_name=ax)
    ref = fn(self.q, self.bank, self.mask, None)
    out = sharded(lambda *a: fn(*a, 'data'), n, (ROWS, ROWS, COLS), ROWS)(
        self.q, self.bank, self.mask)
    np.testing.assert_allclose(out, ref, atol=1e-6)

  @parameterized.parameters(2, 8)
  def test_mochi_with_info_nce_gradient(self, n):
    # The MoCHi loss: gradient only through the query's left-hand side.
    key = jax.random.key(5)

    def fn(q, k, b, ax):
      h = samplers.mochi(key, q, b, num_hard=6, num_mix=4, num_query_mix=2,
                         axis_name=ax)
      return losses.info_nce(q, k, b, temperature=0.2, extra_negatives=h,
                             axis_name=ax)

    self.assert_same(fn, n, (self.q, self.k, self.bank), (ROWS, ROWS, ROWS))

  @parameterized.parameters(2, 8)
  def test_mochi_info_nce(self, n):
    key = jax.random.key(6)
    fn = lambda q, k, b, m, ax: losses.mochi_info_nce(
        key, q, k, b, temperature=0.2, num_hard=6, num_mix=4,
        num_query_mix=2, negative_mask=m, axis_name=ax)[0]
    self.assert_same(fn, n, (self.q, self.k, self.bank, self.mask),
                     (ROWS, ROWS, ROWS, COLS))

  def _regression_batch(self):
    rng = np.random.default_rng(34)
    y = np.tile(rng.integers(20, 30, 8).astype(np.float32), 2)  # 2 views
    return testing.unit(rng, 16, 8), y

  def test_sup_con(self, n=8):
    z, y = self._regression_batch()
    fn = lambda z, y, ax: losses.sup_con(z, y, temperature=0.2, axis_name=ax)
    self.assert_same(fn, n, (z, y), (ROWS, ROWS))

  @parameterized.parameters((None, 'clean'), (0, 'clean'), (None, 'authors'))
  def test_supremix(self, max_partners, variant, n=8):
    # Beta draws come from fold_in(key, global row): equal, not only in
    # distribution. None: the banded path; 0: all pairs.
    z, y = self._regression_batch()
    key = jax.random.key(7)
    fn = lambda z, y, ax: losses.supremix(
        key, z, y, temperature=0.5, window=4.0, variant=variant,
        max_partners=max_partners, axis_name=ax)
    self.assert_same(fn, n, (z, y), (ROWS, ROWS))

  def test_rank_n_contrast(self, n=8):
    z, y = self._regression_batch()
    fn = lambda z, y, ax: losses.rank_n_contrast(z * 3.0, y, temperature=2.0,
                                                 axis_name=ax)
    self.assert_same(fn, n, (z, y), (ROWS, ROWS))

  def test_per_device_memory_layout(self):
    # Each device holds its [K / n, D] shard, never the whole bank.
    mesh = parallel.make_mesh(8)

    def body(q, b):
      self.assertEqual(b.shape, (6, 8))
      self.assertEqual(q.shape, (2, 8))
      return losses.info_nce(q, q, b, temperature=0.1, axis_name='data')

    jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(ROWS, ROWS),
                          out_specs=ROWS))(self.q, self.bank)

  def test_unknown_axis_name(self):
    mesh = parallel.make_mesh(8)
    f = jax.shard_map(
        lambda q, b: losses.info_nce(q, q, b, temperature=0.1,
                                     axis_name='batch'),
        mesh=mesh, in_specs=(ROWS, ROWS), out_specs=ROWS)
    with self.assertRaisesRegex(ValueError, "axis_name='batch' is not a mesh"):
      jax.jit(f)(self.q, self.bank)

  def test_sharded_mask_shape_is_checked(self):
    f = sharded(lambda q, b, m: losses.info_nce(
        q, q, b, temperature=0.1, negative_mask=m, axis_name='data'), 8,
                (ROWS, ROWS, ROWS), ROWS)
    with self.assertRaisesRegex(ValueError, r'\[global batch, local bank '
                                r'shard\] = \(16, 6\), got \(2, 48\)'):
      f(self.q, self.bank, self.mask)


class ShardedQueueTest(parameterized.TestCase):

  def test_init_shards(self):
    mesh = parallel.make_mesh(8)
    q = queue_lib.init(jax.random.key(0), 64, 4,
                       sharding=NamedSharding(mesh, ROWS))
    self.assertLen(q.keys.addressable_shards, 8)
    for s in q.keys.addressable_shards:
      self.assertEqual(s.data.shape, (8, 4))
    np.testing.assert_allclose(np.linalg.norm(q.keys, axis=1), 1.0, rtol=1e-6)
    self.assertTrue(q.ptr.sharding.is_fully_replicated)
    np.testing.assert_array_equal(q.ids, -1)

  def test_init_not_divisible(self):
    mesh = parallel.make_mesh(8)
    with self.assertRaisesRegex(
        ValueError, 'queue size 60 is not divisible by the number of shards 8'):
      queue_lib.init(jax.random.key(0), 60, 4,
                     sharding=NamedSharding(mesh, ROWS))

  @parameterized.parameters(1, 2, 8)
  def test_ids_follow_keys_and_wrap(self, n):
    mesh = parallel.make_mesh(n)
    size, dim, g = 48, 3, 16
    q = queue_lib.init(jax.random.key(0), size, dim,
                       sharding=NamedSharding(mesh, ROWS))
    enq = queue_lib.make_enqueue(mesh)
    seen = []
    for step in range(5):  # 80 keys into 48 slots: wraps around
      ids = np.arange(step * g, (step + 1) * g, dtype=np.int32)
      keys = np.stack([ids, -ids, 2 * ids], 1).astype(np.float32)
      q = enq(q, keys, ids, ids % 7)
      seen.extend(ids)
    ids, keys, labels = (np.asarray(x) for x in (q.ids, q.keys, q.labels))
    np.testing.assert_array_equal(keys[:, 0], ids)  # ids follow their keys
    np.testing.assert_array_equal(keys[:, 1], -ids)
    np.testing.assert_array_equal(labels, ids % 7)
    # FIFO: exactly the newest `size` ids survive, whatever n.
    np.testing.assert_array_equal(np.sort(ids), np.arange(80 - size, 80))
    self.assertEqual(int(q.ptr), 80 % size)

  def test_single_device_ring(self):
    q = queue_lib.init(jax.random.key(0), 5, 2)
    for i in range(3):
      q = queue_lib.enqueue(q, np.full((2, 2), i, np.float32),
                            ids=np.array([2 * i, 2 * i + 1]))
    np.testing.assert_array_equal(q.ids, [5, 1, 2, 3, 4])  # wrapped
    self.assertEqual(int(q.ptr), 1)

  def test_each_device_writes_its_own_shard_without_communication(self):
    mesh = parallel.make_mesh(8)
    q = queue_lib.init(jax.random.key(0), 64, 4,
                       sharding=NamedSharding(mesh, ROWS))
    enq = queue_lib.make_enqueue(mesh)
    keys = np.repeat(np.arange(16, dtype=np.float32)[:, None], 4, 1)
    ids = np.arange(16, dtype=np.int32)
    hlo = enq.lower(q, keys, ids, ids).compile().as_text()
    for op in ('all-gather', 'all-to-all', 'all-reduce', 'collective-permute',
               'reduce-scatter'):
      self.assertNotIn(op, hlo)
    q = enq(q, keys, ids, ids)
    for d, s in enumerate(q.ids.addressable_shards):
      # Device d holds rows [8d, 8d + 8); its 2 keys went to its first rows.
      np.testing.assert_array_equal(np.asarray(s.data)[:2],
                                    [2 * d, 2 * d + 1])

  def test_enqueue_donates(self):
    mesh = parallel.make_mesh(8)
    q = queue_lib.init(jax.random.key(0), 64, 4,
                       sharding=NamedSharding(mesh, ROWS))
    old = q.keys
    q = queue_lib.make_enqueue(mesh)(q, np.ones((16, 4), np.float32),
                                     np.zeros(16, np.int32),
                                     np.zeros(16, np.int32))
    self.assertTrue(old.is_deleted())

  def test_same_id_mask_removes_own_earlier_copy(self):
    # The query's own earlier key is the closest bank entry; masking by id
    # removes it from the global hardest set on every shard count.
    rng = np.random.default_rng(31)
    bank = testing.unit(rng, 64, 8)
    bank_ids = np.arange(64, dtype=np.int32) + 100
    q_ids = bank_ids[::4][:16]
    query = bank[::4][:16] + 0.01 * testing.unit(rng, 16, 8)

    def fn(q, b, qi, bi):
      mask = samplers.same_id_mask(jax.lax.all_gather(qi, 'data', tiled=True),
                                   bi)
      return samplers.hardest_negatives(q, b, 3, negative_mask=mask,
                                        axis_name='data')[1]

    for n in (1, 8):
      idx = np.asarray(sharded(fn, n, (ROWS, ROWS, ROWS, ROWS), ROWS)(
          query, bank, q_ids, bank_ids))
      for r in range(16):
        self.assertNotIn(4 * r, idx[r])
    unmasked = samplers.hardest_negatives(query, bank, 1)[1]
    np.testing.assert_array_equal(unmasked[:, 0], np.arange(0, 64, 4))

  @parameterized.named_parameters(
      ('jax_make_mesh_eager', 'explicit', False),
      ('jax_make_mesh_jit', 'explicit', True),
      ('parallel_make_mesh_eager', 'auto', False),
  )
  def test_global_enqueue_writes_the_rows_make_enqueue_writes(self, axes,
                                                              jitted):
    # Once a raw "Incompatible types for broadcasting" on jax.make_mesh's
    # explicit axes, and on an Auto mesh other rows than make_enqueue's
    # (mixing the two overwrote fresh keys while initial slots stayed).
    mesh = (jax.make_mesh((8,), ('data',)) if axes == 'explicit'
            else parallel.make_mesh(8))
    rows = NamedSharding(mesh, ROWS)
    fresh = lambda: queue_lib.init(jax.random.key(0), 32, 4, sharding=rows)
    rng = np.random.default_rng(0)
    batches = [(testing.unit(rng, 16, 4),
                np.arange(16 * i, 16 * i + 16, dtype=np.int32))
               for i in range(4)]  # 64 keys into 32 slots: wraps twice
    ref, q = fresh(), fresh()
    enqueue = jax.jit(queue_lib.enqueue) if jitted else queue_lib.enqueue
    make_enqueue = queue_lib.make_enqueue(mesh)  # one compilation
    for step, (keys, ids) in enumerate(batches[:3]):
      ref = make_enqueue(ref, keys, ids, ids % 3)
      # Sharded and replicated inputs alike; both APIs mixed on one queue.
      keys_in = jax.device_put(keys, rows) if step % 2 else keys
      q = enqueue(q, keys_in, ids, ids % 3)
      if step == 1:
        q = make_enqueue(q, *batches[3][:1], batches[3][1], batches[3][1] % 3)
        ref = make_enqueue(ref, *batches[3][:1], batches[3][1],
                           batches[3][1] % 3)
    for got, want in zip(jax.tree.leaves(q), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.sort(np.asarray(q.ids)),
                                  np.sort(np.asarray(ref.ids)))
    self.assertNotIn(-1, np.asarray(q.ids))  # no initial slot left behind
    with self.assertRaisesRegex(ValueError, 'keys has 12 rows: not '
                                'divisible by the 8 shards'):
      queue_lib.enqueue(fresh(), np.ones((12, 4), np.float32))

  def test_bad_enqueue(self):
    mesh = parallel.make_mesh(8)
    q = queue_lib.init(jax.random.key(0), 16, 4,
                       sharding=NamedSharding(mesh, ROWS))
    enq = queue_lib.make_enqueue(mesh)
    with self.assertRaisesRegex(ValueError, 'per-device batch 4 is larger '
                                'than the queue shard \\(2 rows\\)'):
      enq(q, np.ones((32, 4), np.float32), np.zeros(32, np.int32),
          np.zeros(32, np.int32))
    with self.assertRaisesRegex(ValueError, 'keys must have dim 4'):
      enq(q, np.ones((8, 3), np.float32), np.zeros(8, np.int32),
          np.zeros(8, np.int32))
    with self.assertRaisesRegex(ValueError, "axis_name='model' is not an axis"):
      queue_lib.make_enqueue(mesh, 'model')


class RoutedRowsTest(parameterized.TestCase):
  """`bank.take_rows`: each row comes from its owner, exact for any layout."""

  @parameterized.product(n=(1, 8), layout=('random', 'one_owner', 'own'),
                         capacity=(None, 0.01))
  def test_take_rows_equals_numpy(self, n, layout, capacity):
    # 'one_owner': every device asks shard 0 only, so one pair needs 8x
    # the mean; capacity 0.01 gives one slot per owner: many rounds.
    rng = np.random.default_rng(40)
    k, g, m = 32, 16, 5
    table = rng.normal(size=(k, 3)).astype(np.float32)
    labels = rng.integers(0, 9, k).astype(np.int32)
    idx = rng.integers(-1, k, (g, m)).astype(np.int32)
    if layout == 'one_owner':
      idx = np.where(idx >= 0, idx % (k // 8), -1)
    elif layout == 'own':  # each device asks only for rows it holds itself
      dev = np.arange(g)[:, None] // (g // n)
      idx = np.where(idx >= 0, dev * (k // n) + idx % (k // n), -1)
    f = lambda t, l, i: (
        bank_lib.take_rows(t, i, axis_name='data', capacity=capacity),
        bank_lib.take_rows(l, i, axis_name='data', capacity=capacity))
    rows, labs = sharded(f, n, (ROWS,) * 3, (ROWS, ROWS))(table, labels, idx)
    ok = idx >= 0
    np.testing.assert_array_equal(
        rows, np.where(ok[..., None], table[np.maximum(idx, 0)], 0))
    np.testing.assert_array_equal(labs, np.where(ok, labels[idx], 0))
    np.testing.assert_array_equal(bank_lib.take_rows(table, idx), rows)

  def test_exchange_does_not_grow_with_devices(self):
    # Per round a device sends and receives about capacity * E indices and
    # rows, not n * E: the all_to_all operands stay [n, ceil(2 E / n)].
    def shapes(n):
      mesh = parallel.make_mesh(n)
      f = jax.shard_map(
          lambda t, i: bank_lib.take_rows(t, i, axis_name='data'), mesh=mesh,
          in_specs=(ROWS, ROWS), out_specs=ROWS)
      text = jax.jit(f).lower(jnp.zeros((64, 4)), jnp.zeros(
          (8 * n, 16), jnp.int32)).as_text()
      return sorted({re.search(r': \(tensor<([^>]*)>\) ->', line)[1]
                     for line in text.splitlines() if 'all_to_all' in line})
    self.assertEqual(shapes(2), ['2x128x4xf32', '2x128xi32'])
    self.assertEqual(shapes(8), ['8x32x4xf32', '8x32xi32'])

  @parameterized.parameters((7, 5, 4), (20, 2, 1))
  def test_mochi_with_all_hardest_rows_on_one_shard(self, num_hard, s, s2):
    # Shard 0 holds the negatives nearest every query: all routed rows come
    # from one device, in several rounds. (7, 5, 4) fetches the hardest
    # sets, (20, 2, 1) only the 2 s + s' drawn rows.
    rng = np.random.default_rng(41)
    q = testing.unit(rng, 16, 8)
    bank = testing.unit(rng, 64, 8)
    bank[:8] = testing.unit(rng, 8, 8) * 0.1 + q.mean(0)
    bank[:8] /= np.linalg.norm(bank[:8], axis=1, keepdims=True)
    key = jax.random.key(8)
    fn = lambda q, b, ax: samplers.mochi(
        key, q, b, num_hard=num_hard, num_mix=s, num_query_mix=s2,
        axis_name=ax)
    ref = fn(q, bank, None)
    out = sharded(lambda *a: fn(*a, 'data'), 8, (ROWS, ROWS), ROWS)(q, bank)
    np.testing.assert_allclose(out, ref, atol=1e-6)


class ShardedTopKTest(parameterized.TestCase):
  """The global top-k: few proposals per shard, exact second pass if needed."""

  @parameterized.product(layout=('random', 'one_shard', 'ties'),
                         masked=(False, True))
  def test_equals_single_device(self, layout, masked):
    # 8 shards of 32 rows and 24 wanted: each shard first proposes 18
    # candidates. 'one_shard' puts every query's 30 nearest rows on shard
    # 3 (the exact pass must run); 'ties' repeats rows across shards.
    rng = np.random.default_rng(42)
    q = testing.unit(rng, 8, 6)
    bank = testing.unit(rng, 256, 6)
    if layout == 'one_shard':
      near = testing.unit(rng, 30, 6) * 0.05 + q.mean(0)
      bank[96:126] = near / np.linalg.norm(near, axis=1, keepdims=True)
    elif layout == 'ties':
      bank[128:] = bank[:128]
    mask = rng.random((8, 256)) > 0.3 if masked else None
    self.assertLess(bank_lib._proposals(24, 8), 24)  # pylint: disable=protected-access
    fn = lambda q, b, m, ax: bank_lib.bank_stats(
        q, b, scales=(5.0,), num_top=24, negative_mask=m, axis_name=ax,
        block_size=16)
    ref = fn(q, bank, mask, None)
    specs = (ROWS, ROWS, COLS if masked else REP)
    out = sharded(lambda *a: fn(*a, 'data')[:3], 8, specs,
                  (COLS, ROWS, ROWS))(q, bank, mask)
    np.testing.assert_array_equal(out[2], ref.top_indices)
    np.testing.assert_allclose(out[1], ref.top_similarities, atol=1e-6)
    np.testing.assert_allclose(out[0], ref.lse, rtol=1e-6)

  def test_few_candidates_left(self):
    # Masks leave 3 entries per query, fewer than the 10 asked: -1 / -inf
    # slots, as on one device.
    rng = np.random.default_rng(43)
    q, bank = testing.unit(rng, 8, 6), testing.unit(rng, 256, 6)
    mask = np.zeros((8, 256), bool)
    mask[:, [5, 70, 100]] = True
    fn = lambda q, b, m, ax: bank_lib.bank_stats(
        q, b, num_top=24, negative_mask=m, axis_name=ax)[1:3]
    ref = fn(q, bank, mask, None)
    out = sharded(lambda *a: fn(*a, 'data'), 8, (ROWS, ROWS, COLS),
                  (ROWS, ROWS))(q, bank, mask)
    np.testing.assert_array_equal(out[1], ref[1])
    np.testing.assert_allclose(out[0], ref[0], atol=1e-6)
    self.assertTrue(np.all(ref[1][:, 3:] == -1))


class ApproximateSelectionTest(parameterized.TestCase):
  """``recall_target``: `jax.lax.approx_max_k`, and the recall it reached."""

  def _stats(self, n, recall_target):
    rng = np.random.default_rng(44)
    q, bank = testing.unit(rng, 16, 6), testing.unit(rng, 256, 6)
    fn = lambda q, b, ax: bank_lib.bank_stats(
        q, b, num_top=12, axis_name=ax, recall_target=recall_target)
    ref = fn(q, bank, None)
    out = sharded(lambda *a: fn(*a, 'data')[1:], n, (ROWS, ROWS),
                  (ROWS, ROWS, REP))(q, bank)
    return ref, out

  @parameterized.parameters(1, 8)
  def test_cpu_computes_it_exactly(self, n):
    ref, out = self._stats(n, None)
    approx_ref, approx_out = self._stats(n, 0.9)
    self.assertIsNone(ref.recall)
    np.testing.assert_array_equal(approx_ref.top_indices, ref.top_indices)
    np.testing.assert_array_equal(approx_out[1], out[1])
    self.assertEqual(float(approx_ref.recall), 1.0)
    self.assertEqual(float(approx_out[2]), 1.0)

  def test_recall_counts_what_was_missed(self):
    # An "approximate" top-k that always misses each row's best entry:
    # it finds k - 1 of the exact k on every sampled query.
    def miss_best(x, k, **unused):
      v, i = jax.lax.top_k(x, k + 1)
      return v[..., 1:], i[..., 1:]

    with mock.patch.object(bank_lib.lax, 'approx_max_k', miss_best):
      stats, _ = self._stats(1, 0.9)
    self.assertAlmostEqual(float(stats.recall), 11 / 12, places=6)

  def test_bad_recall_target(self):
    with self.assertRaisesRegex(ValueError, 'recall_target must be in'):
      bank_lib.bank_stats(jnp.ones((2, 3)), jnp.ones((4, 3)), num_top=1,
                          recall_target=1.5)


class GatherTest(parameterized.TestCase):

  @parameterized.parameters('all', 'local', 'none')
  def test_gradient_semantics(self, mode):
    x = np.random.default_rng(32).normal(size=(8, 3)).astype(np.float32)
    w = np.random.default_rng(33).normal(size=(8, 8, 3)).astype(np.float32)

    def body(x, w):  # each device: its own weights on the gathered rows
      full = parallel.gather(x, 'data', gradient=mode)
      return jnp.sum(full * w[0])[None]

    f = sharded(body, 8, (ROWS, ROWS), ROWS)
    g = jax.grad(lambda x: f(x, w).sum())(x)
    if mode == 'all':
      expected = w.sum(0)  # every device's loss reaches every row
    elif mode == 'local':
      expected = np.stack([w[d, d] for d in range(8)])
    else:
      expected = np.zeros_like(x)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)

  def test_bad_mode(self):
    with self.assertRaisesRegex(ValueError, "gradient must be .* got 'some'"):
      parallel.gather(jnp.zeros(2), 'data', gradient='some')


if __name__ == '__main__':
  absltest.main()
