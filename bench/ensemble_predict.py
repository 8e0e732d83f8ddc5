"""What the seed-ensemble main job costs at inference: ``covidcxr predict`` with the ensemble against one member.

    .venv/bin/python bench/ensemble_predict.py --run-dir runs/quick [--images 400] [--rounds 2]

The main job's run (``configs/quick.yaml``, ``ensemble.seeds``: five since 2026-12-07) averages its members, so
each image goes through one forward pass per member after the one decode, lung crop and standardisation. Both
commands score the same ``--images`` shared JPEGs (``inference_baselines.shared_jpegs``), alternating
``--rounds`` times; wall time, CPU time and peak RSS of each process (``os.wait4``), median and ratio.
Lung masks come from the cache both commands share, so the first round warms it and is not counted
when ``--rounds`` > 1. Writes ``bench/results/ensemble_predict.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from inference_baselines import PY, _timed, shared_jpegs  # noqa: E402

RESULTS = REPO / "bench" / "results" / "ensemble_predict.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    from covidcxr.files import write_json
    from covidcxr.models.record import read_run_record

    record = read_run_record(a.run_dir)
    if not record.members:
        raise SystemExit(f"{a.run_dir}: not an ensemble run (no members)")
    member = a.run_dir / record.members[0]
    files = shared_jpegs(a.images)
    runs: dict[str, list] = {"ensemble": [], "one_member": []}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {name: [PY, "-m", "covidcxr", "predict", str(run), *files, "--out", str(Path(tmp) / f"{name}.csv"),
                       "--overwrite", "--batch-size", "16"]
                for name, run in (("ensemble", a.run_dir), ("one_member", member))}
        for _ in range(a.rounds):  # alternating, so both see the same background load
            for name, cmd in cmds.items():
                runs[name].append(_timed(cmd, dict(os.environ)))
                print(name, runs[name][-1], flush=True)
    counted = {k: v[1:] if len(v) > 1 else v for k, v in runs.items()}
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in counted.items()}
    write_json(a.out, {
        "benchmark": "ensemble_predict", "run_dir": str(a.run_dir), "members": len(record.members),
        "member": record.members[0], "images": len(files), "rounds": a.rounds, "runs": runs,
        "counted": "rounds after the first (it warms the shared lung-mask cache)" if a.rounds > 1 else "all",
        "median_wall_s": med, "images_per_s": {k: round(len(files) / v, 2) for k, v in med.items()},
        "ratio_ensemble_over_member_wall": round(med["ensemble"] / med["one_member"], 3),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "load_average": [round(v, 2) for v in os.getloadavg()]})
    print(f"ensemble {med['ensemble']:.1f} s, one member {med['one_member']:.1f} s "
          f"({med['ensemble'] / med['one_member']:.2f}x); wrote {a.out}")


if __name__ == "__main__":
    main()
