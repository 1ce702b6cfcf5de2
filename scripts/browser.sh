#!/usr/bin/env bash
# Make sure the headless browser the viewer tests drive is installed: Debian's chromium,
# which playwright launches with executable_path=/usr/bin/chromium. Idempotent and quiet;
# returns at once when chromium is already there. Needs root (or sudo) to install.
set -euo pipefail
CHROMIUM="${INFD_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "infd: $CHROMIUM is missing and there is no apt-get; install chromium by hand (the browser tests skip without it)." >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "infd: installing chromium needs root; run: apt-get install -y chromium (the browser tests skip without it)." >&2
        exit 0
    fi
fi
echo "infd: installing chromium for the viewer's browser tests"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
[ -x "$CHROMIUM" ] || { echo "infd: chromium was installed but $CHROMIUM is not there." >&2; exit 1; }
