"""Lung segmentation benchmark: train the real segmenter, score held-out patients, draw unseen sources.

    .venv/bin/python bench/segment.py [--image-size 256] [--epochs 10] [--threads 1] [--run-dir DIR]

Trains ``covidcxr segment train``'s model (U-Net, MobileNetV2 encoder from the shared ImageNet weights) on
all shared v7labs + lungVAE masks (patient split 65 / 15 / 20), on the CPU. Writes
``bench/results/segment.json``: held-out Dice and HD95 (MONAI, in the stored images' geometry, 95%
patient-bootstrap CIs) next to the majority-template baseline, wall time, peak RSS
(``resource.getrusage``), and the predicted lung fraction of each contact-sheet image. The contact
sheet ``docs/img/segment_contact.png`` shows predictions on images unlike the training masks (which are
all adult ieee8023 COVID-collection images): Kermany children, NIH, RSNA, the two DICOMs, Figure1.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "segment.json"
SHEET = REPO / "docs" / "img" / "segment_contact.png"
#: Two images per unseen source, picked by file name (stable across runs).
SHEET_IMAGES = {
    "Kermany (child)": ["images/kermany/normal/NORMAL2-IM-1302-0001.jpg", "images/kermany/pneumonia/person489_virus_994.jpg"],
    "NIH": ["images/nih/pneumonia/00000499_008.jpg", "images/nih/pneumonia/00000773_001.jpg"],
    "RSNA": None,  # the first two RSNA rows of the manifest
    "DICOM": ["dicom/RG1_UNCR.dcm", "dicom/RG1_J2KI.dcm"],
    "Figure1": ["images/figure1/covid/COVID-00015b.jpg", None],
}


def _sheet_paths(root: Path) -> list[tuple[str, Path]]:
    import pandas as pd

    manifest = pd.read_csv(root / "manifest.csv")
    out = []
    for source, names in SHEET_IMAGES.items():
        if names is None:
            names = manifest[manifest["patient_id"].str.startswith("rsna:")]["image"].head(2).tolist()
        names = [n if n is not None else manifest[manifest["patient_id"].str.startswith("figure1:")]["image"].iloc[1]
                 for n in names]
        out += [(source, root / n) for n in names]
    return out


def _contact_sheet(run_dir: Path, items: list[tuple[str, Path]], out_png: Path) -> list[dict]:
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from covidcxr.data.io import read_xray
    from covidcxr.serving.segment import segment_images

    with tempfile.TemporaryDirectory() as tmp:
        result = segment_images(run_dir, [p for _, p in items], tmp)
        lungs = pd.read_csv(Path(tmp) / "lungs.csv").set_index("image")
        skipped = dict(result.skipped)
        fig, axes = plt.subplots(2, 5, figsize=(15, 6.8))
        rows = []
        for ax, (source, path) in zip(axes.T.ravel(), items):
            pixels = read_xray(path).pixels
            ax.imshow(pixels, cmap="gray", vmin=0, vmax=1)
            if str(path) in lungs.index:
                row = lungs.loc[str(path)]
                mask = cv2.imread(str(Path(tmp) / row["mask"]), cv2.IMREAD_GRAYSCALE) > 0
                ax.contour(mask, levels=[0.5], colors="lime", linewidths=1.2)
                note = f"lungs {row['lung_fraction']:.0%} of image, {int(row['components'])} parts"
                rows.append({"source": source, "image": path.name, "lung_fraction": float(row["lung_fraction"]),
                             "components": int(row["components"]), "size": [int(row["width"]), int(row["height"])]})
            else:
                note = "skipped: " + skipped.get(str(path), "?")[:40]
                rows.append({"source": source, "image": path.name, "skipped": skipped.get(str(path))})
            ax.set_title(f"{source}: {path.name[:22]}\n{note}", fontsize=8)
            ax.axis("off")
        fig.suptitle("covidcxr lung segmenter on sources it was not trained on (green: predicted lung outline)",
                     fontsize=11)
        fig.tight_layout()
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=80)
        plt.close(fig)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-masks", type=int, default=None, help="patient-grouped subset (smoke runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a contended 2-core box)")
    ap.add_argument("--run-dir", type=Path, default=None, help="where the run directory goes (default: a temp dir)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--sheet", type=Path, default=SHEET)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))

    import torch

    from covidcxr.files import write_json
    from covidcxr.models.segmenter import read_segmenter_record
    from covidcxr.paths import data_root
    from covidcxr.training.segment import load_segment_config, train_segmenter

    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="covidcxr-segment-")) / "run"
    cfg = load_segment_config(None, [f"image_size={args.image_size}", f"epochs={args.epochs}",
                                     f"batch_size={args.batch_size}", f"lr={args.lr}", f"threads={args.threads}"]
                              + ([f"max_masks={args.max_masks}"] if args.max_masks else []))
    started = time.time()
    metrics = train_segmenter(cfg, run_dir)
    train_s = time.time() - started
    record = read_segmenter_record(run_dir)
    sheet = _contact_sheet(run_dir, _sheet_paths(data_root()), args.sheet)
    result = {
        "what": "lung segmentation: smp U-Net (MobileNetV2 encoder, shared ImageNet weights) trained on the shared "
                "v7labs + lungVAE masks; held-out patients scored in stored-image geometry with MONAI Dice / HD95",
        "config": record.config, "data": {k: v for k, v in record.data.items() if k != "root"},
        "split_counts": record.split.counts if record.split else {},
        "test": metrics["test"], "baseline_template": metrics["baseline_template"],
        "test_by_kind": metrics["test_by_kind"], "selection": metrics["selection"],
        "history": record.info.get("history"),
        "wall_s": round(time.time() - started, 1), "train_and_score_s": round(train_s, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "contact_sheet": {"file": str(args.sheet.relative_to(REPO)) if args.sheet.is_relative_to(REPO) else str(args.sheet),
                          "images": sheet},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "segmentation_models_pytorch": record.info.get("segmentation_models_pytorch"),
                    "monai": record.info.get("monai"), "note": "2 cores shared with other jobs"},
        "run_dir": str(run_dir),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.results, result)
    t = metrics["test"]
    print(f"Dice {t['dice']['mean']:.3f} [{t['dice']['ci_low']:.3f}, {t['dice']['ci_high']:.3f}], HD95 "
          f"{t['hd95_px']['mean']:.1f} px; baseline Dice {metrics['baseline_template']['dice']['mean']:.3f}; "
          f"{result['wall_s']:.0f} s; wrote {args.results} and {args.sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
