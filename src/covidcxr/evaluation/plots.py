"""Evaluation figures (matplotlib, Agg): ROC with bootstrap band and operating point, PR curve,
confusion matrix, per-class score histograms, reliability diagram, per-source ROC curves.

Each function draws one figure, saves it as PNG and returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn import metrics as skm

from covidcxr.evaluation.metrics import bootstrap_samples, check_binary
from covidcxr.plotting import pyplot, save_figure

plt = pyplot()

DPI = 110


def roc_band(y_true, scores, *, n_boot: int = 500, seed: int = 0, level: float = 0.95, clusters=None):
    """Pointwise bootstrap band of TPR over a fixed FPR grid: (grid, low, high)."""
    y, s = check_binary(y_true, scores)
    grid = np.linspace(0, 1, 101)
    curves = []
    for idx in bootstrap_samples(len(y), clusters=clusters, n_boot=n_boot, seed=seed):
        if y[idx].min() == y[idx].max():
            continue
        fpr, tpr, _ = skm.roc_curve(y[idx], s[idx])
        curves.append(np.interp(grid, fpr, tpr))
    if not curves:
        return grid, np.full_like(grid, np.nan), np.full_like(grid, np.nan)
    curves = np.array(curves)
    a = (1 - level) / 2
    return grid, np.quantile(curves, a, axis=0), np.quantile(curves, 1 - a, axis=0)


def plot_roc(path, y_true, scores, *, threshold: float | None = None, auc_text: str = "", title: str = "ROC",
             n_boot: int = 500, clusters=None) -> Path:
    y, s = check_binary(y_true, scores)
    fpr, tpr, _ = skm.roc_curve(y, s)
    grid, lo, hi = roc_band(y, s, n_boot=n_boot, clusters=clusters)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.fill_between(grid, lo, hi, color="tab:blue", alpha=0.2, label="95% bootstrap band")
    ax.plot(fpr, tpr, color="tab:blue", lw=2, label=f"ROC {auc_text}".strip())
    if threshold is not None:
        pred = s >= threshold
        op_tpr = (pred & (y == 1)).sum() / max(1, (y == 1).sum())
        op_fpr = (pred & (y == 0)).sum() / max(1, (y == 0).sum())
        ax.plot([op_fpr], [op_tpr], "o", color="tab:red", ms=8, label=f"threshold {threshold:.3g} (from validation)")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path, dpi=DPI)


def plot_pr(path, y_true, scores, *, threshold: float | None = None, title: str = "Precision-recall") -> Path:
    y, s = check_binary(y_true, scores)
    prec, rec, _ = skm.precision_recall_curve(y, s)
    ap = skm.average_precision_score(y, s)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(rec, prec, lw=2, label=f"AP = {ap:.3f}")
    ax.axhline(y.mean(), ls="--", color="grey", lw=1, label=f"prevalence {y.mean():.2f}")
    if threshold is not None:
        pred = s >= threshold
        tp = (pred & (y == 1)).sum()
        ax.plot([tp / max(1, y.sum())], [tp / max(1, pred.sum())], "o", color="tab:red", ms=8, label="operating point")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path, dpi=DPI)


def plot_confusion(path, matrix, labels: Sequence[str], *, title: str = "Confusion matrix") -> Path:
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.1 * len(labels) + 2))
    ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black", fontsize=11)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return save_figure(fig, path, dpi=DPI)


def plot_score_histograms(path, scores, labels: Sequence[str], *, threshold: float | None = None,
                          title: str = "Scores per true class") -> Path:
    s = np.asarray(scores, dtype=float)
    lab = np.asarray(labels, dtype=object).astype(str)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 31)
    for name in sorted(set(lab)):
        ax.hist(s[lab == name], bins=bins, alpha=0.5, label=f"{name} (n={int((lab == name).sum())})", density=True)
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", ls="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="positive-class probability", ylabel="density", title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=DPI)


def plot_reliability(path, curve: dict, *, ece: float | None = None, title: str = "Reliability diagram",
                     calibrated: dict | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for c, name, color in ((curve, "model", "tab:blue"), (calibrated, "temperature-scaled", "tab:green")):
        if c is None:
            continue
        mp, ob, n = (np.asarray(c[k], dtype=float) for k in ("mean_predicted", "observed", "count"))
        keep = n > 0
        ax.plot(mp[keep], ob[keep], "o-", color=color, label=name)
    if ece is not None:
        ax.text(0.03, 0.93, f"ECE = {ece:.3f}", transform=ax.transAxes)
    edges = np.asarray(curve["edges"])
    ax2 = ax.twinx()
    ax2.bar((edges[:-1] + edges[1:]) / 2, curve["count"], width=np.diff(edges) * 0.9, alpha=0.15, color="grey")
    ax2.set_ylabel("images per bin")
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path, dpi=DPI)


def plot_roc_by_group(path, y_true, scores, groups, *, title: str = "ROC per source") -> Path:
    y, s = check_binary(y_true, scores)
    g = np.asarray(groups, dtype=object).astype(str)
    fig, ax = plt.subplots(figsize=(6, 5))
    drawn = 0
    for name in sorted(set(g)):
        m = g == name
        if y[m].min() == y[m].max():
            continue
        fpr, tpr, _ = skm.roc_curve(y[m], s[m])
        ax.plot(fpr, tpr, lw=1.8, label=f"{name}: AUC {skm.roc_auc_score(y[m], s[m]):.3f} (n={int(m.sum())})")
        drawn += 1
    if drawn == 0:
        ax.text(0.5, 0.5, "no group holds both classes", ha="center")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title=title, xlim=(0, 1), ylim=(0, 1.01))
    if drawn:
        ax.legend(loc="lower right", fontsize=7)
    return save_figure(fig, path, dpi=DPI)


def plot_training_curves(path, epochs: list[dict]) -> Path | None:
    """Every numeric series of ``metrics.jsonl`` (one dict per epoch) against the epoch number."""
    if not epochs:
        return None
    keys = [k for k in epochs[0] if k != "epoch" and all(isinstance(e.get(k), (int, float)) for e in epochs)
            and not isinstance(epochs[0][k], bool)]
    if not keys:
        return None
    x = [e.get("epoch", i) for i, e in enumerate(epochs)]
    loss_keys = [k for k in keys if "loss" in k]
    # scores on the [0, 1] scale (AUC, accuracy, ...); counts, timings and the learning rate are left out
    scores = [k for k in keys if k not in loss_keys and k != "lr" and all(0 <= e[k] <= 1 for e in epochs)]
    panels = [p for p in (loss_keys, scores) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, ks in zip(axes[0], panels):
        for k in ks:
            ax.plot(x, [e[k] for e in epochs], marker="o", ms=3, label=k)
        ax.set(xlabel="epoch")
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=DPI)
