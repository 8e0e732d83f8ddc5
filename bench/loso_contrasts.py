"""Leave-one-source-out runs side by side: one held-out collection, several recipes (or a seed ensemble
and its members), scored per kind of negative and compared pairwise.

    python bench/loso_contrasts.py --run NAME=LOSO_RUN_DIR[,LOSO_RUN_DIR...] [--run NAME=...]
                                   [--out bench/results/loso_contrasts.json]

Each LOSO_RUN_DIR is a ``without_SOURCE`` folder written by ``covidcxr crossval --protocol loso`` (or
``bench/recipe_protocols.py --loso-sources``): a run trained on every source but one, whose
``protocol_scores.csv`` holds its scores of the held-out source. The held-out collection stands in for a
hospital the model never saw; where it holds COVID and normal images, "COVID vs normal" is the shared-data
analogue of issue 10's same-hospital test. Per run: AUC (DeLong CI), the AUC against each kind of negative,
mean P(covid) per label; for a seed ensemble also each member's (the members are scored here, with the one
prediction path). Several folders after one NAME (the same recipe trained with other seeds) are scored
as their mean-probability ensemble, with each folder as a member. Runs are compared with the paired
DeLong test on the same images, against the first.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("COVIDCXR_DATA_ROOT", str(REPO.parent / "shared" / "data" / "cxr"))
os.environ.setdefault("COVIDCXR_WEIGHTS_DIR", str(REPO.parent / "shared" / "weights"))


def summarise(scores: pd.DataFrame) -> dict:
    """AUC, AUC against each kind of negative, and mean P(covid) per label of one set of held-out scores
    (the same per-label numbers ``loso.json`` records)."""
    from covidcxr.evaluation.metrics import auc_ci
    from covidcxr.evaluation.within_source import scores_by_label

    ok = np.isfinite(scores["score"].to_numpy())
    s = scores[ok]
    y, p = s["y"].to_numpy(), s["score"].to_numpy()
    return {"n": int(len(s)), "refused": int((~ok).sum()), "positives": int(y.sum()),
            "auc": auc_ci(y, p).to_dict() if 0 < y.sum() < len(y) else None,
            **scores_by_label(y, p, s["label"].to_numpy())}


def member_scores(run_dir: Path, scores: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each member of a seed-ensemble run scored on the run's held-out rows (empty for a single model)."""
    from covidcxr.evaluation.proxies import predict_files, split_rows
    from covidcxr.models.run import load_run

    out = {}
    for member in sorted((run_dir / "members").glob("*/run.json")):
        run = load_run(member.parent)
        rows = split_rows(run, "test")
        if len(rows) != len(scores):
            raise SystemExit(f"{member.parent}: {len(rows)} test rows, but {run_dir}/protocol_scores.csv has "
                             f"{len(scores)}; was the member trained by another protocol run?")
        t0 = time.perf_counter()
        p, _ = predict_files(run, rows["path"], refused_ok=True)
        print(f"  {member.parent.name}: scored {len(rows)} images in {time.perf_counter() - t0:.0f} s", flush=True)
        out[member.parent.name] = scores.assign(score=p["score"].to_numpy())
    return out


def main() -> None:
    from covidcxr.evaluation.metrics import delong_test
    from covidcxr.files import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                    help="a without_SOURCE run directory of a leave-one-source-out protocol")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "loso_contrasts.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    runs: dict[str, dict] = {}
    scored: dict[str, pd.DataFrame] = {}
    for spec in args.run:
        name, sep, directories = spec.partition("=")
        run_dirs = [Path(d) for d in directories.split(",") if d]
        missing = [str(d) for d in run_dirs if not (d / "protocol_scores.csv").is_file()]
        if not sep or not run_dirs or missing:
            raise SystemExit(f"--run {spec!r}: expected NAME=DIR[,DIR...], each DIR with protocol_scores.csv "
                             f"(a without_SOURCE folder of a leave-one-source-out protocol); missing: {missing}")
        if len(run_dirs) == 1:
            scores = pd.read_csv(run_dirs[0] / "protocol_scores.csv")
            members = member_scores(run_dirs[0], scores)
        else:
            members = {str(d): pd.read_csv(d / "protocol_scores.csv").sort_values("image", ignore_index=True)
                       for d in run_dirs}
            first_scores = next(iter(members.values()))
            if any(not m["image"].equals(first_scores["image"]) for m in members.values()):
                raise SystemExit(f"--run {name}: its folders scored different images; give runs of one held-out source")
            scores = first_scores.assign(score=np.mean([m["score"].to_numpy() for m in members.values()], axis=0))
        held = sorted(set(scores["source"].astype(str)))
        print(f"{name}: {', '.join(map(str, run_dirs))} ({len(scores)} held-out images of {', '.join(held)})",
              flush=True)
        entry = {"run_dirs": [str(d) for d in run_dirs], "held_out": held, **summarise(scores)}
        if members:
            entry["members"] = {m: summarise(s) for m, s in members.items()}
            values = [e["auc"]["value"] for e in entry["members"].values() if e["auc"]]
            entry["member_auc_mean_min_max"] = [float(np.mean(values)), min(values), max(values)] if values else None
        runs[name], scored[name] = entry, scores
    first = next(iter(scored))
    base = scored[first]
    comparisons = []
    for name, s in list(scored.items())[1:]:
        t = base.merge(s[["image", "score"]], on="image", suffixes=("_a", "_b")).dropna(subset=["score_a", "score_b"])
        y, label = t["y"].to_numpy(), t["label"].astype(str).to_numpy()
        row = {"a": first, "b": name, "n": int(len(t)), "all": delong_test(y, t["score_a"], t["score_b"])}
        for lab in sorted(set(label[y == 0])):
            m = (y == 1) | (label == lab)
            row[f"vs_{lab}"] = delong_test(y[m], t["score_a"].to_numpy()[m], t["score_b"].to_numpy()[m])
        comparisons.append(row)
    write_json(args.out, {"what": __doc__.split("\n\n")[0], "runs": runs, "comparisons": comparisons,
                          "wall_s": round(time.perf_counter() - t0, 1),
                          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                          "note": "paired DeLong: difference = AUC(a) - AUC(b) on the same held-out images"})
    for name, e in runs.items():
        auc = e["auc"]["value"] if e["auc"] else float("nan")
        vs = ", ".join(f"vs {lab} {a['value']:.3f}" for lab, a in e["auc_by_negative_label"].items())
        spread = e.get("member_auc_mean_min_max")
        members = f"; members {spread[0]:.3f} ({spread[1]:.3f}-{spread[2]:.3f})" if spread else ""
        print(f"{name}: AUC {auc:.3f} ({vs}){members}; mean P {e['mean_p_by_label']}", flush=True)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
