#!/usr/bin/env bash
# Regenerate the dependency lock after a deliberate upgrade, then prove it: build a fresh
# environment from pyproject.toml's ranges (newest versions allowed), write
# requirements/lock.txt and lock-test.txt from it (scripts/lock.py), rebuild .venv from
# the new lock exactly as a fresh clone does, and run the whole test suite. Commit the
# lock together with the change that needed it only when the suite passes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON_BIN="${PYTHON:-$(command -v python3.11 || command -v python3)}"
FRESH="$ROOT/.venv-lock"
rm -rf "$FRESH"
"$PYTHON_BIN" -m venv "$FRESH"
"$FRESH/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade setuptools wheel
"$FRESH/bin/python" -m pip install --quiet --disable-pip-version-check torch torchvision
"$FRESH/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
"$FRESH/bin/python" scripts/lock.py
rm -rf "$FRESH" .venv
bash scripts/test.sh "$@"
