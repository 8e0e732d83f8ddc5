#!/usr/bin/env bash
# Create .venv and install covidcxr with pinned dependencies (idempotent, ~2-3 minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import covidcxr, torch, torchvision, timm" >/dev/null 2>&1 \
   || [ constraints.txt -nt .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  touch .venv/.installed
fi
