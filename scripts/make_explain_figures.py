"""Make the README's explainability figures from a trained run.

    .venv/bin/python scripts/make_explain_figures.py RUN_DIR [--out docs/img] [--image REL] [--patient ID]

Writes ``explain_overlay.png`` (Grad-CAM overlay with the lung outline) and
``explain_progression.png`` (one patient's serial X-rays) into ``--out``, each kept under 300 KB
(re-saved as a 256-colour PNG when larger). Image paths are relative to the data root
(``$COVIDCXR_DATA_ROOT`` or ``../shared/data/cxr``). Prefer an image and a patient from the run's
*test* split, so the figure does not show the model explaining an image it was trained on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from covidcxr import paths
from covidcxr.explain.images import explain_images
from covidcxr.explain.progression import plot_progression
from covidcxr.models.run import load_run

MAX_BYTES = 300_000
DEFAULT_IMAGE = "images/ieee8023/covid/1-s2.0-S0140673620303706-fx1_lrg.jpg"
DEFAULT_PATIENT = "ieee8023:205"


def shrink_png(path: Path, max_bytes: int = MAX_BYTES) -> Path:
    """Re-save as an optimised 256-colour PNG when the file is larger than ``max_bytes``."""
    if path.stat().st_size <= max_bytes:
        return path
    from PIL import Image

    with Image.open(path) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    ap.add_argument("--image", default=DEFAULT_IMAGE, help="image path relative to the data root")
    ap.add_argument("--patient", default=DEFAULT_PATIENT, help="patient_id with serial studies in manifest.csv")
    ap.add_argument("--method", default="gradcam")
    args = ap.parse_args()

    root = paths.data_root()
    run = load_run(args.run_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        summary = explain_images(args.run_dir, [root / args.image], method=args.method, out=tmp, run=run)
        entry = summary["images"][0]
        overlay = shrink_png(Path(shutil.copyfile(Path(tmp) / entry["overlay"], args.out / "explain_overlay.png")))
        prog = plot_progression(args.run_dir, root / "manifest.csv", args.patient, method=args.method, out=tmp, run=run)
        progression = shrink_png(Path(shutil.copyfile(Path(tmp) / prog["figure"], args.out / "explain_progression.png")))
    print(json.dumps({
        "overlay": str(overlay), "overlay_bytes": overlay.stat().st_size,
        "probabilities": entry["probabilities"], "lung_focus": entry["lung_focus"],
        "progression": str(progression), "progression_bytes": progression.stat().st_size,
        "progression_probabilities": [(s["offset_days"], round(s["probability"], 3)) for s in prog["studies"]],
    }, indent=2))


if __name__ == "__main__":
    main()
