# Sourced by demo.sh and test.sh: make .venv (if missing) and install infd into it.
# Torch is installed only when missing; the default build (CUDA) also runs on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${1:-}"
PYTHON_BIN="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
    echo "infd: creating .venv with $PYTHON_BIN"
    "$PYTHON_BIN" -m venv .venv
fi
VENV_PY="$ROOT/.venv/bin/python"
if ! "$VENV_PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "infd: installing torch and torchvision (about a minute)"
    "$VENV_PY" -m pip install --quiet --disable-pip-version-check torch torchvision
fi
STAMP=".venv/.infd-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "infd: installing infd${EXTRAS:+[$EXTRAS]} and its dependencies"
    "$VENV_PY" -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
    touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1
