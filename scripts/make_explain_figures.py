"""Make the README's explainability figures from a trained run.

    .venv/bin/python scripts/make_explain_figures.py RUN_DIR [--manifest SPLIT.csv] [--out docs/img] [--image REL] [--patient ID]

Writes ``explain_overlay.png`` (Grad-CAM overlay with the lung outline) and
``explain_progression.png`` (one patient's serial X-rays) into ``--out``, each kept under 300 KB
(re-saved as a 256-colour PNG when larger). Image paths are relative to the data root
(``$COVIDCXR_DATA_ROOT`` or ``../shared/data/cxr``). With ``--manifest`` (the split manifest the run
was trained with) the image and the patient are picked from its *test* split - the first test image
with a v7labs lung mask, and the test patient with the most serial studies - so the figures do not
show the model explaining images it was trained on.
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


def pick_from_test_split(manifest_path: Path, split: str = "test") -> tuple[str, str]:
    """(image relative to the data root, patient_id) from the manifest's test split."""
    from covidcxr.data.manifest import Manifest
    from covidcxr.data.annotations import Annotations
    from covidcxr.explain.progression import serial_patients

    manifest = Manifest.read(manifest_path)
    test = manifest.subset(split)
    ann = Annotations(paths.data_root() / "annotations")
    keys = [ann.relative_key(p) for p in test.image_paths()]
    images = [k for k in keys if k and "v7labs" in ann.available(k)]
    patients = serial_patients(test, min_studies=2)
    if not images or patients.empty:
        raise SystemExit(f"{manifest_path}: no annotated image or serial patient in split {split!r}; pass --image / --patient")
    return images[0], str(patients.index[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    ap.add_argument("--manifest", type=Path, help="split manifest of the run: pick image and patient from its test split")
    ap.add_argument("--image", help=f"image path relative to the data root (default {DEFAULT_IMAGE})")
    ap.add_argument("--patient", help=f"patient_id with serial studies in manifest.csv (default {DEFAULT_PATIENT})")
    ap.add_argument("--method", default="gradcam")
    args = ap.parse_args()

    root = paths.data_root()
    picked = pick_from_test_split(args.manifest) if args.manifest else (DEFAULT_IMAGE, DEFAULT_PATIENT)
    args.image = args.image or picked[0]
    args.patient = args.patient or picked[1]
    run = load_run(args.run_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        summary = explain_images(args.run_dir, [root / args.image], method=args.method, out=tmp, run=run)
        entry = summary["images"][0]
        overlay = shrink_png(Path(shutil.copyfile(Path(tmp) / entry["overlay"], args.out / "explain_overlay.png")))
        prog = plot_progression(args.run_dir, root / "manifest.csv", args.patient, method=args.method, out=tmp, run=run)
        progression = shrink_png(Path(shutil.copyfile(Path(tmp) / prog["figure"], args.out / "explain_progression.png")))
    print(json.dumps({
        "image": args.image, "patient": args.patient,
        "overlay": str(overlay), "overlay_bytes": overlay.stat().st_size,
        "probabilities": entry["probabilities"], "lung_focus": entry["lung_focus"],
        "progression": str(progression), "progression_bytes": progression.stat().st_size,
        "progression_probabilities": [(s["offset_days"], round(s["probability"], 3)) for s in prog["studies"]],
    }, indent=2))


if __name__ == "__main__":
    main()
