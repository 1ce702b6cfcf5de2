# Sourced by demo.sh and test.sh: make .venv (if missing) and install into it exactly the
# locked versions the test suite passed with (requirements/lock.txt, plus
# requirements/lock-test.txt for the test extras), then infd itself without dependencies.
# Regenerate the lock after a deliberate upgrade with scripts/lock.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${1:-}"
PYTHON_BIN="${PYTHON:-$(command -v python3.11 || command -v python3)}"
LOCK="requirements/lock.txt"
[ "$EXTRAS" = "test" ] && LOCK="requirements/lock-test.txt"
if [ ! -x .venv/bin/python ]; then
    echo "infd: creating .venv with $PYTHON_BIN"
    "$PYTHON_BIN" -m venv .venv
fi
VENV_PY="$ROOT/.venv/bin/python"
STAMP=".venv/.infd-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ requirements/lock.txt -nt "$STAMP" ] || [ "$LOCK" -nt "$STAMP" ]; then
    echo "infd: installing the locked dependencies ($LOCK; torch is a large download the first time)"
    # --no-deps: the lock lists every package, direct and transitive, so nothing else is resolved.
    "$VENV_PY" -m pip install --quiet --disable-pip-version-check --no-deps -r "$LOCK"
    "$VENV_PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
    "$VENV_PY" -m pip check --disable-pip-version-check >/dev/null || { "$VENV_PY" -m pip check --disable-pip-version-check >&2; exit 1; }
    touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1
