"""Runs every docstring example in the hnjax package."""

import doctest
import importlib
import pkgutil

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp

import hnjax


def _modules():
  for info in pkgutil.walk_packages(hnjax.__path__, 'hnjax.'):
    yield info.name


class DocstringsTest(parameterized.TestCase):

  @parameterized.parameters(*_modules())
  def test_examples(self, name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, extraglobs={'jnp': jnp}, report=True,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    self.assertEqual(result.failed, 0, f'{result.failed} failing examples '
                     f'in {name}; run python -m doctest -v on it')


if __name__ == '__main__':
  absltest.main()
