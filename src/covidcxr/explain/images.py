"""``covidcxr explain RUN_DIR IMAGES...``: heatmap overlays, per-image JSON, contact sheet, summary.

Output layout (``out`` defaults to ``RUN_DIR/explain``; the evaluation report renders its gallery
from ``RUN_DIR/explain/summary.json``; the schema is documented in ``docs/explain.md``)::

    out/<stem>_<method>.png   overlay with colour bar (lung outline drawn where a mask exists)
    out/<stem>.json           probabilities, predicted label, target class, lung focus, ROAD
    out/contact_sheet.png     all overlays as thumbnails
    out/summary.json          one entry per image + skipped files + lung-focus summary

Unreadable images are skipped and listed with the reason; the rest go on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from covidcxr import paths
from covidcxr.errors import CovidCXRError
from covidcxr.data.annotations import Annotations
from covidcxr.explain.cam import cam_models, canonical_method, class_index, compute_cams, to_original_geometry
from covidcxr.explain.lung_focus import lung_focus, summarise_lung_focus
from covidcxr.explain.overlay import DEFAULT_ALPHA, DEFAULT_CMAP, SheetItem, save_contact_sheet, save_overlay, thumbnail
from covidcxr.files import write_json
from covidcxr.models.predict import PreparedInput, predict_inputs, try_prepare
from covidcxr.models.run import LoadedRun, load_run
from covidcxr.progress import make_progress

SUMMARY_FORMAT = "covidcxr-explain/1"
CONTACT_SHEET = "contact_sheet.png"
SUMMARY_JSON = "summary.json"
#: Thumbnails on the contact sheet (a readable figure; every image still gets its own overlay).
MAX_SHEET = 60


def default_annotations() -> Annotations | None:
    """The shared data root's annotations, or None where there are none."""
    folder = paths.data_root() / "annotations"
    return Annotations(folder) if (folder / "index.csv").is_file() else None


def open_annotations(annotations: str | Path | Annotations | None) -> Annotations | None:
    if isinstance(annotations, Annotations):
        return annotations
    if annotations is None:
        return default_annotations()
    return Annotations(annotations)


def _unique_stem(path: Path, used: set[str]) -> str:
    # Two inputs called x.jpg in different folders must not overwrite each other's outputs.
    stem, k = path.stem, 2
    while stem in used:
        stem, k = f"{path.stem}_{k}", k + 1
    used.add(stem)
    return stem


def prepare_images(paths_: Sequence[str | Path], run: LoadedRun, *, allow_non_frontal: bool = False):
    """Yield (path, PreparedInput | None, reason | None) through the one pipeline, never stopping at a bad file."""
    for p in paths_:
        prepared, reason = try_prepare(p, run.spec, lung_finder=run.lung_finder, allow_non_frontal=allow_non_frontal)
        yield Path(p), prepared, reason


def explain_images(run_dir: str | Path, images: Sequence[str | Path], *, method: str = "gradcam",
                   out: str | Path | None = None, target_class: str | None = None, layer: str | None = None,
                   batch_size: int = 8, annotations: str | Path | Annotations | None = None, road: bool = False,
                   cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA, device: str = "cpu",
                   allow_non_frontal: bool = False, run: LoadedRun | None = None) -> dict:
    """Explain ``images`` with ``method`` and write overlays + JSON into ``out``; returns the summary."""
    if not images:
        raise CovidCXRError("no images given; pass image files (PNG / JPEG / DICOM ...) to explain")
    method = canonical_method(method)
    run = run if run is not None else load_run(run_dir, device=device)
    out = Path(out) if out is not None else Path(run_dir) / "explain"
    out.mkdir(parents=True, exist_ok=True)
    ann = open_annotations(annotations)
    models = cam_models(run, layer)
    fixed_class = class_index(run, target_class)
    entries, skipped, sheet, focus, used = [], [], [], [], set()
    todo = list(images)
    with make_progress() as bar:
        task = bar.add_task(f"{method} heatmaps", total=len(todo))
        for start in range(0, len(todo), batch_size):
            batch = []
            for path, prepared, reason in prepare_images(todo[start : start + batch_size], run,
                                                         allow_non_frontal=allow_non_frontal):
                if prepared is None:
                    skipped.append({"image": str(path), "reason": reason})
                else:
                    batch.append((path, prepared))
            if batch:
                records = predict_inputs(run, [x for _, x in batch])
                inputs = torch.stack([x.tensor for _, x in batch])
                targets = [fixed_class if fixed_class is not None else int(np.argmax(r.probabilities))
                           for r in records]
                cams = compute_cams(run, inputs, method=method, models=models, class_indices=targets,
                                    batch_size=batch_size)
                roads = _road(run, inputs, cams, targets) if road else None
                for i, (path, prepared) in enumerate(batch):
                    entry, item, lf = _explain_one(run, out, method, path, prepared, cams[i], records[i].probabilities,
                                                   records[i].predicted, targets[i], ann, used, cmap, alpha,
                                                   {k: float(v[i]) for k, v in roads.items()} if roads else None)
                    entries.append(entry)
                    if len(sheet) < MAX_SHEET:
                        sheet.append(item)
                    focus.append(lf)
            bar.advance(task, len(todo[start : start + batch_size]))
    if entries:
        shown = f" (first {MAX_SHEET} of {len(entries)})" if len(entries) > MAX_SHEET else ""
        save_contact_sheet(out / CONTACT_SHEET, sheet[:MAX_SHEET], cmap=cmap, alpha=alpha,
                           title=f"{method} for class '{_target_name(run, fixed_class)}' - {Path(run_dir).name}{shown}")
    summary = {
        "format": SUMMARY_FORMAT,
        "run_dir": str(run_dir),
        "model_sha256": run.model_sha256,
        "method": method,
        "target_class": _target_name(run, fixed_class),
        "target_layers": {cm.architecture: cm.layer for cm in models},
        "classes": run.classes,
        "positive_class": run.positive_class,
        "threshold": run.threshold,
        "contact_sheet": CONTACT_SHEET if entries else None,
        "images": entries,
        "skipped": skipped,
        "lung_focus_summary": summarise_lung_focus([f for f in focus if f is not None]),
        "road_summary": _road_summary(entries) if road else None,
    }
    write_json(out / SUMMARY_JSON, summary)
    return summary


def _target_name(run: LoadedRun, idx: int | None) -> str:
    return run.classes[idx] if idx is not None else "predicted"


def _road(run: LoadedRun, inputs, cams, targets) -> dict:
    from covidcxr.explain.faithfulness import road_scores

    return road_scores(run.model, inputs.to(run.device), cams, targets)


def _road_summary(entries: list[dict]) -> dict:
    keys = ("morf", "lerf", "combined")
    return {f"mean_{k}": float(np.mean([e["road"][k] for e in entries])) for k in keys} if entries else {}


def _lung_region(ann, path, xray: PreparedInput, working_size: int):
    roi = xray.meta.get("roi")
    if roi is None or roi.get("fallback") is not None:  # the model saw the whole working image
        return ann.lung_region(path, xray.pixels.shape)
    full = tuple(xray.meta.get("original_shape") or ())
    if len(full) != 2 or max(full) > working_size:  # the box is in a downscaled working image: no lung focus
        return None
    region = ann.lung_region(path, full)
    if region is None:
        return None
    from covidcxr.data.annotations import LungRegion

    top, left, bottom, right = roi["box"]
    return LungRegion(lung=region.lung[top:bottom, left:right], valid=region.valid[top:bottom, left:right],
                      kind=region.kind, source=region.source)


def _explain_one(run, out, method, path, xray: PreparedInput, cam, probs, label, target, ann, used, cmap, alpha, road):
    stem = _unique_stem(path, used)
    # ROAD needs the raw S x S maps above, so this one maps them back itself (as explain.cam.heatmaps does).
    heat = to_original_geometry(cam, xray.pixels.shape, run.spec)
    # Annotated lung masks are in the stored image's geometry; a lung-ROI input shows its crop, so the
    # mask is cut to the same box (only when the working image is the stored image, <= working size).
    region = _lung_region(ann, path, xray, run.spec.working_size) if ann is not None else None
    lf = lung_focus(heat, region) if region is not None else None
    prob = {c: float(p) for c, p in zip(run.classes, probs)}
    target_name = run.classes[target]
    title = f"{path.name}\n{method} for '{target_name}' | p({target_name})={prob[target_name]:.2f} | predicted {label}"
    overlay = save_overlay(out / f"{stem}_{method}.png", xray.pixels, heat, title=title, cmap=cmap, alpha=alpha,
                           lung=region.lung if region is not None else None)
    entry = {
        "image": str(path),
        "overlay": overlay.name,
        "json": f"{stem}.json",
        "probabilities": prob,
        "predicted_label": label,
        "target_class": target_name,
        "lung_focus": lf,
        "road": road,
    }
    write_json(out / f"{stem}.json", {**entry, "method": method, "run_dir": str(run.run_dir),
                                     "threshold": run.threshold})
    caption = f"{stem[:22]}\n{label} p={prob[target_name]:.2f}"
    if lf is not None:
        caption += " (empty map)" if lf["empty"] else f" lung {lf['mass_share']:.0%}"
    item = SheetItem(thumbnail(xray.pixels, 192), thumbnail(heat, 192), caption,
                     thumbnail(region.lung.astype(np.float32), 192) > 0.5 if region is not None else None)
    return entry, item, lf
