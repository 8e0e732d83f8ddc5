"""Lung segmentation metrics: Dice and HD95 (MONAI's implementations), with patient-bootstrap 95% CIs.

Each image is scored in the geometry of its reference mask (the stored image), never at the model's
input size, so the numbers describe the masks a user gets. Pixels the reference marks "ignore"
(v7labs value 127: pacemakers, large devices, markup) count neither inside nor outside the lungs:
the prediction is set to the reference there (which is "not lung"), so they add nothing to the
overlap, to either error, or to a boundary. HD95 is in pixels of the stored image (longer side <= 512 px).

A prediction with no lung pixels has Dice 0 and an undefined HD95 (NaN, counted in ``hd95_undefined``).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from covidcxr.evaluation.metrics import bootstrap_ci

__all__ = ["mask_scores", "score_masks", "summarise_scores", "template_mask", "template_for"]


def mask_scores(pred: np.ndarray, lung: np.ndarray, valid: np.ndarray | None = None, *,
                hd95: bool = True) -> tuple[float, float]:
    """(Dice, HD95 in pixels) of one bool prediction against one bool reference, ignoring ``~valid`` pixels.

    ``hd95=False`` skips the (slower) distance and returns NaN for it (model selection needs Dice only)."""
    import torch
    from monai.metrics import DiceMetric, compute_hausdorff_distance

    pred = np.asarray(pred, dtype=bool).copy()
    lung = np.asarray(lung, dtype=bool)
    if pred.shape != lung.shape:
        raise ValueError(f"prediction {pred.shape} and reference {lung.shape} differ in shape")
    if valid is not None:
        pred[~valid] = lung[~valid]
    p = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(lung[None, None].astype(np.float32))
    # ignore_empty=False: an empty reference with an empty prediction scores 1, not NaN.
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, y)
    if not hd95 or not pred.any() or not lung.any():
        return float(dice.item()), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, y, include_background=True, percentile=95)
    return float(dice.item()), float(hd.item())


def score_masks(preds: Sequence[np.ndarray], lungs: Sequence[np.ndarray], valids: Sequence[np.ndarray]) -> pd.DataFrame:
    """Per-image ``dice`` and ``hd95`` of aligned lists of predictions / references / valid maps."""
    rows = [mask_scores(p, y, v) for p, y, v in zip(preds, lungs, valids, strict=True)]
    return pd.DataFrame(rows, columns=["dice", "hd95"])


def _mean_ci(values: np.ndarray, patients: np.ndarray, n_boot: int, seed: int) -> dict:
    finite = np.isfinite(values)
    if not finite.any():
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "median": float("nan")}
    v, g = values[finite], patients[finite]
    low, high = bootstrap_ci(lambda idx: float(np.mean(v[idx])), len(v), clusters=g, n_boot=n_boot, seed=seed)
    return {"mean": float(v.mean()), "ci_low": low, "ci_high": high, "median": float(np.median(v)),
            "p05": float(np.quantile(v, 0.05))}


def summarise_scores(scores: pd.DataFrame, patients: Sequence[str], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean Dice / HD95 over images with 95% CIs from resampling whole patients (percentile bootstrap)."""
    patients = np.asarray(patients, dtype=object).astype(str)
    return {"n_images": int(len(scores)), "n_patients": int(len(set(patients))),
            "dice": _mean_ci(scores["dice"].to_numpy(float), patients, n_boot, seed),
            "hd95_px": _mean_ci(scores["hd95"].to_numpy(float), patients, n_boot, seed),
            "hd95_undefined": int((~np.isfinite(scores["hd95"].to_numpy(float))).sum()),
            "ci": "95% percentile bootstrap over patients", "n_boot": n_boot}


def template_mask(masks: Sequence[np.ndarray], valids: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """The trivial baseline: where the lungs are in most training masks (S x S masks, pixel majority)."""
    stack = np.stack([np.asarray(m, dtype=np.float32) for m in masks])
    if valids is None:
        return stack.mean(0) >= 0.5
    weight = np.stack([np.asarray(v, dtype=np.float32) for v in valids])
    return (stack * weight).sum(0) >= 0.5 * np.maximum(weight.sum(0), 1e-6)


def template_for(template: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The S x S template stretched to an H x W image (the model's own resize convention)."""
    import cv2

    h, w = shape
    return cv2.resize(template.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
