"""The within-source AUC with a CI: COVID against the negatives of the same source only.

A detector of "which collection" gets the plain AUC for free on data whose COVID images come from a
few collections; pairs inside one source take that away. These helpers keep only the sources where
DeLong has a variance, and split the AUC by the kind of negative (a hospital's own COVID-vs-normal
question is not the COVID-vs-pneumonia question the shared COVID collections mostly ask).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidcxr.evaluation.metrics import within_source_auc_details


def one_class_sources(y: np.ndarray, sources: np.ndarray) -> set[str]:
    t = pd.DataFrame({"s": sources, "y": y})
    return {s for s, g in t.groupby("s") if g["y"].nunique() == 1}


def defined_sources(y: np.ndarray, sources: np.ndarray, minimum: int = 2) -> list[str]:
    """Sources holding at least ``minimum`` positives and negatives (where DeLong has a variance)."""
    t = pd.DataFrame({"s": sources, "y": y})
    return sorted(s for s, g in t.groupby("s") if g["y"].sum() >= minimum and (1 - g["y"]).sum() >= minimum)


def within_source_auc_defined(y, score, sources) -> dict:
    """Within-source AUC over the sources with >= 2 images of each class, so that it has a CI.

    (The shared test split's Figure1 part holds a single normal image: with it the pooled DeLong CI
    is undefined, so it is left out here and named in ``sources_left_out``; ``within_source_auc_all``
    keeps it.)"""
    y, score = np.asarray(y, int), np.asarray(score, float)
    sources = np.asarray(sources, dtype=object).astype(str)
    keep_sources = defined_sources(y, sources)
    mixed = sorted(set(sources) - one_class_sources(y, sources))
    if not keep_sources:
        return {"value": None, "ci_low": None, "ci_high": None, "note": "no source with >= 2 images of each class"}
    m = np.isin(sources, keep_sources)
    d = within_source_auc_details(y[m], score[m], sources[m])
    d["sources_left_out"] = [s for s in mixed if s not in keep_sources]
    return d


def within_source_auc_by_negative_label(y, score, sources, labels) -> dict:
    """The within-source AUC of the positives against each kind of negative alone, by manifest label.

    In the shared COVID sources the negatives are mostly other pneumonias (ieee8023: 74 pneumonia,
    11 normal, 7 other), so the pooled within-source AUC is mostly "COVID vs pneumonia". A hospital's
    own COVID-vs-normal question is the ``normal`` entry: a model that calls a normal image of a COVID
    collection COVID (the collection's look) fails it however well it ranks the pneumonias."""
    y, score = np.asarray(y, int), np.asarray(score, float)
    sources = np.asarray(sources, dtype=object).astype(str)
    labels = np.asarray(labels, dtype=object).astype(str)
    out = {}
    for label in sorted(set(labels[y == 0])):
        m = (y == 1) | (labels == label)
        d = within_source_auc_defined(y[m], score[m], sources[m])
        paired = (labels == label) & np.isin(sources, d.get("sources_used") or [])
        out[label] = {"negatives_in_pairs": int(paired.sum()), **d}
    return out


def scores_by_label(y, score, labels) -> dict:
    """The mean score of each manifest label, and the positives' AUC (DeLong CI) against each kind of
    negative alone, for scores of *one* source (e.g. a held-out one, where there is no pooling to do).
    An unseen collection's normals scored like COVID is what a hospital's COVID-vs-normal test punishes."""
    from covidcxr.evaluation.metrics import auc_ci

    y, score = np.asarray(y, int), np.asarray(score, float)
    labels = np.asarray(labels, dtype=object).astype(str)
    by_negative = {}
    if y.any():
        for label in sorted(set(labels[y == 0])):
            m = (y == 1) | (labels == label)
            by_negative[str(label)] = auc_ci(y[m], score[m]).to_dict()
    return {"mean_p_by_label": {str(label): float(score[labels == label].mean()) for label in sorted(set(labels))},
            "auc_by_negative_label": by_negative}
