#!/usr/bin/env bash
# The main job on a fresh machine: install, then import + split + audit the shared data, train the
# quick shortcut-aware model on lung-ROI inputs (the shipped lung segmenter finds every image's lungs
# once; masks are cached), evaluate it on the held-out patient split (per source), audit it for
# shortcuts and write the HTML report. See the README for measured times.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export COVIDCXR_DATA_ROOT=${COVIDCXR_DATA_ROOT:-$(cd .. && pwd)/shared/data/cxr}
export COVIDCXR_WEIGHTS_DIR=${COVIDCXR_WEIGHTS_DIR:-$(cd .. && pwd)/shared/weights}
RUN=${1:-runs/quick}
DATA=runs/data
cx() { .venv/bin/covidcxr "$@"; }

cx data import covidcxr "$COVIDCXR_DATA_ROOT/manifest.csv" --out "$DATA/manifest.csv"
cx data split "$DATA/manifest.csv" --out "$DATA/split.csv" --seed 0
# The audit exits 1 on errors (patient leakage, duplicates across splits); warnings are printed.
cx data audit "$DATA/split.csv" --json "$DATA/audit.json" --plot "$DATA/audit.png"
[ -e "$RUN" ] && rm -rf "$RUN.previous" && mv "$RUN" "$RUN.previous"
cx train configs/quick.yaml --out "$RUN" "data.manifest=$DATA/split.csv"
# The run stores the rows it trained, validated and tested on (RUN/split.csv): evaluate its own test split.
cx evaluate "$RUN" --split test --by source
mapfile -t GALLERY < <(.venv/bin/python -c "
import pandas as pd, sys
from covidcxr.data.manifest import Manifest
m = Manifest.read('$RUN/split.csv'); t = m.table
test = t[(t.run_split == 'test')].groupby('source', group_keys=False).head(3)
print('\n'.join(str(m.root / p) for p in test.image))")
cx explain "$RUN" "${GALLERY[@]}" --method gradcam
# The shortcut scorecard (docs/audits.md) on a seeded sample of 20 test images per source and class:
# recorded in run.json, shown at the top of the report. It reports; a failed check does not stop the job.
cx audit shortcuts "$RUN" --limit-per-source 20
cx report "$RUN"
echo "open $RUN/report.html"
