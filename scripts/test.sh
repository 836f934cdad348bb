#!/usr/bin/env bash
# Sets up and runs the test suite (unit tests and notebooks) on the CPU. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# Notebooks first: they are the longest items, and started last they leave one worker idle at the end.
exec .venv/bin/python -m pytest -n 2 --dist loadgroup -q --nbmake "$@" experiments/notebooks tests
