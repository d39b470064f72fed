"""Running inside a notebook (Jupyter, Colab): detection and progress bars.

The library prints and plots the same way everywhere; only two things
depend on where it runs. Progress bars are ipywidgets bars in a notebook
kernel that has ipywidgets (Colab, most Jupyter installs) and plain text
everywhere else, a kernel without ipywidgets included (where
``tqdm.auto`` would raise at the first bar). Plots are also shown inline
in a notebook (`hnjax.eval.plots.show`).
"""

import sys

import tqdm


def in_notebook() -> bool:
  """Whether this process is an IPython kernel (Jupyter, Colab).

  A plain ``ipython`` terminal is not a notebook: it has no kernel.
  """
  ipython = sys.modules.get('IPython')  # never imported just to ask
  shell = ipython.get_ipython() if ipython is not None else None
  return shell is not None and getattr(shell, 'kernel', None) is not None


def tqdm_class() -> type[tqdm.tqdm]:
  """The tqdm bar for this process: a widget in a notebook, else text."""
  if in_notebook():
    try:
      from tqdm import notebook  # pylint: disable=g-import-not-at-top
    except ImportError:
      return tqdm.tqdm
    # tqdm.notebook imports without ipywidgets but raises at the first bar.
    if getattr(notebook, 'IProgress', None) is not None:
      return notebook.tqdm
  return tqdm.tqdm
