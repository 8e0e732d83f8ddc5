"""How well a model's penultimate features tell the image's source: a linear probe with patient-grouped CV.

A model that learned "which collection" carries the source in its features; the probe's out-of-fold
balanced accuracy, against chance (1 / number of sources) and against the same probe on ImageNet
features, says how much. Used by the shortcut proxies (:mod:`covidcxr.evaluation.proxies`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from covidcxr.evaluation.metrics import bootstrap_ci
from covidcxr.files import jsonable


def source_probe(features: np.ndarray, sources: Sequence, patients: Sequence, *, folds: int = 5, seed: int = 0,
                 n_boot: int = 1000, min_images: int = 10, C: float = 1.0) -> dict:
    """Balanced accuracy of predicting the source from ``features`` (patient-grouped CV), vs chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    src = np.asarray(sources, dtype=object).astype(str)
    pat = np.asarray(patients, dtype=object).astype(str)
    counts = pd.DataFrame({"s": src, "p": pat}).groupby("s").agg(n=("p", "size"), patients=("p", "nunique"))
    kept = sorted(counts.index[(counts["n"] >= min_images) & (counts["patients"] >= folds)])
    m = np.isin(src, kept)
    if len(kept) < 2:
        return {"value": None, "note": f"fewer than 2 sources with >= {min_images} images and >= {folds} patients"}
    X, s, g = np.asarray(features, float)[m], src[m], pat[m]
    pred = np.empty(len(s), dtype=object)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in cv.split(X, s, g):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000, class_weight="balanced"))
        clf.fit(X[train], s[train])
        pred[test] = clf.predict(X[test])
    value = float(balanced_accuracy_score(s, pred))
    lo, hi = bootstrap_ci(lambda idx: float(balanced_accuracy_score(s[idx], pred[idx])) if len(set(s[idx])) > 1
                          else float("nan"), len(s), clusters=g, n_boot=n_boot, seed=seed)
    return jsonable({"value": value, "ci_low": lo, "ci_high": hi, "chance": 1.0 / len(kept), "sources": kept,
                     "n": int(len(s)), "folds": folds, "method": "standardised logistic regression (C=%g), "
                     "patient-grouped stratified k-fold, out-of-fold balanced accuracy, patient bootstrap CI" % C})
