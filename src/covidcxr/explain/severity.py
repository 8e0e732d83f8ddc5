"""Do the model's outputs track how sick the lungs look? (expert severity scores, Cohen et al. 2020)

On the 92 ieee8023 images with expert scores (``geographic_extent_mean`` 0-8, ``opacity_mean`` 0-6,
means of 3 radiologists), two model quantities are rank-correlated (Spearman) with each score:

* ``probability``: the predicted probability of the positive class (``covid``);
* ``cam_lung_area``: the share of lung pixels where the heatmap exceeds ``cam_threshold`` (0.5 of the
  per-image peak), using the image's lung mask (v7labs, else lungVAE) or, failing that, its lung boxes.

95 % CIs come from a percentile bootstrap over *patients* (several scored images can belong to one
patient; patient ids from the data root's ``manifest.csv`` when it lists the image, else one cluster
per image). These images are from the COVID collection the models are trained on, so the numbers say
whether the model's evidence grows with disease, not how well it generalises: run it with a model
whose training split left these patients out if you want to quote them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from covidcxr import paths
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.data.annotations import Annotations
from covidcxr.explain.cam import cam_models, canonical_method, class_index, heatmaps
from covidcxr.explain.lung_focus import lung_cam_area
from covidcxr.files import write_json
from covidcxr.models.predict import predict_inputs
from covidcxr.models.run import LoadedRun, load_run
from covidcxr.plotting import pyplot, save_figure
from covidcxr.progress import make_progress

SCORES = ("geographic_extent_mean", "opacity_mean")
PREDICTORS = ("probability", "cam_lung_area")


def spearman_ci(x, y, *, clusters=None, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Spearman rho with a (cluster) percentile-bootstrap CI."""
    from covidcxr.evaluation.metrics import bootstrap_ci

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)

    def rho(idx):
        xs, ys = x[idx], y[idx]
        if np.ptp(xs) == 0 or np.ptp(ys) == 0:
            return float("nan")
        return float(spearmanr(xs, ys).statistic)

    point = rho(np.arange(len(x)))
    lo, hi = bootstrap_ci(rho, len(x), clusters=clusters, n_boot=n_boot, level=level, seed=seed)
    return {"rho": point, "ci_low": lo, "ci_high": hi, "n": int(len(x)), "level": level}


def _patients(root: Path, images: list[str]) -> list[str]:
    manifest = root / "manifest.csv"
    ids = {}
    if manifest.is_file():
        table = pd.read_csv(manifest, usecols=["image", "patient_id"], dtype=str)
        ids = dict(zip(table["image"], table["patient_id"]))
    return [ids.get(im, im) for im in images]


def severity_study(run_dir: str | Path, *, data_root: str | Path | None = None, method: str = "gradcam",
                   target_class: str | None = None, layer: str | None = None, cam_threshold: float = 0.5,
                   n_boot: int = 2000, batch_size: int = 8, limit: int | None = None, out: str | Path | None = None,
                   run: LoadedRun | None = None) -> dict:
    """Correlate predicted probability and heatmap lung area with expert severity; writes JSON + scatter plot."""
    from covidcxr.explain.images import prepare_images

    root = Path(data_root) if data_root is not None else paths.data_root()
    ann = Annotations(root / "annotations")
    scores = ann.severity_scores()
    if limit is not None:
        scores = scores.iloc[:limit]
    run = run if run is not None else load_run(run_dir)
    target = class_index(run, target_class)
    if target is None:
        raise ConfigError("severity: the run has no positive class; pass target_class (e.g. 'covid')")
    method = canonical_method(method)
    models = cam_models(run, layer)
    rows, skipped = [], []
    with make_progress() as bar:
        task = bar.add_task("severity", total=len(scores))
        for start in range(0, len(scores), batch_size):
            chunk = scores.iloc[start : start + batch_size]
            batch = []
            for (path, xray, reason), (_, rec) in zip(prepare_images([root / im for im in chunk["image"]], run),
                                                       chunk.iterrows()):
                region = ann.lung_region(rec["image"], xray.pixels.shape) if xray is not None else None
                if xray is None or region is None:
                    skipped.append({"image": rec["image"], "reason": reason or "no lung mask or box"})
                else:
                    batch.append((rec, xray, region))
            if batch:
                prepared = [x for _, x, _ in batch]
                probs = [r.probabilities[target] for r in predict_inputs(run, prepared)]
                maps = heatmaps(run, prepared, method=method, models=models, class_indices=[target] * len(batch),
                                batch_size=batch_size)
                for (rec, xray, region), p, heat in zip(batch, probs, maps):
                    rows.append({"image": rec["image"], "geographic_extent_mean": float(rec["geographic_extent_mean"]),
                                 "opacity_mean": float(rec["opacity_mean"]), "probability": float(p),
                                 "cam_lung_area": lung_cam_area(heat, region, cam_threshold), "region": region.kind})
            bar.advance(task, len(chunk))
    if len(rows) < 3:
        raise CovidCXRError(f"severity: only {len(rows)} scored images could be used (skipped: {skipped})")
    table = pd.DataFrame(rows)
    clusters = _patients(root, list(table["image"]))
    correlations = {pred: {score: spearman_ci(table[pred], table[score], clusters=clusters, n_boot=n_boot)
                           for score in SCORES} for pred in PREDICTORS}
    result = {"run_dir": str(run_dir), "model_sha256": run.model_sha256, "method": method,
              "target_class": run.classes[target], "cam_threshold": cam_threshold, "n_images": len(rows),
              "n_patients": len(set(clusters)), "bootstrap": {"n_boot": n_boot, "unit": "patient"},
              "correlations": correlations, "skipped": skipped, "images": rows}
    if out is not None:
        out = Path(out)
        write_json(out / "severity.json", result)
        plot_severity(table, correlations, out / "severity.png", target_name=run.classes[target])
    return result


def plot_severity(table: pd.DataFrame, correlations: dict, path: Path, *, target_name: str = "covid") -> Path:
    plt = pyplot()

    labels = {"probability": f"p({target_name})", "cam_lung_area": "lung share with heatmap > threshold",
              "geographic_extent_mean": "geographic extent (0-8)", "opacity_mean": "opacity (0-6)"}
    fig, axes = plt.subplots(len(PREDICTORS), len(SCORES), figsize=(8, 7), dpi=100, squeeze=False)
    for i, pred in enumerate(PREDICTORS):
        for j, score in enumerate(SCORES):
            ax, c = axes[i, j], correlations[pred][score]
            ax.scatter(table[score], table[pred], s=12, alpha=0.7)
            ax.set_xlabel(labels[score], fontsize=8)
            ax.set_ylabel(labels[pred], fontsize=8)
            ax.set_title(f"Spearman {c['rho']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]", fontsize=9)
    fig.suptitle(f"Model outputs vs expert severity (n = {len(table)})", fontsize=10)
    return save_figure(fig, path)
