"""Classification metrics at a decision threshold (binary) and one-vs-rest (multi-class), with CIs.

Sensitivity, specificity, PPV, NPV and accuracy carry Wilson intervals; F1, balanced accuracy and
macro AUC a percentile bootstrap (patient-clustered with ``clusters=``). The AUC, DeLong and
bootstrap machinery they build on is :mod:`covidcxr.evaluation.metrics`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from sklearn import metrics as skm

from covidcxr.errors import CovidCXRError
from covidcxr.evaluation.metrics import (DEFAULT_LEVEL, DEFAULT_N_BOOT, Estimate, _percentile_ci, auc_ci,
                                         auc_score, bootstrap_ci, bootstrap_samples, check_binary, wilson_ci)


# ---------------------------------------------------------------- binary metrics at a threshold


def confusion_counts(y_true, y_pred) -> dict:
    """tp / fp / tn / fn of 0/1 labels and 0/1 decisions (``sklearn.metrics.confusion_matrix``)."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(y_pred).astype(int)
    if len(y) == 0:
        return {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(y, p, labels=[0, 1]).ravel())
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


# name -> (successes, trials) from confusion counts: the Wilson-interval metrics
_PROPORTIONS: dict[str, Callable[[dict], tuple[int, int]]] = {
    "sensitivity": lambda c: (c["tp"], c["tp"] + c["fn"]),
    "specificity": lambda c: (c["tn"], c["tn"] + c["fp"]),
    "ppv": lambda c: (c["tp"], c["tp"] + c["fp"]),
    "npv": lambda c: (c["tn"], c["tn"] + c["fn"]),
    "accuracy": lambda c: (c["tp"] + c["tn"], c["tp"] + c["tn"] + c["fp"] + c["fn"]),
}


def _bootstrap_counts(y: np.ndarray, pred: np.ndarray, **kwargs) -> dict:
    """Confusion counts of every bootstrap resample at once (arrays of length n_boot)."""
    cell = y * 2 + pred  # 0 tn, 1 fp, 2 fn, 3 tp
    table = np.array([np.bincount(cell[idx], minlength=4) for idx in bootstrap_samples(len(y), **kwargs)])
    if table.size == 0:
        table = np.zeros((0, 4), dtype=int)
    return {"tn": table[:, 0], "fp": table[:, 1], "fn": table[:, 2], "tp": table[:, 3]}


def _from_counts(name: str, c: dict):
    """A threshold metric from confusion counts (scalars or arrays of resamples); NaN where undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        tp, fp, tn, fn = (np.asarray(c[k], dtype=float) for k in ("tp", "fp", "tn", "fn"))
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        values = {"sensitivity": sens, "specificity": spec, "ppv": tp / (tp + fp), "npv": tn / (tn + fn),
                  "accuracy": (tp + tn) / (tp + tn + fp + fn), "balanced_accuracy": (sens + spec) / 2,
                  "f1": 2 * tp / (2 * tp + fp + fn)}
    v = values[name]
    return float(v) if np.ndim(v) == 0 else v




THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "balanced_accuracy", "f1")


def binary_metrics(y_true, scores, threshold: float, *, level: float = DEFAULT_LEVEL, clusters=None,
                   n_boot: int = DEFAULT_N_BOOT, seed: int = 0, prevalence: float | None = None) -> dict:
    """All binary metrics with CIs: AUC (DeLong), metrics at ``threshold`` (score >= threshold is positive).

    Proportions get Wilson intervals, F1 and balanced accuracy a bootstrap; with ``clusters`` every
    interval is a cluster bootstrap. ``prevalence`` adds PPV / NPV re-computed for that prevalence.
    """
    y, s = check_binary(y_true, scores)
    if not np.isfinite(threshold):
        raise CovidCXRError(f"threshold {threshold}: must be a finite number")
    pred = (s >= threshold).astype(int)
    counts = confusion_counts(y, pred)
    out: dict = {"n": int(len(y)), "n_positive": int(y.sum()), "n_negative": int(len(y) - y.sum()),
                 "threshold": float(threshold), "confusion": counts}
    if counts["tp"] + counts["fn"] and counts["tn"] + counts["fp"]:
        out["auc"] = auc_ci(y, s, level=level, clusters=clusters, n_boot=n_boot, seed=seed).to_dict()
    else:
        out["auc"] = Estimate(float("nan"), float("nan"), float("nan"), "undefined: one class only", len(y)).to_dict()
    boot = _bootstrap_counts(y, pred, clusters=clusters, n_boot=n_boot, seed=seed)
    for name in THRESHOLD_METRICS:
        value = _from_counts(name, counts)
        if clusters is None and name in _PROPORTIONS:
            k, n = _PROPORTIONS[name](counts)
            lo, hi = wilson_ci(k, n, level=level)
            est = Estimate(value, lo, hi, "Wilson", n)
        else:
            lo, hi = _percentile_ci(_from_counts(name, boot), level, n_boot)
            method = "cluster bootstrap (patients)" if clusters is not None else "bootstrap"
            est = Estimate(value, lo, hi, method, len(y))
        out[name] = est.to_dict()
    if prevalence is not None:
        out["at_prevalence"] = predictive_values_at_prevalence(out["sensitivity"], out["specificity"], prevalence)
    return out


def predictive_values_at_prevalence(sensitivity: dict, specificity: dict, prevalence: float) -> dict:
    """PPV / NPV for a target prevalence by Bayes' rule from sensitivity and specificity.

    CIs: PPV rises with both sensitivity and specificity and NPV too, so evaluating the formula at the
    sensitivity / specificity CI bounds gives a (conservative) interval.
    """
    if not 0 < prevalence < 1:
        raise CovidCXRError(f"prevalence {prevalence}: must be strictly between 0 and 1")

    def ppv(se, sp):
        d = se * prevalence + (1 - sp) * (1 - prevalence)
        return se * prevalence / d if d else float("nan")

    def npv(se, sp):
        d = sp * (1 - prevalence) + (1 - se) * prevalence
        return sp * (1 - prevalence) / d if d else float("nan")

    se, sp = sensitivity["value"], specificity["value"]
    if se is None or sp is None:
        return {"prevalence": prevalence, "ppv": None, "npv": None}

    def bound(est, key, default):
        return default if est.get(key) is None else est[key]

    se_lo, se_hi = bound(sensitivity, "ci_low", se), bound(sensitivity, "ci_high", se)
    sp_lo, sp_hi = bound(specificity, "ci_low", sp), bound(specificity, "ci_high", sp)
    method = "Bayes from sensitivity/specificity; CI from their CI bounds"
    return {
        "prevalence": prevalence,
        "ppv": Estimate(ppv(se, sp), ppv(se_lo, sp_lo), ppv(se_hi, sp_hi), method).to_dict(),
        "npv": Estimate(npv(se, sp), npv(se_lo, sp_lo), npv(se_hi, sp_hi), method).to_dict(),
    }


# ---------------------------------------------------------------- multi-class


def multiclass_metrics(y_true: Sequence[str], probs: np.ndarray, classes: Sequence[str], *,
                       y_pred: Sequence[str] | None = None, level: float = DEFAULT_LEVEL, clusters=None,
                       n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict:
    """One-vs-rest AUCs (DeLong CIs), macro AUC (bootstrap CI), accuracy and the confusion matrix."""
    classes = list(classes)
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=object).astype(str)
    if probs.shape != (len(y), len(classes)):
        raise CovidCXRError(f"probabilities have shape {probs.shape}; expected ({len(y)}, {len(classes)})")
    unknown = sorted(set(y) - set(classes))
    if unknown:
        raise CovidCXRError(f"labels {unknown} are not among the model's classes {classes}")
    pred = np.asarray(y_pred, dtype=object).astype(str) if y_pred is not None else np.asarray(classes)[probs.argmax(1)]
    y_idx = np.array([classes.index(v) for v in y])
    per_class = {}
    present = []
    for k, name in enumerate(classes):
        yk = (y_idx == k).astype(int)
        if 0 < yk.sum() < len(yk):
            per_class[name] = auc_ci(yk, probs[:, k], level=level, clusters=clusters, n_boot=n_boot, seed=seed).to_dict()
            present.append(k)
        else:
            per_class[name] = None

    def macro(idx):
        vals = [auc_score((y_idx[idx] == k).astype(int), probs[idx, k]) for k in present]
        return float(np.mean(vals)) if vals and np.all(np.isfinite(vals)) else np.nan

    macro_value = macro(np.arange(len(y))) if present else float("nan")
    lo, hi = bootstrap_ci(macro, len(y), clusters=clusters, n_boot=n_boot, level=level, seed=seed) if present else (np.nan, np.nan)
    correct = int((pred == y).sum())
    acc_lo, acc_hi = wilson_ci(correct, len(y), level=level)
    return {
        "classes": classes,
        "auc_ovr": per_class,
        "macro_auc": Estimate(macro_value, lo, hi, "bootstrap", len(y)).to_dict(),
        "accuracy": Estimate(correct / len(y) if len(y) else np.nan, acc_lo, acc_hi, "Wilson", len(y)).to_dict(),
        "confusion_matrix": {"labels": classes,
                             "matrix": skm.confusion_matrix(y, pred, labels=classes).tolist()},
    }
