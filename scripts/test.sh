#!/usr/bin/env bash
# Set up .venv (if missing) with the test extras and run the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" test
bash scripts/browser.sh  # Debian's chromium for the viewer's browser tests (skipped without it)
python -m pytest -q "$@"
