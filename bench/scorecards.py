"""Shortcut scorecards of several runs side by side (the seeds of a few recipes, say), in one JSON table.

    python bench/scorecards.py --group NAME=RUN,RUN,... [--group ...] [--limit-per-source 20]
                               [--work /tmp/covidcxr_scorecards] [--out bench/results/scorecards.json]

Each RUN is audited with ``covidcxr audit shortcuts`` on its own split's test rows (the same seeded
sample of ``--limit-per-source`` images per source and class for runs that share a split), without
writing into the run. For every check this writes each run's value and verdict, and per group the
mean, min and max over its runs. The perturbation check's parts (each change's mean |change of
P(covid)| and change of AUC) are kept too, since the check itself reports only the worst change.
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
sys.path.insert(0, str(HERE))
from recipes import _env  # noqa: E402


def card_values(card: dict) -> dict:
    """Check name -> value, plus ``perturbation:<change>:delta_p`` / ``:delta_auc`` for every change."""
    out = {c["name"]: c["value"] for c in card["checks"]}
    for change, m in card["measurements"].get("perturbation", {}).items():
        if isinstance(m, dict) and "mean_abs_delta_p" in m:
            out[f"perturbation:{change}:delta_p"] = m["mean_abs_delta_p"]["value"]
            out[f"perturbation:{change}:delta_auc"] = m["delta_auc"]
    return out


def summarise(runs: dict[str, dict]) -> dict:
    keys = sorted({k for r in runs.values() for k in r["values"]})
    out = {}
    for k in keys:
        v = np.array([r["values"][k] for r in runs.values() if r["values"].get(k) is not None], dtype=float)
        if v.size:
            out[k] = {"mean": round(float(v.mean()), 4), "min": round(float(v.min()), 4),
                      "max": round(float(v.max()), 4), "n_runs": int(v.size)}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", action="append", required=True, metavar="NAME=RUN,RUN")
    ap.add_argument("--limit-per-source", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("/tmp/covidcxr_scorecards"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scorecards.json")
    a = ap.parse_args(argv)
    for k, v in _env().items():
        os.environ.setdefault(k, v)
    from covidcxr.audit.scorecard import audit_shortcuts

    from covidcxr.files import write_json

    requested = {}
    for item in a.group:
        name, _, runs = item.partition("=")
        if not runs:
            ap.error(f"--group {item!r}: expected NAME=RUN,RUN,...")
        requested[name] = [Path(r) for r in runs.split(",")]
        # checked before any audit, so a typo does not end a long run half-way
        for run_path in requested[name]:
            if not (run_path / "run.json").is_file():
                ap.error(f"--group {name}: {run_path} is not a covidcxr run directory (no run.json)")
    t0 = time.perf_counter()
    groups = {}
    for name, run_paths in requested.items():
        cards = {}
        for i, run_path in enumerate(run_paths):
            print(f"auditing {name}: {run_path}", flush=True)
            # numbered: members of one ensemble (members/seed_S) would share any name taken from the path
            card = audit_shortcuts(run_path, None, split="test", limit_per_source=a.limit_per_source,
                                   out=a.work / name / str(i), write_record=False)
            cards[str(run_path)] = {"verdict": card["verdict"], "sentence": card["sentence"],
                                    "verdicts": {c["name"]: c["verdict"] for c in card["checks"]},
                                    "values": card_values(card), "images": card["images"],
                                    "seconds": card["seconds"]}
            print(f"  {card['verdict']}: {card['sentence']}", flush=True)
        groups[name] = {"runs": cards, "summary": summarise(cards)}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"benchmark": "scorecards", "limit_per_source": a.limit_per_source, "split": "test", "groups": groups,
              "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
