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
# The PACS tests (tests/test_dicom_node.py) run Debian's Orthanc with its DICOMweb plugin.
if ! command -v Orthanc >/dev/null 2>&1 || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb) \
      >/tmp/covidcxr-apt-orthanc.log 2>&1 || echo "warning: could not install orthanc (see /tmp/covidcxr-apt-orthanc.log)"
  else
    echo "warning: Orthanc not found; install Debian's 'orthanc' and 'orthanc-dicomweb' packages for the PACS tests"
  fi
fi
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" = 5 ]; then echo "pytest collected no tests"; fi
exit "$rc"
