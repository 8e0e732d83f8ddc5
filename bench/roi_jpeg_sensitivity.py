"""Where a lung-ROI model's sensitivity to JPEG re-compression comes from: the classifier, or the lung mask.

    python bench/roi_jpeg_sensitivity.py [RUN ...] [--group NAME=RUN,RUN ...] [--per-source 10]
                                         [--out bench/results/roi_jpeg_sensitivity.json]

The shortcut scorecard and issue 10's proxy re-save test images as JPEG (quality 90 / 70 / 50) and
measure the mean |change of P(covid)| against a lossless PNG copy. For a run with ``roi: lungs`` the
re-saved image goes through the lung segmenter again, so two things change at once: the pixels the
classifier sees, and the mask and box the segmenter draws. This script separates them. For each test
image (up to ``--per-source`` per source, seeded) it scores the JPEG copy

* with its own lung ROI, as ``predict`` does (the scorecard's number), and
* with the ROI of the PNG copy (the same box and mask, only the JPEG pixels inside differ),

and reports both means, their difference (the part the moved mask causes), the box IoU and the mask
IoU between the two ROIs, with the run's AUC and within-source AUC on its whole test split. Each RUN
must be a single lung-ROI model (an ensemble member, say). ``--group NAME=RUN,RUN`` averages runs (the
seeds of one recipe) under a name.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("COVIDCXR_DATA_ROOT", str(HERE.parent.parent / "shared" / "data" / "cxr"))
os.environ.setdefault("COVIDCXR_WEIGHTS_DIR", str(HERE.parent.parent / "shared" / "weights"))

QUALITIES = (90, 70, 50)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _box_iou(a, b) -> float:
    """IoU of two (top, left, bottom, right) boxes."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / max(1, area(a) + area(b) - inter)


def measure(run_dir: Path, per_source: int, seed: int, work: Path) -> dict:
    import torch

    from covidcxr.data.io import read_xray
    from covidcxr.data.lung_roi import locate_lungs
    from covidcxr.data.preprocess import prepare, to_tensor, working_image
    from covidcxr.errors import ConfigError
    from covidcxr.evaluation.proxies import compression_sample, discrimination, predict_files, split_rows
    from covidcxr.evaluation.proxy_images import resaved_copies
    from covidcxr.models.run import load_run

    run = load_run(run_dir)
    if run.spec.roi != "lungs" or run.record.members:
        raise ConfigError(f"{run_dir}: needs a single model with roi: lungs (an ensemble: pass its members)")
    test = split_rows(run, "test")
    rows = compression_sample(test, per_source, seed)
    copies = resaved_copies(rows["path"].tolist(), work, QUALITIES)
    pos = run.classes.index(run.positive_class)

    def load(path):
        working = working_image(read_xray(path).pixels, run.spec.working_size)
        return working, locate_lungs(working, run.spec, run.lung_finder, str(path))

    def score(pairs) -> np.ndarray:
        x = torch.stack([to_tensor(prepare(w, run.spec, roi), run.spec) for w, roi in pairs])
        return np.concatenate([run.predict_tensor(x[i:i + 32])[:, pos] for i in range(0, len(x), 32)])

    png = [load(p) for p in copies["png"]]
    p_png = score(png)
    # what the model is worth on its whole test split
    d = discrimination(test["y"].to_numpy(), predict_files(run, test["path"])[0]["score"].to_numpy(),
                       test["source"].astype(str).to_numpy())
    out = {"run": str(run_dir), "images": int(len(rows)), "sources": rows["source"].value_counts().to_dict(),
           "test_auc": d["auc"], "test_within_source_auc": d.get("within_source_auc")}
    for q in QUALITIES:
        jpeg = [load(p) for p in copies[f"q{q}"]]
        own = np.abs(score(jpeg) - p_png)
        fixed = np.abs(score([(w, roi) for (w, _), (_, roi) in zip(jpeg, png)]) - p_png)
        box_iou = np.array([_box_iou(a.box, b.box) for (_, a), (_, b) in zip(png, jpeg)])
        mask_iou = np.array([_iou(a.keep, b.keep) for (_, a), (_, b) in zip(png, jpeg)
                             if a.keep is not None and b.keep is not None])
        out[f"q{q}"] = {"mean_abs_dp_own_roi": float(own.mean()), "mean_abs_dp_png_roi": float(fixed.mean()),
                        "share_from_moved_roi": float(1 - fixed.mean() / own.mean()) if own.mean() > 0 else None,
                        "box_iou_mean": float(box_iou.mean()), "box_iou_min": float(box_iou.min()),
                        "mask_iou_mean": float(mask_iou.mean()) if len(mask_iou) else None,
                        "mask_iou_min": float(mask_iou.min()) if len(mask_iou) else None}
        print(f"{run_dir} q{q}: |dP| own ROI {own.mean():.3f}, PNG's ROI {fixed.mean():.3f}; "
              f"box IoU {box_iou.mean():.3f}, mask IoU {out[f'q{q}']['mask_iou_mean']}", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--group", action="append", default=[], metavar="NAME=RUN,RUN",
                    help="runs of one recipe (its seeds), averaged under NAME")
    ap.add_argument("--per-source", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/covidcxr_roi_jpeg"), help="re-saved copies")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "roi_jpeg_sensitivity.json")
    args = ap.parse_args(argv)
    from covidcxr.files import write_json

    t0 = time.perf_counter()
    groups = {"runs": [str(r) for r in args.runs]} if args.runs else {}
    for g in args.group:
        name, sep, paths = g.partition("=")
        if not sep or not paths:
            ap.error(f"--group {g!r}: expected NAME=RUN,RUN")
        groups[name] = paths.split(",")
    if not groups:
        ap.error("give RUN paths or --group NAME=RUN,RUN")
    results = {}
    for name, members in groups.items():
        runs = [measure(Path(r), args.per_source, args.seed, args.work) for r in members]
        mean = {f"q{q}": {k: float(np.mean([r[f"q{q}"][k] for r in runs]))
                          for k in ("mean_abs_dp_own_roi", "mean_abs_dp_png_roi", "box_iou_mean", "mask_iou_mean")}
                for q in QUALITIES}
        mean["test_auc"] = float(np.mean([r["test_auc"]["value"] for r in runs]))
        mean["test_within_source_auc"] = float(np.mean([r["test_within_source_auc"]["value"] for r in runs]))
        results[name] = {"runs": runs, "mean_over_runs": mean}
    write_json(args.out, {"benchmark": "JPEG sensitivity of lung-ROI models: classifier against moved lung ROI",
                          "groups": results, "wall_s": round(time.perf_counter() - t0, 1),
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
