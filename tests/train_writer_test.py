"""Tests for hnjax.train.writer."""

import glob
import io
import json
import os
import struct
import tempfile
from unittest import mock

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np
from tensorboardX.proto import event_pb2
import tqdm
from tqdm import notebook as tqdm_notebook

from hnjax import notebook
from hnjax.train import writer as writer_lib


def _read_events(workdir):
  """All TensorBoard events in `workdir` (TFRecord framing, no TensorFlow)."""
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos : pos + 8])
      record = data[pos + 12 : pos + 12 + length]  # Skips the length CRC.
      pos += 12 + length + 4  # And the data CRC.
      events.append(event_pb2.Event.FromString(record))
  return events


def _tb_scalars(workdir):
  out = []
  for e in _read_events(workdir):
    for v in e.summary.value:
      if v.HasField('simple_value'):
        out.append((e.step, v.tag, v.simple_value))
  return out


class MetricWriterTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = self.enter_context(tempfile.TemporaryDirectory())

  def _lines(self, name=writer_lib.METRICS_FILE):
    return writer_lib.read_jsonl(os.path.join(self.workdir, name))

  def test_scalars_go_to_jsonl_and_tensorboard(self):
    with writer_lib.MetricWriter(self.workdir) as w:
      w.write_scalars(1, {'loss': jnp.float32(2.5), 'acc': np.array(0.25)})
      # Flushed per call: readable before close.
      self.assertEqual(self._lines(), [{'step': 1, 'loss': 2.5, 'acc': 0.25}])
      w.write_scalars(2, {'loss': 1.5, 'count': np.int32(3)})
    self.assertEqual(self._lines()[1], {'step': 2, 'loss': 1.5, 'count': 3})
    self.assertIsInstance(self._lines()[1]['count'], int)
    self.assertCountEqual(
        _tb_scalars(self.workdir),
        [
            (1, 'loss', 2.5),
            (1, 'acc', 0.25),
            (2, 'loss', 1.5),
            (2, 'count', 3.0),
        ],
    )

  def test_nan_is_written(self):
    with writer_lib.MetricWriter(self.workdir) as w:
      w.write_scalars(1, {'loss': float('nan')})
    self.assertTrue(np.isnan(self._lines()[0]['loss']))

  def test_bad_scalars_raise(self):
    with writer_lib.MetricWriter(self.workdir) as w:
      with self.assertRaisesRegex(ValueError, "scalars\\['x'\\]"):
        w.write_scalars(1, {'x': np.zeros(3)})
      with self.assertRaisesRegex(ValueError, 'step'):
        w.write_scalars(1, {'step': 3})

  def test_histogram_has_fixed_edges_and_counts(self):
    values = np.array([-2.0, -0.95, 0.1, 0.15, 0.9, 3.0, np.nan])
    with writer_lib.MetricWriter(self.workdir) as w:
      w.write_histogram(5, 'hard_neg_sim', values, bins=4)
      w.write_histogram(6, 'hard_neg_sim', jnp.zeros((2, 3)), bins=4)
    h5, h6 = self._lines(writer_lib.HISTOGRAMS_FILE)
    self.assertEqual(h5['edges'], [-1.0, -0.5, 0.0, 0.5, 1.0])
    self.assertEqual(h6['edges'], h5['edges'])
    # -2 clips into the first bin, 3 into the last; NaN is dropped.
    self.assertEqual(h5['counts'], [2, 0, 2, 2])
    self.assertEqual((h5['count'], h5['min'], h5['max']), (6, -2.0, 3.0))
    self.assertEqual(h6['counts'], [0, 0, 6, 0])
    histos = [
        (e.step, v.histo)
        for e in _read_events(self.workdir)
        for v in e.summary.value
        if v.HasField('histo')
    ]
    self.assertEqual([s for s, _ in histos], [5, 6])
    self.assertEqual(list(histos[0][1].bucket_limit), [-0.5, 0.0, 0.5, 1.0])
    self.assertEqual(list(histos[0][1].bucket), [2, 0, 2, 2])

  def test_histogram_explicit_edges_and_errors(self):
    with writer_lib.MetricWriter(self.workdir) as w:
      w.write_histogram(1, 'x', [0.5, 1.5, 2.5], bins=[0.0, 1.0, 3.0])
      with self.assertRaisesRegex(ValueError, 'increasing'):
        w.write_histogram(1, 'x', [0.5], bins=[1.0, 0.0])
      with self.assertRaisesRegex(ValueError, 'bins must be >= 1'):
        w.write_histogram(1, 'x', [0.5], bins=0)
    self.assertEqual(
        self._lines(writer_lib.HISTOGRAMS_FILE)[0]['counts'], [1, 2]
    )

  def test_truncate_after_resume_drops_later_steps(self):
    with writer_lib.MetricWriter(self.workdir) as w:
      for step in (10, 20, 30):
        w.write_scalars(step, {'loss': float(step)})
        w.write_histogram(step, 'h', [0.0])
    # The run died mid-line after step 30.
    with open(os.path.join(self.workdir, writer_lib.METRICS_FILE), 'a') as f:
      f.write('{"step": 40, "lo')
    # Resume from the checkpoint at step 20 and log 30 again.
    with writer_lib.MetricWriter(self.workdir) as w:
      w.truncate_after(20)
      w.write_scalars(30, {'loss': 3.0})
    self.assertEqual(
        [(r['step'], r['loss']) for r in self._lines()],
        [(10, 10.0), (20, 20.0), (30, 3.0)],
    )
    self.assertEqual(
        [r['step'] for r in self._lines(writer_lib.HISTOGRAMS_FILE)], [10, 20]
    )
    # TensorBoard is told to discard old events from step 21 on.
    purges = [
        e.step
        for e in _read_events(self.workdir)
        if e.HasField('session_log') and e.session_log.status == 1
    ]
    self.assertIn(21, purges)

  def test_truncate_none_drops_everything(self):
    with writer_lib.MetricWriter(self.workdir) as w:
      w.write_scalars(1, {'loss': 1.0})
      w.truncate_after(None)
    self.assertEqual(self._lines(), [])

  def test_disabled_writes_nothing(self):
    workdir = os.path.join(self.workdir, 'sub')
    with writer_lib.MetricWriter(workdir, enabled=False) as w:
      w.write_scalars(1, {'loss': 1.0})
      w.write_histogram(1, 'h', [0.0])
      w.write_config({'a': 1})
      w.truncate_after(0)
    self.assertFalse(os.path.exists(workdir))

  def test_write_config(self):
    class FakeConfigDict:

      def to_dict(self):
        return {'model': {'name': 'resnet18'}, 'shape': (32, 32), 'x': {1, 2}}

    with writer_lib.MetricWriter(self.workdir) as w:
      w.write_config(FakeConfigDict())
    with open(os.path.join(self.workdir, writer_lib.CONFIG_FILE)) as f:
      config = json.load(f)
    self.assertEqual(config['model'], {'name': 'resnet18'})
    self.assertEqual(config['shape'], [32, 32])
    self.assertEqual(config['x'], '{1, 2}')


class ProgressBarTest(absltest.TestCase):

  def test_shows_position_rate_and_eta(self):
    out = io.StringIO()
    bar = writer_lib.progress_bar(100, initial=40, file=out, mininterval=0)
    bar.update(5)
    bar.close()
    text = out.getvalue()
    self.assertIn('45/100', text)
    self.assertIn('step/s', text)
    self.assertRegex(text, r'<\d\d:\d\d')  # The ETA.

  def test_disabled_prints_nothing(self):
    out = io.StringIO()
    bar = writer_lib.progress_bar(100, enabled=False, file=out)
    bar.update(5)
    bar.close()
    self.assertEqual(out.getvalue(), '')

  def test_plain_text_outside_a_notebook(self):
    self.assertFalse(notebook.in_notebook())
    self.assertIs(notebook.tqdm_class(), tqdm.tqdm)

  def test_widget_in_a_notebook_with_ipywidgets(self):
    with mock.patch.object(notebook, 'in_notebook', return_value=True), \
        mock.patch.object(tqdm_notebook, 'IProgress', object):
      self.assertIs(notebook.tqdm_class(), tqdm_notebook.tqdm)

  def test_plain_text_in_a_notebook_without_ipywidgets(self):
    # tqdm.auto would pick tqdm.notebook here and raise at the first bar.
    out = io.StringIO()
    with mock.patch.object(notebook, 'in_notebook', return_value=True), \
        mock.patch.object(tqdm_notebook, 'IProgress', None):
      self.assertIs(notebook.tqdm_class(), tqdm.tqdm)
      bar = writer_lib.progress_bar(10, file=out, mininterval=0)
      bar.update(3)
      bar.close()
    self.assertIn('3/10', out.getvalue())


if __name__ == '__main__':
  absltest.main()
