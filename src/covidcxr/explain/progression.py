"""Following one patient over serial X-rays (as Zebin et al. do): heatmaps and probability over days.

``plot_progression`` takes a patient's images from a manifest, orders them by ``offset_days`` (images
without a day come last, in manifest order), and draws one figure: a row of overlays titled with the
day and the predicted probability, and below it the probability of the target class over the days.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError
from covidcxr.explain.cam import cam_models, canonical_method, class_index, heatmaps
from covidcxr.explain.overlay import DEFAULT_ALPHA, DEFAULT_CMAP, draw_overlay, thumbnail
from covidcxr.files import write_json
from covidcxr.models.predict import predict_inputs
from covidcxr.models.run import LoadedRun, load_run
from covidcxr.plotting import pyplot, save_figure


def serial_patients(manifest, min_studies: int = 3) -> pd.DataFrame:
    """Patients with at least ``min_studies`` images on distinct ``offset_days``, most studies first."""
    t = manifest.table[manifest.table["offset_days"].notna()]
    g = t.groupby("patient_id").agg(studies=("offset_days", "nunique"), images=("image", "size"),
                                    label=("label", "first"), source=("source", "first"))
    return g[g["studies"] >= min_studies].sort_values(["studies", "images"], ascending=False)


def patient_rows(manifest, patient_id: str) -> pd.DataFrame:
    """The patient's rows in ``offset_days`` order (absolute image paths in column ``path``)."""
    table = manifest.table.assign(path=[str(p) for p in manifest.image_paths()])
    rows = table[table["patient_id"] == patient_id]
    if rows.empty:
        hint = ", ".join(serial_patients(manifest).index[:5])
        raise CovidCXRError(f"{manifest.name}: no images of patient {patient_id!r}"
                            + (f"; patients with serial studies include {hint}" if hint else ""))
    return rows.sort_values("offset_days", na_position="last", kind="stable")


def plot_progression(run_dir: str | Path, manifest, patient_id: str, *, method: str = "gradcam",
                     target_class: str | None = None, layer: str | None = None, out: str | Path | None = None,
                     cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA, max_images: int = 8,
                     run: LoadedRun | None = None) -> dict:
    """Heatmaps + probability-over-days figure for one patient; writes ``progression_<id>.png`` and ``.json``.

    ``manifest``: a :class:`covidcxr.data.manifest.Manifest` or the path of a manifest CSV.
    """
    from covidcxr.data.manifest import Manifest
    from covidcxr.explain.images import prepare_images

    if not isinstance(manifest, Manifest):
        manifest = Manifest.read(manifest)
    rows = patient_rows(manifest, patient_id)
    if len(rows) > max_images:
        rows = rows.iloc[np.linspace(0, len(rows) - 1, max_images).round().astype(int)]
    run = run if run is not None else load_run(run_dir)
    method = canonical_method(method)
    fixed = class_index(run, target_class)
    studies, skipped = [], []
    for (path, xray, reason), (_, rec) in zip(prepare_images(list(rows["path"]), run), rows.iterrows()):
        if xray is None:
            skipped.append({"image": str(path), "reason": reason})
        else:
            studies.append((rec, xray))
    if not studies:
        raise CovidCXRError(f"patient {patient_id}: none of the images could be read ({skipped})")
    records = predict_inputs(run, [x for _, x in studies])
    probs = np.stack([r.probabilities for r in records])
    targets = [fixed if fixed is not None else int(k) for k in probs.argmax(1)]
    maps = heatmaps(run, [x for _, x in studies], method=method, models=cam_models(run, layer), class_indices=targets)
    labels = [r.predicted for r in records]
    target_name = run.classes[fixed] if fixed is not None else None
    entries = []
    for (rec, xray), p, t, lab, heat in zip(studies, probs, targets, labels, maps):
        day = rec["offset_days"]
        entries.append({"image": rec["path"], "offset_days": None if pd.isna(day) else float(day),
                        "label": rec["label"], "predicted_label": lab, "target_class": run.classes[t],
                        "probability": float(p[t]), "probabilities": dict(zip(run.classes, map(float, p))),
                        "heat": heat, "pixels": xray.pixels})
    out = Path(out) if out is not None else Path(run_dir) / "explain"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in patient_id)
    threshold = run.threshold if fixed is not None and fixed == run.positive_index else None
    figure = _draw(entries, out / f"progression_{safe}.png", patient_id, method, target_name, cmap, alpha, threshold)
    result = {"patient_id": patient_id, "run_dir": str(run_dir), "method": method, "figure": figure.name,
              "target_class": target_name or "predicted", "skipped": skipped,
              "studies": [{k: v for k, v in e.items() if k not in ("heat", "pixels")} for e in entries]}
    write_json(out / f"progression_{safe}.json", result)
    return result


def _draw(entries, path: Path, patient_id, method, target_name, cmap, alpha, threshold=None) -> Path:
    plt = pyplot()

    n = len(entries)
    fig = plt.figure(figsize=(max(2.0 * n, 6), 4.6), dpi=90)
    grid = fig.add_gridspec(2, n, height_ratios=[2.2, 1])
    for i, e in enumerate(entries):
        ax = fig.add_subplot(grid[0, i])
        day = "day ?" if e["offset_days"] is None else f"day {e['offset_days']:g}"
        draw_overlay(ax, thumbnail(e["pixels"], 192), thumbnail(e["heat"], 192), cmap=cmap, alpha=alpha,
                     title=f"{day}\np({e['target_class']})={e['probability']:.2f}")
    ax = fig.add_subplot(grid[1, :])
    dated = [e for e in entries if e["offset_days"] is not None]
    if dated:
        ax.plot([e["offset_days"] for e in dated], [e["probability"] for e in dated], marker="o")
    if threshold is not None:
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"decision threshold {threshold:.3g}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("days (offset_days)")
    ax.set_ylabel(f"p({target_name})" if target_name else "p(predicted)")
    ax.grid(alpha=0.3)
    fig.suptitle(f"Patient {patient_id}: {method} over serial X-rays", fontsize=10)
    return save_figure(fig, path)
