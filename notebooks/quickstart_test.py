"""notebooks/quickstart.ipynb runs top to bottom (small mode, CPU).

Run by CI after the test suite (``python -m pytest notebooks``); kept out of
``tests/`` so the suite stays within its time budget. The kernel inherits
this process's environment: 8 fake CPU devices (conftest.py here).
"""

import os

import nbclient
import nbformat

_NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         'quickstart.ipynb')


def _outputs(cell, output_type):
  return [o for o in cell.get('outputs', []) if o['output_type'] == output_type]


def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
  nb = nbformat.read(_NOTEBOOK, as_version=4)
  # Checked in clean: outputs belong to whoever runs it.
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None
  monkeypatch.setenv('HNJAX_NOTEBOOK_SMOKE', '1')
  monkeypatch.setenv('HNJAX_NOTEBOOK_WORKDIR', str(tmp_path / 'runs'))
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name='python3',
      resources={'metadata': {'path': os.path.dirname(_NOTEBOOK)}})
  client.execute()  # raises CellExecutionError naming the failing cell

  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in _outputs(c, 'stream'))
  assert 'hnjax is importable: nothing to install' in text
  assert '8 devices' in text
  images = [o for c in nb.cells if c.cell_type == 'code'
            for o in _outputs(c, 'display_data') if 'image/png' in o['data']]
  # The toy picture; MoCHi's 3 curves, histogram and hardness; SupReMix's
  # 2 and CLIP's 2 figures.
  assert len(images) >= 10, len(images)
  # The progress bars are widgets (ipywidgets is installed), one per stage.
  widgets = [o for c in nb.cells if c.cell_type == 'code'
             for o in _outputs(c, 'display_data')
             if 'application/vnd.jupyter.widget-view+json' in o['data']]
  assert len(widgets) >= 3, len(widgets)
  workdir = tmp_path / 'runs-smoke'
  for name in ('mochi_toy.png', 'mochi/loss.png', 'mochi/hardness.png',
               'supremix/embedding_2d.png', 'clip_mixup/recall_at_k.png'):
    assert (workdir / name).is_file(), name
