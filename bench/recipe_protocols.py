"""Recipe benchmark, protocol edition: out-of-fold within-source AUC (and optionally leave-one-source-out).

    python bench/recipe_protocols.py [--recipes wsauc,decomp,...] [--folds 3] [--seed 0] [--loso]
                                     [--work /work/recipes_protocols] [--out bench/results/recipes_oof.json]

For each recipe of ``bench/recipes.py`` it runs :func:`covidcxr.training.protocols.out_of_fold_within_source`
on the shared manifest: every image of the sources holding both classes (ieee8023, Figure1: ~430) is
scored by a model that never saw its patient, so the within-source AUC has a CI about a third as wide
as the ~40-image test split's. Recipes are compared pairwise on the same out-of-fold images with the
paired DeLong test (per source, pooled by pairs), against ``--baseline``. Models are kept under
``--work`` and reused, so the benchmark can be interrupted and extended. Peak RSS and wall time are
recorded per recipe (each recipe runs in its own process).
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

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from recipes import RECIPES, REPO, _env, paired_within_source  # noqa: E402


def run_recipe(recipe: str, work: Path, folds: int, seed: int, threads: int, loso: bool,
               train_seed: int | None = None, loso_sources: list[str] | None = None) -> dict:
    """Train and score ``recipe`` under the protocols; ``seed`` deals the folds, ``train_seed`` (default:
    ``seed``) seeds the training. ``loso_sources`` holds out only those sources and skips the out-of-fold
    protocol (to finish a leave-one-source-out run that was cut short)."""
    from covidcxr.data.manifest import Manifest
    from covidcxr.paths import data_root
    from covidcxr.training import load_config
    from covidcxr.training.protocols import leave_one_source_out, out_of_fold_within_source

    spec = RECIPES[recipe]
    config = load_config(str(REPO / spec["config"]) if spec.get("config") else None, spec["overrides"] + [
        f"train.seed={seed if train_seed is None else train_seed}", f"train.threads={threads}", "train.progress=false"])
    manifest = Manifest.read(data_root() / "manifest.csv")
    t0 = time.perf_counter()
    result = {"recipe": recipe, "what": spec["what"]}
    if not loso_sources:
        result["oof"] = out_of_fold_within_source(config, manifest, work / recipe / "oof", folds=folds, seed=seed)
    if loso or loso_sources:
        result["loso"] = leave_one_source_out(config, manifest, work / recipe / "loso", seed=seed,
                                              sources=loso_sources)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(wall_s=round(time.perf_counter() - t0, 1), peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
                  loadavg_end=[round(v, 2) for v in os.getloadavg()])
    (work / recipe / "result.json").write_text(json.dumps(result, indent=1, default=float))
    if "oof" not in result:
        print(f"{recipe}: leave-one-source-out for {loso_sources} ({result['wall_s']} s)", flush=True)
        return result
    w = result["oof"]["within_source_auc"]
    print(f"{recipe}: out-of-fold within-source AUC {w['value']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] "
          f"n={result['oof']['n']} ({result['wall_s']} s)", flush=True)
    return result


def compare(work: Path, recipes: list[str], baseline: str) -> list[dict]:
    base = pd.read_csv(work / baseline / "oof" / "oof_scores.csv")
    out = []
    for recipe in recipes:
        if recipe == baseline or not (work / recipe / "oof" / "oof_scores.csv").is_file():
            continue
        a = pd.read_csv(work / recipe / "oof" / "oof_scores.csv")
        t = a.merge(base[["image", "score"]], on="image", suffixes=("", "_base")).dropna(subset=["score", "score_base"])
        out.append({"recipe": recipe, "versus": baseline, "n": int(len(t)),
                    "within_source_auc": paired_within_source(t["y"].to_numpy(), t["score"], t["score_base"],
                                                              t["source"].to_numpy())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="wsauc,decomp,wsauc_roi,decomp_roi")
    ap.add_argument("--baseline", default="wsauc")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loso", action="store_true", help="also leave one source out (5 more models per recipe)")
    ap.add_argument("--loso-sources", help="comma-separated sources: hold out only these, no out-of-fold run "
                                           "(writes only --work/RECIPE/result.json)")
    ap.add_argument("--work", default="/work/recipes_protocols")
    ap.add_argument("--out", default=str(HERE / "results" / "recipes_oof.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for k, v in _env().items():
        os.environ.setdefault(k, v)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.one:
        run_recipe(args.one, work, args.folds, args.seed, args.threads, args.loso)
        return
    if args.loso_sources:
        for recipe in [r for r in args.recipes.split(",") if r]:
            run_recipe(recipe, work, args.folds, args.seed, args.threads, loso=False,
                       loso_sources=args.loso_sources.split(","))
        return
    recipes = [r for r in args.recipes.split(",") if r]
    failures = []
    for recipe in recipes:
        if (work / recipe / "result.json").is_file():
            continue
        cmd = [sys.executable, __file__, "--one", recipe, "--work", str(work), "--folds", str(args.folds),
               "--seed", str(args.seed), "--threads", str(args.threads)] + (["--loso"] if args.loso else [])
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        (work / f"{recipe}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            failures.append({"recipe": recipe, "error": proc.stderr[-2000:]})
            print(f"{recipe}: FAILED\n{proc.stderr[-2000:]}", flush=True)
        else:
            print(proc.stdout.strip().splitlines()[-1], flush=True)
    results = {r: json.loads((work / r / "result.json").read_text()) for r in recipes
               if (work / r / "result.json").is_file()}
    comps = compare(work, list(results), args.baseline) if args.baseline in results else []
    from covidcxr.files import write_json

    write_json(args.out, {"what": __doc__.split("\n\n")[0], "folds": args.folds, "seed": args.seed,
                          "baseline": args.baseline, "results": results, "comparisons": comps, "failures": failures,
                          "cpu_count": os.cpu_count(),
                          "note": "out-of-fold scores: each image scored by the fold model that never saw its "
                                  "patient; within-source AUC pooled over sources with >= 2 images of each "
                                  "class (DeLong CI); comparisons: paired DeLong on the same images."})
    for c in comps:
        w = c["within_source_auc"]
        if w.get("difference") is not None:
            print(f"{c['recipe']} vs {c['versus']}: within-source AUC difference {w['difference']:+.3f} "
                  f"[{w['ci_low']:+.3f}, {w['ci_high']:+.3f}] p={w['p_value']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
