"""Data-audit wall time on the shared data (3,495 images), cold and warm pHash cache, with peak RSS.

    .venv/bin/python bench/audit_speed.py [--repeats 1]

Each phase runs in a fresh subprocess (so its peak RSS is its own and a warm run really reads the
cache from disk): ``split`` (assign_splits on the shared manifest), ``audit_cold`` (empty cache: read,
SHA-256, decode, pHash every image, then the pair search and tables) and ``audit_warm`` (same cache,
new process). Single-threaded. Writes ``bench/results/audit_speed.json``. The machine is a shared
2-core box, so absolute numbers vary with load; the target is "well under a minute" cold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "audit_speed.json"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_phase(phase: str) -> dict:
    from covidcxr import paths
    from covidcxr.data.audit import audit_manifest
    from covidcxr.data.manifest import Manifest
    from covidcxr.data.splits import assign_splits

    start = time.perf_counter()
    manifest = Manifest.read(paths.data_root() / "manifest.csv")
    read_s = time.perf_counter() - start
    t = time.perf_counter()
    split = assign_splits(manifest, seed=0)
    split_s = time.perf_counter() - t
    out = {"phase": phase, "images": len(manifest), "read_manifest_s": round(read_s, 3), "split_s": round(split_s, 3)}
    if phase != "split":
        t = time.perf_counter()
        cpu = time.process_time()
        report = audit_manifest(split, progress=False)
        out["audit_cpu_s"] = round(time.process_time() - cpu, 3)
        out.update({"audit_s": round(time.perf_counter() - t, 3), "audit_parts_s": report.seconds,
                    "errors": len(report.errors), "warnings": len(report.warnings),
                    "near_duplicate_pairs": int(len(report.duplicates)),
                    "images_per_second": round(len(manifest) / (time.perf_counter() - t), 1)})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["process_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)  # robust to other jobs' load
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="cold/warm pairs to run (fresh cache each)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase)))
        return

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.setdefault("COVIDCXR_DATA_ROOT", str(REPO.parent / "shared" / "data" / "cxr"))
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="audit-bench-cache-") as cache:
            env["COVIDCXR_CACHE_DIR"] = cache
            for phase in ("split", "audit_cold", "audit_warm"):
                t = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--phase", phase], env=env, cwd=REPO,
                                      capture_output=True, text=True, check=True)
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                result["process_wall_s"] = round(time.perf_counter() - t, 3)  # includes interpreter + imports
                runs.append(result)
                print(json.dumps(result))
    load = os.getloadavg()
    summary = {
        "benchmark": "audit_speed",
        "what": "audit_manifest(assign_splits(shared manifest)) on ../shared/data/cxr: 3,495 JPEGs <= 512 px",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_1m_at_end": round(load[0], 2), "note": "shared 2-core machine, other jobs running"},
        "runs": runs,
        "audit_cold_s": min(r["audit_s"] for r in runs if r["phase"] == "audit_cold"),
        "audit_warm_s": min(r["audit_s"] for r in runs if r["phase"] == "audit_warm"),
        "audit_cold_cpu_s": min(r["audit_cpu_s"] for r in runs if r["phase"] == "audit_cold"),
        "audit_warm_cpu_s": min(r["audit_cpu_s"] for r in runs if r["phase"] == "audit_warm"),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
