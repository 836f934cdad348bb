"""The README's library quick start runs as written."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_quick_start_block_runs():
  text = open(README, encoding="utf-8").read()
  section = text.split("## Quick start (library)", 1)[1]
  block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert "decoding.decode_step" in block and "assert" in block
  exec(compile(block, "README.md quick start", "exec"), {})
