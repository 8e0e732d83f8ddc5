"""Seed ensembles against single seeds, out of fold: does averaging training seeds steady the main recipe?

    python bench/seed_ensemble.py [--recipe wsauc_roi_1pass] [--train-seeds 0,1,2] [--fold-seed 0] [--folds 3]
                                  [--work /work/seed_ensemble] [--out bench/results/seed_ensemble.json]

Issue 10 measured the main job's external AUC swinging by up to 0.27 between training seeds. Here the
folds are dealt once (``--fold-seed``) and the recipe is trained with each training seed on the same
folds (``bench/recipe_protocols.py``), so every ieee8023 + Figure1 image gets one out-of-fold score
per seed. Three ways to use the seeds are then scored on the same images:

* each seed alone (the spread is what a user of one seed is exposed to);
* ``mean_probability``: the ensemble's P(covid), the mean of the seeds' (what covidcxr ensembles do);
* ``weight_average``: one model whose weights are the mean of the seeds' (a "uniform soup",
  Wortsman et al. 2022; batch-norm statistics averaged too), scored through the one prediction path.

Each is reported as within-source AUC with a DeLong CI, and compared with every single seed by the
paired per-source DeLong test. Peak RSS and wall time are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from recipes import _env, paired_within_source  # noqa: E402


def train_seed_runs(recipe: str, work: Path, seeds: list[int], fold_seed: int, folds: int) -> dict[int, Path]:
    """One protocol run per training seed (each in its own process; finished ones are reused)."""
    out = {}
    for s in seeds:
        folder = work / f"train_seed_{s}"
        out[s] = folder / recipe / "oof"
        if (folder / recipe / "result.json").is_file():
            continue
        code = ("import sys; sys.path.insert(0, %r); from pathlib import Path; from recipe_protocols import run_recipe; "
                "run_recipe(%r, Path(%r), %d, %d, 2, False, train_seed=%d)" % (str(HERE), recipe, str(folder), folds,
                                                                               fold_seed, s))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
        (work / f"train_seed_{s}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"training seed {s} failed:\n{proc.stderr[-3000:]}")
        print(f"train seed {s}: {proc.stdout.strip().splitlines()[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def weight_average_scores(oof_dirs: dict[int, Path], folds: int) -> pd.DataFrame:
    """Per fold, one model with the seeds' mean weights scores that fold's held-out rows."""
    import torch
    from safetensors.torch import load_file

    from covidcxr.evaluation.proxies import predict_files, split_rows
    from covidcxr.models.run import load_run

    parts = []
    for k in range(folds):
        dirs = [d / f"fold_{k}" for d in oof_dirs.values()]
        states = [load_file(str(d / "model.safetensors")) for d in dirs]
        mean = {name: (torch.stack([s[name].float() for s in states]).mean(0).to(t.dtype)
                       if t.is_floating_point() else t) for name, t in states[0].items()}
        run = load_run(dirs[0])  # the first seed's record: same preprocessing, label space, split
        run.model.load_state_dict(mean)
        rows = split_rows(run, "test")
        scores, _ = predict_files(run, rows["path"], refused_ok=True)
        parts.append(pd.DataFrame({"path": rows["path"].to_numpy(), "score": scores["score"].to_numpy(), "fold": k}))
    return pd.concat(parts, ignore_index=True)


def members_by_size(base: pd.DataFrame, seed_cols: list[str], y: np.ndarray, src: np.ndarray) -> dict:
    """Within-source AUC of the mean-probability ensemble of every subset of the seeds, by subset size:
    how much does each extra member buy, and how bad is the worst draw of k members?"""
    from itertools import combinations

    from covidcxr.evaluation.within_source import within_source_auc_defined

    out = {}
    for k in range(1, len(seed_cols) + 1):
        values = {"+".join(c): within_source_auc_defined(y, base[list(c)].mean(axis=1).to_numpy(), src)["value"]
                  for c in combinations(seed_cols, k)}
        v = np.array(list(values.values()))
        out[str(k)] = {"subsets": len(v), "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
                       "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": values}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="wsauc_roi_1pass")
    ap.add_argument("--train-seeds", default="0,1,2")
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--work", default="/work/seed_ensemble")
    ap.add_argument("--out", default=str(HERE / "results" / "seed_ensemble.json"))
    args = ap.parse_args()
    for k, v in _env().items():
        os.environ.setdefault(k, v)
    from covidcxr.evaluation.within_source import within_source_auc_defined
    from covidcxr.files import write_json

    seeds = [int(s) for s in args.train_seeds.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    oof_dirs = train_seed_runs(args.recipe, work, seeds, args.fold_seed, args.folds)
    tables = {s: pd.read_csv(d / "oof_scores.csv") for s, d in oof_dirs.items()}
    base = tables[seeds[0]][["image", "y", "source", "fold"]].copy()
    for s, t in tables.items():
        merged = base.merge(t[["image", "score", "fold"]], on="image", how="left", suffixes=("", "_s"))
        if not (merged["fold"] == merged["fold_s"]).all():
            raise SystemExit(f"train seed {s}: its folds differ from seed {seeds[0]}'s (same --fold-seed expected)")
        base[f"seed_{s}"] = merged["score"].to_numpy()
    seed_cols = [f"seed_{s}" for s in seeds]
    base["mean_probability"] = base[seed_cols].mean(axis=1, skipna=False)
    t1 = time.perf_counter()
    soup = weight_average_scores(oof_dirs, args.folds)
    # The fold runs' split.csv rows resolve to absolute paths; match them to the manifest's image values.
    from covidcxr.data.manifest import Manifest
    from covidcxr.paths import data_root

    manifest = Manifest.read(data_root() / "manifest.csv")
    image_of = {os.path.realpath(p): img for p, img in zip(manifest.image_paths(), manifest.table["image"])}
    soup["image"] = [image_of[os.path.realpath(p)] for p in soup["path"]]
    base = base.merge(soup[["image", "score"]].rename(columns={"score": "weight_average"}), on="image", how="left")
    soup_s = time.perf_counter() - t1
    scores_csv = Path(args.out).with_name(Path(args.out).stem + "_oof_scores.csv")  # beside the JSON: small, re-analysable
    base.to_csv(scores_csv, index=False)

    y, src = base["y"].to_numpy(), base["source"].astype(str).to_numpy()
    ways = seed_cols + ["mean_probability", "weight_average"]
    results, comparisons = {}, []
    for way in ways:
        ok = np.isfinite(base[way].to_numpy())
        results[way] = {"n": int(ok.sum()), "refused": int((~ok).sum()),
                        "within_source_auc": within_source_auc_defined(y[ok], base[way].to_numpy()[ok], src[ok])}
    for way in ("mean_probability", "weight_average"):
        for col in seed_cols:
            ok = np.isfinite(base[way].to_numpy()) & np.isfinite(base[col].to_numpy())
            comparisons.append({"way": way, "versus": col, "n": int(ok.sum()),
                                "within_source_auc": paired_within_source(y[ok], base[way].to_numpy()[ok],
                                                                          base[col].to_numpy()[ok], src[ok])})
    singles = [results[c]["within_source_auc"]["value"] for c in seed_cols]
    by_size = members_by_size(base, seed_cols, y, src)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    write_json(args.out, {
        "what": __doc__.split("\n\n")[0], "recipe": args.recipe, "train_seeds": seeds, "fold_seed": args.fold_seed,
        "folds": args.folds, "results": results, "comparisons": comparisons,
        "single_seed_spread": {"min": min(singles), "max": max(singles), "range": max(singles) - min(singles)},
        "ensembles_by_size": by_size,
        "scores_csv": scores_csv.name,
        "wall_s": round(time.perf_counter() - t0, 1), "weight_average_scoring_s": round(soup_s, 1),
        "peak_rss_mb": {"training_process": round(usage[0].ru_maxrss / 1024, 1),
                        "this_process": round(usage[1].ru_maxrss / 1024, 1)},
        "cpu_count": os.cpu_count(), "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "note": "every image is scored out of fold by each seed's model (same folds); within-source AUC pooled over "
                "sources with >= 2 images of each class (DeLong CI); comparisons: paired per-source DeLong."})
    for way in ways:
        w = results[way]["within_source_auc"]
        print(f"{way}: within-source AUC {w['value']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] n={results[way]['n']}")
    for c in comparisons:
        w = c["within_source_auc"]
        print(f"{c['way']} vs {c['versus']}: {w['difference']:+.3f} [{w['ci_low']:+.3f}, {w['ci_high']:+.3f}] "
              f"p={w['p_value']:.3f}")
    for k, v in by_size.items():
        print(f"{k} member(s): mean {v['mean']:.3f}, worst {v['min']:.3f}, best {v['max']:.3f} over {v['subsets']} subsets")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
