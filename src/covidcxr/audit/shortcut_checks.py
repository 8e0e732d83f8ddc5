"""The measurements behind the shortcut scorecard (:mod:`covidcxr.audit.scorecard` judges them).

Every measurement predicts through the one prediction path (:func:`covidcxr.evaluation.proxies.predict_files`)
and reuses the existing proxies where they exist: :func:`~covidcxr.evaluation.proxies.source_probe`,
:func:`~covidcxr.evaluation.proxies.lungs_removed` (lungs blacked out / lungs only, with the lung
template from the shared annotations), the JPEG re-saves of the compression proxy, and the
explanation package's lung-mass share and pointing game. What they lack (border-only, markers,
resolution, gamma, subgroups, the ImageNet reference of the source probe) is measured here.

Each function returns plain dicts: ``value``, ``ci_low``, ``ci_high`` and what it was computed on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.evaluation.metrics import auc_ci, bootstrap_ci, wilson_ci
from covidcxr.evaluation.proxies import compression_sample, predict_files
from covidcxr.files import jsonable

#: Age bands of the subgroup check (years; Figure1's "50+" style ranges count at their lower end).
AGE_BANDS = ((0, 18, "<18"), (18, 50, "18-49"), (50, 70, "50-69"), (70, 200, "70+"))


def _auc(y, s) -> dict | None:
    y, s = np.asarray(y, int), np.asarray(s, float)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    if not (0 < y.sum() < len(y)):
        return None
    return auc_ci(y, s).to_dict()


def _mean_abs(delta: np.ndarray, clusters, n_boot: int, seed: int) -> dict:
    d = np.abs(np.asarray(delta, float))
    if not len(d):
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    lo, hi = bootstrap_ci(lambda i: float(d[i].mean()), len(d), clusters=np.asarray(clusters), n_boot=n_boot, seed=seed)
    return jsonable({"value": float(d.mean()), "ci_low": lo, "ci_high": hi, "n": int(len(d))})


def imagenet_twin(run):
    """The run's architecture with its starting (ImageNet) backbone and the run's preprocessing, as a
    predictor; None when the starting weights are not at hand."""
    from covidcxr.models.registry import create_model
    from covidcxr.models.run import LoadedRun

    model_info = run.record.info.get("model") or {}
    weights = model_info.get("weights")
    if not weights:
        return None
    # An ensemble's members share the starting backbone: one member is the reference (and its folder
    # holds the lung segmenter a lung-ROI run needs).
    ref = run.members[0] if run.members else run
    try:
        model = create_model(ref.record.architecture, len(run.classes), channels=run.record.channels, weights=weights,
                             weights_sha256=model_info.get("weights_sha256"))
    except Exception:  # weights elsewhere / not this machine's: the probe is then reported without its reference
        return None
    return LoadedRun(run_dir=ref.run_dir, model=model.eval(), record=ref.record)


def source_probe_check(run, rows: pd.DataFrame, feats, *, n_boot: int, seed: int) -> dict:
    from covidcxr.evaluation.proxies import source_probe

    src, pid = rows["source"].astype(str).to_numpy(), rows["patient_id"].astype(str).to_numpy()
    out = source_probe(feats, src, pid, seed=seed, n_boot=n_boot) if feats is not None else {"value": None}
    twin = imagenet_twin(run)
    ref = None
    if twin is not None and out.get("value") is not None:
        _, f_ref = predict_files(twin, rows["path"], features=True)
        ref = source_probe(f_ref, src, pid, seed=seed, n_boot=n_boot) if f_ref is not None else None
    out["imagenet"] = ref
    out["excess_over_imagenet"] = (out["value"] - ref["value"]) if ref and ref.get("value") is not None else None
    return jsonable(out)


def lung_checks(run, rows, base_scores, work: Path, annotations_folder) -> dict:
    """AUC with each image's segmented lungs removed, on those lungs only, and on the border frame only.

    The lungs come from the lung segmenter shipped with covidcxr (``models/assets/lung_segmenter``,
    Dice 0.95), not from the run, so every model is audited against the same lungs."""
    from covidcxr.audit.perturb import altered_copies
    from covidcxr.evaluation.proxies import lungs_removed
    from covidcxr.models.lung_finder import DEFAULT_SEGMENTER, load_lung_finder

    lungs, _ = lungs_removed(run, rows, work / "masked", annotations_folder, base_scores=base_scores, n_boot=200,
                             lung_finder=load_lung_finder(DEFAULT_SEGMENTER))
    border, _ = predict_files(run, altered_copies(rows["path"], work, "border_only"), refused_ok=True)
    y = rows["y"].to_numpy()
    out = {"original": _auc(y, base_scores), "border_only": _auc(y, border["score"]),
           "mask_source": lungs.get("lung_regions")}
    for name in ("no_lungs", "lungs_only"):
        part = lungs.get(name) or {}
        out[name] = part.get("auc") or {"value": None, "note": (
            f"The model refused {part.get('refused')} of these images (its lung crop found no lungs), so "
            "nothing it could score is left." if part.get("refused") else "Not measurable on these images.")}
    return out


def heatmap_checks(run_dir, rows, work: Path, annotations_folder, max_images: int, seed: int, n_boot: int) -> dict:
    """CAM lung-mass share over the uniform map and the pointing game on annotated positive test images."""
    from covidcxr.data.annotations import Annotations
    from covidcxr.explain.images import explain_images

    ann = Annotations(annotations_folder)
    pos = rows[(rows["y"] == 1) & rows["path"].map(lambda p: bool(ann.available(p)))]
    if pos.empty:
        return {"mass_share_over_uniform": {"value": None, "note": "no annotated positive images"},
                "pointing_game": {"value": None}}
    pos = pos.sample(min(max_images, len(pos)), random_state=seed)
    from covidcxr.models.record import read_run_record

    out = work / "explain" / read_run_record(run_dir).model_sha256[:16]  # overlays of this model only
    summary = explain_images(run_dir, pos["path"].tolist(), out=out, annotations=ann)
    focus = [e["lung_focus"] for e in summary["images"] if e.get("lung_focus") and not e["lung_focus"]["empty"]]
    if not focus:
        return {"mass_share_over_uniform": {"value": None, "note": "every heatmap was empty"}, "pointing_game": {"value": None}}
    excess = np.array([f["mass_share"] - f["baseline"] for f in focus])
    hits = np.array([bool(f["pointing_hit"]) for f in focus])
    lo, hi = bootstrap_ci(lambda i: float(excess[i].mean()), len(excess), n_boot=n_boot, seed=seed)
    plo, phi = wilson_ci(int(hits.sum()), len(hits))
    return jsonable({"mass_share_over_uniform": {"value": float(excess.mean()), "ci_low": lo, "ci_high": hi,
                                                 "n": len(excess), "mean_baseline": float(np.mean([f["baseline"] for f in focus]))},
                     "pointing_game": {"value": float(hits.mean()), "ci_low": plo, "ci_high": phi, "n": len(hits)}})


def marker_checks(run, rows, work: Path, per_source: int, n_boot: int, seed: int) -> dict:
    """Markers pasted on negatives: mean |change in P(positive)| and the share of decisions that flip, per marker."""
    from covidcxr.audit.perturb import MARKERS, altered_copies

    neg = compression_sample(rows[rows["y"] == 0], per_source, seed)
    base, _ = predict_files(run, neg["path"])
    t = run.threshold if run.threshold is not None else 0.5
    out = {}
    for kind in MARKERS:
        marked, _ = predict_files(run, altered_copies(neg["path"], work, kind))
        delta = marked["score"].to_numpy() - base["score"].to_numpy()
        flips = (marked["score"].to_numpy() >= t) != (base["score"].to_numpy() >= t)
        lo, hi = wilson_ci(int(flips.sum()), len(flips))
        out[kind] = {"mean_abs_delta_p": _mean_abs(delta, neg["patient_id"].astype(str), n_boot, seed),
                     "mean_delta_p": float(delta.mean()),
                     "flipped": {"value": float(flips.mean()), "ci_low": lo, "ci_high": hi, "n": int(len(flips))}}
    return jsonable(out)


def perturbation_checks(run, rows, work: Path, per_source: int, n_boot: int, seed: int) -> dict:
    """Resolution (down 4x, back up), JPEG q50 (the compression proxy's re-save) and gamma: change in AUC and mean |change in P|."""
    from covidcxr.audit.perturb import GAMMAS, altered_copies
    from covidcxr.evaluation.proxy_images import resaved_copies

    sample = compression_sample(rows, per_source, seed)
    y, pid = sample["y"].to_numpy(), sample["patient_id"].astype(str)
    base, _ = predict_files(run, sample["path"])
    b = base["score"].to_numpy()
    variants = {"lowres": altered_copies(sample["path"], work, "lowres"),
                "jpeg_q50": resaved_copies(sample["path"].tolist(), work / "resaved", (50,))["q50"],
                **{f"gamma_{g:g}": altered_copies(sample["path"], work, f"gamma_{g:g}") for g in GAMMAS}}
    out = {"original_auc": _auc(y, b)}
    for name, paths in variants.items():
        s = predict_files(run, paths)[0]["score"].to_numpy()
        auc = _auc(y, s)
        out[name] = {"auc": auc, "delta_auc": (auc["value"] - out["original_auc"]["value"]) if auc and out["original_auc"] else None,
                     "mean_abs_delta_p": _mean_abs(s - b, pid, n_boot, seed)}
    return jsonable(out)


def _age(v) -> float:
    try:
        return float(str(v).rstrip("+").split("-")[0])
    except ValueError:
        return float("nan")


def subgroup_checks(rows, scores: np.ndarray, *, min_per_class: int = 5) -> dict:
    """AUC per age band and per sex (groups with >= ``min_per_class`` of each class) and the age-only AUC."""
    y = rows["y"].to_numpy()
    out: dict = {"age_bands": {}, "sex": {}}
    ages = np.array([_age(a) for a in rows["age"]]) if "age" in rows else np.full(len(rows), np.nan)
    for lo, hi, name in AGE_BANDS:
        m = (ages >= lo) & (ages < hi)
        if min(int((y[m] == 1).sum()), int((y[m] == 0).sum())) >= min_per_class:
            out["age_bands"][name] = _auc(y[m], scores[m])
    sex = rows["sex"].astype(str).str.upper().str[:1].to_numpy() if "sex" in rows else np.full(len(rows), "")
    for s in ("F", "M"):
        m = sex == s
        if min(int((y[m] == 1).sum()), int((y[m] == 0).sum())) >= min_per_class:
            out["sex"][s] = _auc(y[m], scores[m])
    groups = [v["value"] for part in ("age_bands", "sex") for v in out[part].values() if v]
    out["max_gap"] = {"value": float(max(groups) - min(groups)) if len(groups) > 1 else None, "groups": len(groups)}
    has_age = np.isfinite(ages)
    age_auc = _auc(y[has_age], ages[has_age]) if has_age.any() else None
    if age_auc and age_auc["value"] < 0.5:  # age predicts either way: report the informative direction
        age_auc = {**age_auc, "value": 1 - age_auc["value"], "ci_low": 1 - age_auc["ci_high"],
                   "ci_high": 1 - age_auc["ci_low"], "direction": "younger is positive"}
    out["age_only_auc"] = {**(age_auc or {"value": None}), "n_with_age": int(has_age.sum())}
    return jsonable(out)
