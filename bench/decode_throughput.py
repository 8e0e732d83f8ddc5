"""Decode throughput: read_xray + resize vs the working-size cache (cold, warm), with peak RSS.

    .venv/bin/python bench/decode_throughput.py [--images 400] [--working-size 512]

Sets of files: an evenly spaced sample of the shared manifest (the 512 px processed JPEGs every
training run reads) and the 10 large ``originals/`` plus the 2 DICOM files (what a hospital feeds
in). Modes, each measured in a fresh subprocess so that its peak RSS is its own:

* ``decode``: ``read_xray`` + ``to_working_size`` on every file (no cache);
* ``cache_cold``: an empty cache, first pass (hash + decode + resize + atomic write);
* ``cache_warm_new_process``: a second pass in a new process (hash index on disk, no re-hashing);
* ``cache_warm_same_object``: a third pass with the same ``WorkingSizeCache`` object (in-memory index).

Writes ``bench/results/decode_throughput.json``. Single thread throughout (``workers=1``); the
numbers come from a shared 2-core machine, so compare ratios more than absolute values.
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
RESULTS = REPO / "bench" / "results" / "decode_throughput.json"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _file_sets(data_root: Path, n_images: int) -> dict[str, list[str]]:
    import pandas as pd

    manifest = pd.read_csv(data_root / "manifest.csv")
    step = max(1, len(manifest) // n_images)
    sample = [str(data_root / p) for p in manifest["image"].iloc[::step][:n_images]]
    originals = pd.read_csv(data_root / "originals" / "originals.csv")
    large = [str(data_root / p) for p in originals["file"]] + [
        str(data_root / "dicom" / f) for f in ("RG1_UNCR.dcm", "RG1_J2KI.dcm")]
    return {"shared_512px_jpeg": sample, "originals_and_dicom": large}


def run_phase(phase: str, files: list[str], working_size: int, cache_root: str) -> dict:
    """One measurement in this process; printed as JSON for the parent."""
    import numpy as np

    from covidcxr.data.cache import WorkingSizeCache
    from covidcxr.data.preprocess import to_working_size
    from covidcxr.data.io import read_xray
    import covidcxr.models.run  # noqa: F401  (torch: loaded in every phase, as in a training process)

    rss_before = _peak_rss_mb()

    per_file = []
    cache = WorkingSizeCache(cache_root, working_size) if phase != "decode" else None
    passes = 2 if phase == "cache_warm_same_object" else 1
    timed = []
    for p in range(passes):
        start = time.perf_counter()
        for f in files:
            t = time.perf_counter()
            if cache is None:
                out = to_working_size(read_xray(f).pixels, working_size)
            else:
                out = cache.load(f)
            assert out.dtype == np.float32 and max(out.shape) <= working_size
            if p == passes - 1:
                per_file.append(time.perf_counter() - t)
        timed.append(time.perf_counter() - start)
    seconds = timed[-1]
    result = {"phase": phase, "images": len(files), "seconds": round(seconds, 4),
              "images_per_second": round(len(files) / seconds, 2),
              "ms_per_image_median": round(1000 * float(np.median(per_file)), 3),
              "ms_per_image_max": round(1000 * float(np.max(per_file)), 3),
              "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_after_imports_mb": round(rss_before, 1)}
    if len(files) <= 20:  # the large originals: per-file times show which formats are slow
        result["per_file_ms"] = {Path(f).name: round(1000 * t, 1) for f, t in zip(files, per_file)}
    if cache is not None:
        result["cache_stats"] = cache.stats.as_dict()
    return result


def _subprocess_phase(phase: str, files: list[str], working_size: int, cache_root: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(files, fh)
        listing = fh.name
    try:
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--files", listing,
                              "--working-size", str(working_size), "--cache-root", cache_root],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.unlink(listing)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cache_size_mb(root: str) -> float:
    return sum(p.stat().st_size for p in Path(root).rglob("*.cxr")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--working-size", type=int, default=512)
    parser.add_argument("--phase")
    parser.add_argument("--files")
    parser.add_argument("--cache-root")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.phase:  # child process: one measurement
        files = json.loads(Path(args.files).read_text())
        print(json.dumps(run_phase(args.phase, files, args.working_size, args.cache_root)))
        return

    sys.path.insert(0, str(REPO / "src"))
    from covidcxr import paths

    data_root = paths.data_root()
    results = {"benchmark": "decode_throughput", "working_size": args.working_size,
               "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                           "python": platform.python_version(), "platform": platform.platform()},
               "threads": 1, "note": "each phase in a fresh process with torch imported (as in training); "
                         "peak_rss_mb - rss_after_imports_mb is what the phase itself added", "sets": {}}
    from rich.console import Console

    console = Console(stderr=True)
    for name, files in _file_sets(data_root, args.images).items():
        with tempfile.TemporaryDirectory(prefix="covidcxr-bench-") as root:
            set_result = {"files": len(files), "bytes_on_disk_source_mb": round(sum(Path(f).stat().st_size for f in files) / 1e6, 2)}
            for phase in ("decode", "cache_cold", "cache_warm_new_process", "cache_warm_same_object"):
                console.print(f"[bold]{name}[/bold]: {phase} ({len(files)} files)")
                set_result[phase] = _subprocess_phase(phase, files, args.working_size, root)
                console.print(f"  {set_result[phase]['images_per_second']:.1f} img/s, "
                              f"peak RSS {set_result[phase]['peak_rss_mb']:.0f} MB")
            set_result["cache_size_mb"] = round(_cache_size_mb(root), 2)
            set_result["cache_mb_per_image"] = round(set_result["cache_size_mb"] / len(files), 3)
            set_result["speedup_warm_vs_decode"] = round(
                set_result["cache_warm_new_process"]["images_per_second"] / set_result["decode"]["images_per_second"], 2)
        results["sets"][name] = set_result
    results["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    from covidcxr.files import write_json

    write_json(args.output, results)
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
