"""Heatmap throughput per CAM method (images/s) with peak RSS, on real shared X-rays.

    .venv/bin/python bench/explain_speed.py RUN_DIR [--images 16] [--methods gradcam,gradcam++,...]
    .venv/bin/python bench/explain_speed.py --imagenet-lite0 [--size 224]   # no run needed

Each method runs in a fresh subprocess (so its peak RSS is its own): preprocess a fixed sample of
shared images, then ``compute_cams`` on them in batches of 8, single-threaded (``torch.set_num_threads(1)``).
``--road`` also times ROAD scoring for gradcam. Writes ``bench/results/explain_speed.json``. The
numbers come from a shared 2-core machine: compare methods with each other more than across runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "explain_speed.json"
DEFAULT_METHODS = "gradcam,gradcam++,hirescam,layercam,eigencam,xgradcam,scorecam"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_method(run_dir: str, method: str, n: int, road: bool) -> dict:
    import torch

    from covidcxr import paths
    from covidcxr.data.io import read_xray
    from covidcxr.data.preprocess import preprocess
    from covidcxr.data.annotations import Annotations
    from covidcxr.explain.cam import cam_models, compute_cams
    from covidcxr.explain.faithfulness import road_scores
    from covidcxr.models.run import load_run

    torch.set_num_threads(1)
    root = paths.data_root()
    images = list(Annotations(root / "annotations").severity_scores()["image"])[:n]
    run = load_run(run_dir)
    inputs = torch.stack([preprocess(read_xray(root / p).pixels, run.spec) for p in images])
    start = time.perf_counter()
    cams = compute_cams(run, inputs, method=method, batch_size=8)
    seconds = time.perf_counter() - start
    out = {"method": method, "images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 3),
           "image_size": run.spec.image_size, "layers": [m.layer for m in cam_models(run)]}
    if road:
        start = time.perf_counter()
        road_scores(run.model, inputs, cams, [run.positive_index or 0] * n)
        out["road_seconds_per_image"] = round((time.perf_counter() - start) / n, 3)
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def imagenet_lite0_run(size: int) -> str:
    from covidcxr import paths
    from covidcxr.data.preprocess import PreprocessSpec
    from covidcxr.models.registry import create_model
    from covidcxr.models.run import save_model

    d = Path(tempfile.mkdtemp(prefix="explain-bench-"))
    model = create_model("tf_efficientnet_lite0", 2, weights=str(paths.weights_dir() / "efficientnet_lite0_imagenet_timm.pth"))
    save_model(d, model, architecture="tf_efficientnet_lite0", classes=["non-covid", "covid"],
               preprocess_spec=PreprocessSpec(image_size=size, mean=(0.5,) * 3, std=(0.5,) * 3))
    return str(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--imagenet-lite0", action="store_true", help="bench an ImageNet EfficientNet-Lite0 with a new head")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--road", action="store_true")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(run_method(args.run_dir, args.phase, args.images, args.road)))
        return
    run_dir = args.run_dir or (imagenet_lite0_run(args.size) if args.imagenet_lite0 else None)
    if run_dir is None:
        ap.error("give RUN_DIR or --imagenet-lite0")
    results = []
    for method in args.methods.split(","):
        # ScoreCAM makes one forward pass per channel of the layer (1280 for EfficientNet's bn2): 2 images suffice.
        n = min(args.images, 2) if method == "scorecam" else args.images
        cmd = [sys.executable, __file__, run_dir, "--phase", method, "--images", str(n)]
        if args.road and method == "gradcam":
            cmd.append("--road")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"run_dir": run_dir, "threads": 1, "machine": platform.platform(),
                                   "python": platform.python_version(), "results": results}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
