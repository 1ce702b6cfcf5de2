#!/usr/bin/env bash
# Lint the whole repository with the locked ruff (rules in pyproject.toml [tool.ruff]); non-zero on any finding.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" test
ruff check "$@" .
