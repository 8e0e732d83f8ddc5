"""The counterfactual shortcut test (DeGrave et al. 2021): change only a source's "look", watch P(covid).

A CycleGAN trained between two *sources* on images that share a label (``configs/synth_nih_rsna_normals.yaml``:
NIH normals <-> RSNA normals) learns what tells the collections apart, not disease. Translating a
classifier's held-out images of the source domain into the other source's look and predicting again shows
what the classifier follows: one that reads the lungs barely moves; one that reads the collection moves a lot.

:func:`counterfactual_shift` reports, on the run's own ``test`` rows (its ``split.csv``) of the generator's
source domain:

* ``translated``: mean |change in P(positive)| (patient-bootstrap 95% CI), mean signed change, the share of
  decisions (at the run's threshold) that flip (Wilson CI), and the AUC of the whole test split with those
  images replaced by their translations, against the original AUC (DeLong, paired);
* two controls through the same path, so that the number is about the *look* and not the generator's
  defects: ``resampled`` (the image shrunk to the generator's resolution and back: the resolution loss alone)
  and ``round_trip`` (A -> B -> A: the generator's artefacts twice, the source look kept).

A shift well above both controls is the shortcut signal. The generator is trained once and reused
(``covidcxr synth train``); :func:`scorecard_line` is the one line for the shortcut scorecard.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from covidcxr.errors import CovidCXRError
from covidcxr.evaluation.metrics import auc_ci, bootstrap_ci, delong_test, wilson_ci


def _shift(p0: np.ndarray, p1: np.ndarray, threshold: float, patients: np.ndarray, n_boot: int, seed: int) -> dict:
    d = p1 - p0
    flips = int(((p0 >= threshold) != (p1 >= threshold)).sum())
    lo, hi = bootstrap_ci(lambda idx: float(np.abs(d[idx]).mean()), len(d), clusters=patients, n_boot=n_boot, seed=seed)
    f_lo, f_hi = wilson_ci(flips, len(d))
    return {"n": int(len(d)), "mean_abs_delta": float(np.abs(d).mean()), "mean_abs_delta_ci": [lo, hi],
            "mean_delta": float(d.mean()), "flips": flips, "flip_share": flips / len(d), "flip_share_ci": [f_lo, f_hi],
            "flips_to_positive": int(((p0 < threshold) & (p1 >= threshold)).sum())}


def _resampled(pixels: np.ndarray, size: int) -> np.ndarray:
    h, w = pixels.shape
    scale = size / max(h, w)
    small = cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), 0, 1)


def counterfactual_shift(classifier_run: str | Path, generator_run: str | Path, *, direction: str = "a2b",
                         split: str = "test", n_boot: int = 1000, seed: int = 0, max_images: int | None = None) -> dict:
    """How much the classifier's P(positive) moves when only the source look of its held-out images changes."""
    from covidcxr.data.io import read_xray
    from covidcxr.evaluation.proxies import split_rows
    from covidcxr.models.cyclegan import load_generator
    from covidcxr.models.run import load_run

    run = load_run(classifier_run)
    if run.positive_index is None or run.threshold is None:
        raise CovidCXRError(f"{classifier_run}: the counterfactual test needs a binary run with a threshold")
    forward = load_generator(generator_run, direction)
    back = load_generator(generator_run, "b2a" if direction == "a2b" else "a2b")
    src_key, dst_key = ("a", "b") if direction == "a2b" else ("b", "a")
    domains = forward.record.domains
    rows = split_rows(run, split)
    keep = np.ones(len(rows), dtype=bool)
    for column, value in domains[src_key]["filter"].items():
        if column not in rows.columns:
            raise CovidCXRError(f"domain filter column {column!r} is not one of {list(rows.columns)}")
        keep &= rows[column].astype(str).isin([str(v) for v in (value if isinstance(value, list) else [value])]).to_numpy()
    idx = np.flatnonzero(keep)
    if max_images is not None and len(idx) > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_images, replace=False))
    if len(idx) < 2:
        raise CovidCXRError(f"{classifier_run}: {len(idx)} {split} image(s) in domain {domains[src_key]['name']!r} "
                            f"({domains[src_key]['filter']}); need at least 2")
    pos, thr = run.positive_index, float(run.threshold)
    pixels = [read_xray(p).pixels for p in rows["path"]]
    p_orig = run.predict_arrays(pixels)[:, pos]
    chosen = [pixels[i] for i in idx]
    size = forward.spec.image_size
    translated = [cv2.resize(t, (p.shape[1], p.shape[0]), interpolation=cv2.INTER_LINEAR)
                  for t, p in zip(forward.translate(chosen), chosen)]
    round_trip = [cv2.resize(t, (p.shape[1], p.shape[0]), interpolation=cv2.INTER_LINEAR)
                  for t, p in zip(back.translate(translated), chosen)]
    variants = {"translated": translated, "round_trip": round_trip, "resampled": [_resampled(p, size) for p in chosen]}
    y, patients = rows["y"].to_numpy(), rows["patient_id"].to_numpy()
    base_auc = auc_ci(y, p_orig) if len(set(y)) == 2 else None
    out = {"classifier_run": str(classifier_run), "generator_run": str(generator_run), "direction": direction,
           "translation": f"{domains[src_key]['name']} -> {domains[dst_key]['name']}", "split": split,
           "generator_sha256": forward.sha256, "threshold": thr, "n_split": int(len(rows)), "n_translated": int(len(idx)),
           "auc_original": base_auc.to_dict() if base_auc is not None else None}
    for name, images in variants.items():
        p_new = run.predict_arrays(images)[:, pos]
        result = _shift(p_orig[idx], p_new, thr, patients[idx], n_boot, seed)
        if base_auc is not None:
            swapped = p_orig.copy()
            swapped[idx] = p_new
            result["auc"] = auc_ci(y, swapped).to_dict()
            result["delong_vs_original"] = delong_test(y, p_orig, swapped)
        out[name] = result
    return out


def scorecard_line(result: dict) -> str:
    """One line for the shortcut scorecard."""
    t, r, s = result["translated"], result["round_trip"], result["resampled"]
    lo, hi = t["mean_abs_delta_ci"]
    auc = (f"; AUC {result['auc_original']['value']:.3f} -> {t['auc']['value']:.3f}"
           if result.get("auc_original") and "auc" in t else "")
    return (f"counterfactual {result['translation']} ({t['n']} {result['split']} images): mean |dP| {t['mean_abs_delta']:.3f} "
            f"[{lo:.3f}, {hi:.3f}], flips {t['flip_share']:.1%}{auc} (controls: round trip {r['mean_abs_delta']:.3f}, "
            f"resampled {s['mean_abs_delta']:.3f})")
