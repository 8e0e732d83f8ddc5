"""Benchmark: `covidcxr train configs/quick.yaml` on the shared data (CPU), wall time + peak RSS + val metrics.

    python bench/train_quick.py [--config configs/quick.yaml] [--name train_quick] [key=value ...]

Writes bench/results/<name>.json: wall seconds, peak RSS, torch threads, machine load at start and
end (the CPU is often shared, so note contention), and per-epoch val AUC / within-source AUC.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from covidcxr.files import write_json
from covidcxr.training import run_training

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(HERE.parent / "configs" / "quick.yaml"))
    ap.add_argument("--name", default="train_quick")
    ap.add_argument("--keep", default=None, help="keep the run directory here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp()) / "run"
    if out.exists():
        shutil.rmtree(out)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    run_training(args.config, out, overrides=args.overrides)
    wall = time.perf_counter() - t0
    record = json.loads((out / "run.json").read_text())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {
        "config": str(Path(args.config).name), "overrides": args.overrides, "wall_s": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        # CPU seconds (user + system): less sensitive than wall time to other processes sharing the CPU.
        "cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_start": [round(v, 2) for v in load_start], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "selection": record["info"]["selection"], "threshold": record["threshold"],
        "epochs": [{k: e.get(k) for k in ("epoch", "train_loss", "val_loss", "val_auc", "val_within_source_auc",
                                           "val_auc_per_source", "images_per_s", "train_seconds", "val_seconds")}
                   for e in epochs],
        "val_images": record["info"]["data"]["val_images"],
    }
    (HERE / "results").mkdir(exist_ok=True)
    write_json(HERE / "results" / f"{args.name}.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
