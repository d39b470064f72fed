"""Tests for hnjax.data.pipeline: order, resumption, multi-host slicing."""

import json
import shutil
import tempfile
import threading

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from hnjax.data import pipeline
from hnjax.data import sources


class _ArraySource:
  """In-memory source that records which rows were read."""

  def __init__(self, n, image_shape=(4, 4, 3)):
    rng = np.random.default_rng(0)
    self.data = {
        'image': rng.integers(0, 256, (n,) + image_shape, dtype=np.uint8),
        'label': rng.integers(0, 5, n).astype(np.int64),
        'index': np.arange(n, dtype=np.int64),
        'size': rng.uniform(1, 2, n),  # float64, expect float32 out
        'caption': np.array([f'example {i}' for i in range(n)]),
    }
    self.reads = []  # rows of each get_batch call
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.data['label'])

  def get_batch(self, rows, fields=None):
    rows = np.asarray(rows)
    with self._lock:
      self.reads.append(tuple(rows.tolist()))
    return {
        k: v[rows]
        for k, v in self.data.items()
        if fields is None or k in fields
    }


def _take(it, n):
  return [next(it) for _ in range(n)]


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class TrainPipelineTest(parameterized.TestCase):

  def test_each_epoch_visits_each_example_at_most_once(self):
    n, g = 103, 10  # 10 steps per epoch, 3 examples dropped per epoch
    self.assertEqual(pipeline.steps_per_epoch(n, g), 10)
    src = _ArraySource(n)
    it = pipeline.train_iterator(
        src, global_batch_size=g, seed=1, process_index=0, process_count=1
    )
    batches = _take(it, 20)
    for epoch in range(2):
      idx = np.concatenate(
          [b['index'] for b in batches[epoch * 10 : (epoch + 1) * 10]]
      )
      self.assertLen(idx, 100)
      self.assertLen(set(idx.tolist()), 100)
    # Reshuffled per epoch: the two epochs' orders differ.
    e0 = np.concatenate([b['index'] for b in batches[:10]])
    e1 = np.concatenate([b['index'] for b in batches[10:]])
    self.assertFalse(np.array_equal(e0, e1))

  def test_fields_match_the_rows_and_types_are_narrowed(self):
    src = _ArraySource(50)
    b = next(
        pipeline.train_iterator(
            src, global_batch_size=8, seed=0, process_index=0, process_count=1
        )
    )
    rows = b['index']
    np.testing.assert_array_equal(b['image'], src.data['image'][rows])
    np.testing.assert_array_equal(b['label'], src.data['label'][rows])
    self.assertEqual(b['image'].dtype, np.uint8)
    self.assertEqual(b['image'].shape, (8, 4, 4, 3))
    self.assertEqual(b['label'].dtype, np.int32)
    self.assertEqual(b['index'].dtype, np.int32)
    self.assertEqual(b['size'].dtype, np.float32)
    self.assertNotIn('caption', b)  # strings only on request

  def test_strings_on_request(self):
    src = _ArraySource(50)
    b = next(
        pipeline.train_iterator(
            src,
            global_batch_size=8,
            seed=0,
            process_index=0,
            process_count=1,
            fields=('image', 'index', 'caption'),
        )
    )
    self.assertEqual(set(b), {'image', 'index', 'caption'})
    self.assertEqual(b['caption'][0], f"example {b['index'][0]}")

  def test_seed_changes_the_order(self):
    src = _ArraySource(64)
    a = next(
        pipeline.train_iterator(
            src, global_batch_size=16, seed=0, process_index=0, process_count=1
        )
    )
    b = next(
        pipeline.train_iterator(
            src, global_batch_size=16, seed=1, process_index=0, process_count=1
        )
    )
    self.assertFalse(np.array_equal(a['index'], b['index']))

  @parameterized.parameters(2, 4)
  def test_global_batches_do_not_depend_on_process_count(self, num_procs):
    n, g, steps = 90, 12, 17  # crosses two epoch boundaries
    single = _take(
        pipeline.train_iterator(
            _ArraySource(n),
            global_batch_size=g,
            seed=3,
            process_index=0,
            process_count=1,
        ),
        steps,
    )
    srcs = [_ArraySource(n) for _ in range(num_procs)]
    per_proc = [
        _take(
            pipeline.train_iterator(
                srcs[p],
                global_batch_size=g,
                seed=3,
                process_index=p,
                process_count=num_procs,
            ),
            steps,
        )
        for p in range(num_procs)
    ]
    for t in range(steps):
      joined = _concat([per_proc[p][t] for p in range(num_procs)])
      for k in single[t]:
        np.testing.assert_array_equal(joined[k], single[t][k])
    # Each read of a process is exactly its slice of one step (prefetching
    # may read a few steps ahead).
    for p in range(num_procs):
      own = {
          tuple(
              pipeline.train_rows(
                  t,
                  num_examples=n,
                  global_batch_size=g,
                  seed=3,
                  process_index=p,
                  process_count=num_procs,
              ).tolist()
          )
          for t in range(steps + 8)
      }
      self.assertNotEmpty(srcs[p].reads)
      self.assertContainsSubset(srcs[p].reads, own)
      self.assertTrue(all(len(r) == g // num_procs for r in srcs[p].reads))

  def test_resume_from_state_and_from_start_step(self):
    src = _ArraySource(70)
    kwargs = dict(global_batch_size=8, seed=5, process_index=0, process_count=1)
    it = pipeline.train_iterator(src, **kwargs)
    _take(it, 11)
    state = json.loads(json.dumps(it.get_state()))  # must be JSON-able
    expected = _take(it, 9)  # crosses an epoch boundary (8 steps/epoch)

    restored = pipeline.train_iterator(src, **kwargs)
    _take(restored, 2)  # wherever it was, set_state moves it
    restored.set_state(state)
    from_step = pipeline.train_iterator(src, start_step=11, **kwargs)
    for a, b, c in zip(expected, _take(restored, 9), _take(from_step, 9)):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], c[k])
    self.assertEqual(from_step.get_state(), it.get_state())

  def test_num_steps_ends_the_iterator(self):
    it = pipeline.train_iterator(
        _ArraySource(40),
        global_batch_size=8,
        seed=0,
        num_steps=3,
        process_index=0,
        process_count=1,
    )
    self.assertLen(list(it), 3)

  def test_train_rows_is_what_the_iterator_yields(self):
    src = _ArraySource(40)
    it = pipeline.train_iterator(
        src, global_batch_size=6, seed=2, process_index=1, process_count=2
    )
    for t, b in enumerate(_take(it, 8)):
      rows = pipeline.train_rows(
          t,
          num_examples=40,
          global_batch_size=6,
          seed=2,
          process_index=1,
          process_count=2,
      )
      np.testing.assert_array_equal(b['index'], rows)

  @parameterized.named_parameters(
      (
          'batch_not_multiple',
          dict(global_batch_size=9, process_count=2),
          'global_batch_size',
      ),
      ('batch_too_large', dict(global_batch_size=64), 'global_batch_size'),
      ('bad_process', dict(process_index=2, process_count=2), 'process_index'),
      ('negative_start', dict(start_step=-1), 'start_step'),
  )
  def test_bad_arguments(self, overrides, name):
    kwargs = dict(global_batch_size=8, seed=0, process_index=0, process_count=1)
    kwargs.update(overrides)
    with self.assertRaisesRegex(ValueError, name):
      pipeline.train_iterator(_ArraySource(40), **kwargs)


class EvalPipelineTest(parameterized.TestCase):

  @parameterized.parameters(1, 2)
  def test_whole_split_in_order_with_padding(self, num_procs):
    n, g = 23, 10
    src = _ArraySource(n)
    per_proc = [
        list(
            pipeline.eval_iterator(
                src,
                global_batch_size=g,
                process_index=p,
                process_count=num_procs,
            )
        )
        for p in range(num_procs)
    ]
    self.assertLen(per_proc[0], 3)
    joined = _concat([_concat([b[i] for b in per_proc]) for i in range(3)])
    mask = joined['mask']
    self.assertEqual(mask.dtype, np.bool_)
    self.assertEqual(mask.sum(), n)
    np.testing.assert_array_equal(joined['index'][mask], np.arange(n))
    np.testing.assert_array_equal(joined['image'][mask], src.data['image'])
    self.assertFalse(joined['image'][~mask].any())  # padding is zeros
    for b in per_proc[0]:
      self.assertEqual(b['image'].shape, (g // num_procs, 4, 4, 3))


class RealSourceTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.src = sources.get_source('shapes32/small', 'test', data_dir=cls.dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir)
    super().tearDownClass()

  def test_shapes_source_through_the_pipeline(self):
    it = pipeline.train_iterator(
        self.src, global_batch_size=32, seed=0, process_index=0, process_count=1
    )
    b = next(it)
    self.assertEqual(b['image'].shape, (32, 32, 32, 3))
    for j in (0, 17):
      ex = self.src[int(b['index'][j])]
      np.testing.assert_array_equal(b['image'][j], ex['image'])
      self.assertEqual(b['label'][j], ex['label'])
      self.assertAlmostEqual(b['size'][j], ex['size'], places=6)

  def test_worker_processes_give_the_same_batches(self):
    kwargs = dict(
        global_batch_size=16, seed=4, process_index=0, process_count=1
    )
    ref = _take(pipeline.train_iterator(self.src, start_step=5, **kwargs), 6)
    it = pipeline.train_iterator(
        self.src, start_step=5, num_workers=1, **kwargs
    )
    try:
      got = _take(it, 3)
      state = json.loads(json.dumps(it.get_state()))
    finally:
      it.close()
    resumed = pipeline.train_iterator(
        self.src, start_step=5, num_workers=1, **kwargs
    )
    try:
      resumed.set_state(state)
      got += _take(resumed, 3)
    finally:
      resumed.close()
    for a, b in zip(ref, got):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])


if __name__ == '__main__':
  absltest.main()
