"""The end of a training run: best weights + the run record, threshold, split, provenance, plots."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from covidcxr.data.dataset import CXRDataset
from covidcxr.data.labels import LabelSpace
from covidcxr.data.manifest import Manifest
from covidcxr.data.preprocess import PreprocessSpec
from covidcxr.errors import CovidCXRError
from covidcxr.files import atomic_write_bytes, write_json
from covidcxr.models.provenance import hash_data_files
from covidcxr.models.run import save_model
from covidcxr.models.run_split import write_run_split
from covidcxr.plotting import pyplot, save_figure
from covidcxr.training.config import TrainingConfig
from covidcxr.training.rows import TrainingData, data_counts, split_column_used
from covidcxr.training.state import BEST_WEIGHTS, CHECKPOINT_DIR
from covidcxr.training.validation import HIGHER_IS_BETTER, choose_threshold, positive_scores


def write_val_predictions(out_dir: Path, ds: CXRDataset, probs: np.ndarray) -> None:
    table = ds.table[["image", "patient_id", "source", "label"]].copy()
    table.insert(0, "row", ds.rows)
    table["target"] = [ds.classes[t] for t in ds.targets]
    for j, c in enumerate(ds.classes):
        table[f"p_{c}"] = probs[:, j]
    atomic_write_bytes(out_dir / "val_predictions.csv", table.to_csv(index=False, lineterminator="\n").encode())



def finalize_run(config: TrainingConfig, out_dir: Path, model: nn.Module, spec: PreprocessSpec, space: LabelSpace,
                 train_ds: CXRDataset, val_ds: CXRDataset, data: TrainingData, history: list[dict], best: float,
                 best_epoch: int, stopped_early: bool, seconds: float, device: torch.device, write_card: bool,
                 extra_info: dict | None) -> Path:
    """Best weights -> model.safetensors + run.json with threshold, selection record and data provenance."""
    from safetensors.torch import load_file

    import covidcxr

    model.load_state_dict(load_file(str(out_dir / CHECKPOINT_DIR / BEST_WEIGHTS)))
    model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    preds = pd.read_csv(out_dir / "val_predictions.csv")
    probs = preds[[f"p_{c}" for c in space.classes]].to_numpy()
    score = positive_scores(probs, space.classes, space.positive)
    y = (val_ds.targets == space.classes.index(space.positive)).astype(int) if score is not None else None
    threshold, threshold_info = choose_threshold(config, y, score)
    best_record = next(h for h in history if h["epoch"] == best_epoch)
    split_column = split_column_used(config, data)
    run_split = data.run_split(split_column)
    split = write_run_split(out_dir, data.manifest, run_split)
    # Every image file the run learned from, was selected on or is tested on, by SHA-256 (covidcxr verify).
    provenance = hash_data_files(out_dir, data.manifest, run_split, config.data.manifest)
    counts = data_counts(data.manifest, space, split_column)
    atomic_write_bytes(out_dir / "data_counts.csv", counts.to_csv(index=False, lineterminator="\n").encode())
    labels = {"label_space": space.to_dict(), "class_index": {c: i for i, c in enumerate(space.classes)},
              "manifest_label_to_class": _label_map(space)}
    write_json(out_dir / "labels.json", labels)
    audit = _audit(data.manifest, out_dir)
    info = {
        "selection": {"metric": config.train.selection_metric, "value": best, "epoch": best_epoch,
                      "split": "val", "higher_is_better": HIGHER_IS_BETTER[config.train.selection_metric]},
        "val_metrics": {k: v for k, v in best_record.items() if k.startswith("val_")},
        "threshold": threshold_info,
        "epochs_run": len(history), "epochs_planned": config.train.epochs, "stopped_early": stopped_early,
        "training_manifest": {"path": str(config.data.manifest), "name": data.manifest.name,
                              "sha256": data.manifest.sha256(), "rows": len(data.manifest),
                              "counts": counts.to_dict(orient="records")},
        "split": data.split_info,
        "data": {"train": train_ds.report(), "val": val_ds.report(), "train_images": len(train_ds),
                 "val_images": len(val_ds)},
        "audit": audit,
        "model": config.model.model_dump(mode="json"),
        "sampler": config.train.sampler,
        "seed": config.train.seed,
        "wall_time_s": seconds,
        "device": str(device),
        "versions": {"covidcxr": covidcxr.__version__, "torch": torch.__version__, "python": platform.python_version()},
        **(extra_info or {}),
    }
    save_model(out_dir, model, architecture=config.model.name, classes=space.classes, preprocess_spec=spec,
               positive_class=space.positive, threshold=threshold, label_space=space.to_dict(), split=split,
               tta=config.ensemble.tta, info=info, provenance=provenance)
    _plot_history(out_dir, history, config.train.selection_metric, best_epoch)
    if write_card:
        from covidcxr.training.model_card import write_model_card

        write_model_card(out_dir)
    return out_dir


def _label_map(space: LabelSpace) -> dict:
    from covidcxr.data.manifest import LABELS

    t = pd.DataFrame({"label": list(LABELS), "finding": [""] * len(LABELS)})
    return {lab: (c if isinstance(c, str) else None) for lab, c in zip(LABELS, space.assign(t))}


def _audit(manifest: Manifest, out_dir: Path) -> dict:
    """Audit summary (the full report goes to audit.json); near-duplicate search off to stay fast."""
    try:
        from covidcxr.data.audit import audit_manifest
    except ImportError:
        return {"available": False}
    try:
        report = audit_manifest(manifest, duplicates=False, progress=False)
    except CovidCXRError as exc:
        return {"available": False, "error": str(exc)}
    report.write_json(out_dir / "audit.json")
    return {"available": True, "file": "audit.json", "ok": report.ok,
            "findings": [{"check": f.check, "severity": f.severity, "message": f.message}
                         for f in report.findings if f.severity in ("error", "warning")]}


def _plot_history(out_dir: Path, history: list[dict], metric: str, best_epoch: int) -> None:
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val loss")
    a.set_xlabel("epoch"), a.legend(), a.set_title("loss")
    b.plot(ep, [h.get("val_auc") for h in history], "o-", label="val AUC")
    b.plot(ep, [h.get("val_within_source_auc") for h in history], "o-", label="val within-source AUC")
    b.axvline(best_epoch, color="grey", ls="--", label=f"selected ({metric})")
    b.set_xlabel("epoch"), b.set_ylim(0, 1.02), b.legend(loc="lower right"), b.set_title("validation")
    fig.tight_layout()
    save_figure(fig, out_dir / "metrics.png", dpi=90)
