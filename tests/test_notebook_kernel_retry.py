"""experiments/notebooks/conftest.py: a notebook whose Jupyter kernel died while starting runs again;
any other failure is reported at once."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "notebooks" / "conftest.py"
_SPEC = importlib.util.spec_from_file_location("notebooks_conftest", _PATH)
notebooks = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(notebooks)


def _flaky(failures, error):
  calls = []

  def runtest():
    calls.append(1)
    if len(calls) <= failures:
      raise error
    return "ran"
  return runtest, calls


def test_kernel_start_failure_is_retried():
  runtest, calls = _flaky(2, RuntimeError("Kernel died before replying to kernel_info"))
  assert notebooks.retry_kernel_start(runtest, attempts=3)() == "ran"
  assert len(calls) == 3


def test_kernel_start_failure_gives_up_after_the_last_attempt():
  runtest, calls = _flaky(5, RuntimeError("Kernel died before replying to kernel_info"))
  with pytest.raises(RuntimeError, match="Kernel died"):
    notebooks.retry_kernel_start(runtest, attempts=3)()
  assert len(calls) == 3


@pytest.mark.parametrize("error", [RuntimeError("a cell raised"), ValueError("Kernel died before replying")])
def test_other_failures_are_not_retried(error):
  runtest, calls = _flaky(1, error)
  with pytest.raises(type(error)):
    notebooks.retry_kernel_start(runtest)()
  assert len(calls) == 1
