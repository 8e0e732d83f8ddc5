#!/usr/bin/env bash
# Install (if needed) and run the whole test suite. This is what CI runs (.ci/run).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# The browser tests drive Debian's headless Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/tmp/covidcxr-apt.log 2>&1 \
      || echo "warning: could not install chromium (see /tmp/covidcxr-apt.log)"
  else
    echo "warning: chromium not found; install Debian's 'chromium' package for the browser tests"
  fi
fi
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" = 5 ]; then echo "pytest collected no tests"; fi
exit "$rc"
