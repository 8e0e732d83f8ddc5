"""Out-of-fold scores of several recipes, split by what the COVID images are contrasted with.

    python bench/oof_contrasts.py --recipe NAME=SCORES.csv | NAME@S,S,..=SCORES.csv | NAME:SEED=oof_scores.csv
                                  [--recipe ...] --baseline NAME
                                  [--out bench/results/oof_contrasts.json]

``NAME=SCORES.csv`` is what ``bench/seed_ensemble.py`` writes beside its JSON: one row per ieee8023 /
Figure1 image, scored out of fold by every training seed's model (``seed_S`` columns) and their mean
(``mean_probability``). ``NAME:SEED=.../oof/oof_scores.csv`` is one protocol run's own file
(``covidcxr crossval --protocol oof``, ``bench/recipe_protocols.py``); the seeds given for a name
become its ``seed_S`` columns, and their mean its ``mean_probability`` when there are several. All
inputs must hold the same images in the same folds (the same ``--fold-seed``). The within-source AUC these
images give is mostly "COVID vs other pneumonia" (ieee8023 holds 74 pneumonias, 11 normals and 7
others beside its 338 COVID images). A hospital's own COVID-vs-normal question - the external
same-hospital test of issue 10 - is the "normal" contrast, on 14 normals only, so its CI is wide.
For every recipe and way of scoring, this writes:

* the pooled within-source AUC and the within-source AUC against normals only and against
  pneumonias only (DeLong CIs, ``covidcxr.evaluation.within_source.within_source_auc_by_negative_label``);
* the mean P(covid) of each label (a model that scores the COVID collections' normals like COVID has
  learned the collections' look);
* paired per-source DeLong differences against ``--baseline``, column by column, for each contrast;
* for protocol inputs, each fold model's validation AUC over all its validation rows (every source,
  so mostly COVID against the negatives of *other* collections): the within-source contrasts cannot
  see a recipe that loses the cross-source order, which the external "unseen COVID vs negatives"
  test needs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from recipes import _env, paired_within_source  # noqa: E402

CONTRASTS = ("all", "normal", "pneumonia")


def merge_same_folds(table: pd.DataFrame | None, t: pd.DataFrame, columns: list[str], what: str) -> pd.DataFrame:
    """``table`` with ``t``'s ``columns`` added; refused unless both hold the same images in the same folds."""
    if table is None:
        return t
    merged = table.merge(t[["image", "fold", *columns]], on="image", how="outer", suffixes=("", "_other"))
    if merged[["fold", "fold_other"]].isna().any().any() or not (merged["fold"] == merged["fold_other"]).all():
        raise SystemExit(f"{what}: not the same images in the same folds as the inputs before it (same --fold-seed?)")
    return merged.drop(columns=["fold_other"])


def load_scores(recipes: dict[str, Path | pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """One table: image, y, source, label, fold and a ``RECIPE|COLUMN`` column per score; the columns per recipe."""
    from covidcxr.data.manifest import Manifest
    from covidcxr.paths import data_root

    labels = Manifest.read(data_root() / "manifest.csv").table[["image", "label"]]
    table, columns = None, {}
    for name, path in recipes.items():
        t = path if isinstance(path, pd.DataFrame) else pd.read_csv(path)
        cols = [c for c in t.columns if c.startswith("seed_") or c == "mean_probability"]
        if not cols:
            raise SystemExit(f"{path}: no seed_S / mean_probability columns (write it with bench/seed_ensemble.py)")
        columns[name] = [f"{name}|{c}" for c in cols]
        t = t.rename(columns=dict(zip(cols, columns[name])))[["image", "y", "source", "fold", *columns[name]]]
        table = merge_same_folds(table, t, columns[name], f"{name} ({path if isinstance(path, Path) else 'seeds'})")
    table = table.merge(labels, on="image", how="left")
    if table["label"].isna().any():
        raise SystemExit("some scored images are not in the shared manifest")
    return table, columns


def fold_val_aucs(oof_scores: Path) -> list[float]:
    """The validation AUC (all sources) of each fold model beside an ``oof_scores.csv``, from its run record."""
    import json

    return [round(float(json.loads((d / "run.json").read_text())["info"]["val_metrics"]["val_auc"]), 4)
            for d in sorted(oof_scores.parent.glob("fold_*")) if (d / "run.json").is_file()]


def seed_subset(path: Path, keep: list[int]) -> pd.DataFrame:
    """A seed_ensemble table with only the ``seed_S`` columns of ``keep``, and ``mean_probability`` their mean."""
    t = pd.read_csv(path)
    cols = [f"seed_{s}" for s in keep]
    missing = [c for c in cols if c not in t.columns]
    if missing:
        raise SystemExit(f"{path}: no column {missing[0]}")
    t = t.drop(columns=[c for c in t.columns if c.startswith("seed_") and c not in cols] +
               [c for c in ("mean_probability", "weight_average") if c in t.columns])
    if len(cols) > 1:
        t["mean_probability"] = t[cols].mean(axis=1, skipna=False)
    return t


def parse_inputs(items: list[str]) -> tuple[dict[str, Path | pd.DataFrame], dict[str, dict[int, Path]]]:
    """``--recipe`` values: ``NAME=SCORES.csv`` files (``NAME@0,1,2=SCORES.csv``: those seeds' columns and their
    mean only, to match another recipe's number of seeds), and ``NAME:SEED=oof_scores.csv`` files per name and seed."""
    files: dict[str, Path | pd.DataFrame] = {}
    seeds: dict[str, dict[int, Path]] = {}
    for item in items:
        key, sep, path = item.partition("=")
        key, at, keep = key.partition("@")
        name, colon, seed = key.partition(":")
        if (not sep or not name or not path or (colon and not seed.isdigit()) or (at and colon)
                or (at and not all(k.isdigit() for k in keep.split(",")))):
            raise SystemExit(f"--recipe {item!r}: expected NAME=SCORES.csv, NAME@S,S,...=SCORES.csv or "
                             "NAME:SEED=oof_scores.csv (seeds are numbers)")
        if not Path(path).is_file():
            raise SystemExit(f"--recipe {item!r}: {path} is not a file")
        if colon:
            seeds.setdefault(name, {})[int(seed)] = Path(path)
        else:
            files[name] = seed_subset(Path(path), [int(k) for k in keep.split(",")]) if at else Path(path)
    both = sorted(set(files) & set(seeds))
    if both:
        raise SystemExit(f"{both[0]}: give either {both[0]}=SCORES.csv or {both[0]}:SEED=oof_scores.csv entries")
    return files, seeds


def gather(files: dict[str, Path], seeds: dict[str, dict[int, Path]]) -> dict[str, Path | pd.DataFrame]:
    """Each name's ``NAME:SEED`` protocol files as one seed_ensemble-style table (``seed_S`` columns and their
    mean); ``NAME=`` files as they are."""
    out: dict[str, Path | pd.DataFrame] = dict(files)
    for name, by_seed in seeds.items():
        table = None
        for seed, path in sorted(by_seed.items()):
            t = pd.read_csv(path)[["image", "y", "source", "fold", "score"]].rename(columns={"score": f"seed_{seed}"})
            table = merge_same_folds(table, t, [f"seed_{seed}"], str(path))
        cols = [f"seed_{s}" for s in sorted(by_seed)]
        if len(cols) > 1:
            table["mean_probability"] = table[cols].mean(axis=1, skipna=False)
        out[name] = table
    return out


def contrast_mask(table: pd.DataFrame, contrast: str) -> np.ndarray:
    y = table["y"].to_numpy()
    if contrast == "all":
        return np.ones(len(table), dtype=bool)
    return (y == 1) | (table["label"].astype(str).to_numpy() == contrast)


def describe(table: pd.DataFrame, column: str) -> dict:
    from covidcxr.evaluation.within_source import within_source_auc_by_negative_label, within_source_auc_defined

    ok = np.isfinite(table[column].to_numpy())
    t = table[ok]
    y, s, src, lab = (t["y"].to_numpy(), t[column].to_numpy(), t["source"].astype(str).to_numpy(),
                      t["label"].astype(str).to_numpy())
    return {"n": int(ok.sum()), "refused": int((~ok).sum()),
            "within_source_auc": within_source_auc_defined(y, s, src),
            "within_source_auc_by_negative_label": within_source_auc_by_negative_label(y, s, src, lab),
            "mean_p_by_label": {k: float(v) for k, v in t.groupby("label")[column].mean().items()}}


def compare(table: pd.DataFrame, column: str, base_column: str) -> dict:
    out = {}
    for contrast in CONTRASTS:
        m = contrast_mask(table, contrast) & np.isfinite(table[column].to_numpy()) & \
            np.isfinite(table[base_column].to_numpy())
        t = table[m]
        out[contrast] = paired_within_source(t["y"].to_numpy(), t[column].to_numpy(), t[base_column].to_numpy(),
                                             t["source"].to_numpy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", action="append", required=True, help="NAME=path/to/oof_scores.csv (repeatable)")
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--out", default=str(HERE / "results" / "oof_contrasts.json"))
    args = ap.parse_args()
    for k, v in _env().items():
        os.environ.setdefault(k, v)
    from covidcxr.files import write_json

    files, seeds = parse_inputs(args.recipe)
    if args.baseline not in {*files, *seeds}:
        raise SystemExit(f"--baseline {args.baseline!r} is not one of {sorted({*files, *seeds})}")
    table, columns = load_scores(gather(files, seeds))
    fold_val_auc = {name: {f"seed_{seed}": fold_val_aucs(path) for seed, path in sorted(by_seed.items())}
                    for name, by_seed in seeds.items()}
    scores_csv = Path(args.out).with_name(Path(args.out).stem + "_scores.csv")  # beside the JSON, for re-analysis
    table.to_csv(scores_csv, index=False)
    results = {c: describe(table, c) for cols in columns.values() for c in cols}
    comparisons = []
    for name, cols in columns.items():
        if name == args.baseline:
            continue
        for c in cols:
            way = c.split("|", 1)[1]
            base = f"{args.baseline}|{way}"
            if base in table:
                comparisons.append({"recipe": name, "way": way, "versus": base, **compare(table, c, base)})
    score_cols = [c for cols in columns.values() for c in cols]
    # Spearman correlation of every pair of score columns: how alike two trained models rank the same images
    correlation = table[score_cols].corr(method="spearman").round(3).to_dict()
    write_json(args.out, {"what": __doc__.split("\n\n")[0], "inputs": args.recipe, "scores_csv": scores_csv.name,
                          "baseline": args.baseline,
                          "spearman_between_score_columns": correlation,
                          "results": results, "comparisons": comparisons, "fold_models_val_auc": fold_val_auc,
                          "note": "within-source AUC pooled over the sources with >= 2 images of each class (DeLong "
                                  "CI); 'normal' / 'pneumonia': the COVID images against those negatives only; "
                                  "comparisons: paired per-source DeLong on the same images, pooled by pairs."})
    print(f"{'recipe|way':45s} {'all':>7s} {'normal':>7s} {'pneu':>7s}   mean P: normal pneumonia covid")
    for c, r in results.items():
        by = r["within_source_auc_by_negative_label"]
        p = r["mean_p_by_label"]
        print(f"{c:45s} {r['within_source_auc']['value']:7.3f} {by['normal']['value']:7.3f} "
              f"{by['pneumonia']['value']:7.3f}   {p['normal']:.3f} {p['pneumonia']:.3f} {p['covid']:.3f}")
    for c in comparisons:
        parts = "  ".join(f"{k} {c[k]['difference']:+.3f} (p={c[k]['p_value']:.3f})" for k in CONTRASTS)
        print(f"{c['recipe']}|{c['way']} vs {c['versus']}: {parts}")
    for name, by_seed in fold_val_auc.items():
        print(f"{name}: fold models' validation AUC (all sources) " +
              "; ".join(f"{k} {', '.join(f'{v:.3f}' for v in vals)}" for k, vals in by_seed.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
