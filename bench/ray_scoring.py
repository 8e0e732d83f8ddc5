"""Ray batch scoring throughput at 1 and 2 actors (``covidcxr predict --engine ray``), side by side.

    .venv/bin/python bench/ray_scoring.py --run-dir RUN [--images 200] [--rounds 2] [--address ADDR]

One local Ray instance (or ``--address auto`` / ``ray://head:10001`` for an existing cluster) is
started once; then ``score_with_ray`` runs alternately with 1 and 2 actors (each actor 1 thread)
over the same shared JPEGs, into fresh output folders. Reported per run: wall seconds (actor start,
reading, preprocessing, model, partition writes; ``ray.init`` excluded and timed separately),
images/s, and the driver's peak RSS. Writes ``bench/results/ray_scoring.json``.

On a cluster the run directory and the images must be on storage every node sees at the same path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "ray_scoring.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--address", default=None)
    a = ap.parse_args()
    import ray

    from covidcxr.serving.ray_scoring import score_with_ray
    from inference_baselines import _vmhwm_mb, shared_jpegs

    files = shared_jpegs(a.images)
    t0 = time.perf_counter()
    if a.address:
        ray.init(address=a.address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(a.actors) + 1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - t0
    runs = {n: [] for n in a.actors}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for n in a.actors:  # alternating, so both see the same background load
                res = score_with_ray(a.run_dir, files, Path(tmp) / f"out_{n}_{r}", actors=n, batch_size=16,
                                     partition_size=64)
                runs[n].append({"wall_s": round(res.seconds, 2), "images": res.predicted,
                                "images_per_s": round(res.images_per_second, 2), "partitions": res.partitions_total})
    med = {n: statistics.median(x["images_per_s"] for x in v) for n, v in runs.items()}
    result = {"benchmark": "ray_scoring", "run_dir": str(a.run_dir), "images": len(files), "rounds": a.rounds,
              "cluster": a.address or "local (ray.init on this machine)", "ray": ray.__version__,
              "cpu_count": os.cpu_count(), "ray_init_s": round(init_s, 2), "runs": runs,
              "median_images_per_s": med,
              "speedup_2_over_1_actor": round(med[2] / med[1], 3) if 1 in med and 2 in med else None,
              "driver_peak_rss_mb": round(_vmhwm_mb(), 1),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "shared_machine_note": "2 CPU cores shared with other agents' jobs: 2 actors cannot get 2 free cores; "
                                     "the ratio is measured side by side in this one run"}
    ray.shutdown()
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
