"""The README's Python examples run as written."""

import os
import re

from absl.testing import absltest

_README = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'README.md')


class ReadmeTest(absltest.TestCase):

  def test_python_blocks_run(self):
    with open(_README) as f:
      blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
    self.assertGreaterEqual(len(blocks), 2)
    for block in blocks:
      exec(compile(block, 'README.md', 'exec'), {})  # pylint: disable=exec-used

  def test_ci_runs_the_readme_test_command(self):
    with open(_README) as f:
      commands = re.findall(r'```bash\n(.*?)\n```', f.read(), re.S)
    ci = open(os.path.join(os.path.dirname(_README), '.ci', 'run')).read()
    self.assertIn(commands[1].strip(), ci)


if __name__ == '__main__':
  absltest.main()
