#!/usr/bin/env bash
# What the browser test (tests/browser, marker `browser`) needs beyond .venv:
#   - Debian's chromium and chromedriver (apt; nothing is downloaded by the test itself)
#   - selenium (PyPI), which drives /usr/bin/chromedriver given explicitly: its
#     "Selenium Manager" never has to fetch a browser or a driver.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
fi
"$VENV/bin/python" -c "import selenium" 2>/dev/null || "$VENV/bin/python" -m pip install -q "selenium>=4.20"
chromium --version 2>/dev/null | tail -n 1
chromedriver --version
