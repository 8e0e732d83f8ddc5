"""Validation protocols that train a recipe several times: out-of-fold within-source AUC, leave-one-source-out.

The shared data's test split holds about 40 images of the two sources with both COVID and non-COVID
images (ieee8023, Figure1), so its within-source AUC - the one AUC a source detector cannot raise -
has a CI about +-0.2 wide. These protocols spend training time to narrow it, from shared data alone:

* :func:`out_of_fold_within_source`: the patients of every source that holds both classes are dealt
  into ``folds`` patient-grouped, label-stratified folds; model k trains on everything except fold k
  (the one-class sources always train) and scores fold k. Every image of those sources (~430 in the
  shared data) is then scored by a model that never saw its patient, and the within-source AUC over
  all of them gets a DeLong CI (pooled over sources).
* :func:`leave_one_source_out`: model s trains on every source but s and scores s - a stand-in for a
  hospital never seen. A held-out source with both classes gets its AUC; every held-out source gets
  the mean P(covid) of its negatives and the share of them called COVID at the run's threshold (for
  NIH / Kermany / RSNA, which hold no COVID, that false-positive rate *is* the test).

Each model is a normal run directory under ``out_dir`` (``fold_K`` / ``without_SOURCE``), trained as
``covidcxr train`` would train the config: one model, or with ``ensemble.seeds`` a seed ensemble
(:func:`covidcxr.training.cv.train_seed_ensemble`), so the protocol scores what the config ships
(``"ensemble.seeds=[]"`` scores one member). Finished models are reused when a protocol is started again. Checkpoint selection and the threshold use each model's own validation split, cut
from its training rows; the scored rows never enter it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.data.labels import get_label_space
from covidcxr.data.manifest import Manifest
from covidcxr.data.splits import assign_splits
from covidcxr.errors import ConfigError
from covidcxr.files import jsonable, write_json
from covidcxr.training.config import TrainingConfig


def _targets(config: TrainingConfig, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, y = 1 for the positive class) under the recipe's label space."""
    space = get_label_space(config.data.label_space)
    if space.positive is None:
        raise ConfigError("these protocols score P(positive); the label space has no positive class")
    cls = space.assign(manifest.table)
    keep = cls.notna().to_numpy()
    return keep, (cls == space.positive).to_numpy().astype(int)


def _train(config: TrainingConfig, run_dir: Path, manifest: Manifest) -> None:
    """The config's own training on ``manifest``: one model, or its seed ensemble; an interrupted one resumes."""
    from covidcxr.training.cv import train_seed_ensemble
    from covidcxr.training.loop import fit

    if config.ensemble.folds:
        raise ConfigError(f"ensemble.folds={config.ensemble.folds} inside a cross-validation protocol would nest "
                          "k-fold ensembles in its folds; use ensemble.seeds, or ensemble.folds=null")
    started = any(run_dir.glob("checkpoints/last.pt")) or any(run_dir.glob("members/*/run.json")) \
        or any(run_dir.glob("members/*/checkpoints/last.pt"))
    if config.ensemble.seeds:
        train_seed_ensemble(config, run_dir, manifest=manifest, resume=started)
    else:
        fit(config, run_dir, manifest=manifest, resume=started)


def _fit_and_score(config: TrainingConfig, manifest: Manifest, run_dir: Path, seed: int) -> pd.DataFrame:
    """Train on ``manifest``'s non-test rows (val cut from them here), score its ``test`` rows."""
    from covidcxr.evaluation.proxies import predict_files, split_rows
    from covidcxr.models.run import load_run

    scores_csv = run_dir / "protocol_scores.csv"
    if scores_csv.is_file() and (run_dir / "run.json").is_file():
        return pd.read_csv(scores_csv)
    table = manifest.table
    test = (table["split"] == "test").to_numpy()
    rest = assign_splits(manifest.subset(mask=~test), val=0.15, test=0.0, seed=seed)
    split = table["split"].to_numpy(dtype=object).copy()
    split[~test] = rest.table["split"].to_numpy()
    fold_manifest = manifest.replace(table.assign(split=split))
    selection = config.train.selection_metric
    try:
        _train(config, run_dir, fold_manifest)
    except ConfigError as exc:
        # Holding a source out can leave validation without a source holding both classes; the
        # recipe's within-source selection is then undefined, and the model selects on val loss.
        if "selection_metric" not in str(exc) or selection == "val_loss":
            raise
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        selection = "val_loss"
        config = config.model_copy(deep=True)
        config.train.selection_metric = "val_loss"
        _train(config, run_dir, fold_manifest)
    run = load_run(run_dir)
    rows = split_rows(run, "test")
    scores, _ = predict_files(run, rows["path"], refused_ok=True)
    # The run's split.csv names images relative to the run; report them as the caller's manifest does.
    image_of = {str(p.resolve()): img for p, img in zip(manifest.image_paths(), table["image"])}
    rows["image"] = [image_of.get(str(Path(p).resolve()), img) for p, img in zip(rows["path"], rows["image"])]
    rows["score"] = scores["score"].to_numpy()
    rows["threshold"] = run.threshold if run.threshold is not None else np.nan
    rows["selection"] = selection
    rows.drop(columns=["path"]).to_csv(scores_csv, index=False)
    return pd.read_csv(scores_csv)


def out_of_fold_within_source(config: TrainingConfig, manifest: Manifest, out_dir: str | Path, *, folds: int = 5,
                              seed: int = 0) -> dict:
    """Out-of-fold within-source AUC over every image of the sources holding both classes (see module doc)."""
    from covidcxr.evaluation.metrics import auc_ci
    from covidcxr.evaluation.within_source import within_source_auc_by_negative_label, within_source_auc_defined

    out_dir = Path(out_dir)
    keep, y = _targets(config, manifest)
    table = manifest.table.reset_index(drop=True)
    src = table["source"].astype(str).to_numpy()
    mixed = sorted(s for s in set(src[keep]) if 0 < y[keep & (src == s)].sum() < (keep & (src == s)).sum())
    if not mixed:
        raise ConfigError("no source holds both classes: the out-of-fold within-source AUC is undefined")
    in_mixed = keep & np.isin(src, mixed)
    with_folds = assign_splits(manifest.subset(mask=in_mixed), val=0.0, test=0.0, seed=seed, folds=folds)
    fold = np.full(len(table), -1)
    fold[in_mixed] = with_folds.table["fold"].to_numpy()
    parts = []
    for k in range(folds):
        split = np.where(fold == k, "test", "train").astype(object)
        parts.append(_fit_and_score(config, manifest.replace(table.assign(split=split)), out_dir / f"fold_{k}",
                                    seed).assign(fold=k))
    scores = pd.concat(parts, ignore_index=True)
    scores.to_csv(out_dir / "oof_scores.csv", index=False)
    yy, ss, sources = scores["y"].to_numpy(), scores["score"].to_numpy(), scores["source"].astype(str).to_numpy()
    ok = np.isfinite(ss)
    result = {"protocol": "out_of_fold_within_source", "folds": folds, "seed": seed, "sources": mixed,
              "n": int(ok.sum()), "refused": int((~ok).sum()), "positives": int(yy[ok].sum()),
              "within_source_auc": within_source_auc_defined(yy[ok], ss[ok], sources[ok]),
              # the same AUC against normals only / pneumonias only: a hospital's COVID-vs-normal is the first
              "within_source_auc_by_negative_label": within_source_auc_by_negative_label(
                  yy[ok], ss[ok], sources[ok], scores["label"].astype(str).to_numpy()[ok]),
              "pooled_auc_mixed_sources": auc_ci(yy[ok], ss[ok]).to_dict(),
              "per_source_auc": {s: auc_ci(yy[ok & (sources == s)], ss[ok & (sources == s)]).to_dict()
                                 for s in mixed if 0 < yy[ok & (sources == s)].sum() < (ok & (sources == s)).sum()}}
    write_json(out_dir / "oof.json", jsonable(result))
    return jsonable(result)


def _slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", source).strip("_")[:40]


def leave_one_source_out(config: TrainingConfig, manifest: Manifest, out_dir: str | Path, *, seed: int = 0,
                         sources: list[str] | None = None) -> dict:
    """One model per held-out source, trained on all others; the held-out source's scores (see module doc).

    ``sources`` holds out only those; ``loso.json`` keeps the entries of sources held out by an earlier
    call with the same seed, so a protocol finished source by source ends with one complete file."""
    from covidcxr.evaluation.metrics import auc_ci
    from covidcxr.evaluation.within_source import scores_by_label

    out_dir = Path(out_dir)
    keep, y = _targets(config, manifest)
    table = manifest.table.reset_index(drop=True)
    src = table["source"].astype(str).to_numpy()
    held = sources or sorted(set(src[keep]))
    result: dict = {"protocol": "leave_one_source_out", "seed": seed, "held_out": {}}
    earlier = out_dir / "loso.json"
    if earlier.is_file():
        previous = json.loads(earlier.read_text())
        if previous.get("seed") == seed:
            result["held_out"] = {s: e for s, e in previous.get("held_out", {}).items() if s not in held}
    for s in held:
        if not (src == s).any():
            raise ConfigError(f"leave-one-source-out: no source {s!r}; known: {sorted(set(src))}")
        # Patients are source-specific in a covidcxr manifest, so no patient spans train and test here.
        split = np.where(src == s, "test", "train").astype(object)
        scores = _fit_and_score(config, manifest.replace(table.assign(split=split)), out_dir / f"without_{_slug(s)}",
                                seed)
        yy, ss = scores["y"].to_numpy(), scores["score"].to_numpy()
        ok, thr = np.isfinite(ss), float(scores["threshold"].iloc[0])
        neg, pos, has_thr = ok & (yy == 0), ok & (yy == 1), np.isfinite(thr)
        entry = {"n": int(ok.sum()), "refused": int((~ok).sum()), "positives": int(pos.sum()),
                 "threshold": thr if has_thr else None, "selection": str(scores["selection"].iloc[0]),
                 "mean_p_negatives": float(ss[neg].mean()) if neg.any() else None,
                 "false_positive_rate": float((ss[neg] >= thr).mean()) if neg.any() and has_thr else None,
                 "sensitivity": float((ss[pos] >= thr).mean()) if pos.any() and has_thr else None,
                 "auc": auc_ci(yy[ok], ss[ok]).to_dict() if 0 < pos.sum() < ok.sum() else None}
        entry.update(scores_by_label(yy[ok], ss[ok], scores["label"].to_numpy()[ok]))
        result["held_out"][s] = entry
    write_json(out_dir / "loso.json", jsonable(result))
    return jsonable(result)
