"""Validation during training: predictions on the val rows, metrics, checkpoint selection, threshold."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from covidcxr.data.dataset import CXRDataset
from covidcxr.errors import ConfigError
from covidcxr.models.run import with_tta
from covidcxr.training.config import TrainingConfig

HIGHER_IS_BETTER = {"auc": True, "within_source_auc": True, "val_loss": False}


def autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: CXRDataset, *, batch_size: int, device: torch.device,
                    amp: bool = False, channels_last: bool = False, num_workers: int = 0,
                    tta: Sequence[str] = ()) -> np.ndarray:
    """Class probabilities for every item of ``dataset`` (no augmentation), in dataset order.

    ``tta`` wraps the network exactly as :func:`covidcxr.models.run.load_run` does, so validation
    predictions equal what the saved run predicts.
    """
    model.eval()
    net = with_tta(model, tta)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for x, _, _ in loader:
        x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with autocast(device, amp):
            out.append(net(x).float().softmax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(dataset.classes)), dtype=np.float32)


def positive_scores(probs: np.ndarray, classes: Sequence[str], positive: str | None) -> np.ndarray | None:
    if positive is None or positive not in classes:
        return None
    return probs[:, list(classes).index(positive)]


def validation_metrics(probs: np.ndarray, targets: np.ndarray, sources: np.ndarray, classes: Sequence[str],
                       positive: str | None) -> dict:
    """Val loss, AUC (positive vs rest, or macro one-vs-rest), within-source AUC and per-source AUCs."""
    from sklearn.metrics import roc_auc_score

    from covidcxr.evaluation.metrics import within_source_auc

    out: dict = {"val_loss": float(F.nll_loss(torch.from_numpy(np.log(np.clip(probs, 1e-12, 1))).float(),
                                               torch.from_numpy(np.array(targets, dtype=np.int64))).item())}
    out["val_accuracy"] = float((probs.argmax(1) == targets).mean())
    score = positive_scores(probs, classes, positive)
    if score is not None:
        y = (targets == list(classes).index(positive)).astype(int)
        out["val_auc"] = float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")
        out["val_within_source_auc"] = float(within_source_auc(y, score, sources))
        per_source = {}
        for s in sorted(set(sources)):
            m = sources == s
            if 0 < y[m].sum() < m.sum():
                per_source[str(s)] = {"auc": float(roc_auc_score(y[m], score[m])), "n": int(m.sum()),
                                      "n_pos": int(y[m].sum())}
        out["val_auc_per_source"] = per_source
    else:
        present = np.unique(targets)
        out["val_auc"] = float(roc_auc_score(targets, probs, multi_class="ovr", labels=list(range(len(classes))))) \
            if len(present) == len(classes) else float("nan")
        out["val_within_source_auc"] = float("nan")
    return out


def selection_value(metrics: dict, name: str) -> float:
    return metrics["val_loss"] if name == "val_loss" else metrics[f"val_{name}"]


def is_better(value: float, best: float | None, name: str, min_delta: float) -> bool:
    if value is None or not np.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if HIGHER_IS_BETTER[name] else value < best - min_delta


def check_selection_possible(config: TrainingConfig, val_ds: CXRDataset, positive: str | None) -> None:
    """Fail before training when the selection metric cannot be computed on this validation set."""
    if config.train.selection_metric == "auc":
        # AUC is NaN on every epoch when validation lacks a class: no checkpoint could ever be
        # selected, and the run would only fail after its last epoch.
        if positive is not None:
            present = set(np.unique(val_ds.targets == val_ds.classes.index(positive)))
            missing = [n for v, n in ((True, positive), (False, f"non-{positive}")) if v not in present]
        else:
            missing = [c for i, c in enumerate(val_ds.classes) if i not in set(np.unique(val_ds.targets))]
        if missing:
            raise ConfigError(f"config key train.selection_metric: auc needs every class in the validation rows, "
                              f"but {len(val_ds)} validation images hold no {', '.join(missing)}; "
                              "use val_loss, or another split")
        return
    if config.train.selection_metric != "within_source_auc":
        return
    if positive is None:
        raise ConfigError("config key train.selection_metric: within_source_auc needs a label space with a positive "
                          "class; use auc or val_loss")
    pos = val_ds.classes.index(positive)
    t = pd.DataFrame({"s": val_ds.sources, "y": val_ds.targets == pos})
    if not any(0 < g["y"].sum() < len(g) for _, g in t.groupby("s")):
        raise ConfigError("config key train.selection_metric: within_source_auc needs validation sources holding "
                          "both classes and none does; use auc or val_loss, or another split")


def choose_threshold(config: TrainingConfig, y: np.ndarray, score: np.ndarray) -> tuple[float | None, dict]:
    from covidcxr.evaluation.thresholds import select_threshold

    t = config.train
    if score is None or not (0 < y.sum() < len(y)):
        return None, {"method": None, "reason": "no positive class or validation lacks a class"}
    value = float(select_threshold(y, score, method=t.threshold_method, target=t.threshold_target))
    pred = score >= value
    return value, {"method": t.threshold_method, "target": t.threshold_target, "value": value, "chosen_on": "val",
                   "n_val": int(len(y)), "val_sensitivity": float(pred[y == 1].mean()),
                   "val_specificity": float((~pred[y == 0]).mean())}
