"""Shortcut proxies: honest checks of a trained run that need only the shared data.

The external hospital data that shows the collapse is not ours to use; these measure, on a run's
own held-out split (default ``test``, never trained or selected on), whether the model looks at the
disease or at the collection an image came from:

* :func:`discrimination`: plain AUC (DeLong CI), **within-source AUC** (pairs only inside the sources
  holding both classes: IEEE8023, Figure1), and the cross-source AUC of COVID against the negatives of
  the one-class sources (NIH, Kermany, RSNA) - the part of the plain AUC a source detector gets for free.
* :func:`compression_invariance`: the same images re-saved losslessly (PNG) and as JPEG q90 / 70 / 50,
  predicted through :func:`covidcxr.models.predict.predict_paths`; mean |change in P(covid)|, mean signed
  change and the share of decisions that flip, per class, with patient-bootstrap CIs. A model that reads
  the disease should not care how the file was stored.
* :func:`lungs_removed`: the lungs blacked out with one lung template (the mean of the shared lung masks,
  the same region for every image and class, so the masking itself carries no label) and, separately,
  everything *but* the lungs blacked out; with ``lung_finder`` each image's own segmented lungs instead
  (what the shortcut scorecard uses). AUC should fall toward 0.5 without the lungs for a model that
  uses them, and hold with the lungs only. The annotated COVID images (v7labs / lungVAE masks / boxes)
  also get their own lungs removed: the mean drop of P(covid).
* :func:`source_probe`: how well the features the classifier head sees predict the source
  (standardised logistic regression, patient-grouped stratified k-fold, balanced accuracy against
  chance 1/k, patient-bootstrap CI). Fine-tuning that raises it above the ImageNet features' value
  has learned the collections.

``run_proxies(run_dir)`` computes all of them and writes ``proxies.json`` + ``proxy_scores.csv``
(one row per image, every score, for paired DeLong comparisons between runs) into ``out``.
Command: ``python -m covidcxr.evaluation.proxies RUN_DIR [--out DIR] [--split test]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError
from covidcxr.evaluation.metrics import auc_ci, auc_score, bootstrap_ci, wilson_ci, within_source_auc_details
from covidcxr.evaluation.proxy_images import (LUNG_DILATE, QUALITIES, TEMPLATE_LEVEL, TEMPLATE_SIZE, lung_template,
                                              masked_copies, resaved_copies, segmented_lungs)
from covidcxr.evaluation.source_probe import source_probe
from covidcxr.evaluation.within_source import one_class_sources, within_source_auc_defined
from covidcxr.files import jsonable, write_json


# ---------------------------------------------------------------- predictions (+ head features)


def _unwrap(model):
    from covidcxr.models.run import FlipTTAModel

    while isinstance(model, FlipTTAModel):
        model = model.model
    return model


def _networks(run) -> list[tuple]:
    """``(network, architecture)`` of each network of a run: itself, or each member of an ensemble."""
    return [(_unwrap(r.model), r.record.architecture) for r in (run.members or [run])]


class _HeadInputs:
    """Collects the input of the classifier head (the penultimate features) during predictions.

    An ensemble's features are its members' side by side: what a probe can read from any of them."""

    def __init__(self, run):
        from covidcxr.models.registry import get_architecture

        self.buffers: list[list] = []
        self.handles: list = []
        for network, architecture in _networks(run):
            prefixes = get_architecture(architecture).head(network)
            module = network.get_submodule(prefixes[0].rstrip("."))
            buffer: list = []
            self.buffers.append(buffer)
            self.handles.append(module.register_forward_pre_hook(
                lambda mod, args, buffer=buffer: buffer.append(args[0].detach().flatten(1).float().cpu().numpy())))

    def take(self) -> np.ndarray | None:
        if not all(self.buffers):
            return None
        out = np.concatenate([np.mean(np.stack(b), axis=0) for b in self.buffers], axis=1)  # flip TTA: mean of the pair
        for b in self.buffers:
            b.clear()
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def predict_files(run, paths: Sequence[str | Path], *, features: bool = False, batch_size: int = 32,
                  progress: bool = False, refused_ok: bool = False) -> tuple[pd.DataFrame, np.ndarray | None]:
    """P(positive) of every file (``path``, ``score``; bad files raise) and optionally head features.

    ``refused_ok``: a file the run refuses (a lung-ROI model that finds no lungs in a masked copy)
    gets score NaN instead of stopping the proxy; the callers count them.
    """
    from covidcxr.models.predict import predict_paths

    if run.positive_class is None:
        raise CovidCXRError(f"{run.run_dir}: the proxies need a run with a positive class (e.g. binary covid)")
    hook = _HeadInputs(run) if features else None
    feats: list[np.ndarray] = []

    def on_batch(records, rows, bad):
        if hook is not None:
            f = hook.take()
            if f is not None and len(records):
                feats.append(f)

    try:
        preds = predict_paths(run, [str(p) for p in paths], batch_size=batch_size, progress=progress,
                              on_batch=on_batch)
    finally:
        if hook is not None:
            hook.close()
    if preds.skipped and refused_ok:  # one row per input path, in order; refused ones NaN
        scored = dict(zip(preds.table["path"].astype(str), preds.table[f"prob_{run.positive_class}"].astype(float)))
        return pd.DataFrame({"path": [str(p) for p in paths],
                             "score": [scored.get(str(p), np.nan) for p in paths]}), None
    if preds.skipped:
        raise CovidCXRError(f"{len(preds.skipped)} image(s) could not be read, e.g. {preds.skipped[0][0]}: "
                            f"{preds.skipped[0][1]}")
    table = pd.DataFrame({"path": preds.table["path"].astype(str),
                          "score": preds.table[f"prob_{run.positive_class}"].astype(float)})
    f = np.concatenate(feats) if feats and hook is not None else None
    return table, f


def split_rows(run, split: str = "test") -> pd.DataFrame:
    """The run's ``split`` rows (from its own ``split.csv``) the label space includes, with ``path`` and ``y``."""
    from covidcxr.evaluation.evaluate import run_label_space
    from covidcxr.models.run_split import read_run_split

    manifest = read_run_split(run.run_dir, run.record)
    space = run_label_space(run)
    table = manifest.table.reset_index(drop=True)
    cls = space.assign(table)
    keep = (table["split"].astype(str) == split).to_numpy() & cls.notna().to_numpy()
    if not keep.any():
        raise CovidCXRError(f"{run.run_dir}: no {split!r} rows in the run's split.csv")
    extra = [c for c in ("age", "sex") if c in table.columns]  # the scorecard's subgroup checks need them
    rows = table.loc[keep, ["image", "patient_id", "source", "label"] + extra].copy()
    rows["path"] = [str(p) for p, k in zip(manifest.image_paths(check_root=True), keep) if k]
    rows["y"] = (cls[keep] == run.positive_class).astype(int).to_numpy()
    return rows.reset_index(drop=True)


# ---------------------------------------------------------------- discrimination


def discrimination(y, score, sources) -> dict:
    """Plain AUC, within-source AUC and cross-source AUC (COVID vs one-class-source negatives), with CIs."""
    y, score, sources = np.asarray(y, int), np.asarray(score, float), np.asarray(sources, dtype=object).astype(str)
    out = {"n": int(len(y)), "n_positive": int(y.sum()), "auc": auc_ci(y, score).to_dict(),
           "within_source_auc": within_source_auc_defined(y, score, sources),
           "within_source_auc_all": within_source_auc_details(y, score, sources)}
    single = one_class_sources(y, sources)
    cross = (y == 1) | np.isin(sources, list(single))
    if 0 < y[cross].sum() < cross.sum():
        out["cross_source_auc"] = {**auc_ci(y[cross], score[cross]).to_dict(),
                                   "negatives_from": sorted(single)}
    return out


# ---------------------------------------------------------------- proxies


def _mean_ci(values: np.ndarray, clusters: np.ndarray, *, n_boot: int, seed: int) -> dict:
    values = np.asarray(values, float)
    if not len(values):
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    lo, hi = bootstrap_ci(lambda idx: float(values[idx].mean()), len(values), clusters=clusters, n_boot=n_boot,
                          seed=seed)
    return jsonable({"value": float(values.mean()), "ci_low": lo, "ci_high": hi, "n": int(len(values)),
                     "method": "patient bootstrap"})


def compression_sample(rows: pd.DataFrame, per_source: int = 20, seed: int = 0) -> pd.DataFrame:
    """The images of the compression proxy: every image of the sources holding both classes and up
    to ``per_source`` (seeded) of each one-class source."""
    single = one_class_sources(rows["y"].to_numpy(), rows["source"].astype(str).to_numpy())
    rng = np.random.default_rng([seed, 11])
    parts = []
    for source, group in rows.groupby("source", sort=True):
        if source in single and len(group) > per_source:
            group = group.iloc[np.sort(rng.choice(len(group), per_source, replace=False))]
        parts.append(group)
    return pd.concat(parts).reset_index(drop=True)


def compression_invariance(run, rows: pd.DataFrame, folder: str | Path, *, qualities: Sequence[int] = QUALITIES,
                           n_boot: int = 1000, seed: int = 0) -> tuple[dict, pd.DataFrame]:
    """P(positive) of lossless vs JPEG re-saves of the same images; (summary, per-image scores)."""
    copies = resaved_copies(rows["path"].tolist(), folder, qualities)
    scores = rows[["image", "patient_id", "source", "label", "y"]].copy()
    for name, paths in copies.items():
        scores[f"p_{name}"] = predict_files(run, paths)[0]["score"].to_numpy()
    threshold = run.threshold
    y, clusters = scores["y"].to_numpy(), scores["patient_id"].astype(str).to_numpy()
    out: dict = {"n": int(len(scores)), "n_positive": int(y.sum()), "threshold": threshold,
                 "reference": "png (lossless copy of the stored pixels)", "qualities": {}}
    for q in qualities:
        d = scores[f"p_q{q}"].to_numpy() - scores["p_png"].to_numpy()
        entry = {"mean_abs_change": _mean_ci(np.abs(d), clusters, n_boot=n_boot, seed=seed)}
        for cls_name, m in (("negatives", y == 0), ("positives", y == 1)):
            entry[cls_name] = {"mean_abs_change": _mean_ci(np.abs(d[m]), clusters[m], n_boot=n_boot, seed=seed),
                               "mean_change": _mean_ci(d[m], clusters[m], n_boot=n_boot, seed=seed)}
            if threshold is not None and m.any():
                flips = int(((scores["p_png"].to_numpy()[m] >= threshold) != (scores[f"p_q{q}"].to_numpy()[m] >= threshold)).sum())
                lo, hi = wilson_ci(flips, int(m.sum()))
                entry[cls_name]["decision_flips"] = jsonable({"value": flips / int(m.sum()), "ci_low": lo,
                                                              "ci_high": hi, "count": flips, "n": int(m.sum()),
                                                              "method": "Wilson"})
        if 0 < y.sum() < len(y):
            entry["auc"] = auc_score(y, scores[f"p_q{q}"].to_numpy())
        out["qualities"][f"q{q}"] = entry
    if 0 < y.sum() < len(y):
        out["auc_png"] = auc_score(y, scores["p_png"].to_numpy())
    return jsonable(out), scores


def lungs_removed(run, rows: pd.DataFrame, folder: str | Path, annotations_folder: str | Path, *,
                  base_scores: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0,
                  lung_finder=None) -> tuple[dict, pd.DataFrame]:
    """AUCs with the lungs removed / kept alone, and P(covid) of annotated COVID images without their lungs.

    The lungs are the shared lung template (default) or, with ``lung_finder`` (a lung segmenter's
    :class:`~covidcxr.models.lung_finder.SegmenterLungFinder`), each image's own segmented lungs."""
    from covidcxr.data.annotations import Annotations

    annotations = Annotations(annotations_folder)
    template = lung_template(str(Path(annotations_folder).resolve()))
    if lung_finder is None:
        copies = masked_copies(rows["path"].tolist(), folder, template, annotations)
        regions = {"source": "template"}  # its details: out["template"]
    else:
        copies = masked_copies(rows["path"].tolist(), folder, template, annotations,
                               lung_of=segmented_lungs(lung_finder), lung_key=lung_finder.sha256)
        regions = {"source": "segmenter", "segmenter_sha256": lung_finder.sha256, "dilate": LUNG_DILATE}
    scores = rows[["image", "patient_id", "source", "label", "y"]].copy()
    scores["p_original"] = base_scores if base_scores is not None else predict_files(run, rows["path"])[0]["score"].to_numpy()
    # A lung-ROI model may refuse a masked copy (no lungs found): NaN, counted, left out of its AUC.
    for name in ("no_lungs", "lungs_only"):
        scores[f"p_{name}"] = predict_files(run, copies[name], refused_ok=True)[0]["score"].to_numpy()
    own = [p for p in copies["own_lungs_removed"]]
    has_own = np.asarray([p is not None for p in own])
    scores["p_own_lungs_removed"] = np.nan
    if has_own.any():
        scores.loc[has_own, "p_own_lungs_removed"] = predict_files(
            run, [p for p in own if p is not None], refused_ok=True)[0]["score"].to_numpy()
    y_all, src_all = scores["y"].to_numpy(), scores["source"].astype(str).to_numpy()
    out: dict = {"lung_regions": regions,
                 "template": {"level": TEMPLATE_LEVEL, "size": TEMPLATE_SIZE, "area_share": float(template.mean())}}
    for name in ("original", "no_lungs", "lungs_only"):
        s_all = scores[f"p_{name}"].to_numpy()
        ok = np.isfinite(s_all)
        y, src, s = y_all[ok], src_all[ok], s_all[ok]
        usable = 0 < y.sum() < len(y)
        out[name] = {"auc": auc_ci(y, s).to_dict() if usable else None,
                     "within_source_auc": _wsa_short(y, s, src) if usable else None,
                     "refused": int((~ok).sum()),
                     "mean_p_negatives": float(s[y == 0].mean()) if (y == 0).any() else None,
                     "mean_p_positives": float(s[y == 1].mean()) if (y == 1).any() else None}
    y = y_all
    m = has_own & (y == 1) & np.isfinite(scores["p_own_lungs_removed"].to_numpy())
    d = scores.loc[m, "p_own_lungs_removed"].to_numpy() - scores.loc[m, "p_original"].to_numpy()
    out["own_lungs_removed_positives"] = {
        "n": int(m.sum()), "mean_p_original": float(scores.loc[m, "p_original"].mean()) if m.any() else None,
        "mean_p_removed": float(scores.loc[m, "p_own_lungs_removed"].mean()) if m.any() else None,
        "mean_change": _mean_ci(d, scores.loc[m, "patient_id"].astype(str).to_numpy(), n_boot=n_boot, seed=seed)}
    return jsonable(out), scores


def _wsa_short(y, s, src) -> dict:
    d = within_source_auc_defined(y, s, src)
    return {k: d.get(k) for k in ("value", "ci_low", "ci_high", "pairs", "sources_used")}


def run_proxies(run_dir: str | Path, out: str | Path | None = None, *, split: str = "test",
                work_dir: str | Path | None = None, per_source: int = 20, qualities: Sequence[int] = QUALITIES,
                annotations_folder: str | Path | None = None, n_boot: int = 1000, seed: int = 0,
                features: bool = True, limit_per_source: int | None = None) -> dict:
    """All proxies of ``run_dir`` on its own ``split`` rows; writes ``proxies.json`` / ``proxy_scores.csv`` to ``out``.

    ``work_dir`` keeps the re-saved / masked image copies (they depend only on the images, so several
    runs can share one folder); default: a folder under the cache directory.
    """
    from covidcxr import paths as cpaths
    from covidcxr.models.run import load_run

    t0 = time.perf_counter()
    run = load_run(run_dir)
    rows = split_rows(run, split)
    if limit_per_source:  # a quick look (tests, smoke runs): a seeded sample of each source, both classes kept
        rng = np.random.default_rng([seed, 13])
        keep = [np.sort(rng.choice(idx, min(len(idx), limit_per_source), replace=False))
                for _, idx in sorted(rows.groupby(["source", "y"]).indices.items())]
        rows = rows.iloc[np.sort(np.concatenate(keep))].reset_index(drop=True)
    work = Path(work_dir) if work_dir is not None else cpaths.cache_dir() / "proxies"
    annotations_folder = Path(annotations_folder) if annotations_folder is not None else cpaths.data_root() / "annotations"
    base, feats = predict_files(run, rows["path"], features=features)
    y, src = rows["y"].to_numpy(), rows["source"].astype(str).to_numpy()
    result: dict = {"run": str(run_dir), "split": split, "limit_per_source": limit_per_source, "model_sha256": run.model_sha256, "threshold": run.threshold,
                    "positive_class": run.positive_class, "discrimination": discrimination(y, base["score"], src)}
    sample = compression_sample(rows, per_source, seed)
    result["compression"], comp_scores = compression_invariance(run, sample, work / "resaved", qualities=qualities,
                                                                n_boot=n_boot, seed=seed)
    result["lungs"], lung_scores = lungs_removed(run, rows, work / "masked", annotations_folder,
                                                 base_scores=base["score"].to_numpy(), n_boot=n_boot, seed=seed)
    result["source_probe"] = source_probe(feats, src, rows["patient_id"], seed=seed, n_boot=n_boot)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    table = lung_scores.rename(columns={"p_original": "score"})
    table = table.merge(comp_scores[["image"] + [c for c in comp_scores.columns if c.startswith("p_")]],
                        on="image", how="left")
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "proxies.json", result)
        table.to_csv(out / "proxy_scores.csv", index=False)
    result["_scores"] = table
    return result


def _value(entry: dict | None) -> str:
    return "n/a" if not entry or entry.get("value") is None else f"{entry['value']:.3f}"


def summary_line(result: dict) -> str:
    d = result["discrimination"]
    w = d["within_source_auc"]
    c = result["compression"]["qualities"]
    q = "q70" if "q70" in c else next(iter(c))
    parts = [f"AUC {d['auc']['value']:.3f}", f"within-source AUC {w['value']:.3f}"
             f" [{w['ci_low'] if w['ci_low'] is None else round(w['ci_low'], 3)}, "
             f"{w['ci_high'] if w['ci_high'] is None else round(w['ci_high'], 3)}]",
             f"{q} mean |dP| {c[q]['mean_abs_change']['value']:.3f}",
             f"no-lungs AUC {_value(result['lungs']['no_lungs']['auc'])}",
             f"source probe {result['source_probe'].get('value')}"]
    return " | ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m covidcxr.evaluation.proxies", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="folder for proxies.json / proxy_scores.csv (default: RUN_DIR/proxies)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--work-dir", default=None, help="where re-saved / masked copies are kept")
    ap.add_argument("--per-source", type=int, default=20, help="one-class-source images in the compression proxy")
    ap.add_argument("--limit-per-source", type=int, default=None, help="quick look: at most N images per source x class")
    args = ap.parse_args(argv)
    result = run_proxies(args.run_dir, args.out or Path(args.run_dir) / "proxies", split=args.split,
                         work_dir=args.work_dir, per_source=args.per_source, limit_per_source=args.limit_per_source)
    result.pop("_scores", None)
    print(summary_line(result))
    print(json.dumps(jsonable(result), indent=1)[:4000])


if __name__ == "__main__":
    main()
