"""Notebook items (nbmake) retry a Jupyter kernel that died while starting, before any cell ran.

Two kernels started at the same moment on two xdist workers can be handed the same free TCP port;
one then dies with "Address already in use" and nbclient raises "Kernel died before replying to
kernel_info" (a fresh-clone CI run in session 19 failed `long_context.ipynb` that way). No cell has
run at that point, so starting the notebook again is safe. Failures inside the notebook are not
retried. (Keeping the notebooks on one worker with xdist_group does not work here: under pytest 9
xdist's loadgroup suffix no longer reaches the node ids.)
"""

import sys

import pytest

KERNEL_START_ERROR = "Kernel died before replying to kernel_info"
ATTEMPTS = 3


def retry_kernel_start(runtest, attempts=ATTEMPTS):
  """runtest() again when it raised nbclient's kernel-start RuntimeError, up to `attempts` calls."""
  def run():
    for attempt in range(1, attempts + 1):
      try:
        return runtest()
      except RuntimeError as err:
        if KERNEL_START_ERROR not in str(err) or attempt == attempts:
          raise
        print(f"notebook kernel did not start (attempt {attempt} of {attempts}): {err}; starting it again",
              file=sys.stderr)
  return run


def pytest_collection_modifyitems(items):
  for item in items:
    if str(item.path).endswith(".ipynb"):
      item.runtest = retry_kernel_start(item.runtest)
