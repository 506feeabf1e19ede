#!/usr/bin/env bash
# Installs what tests/server/test_playground.py needs from Debian: Chromium and its matching
# chromedriver (the `selenium` Python package comes with the `test` extra). Idempotent and quiet:
# nothing is done when both are already there. Browsers are never downloaded from anywhere else,
# so the driver always matches the browser and the test needs no network. Recommends are skipped
# (printer and desktop tools); the one that matters, a font, is named so the page renders text.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "browser.sh: chromium/chromedriver missing and neither root nor sudo to install them" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
