#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned dependencies and this package; idempotent and quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setting up .venv (pinned dependencies from requirements-lock.txt; about a minute)..."
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum requirements-lock.txt pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade "pip==25.3"
  .venv/bin/python -m pip install -q -r requirements-lock.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  rm -f .venv/.installed-*
  touch "$stamp"
fi
