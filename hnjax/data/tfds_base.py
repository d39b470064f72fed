"""Base class of the local (generated, download-free) tfds builders."""

import inspect

from etils import epath
import tensorflow_datasets as tfds


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A ``GeneratorBasedBuilder`` whose code is located without resources.

  tfds 4.9.10 locates a builder's code (to look for URL checksums) through
  the ``importlib_resources`` backport when the builder lives in a package,
  and fails with ``ModuleNotFoundError`` when that package is not installed.
  Our builders download nothing, so the plain source file path is enough.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=no-self-argument
    return epath.Path(inspect.getfile(cls))
