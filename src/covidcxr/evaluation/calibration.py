"""Calibration: expected calibration error, reliability-diagram data, temperature scaling.

Temperature scaling (Guo et al. 2017) is fitted on VALIDATION predictions only and stored in the
run directory (``calibration.json``); evaluation applies the stored temperature to test
predictions. For a binary model it is a monotone map of the positive-class probability, so it never
changes the ranking (AUC) and the validation threshold is mapped along with the probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from covidcxr.errors import CovidCXRError
from covidcxr.evaluation.metrics import check_binary

DEFAULT_BINS = 10


def reliability_curve(y_true, prob, *, n_bins: int = DEFAULT_BINS) -> dict:
    """Equal-width bins of predicted probability: mean prediction, observed frequency and count per bin."""
    y, p = check_binary(y_true, prob)
    if ((p < 0) | (p > 1)).any():
        raise CovidCXRError("calibration needs probabilities in [0, 1]")
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.where(counts > 0, sum_p / np.maximum(counts, 1), np.nan)
        observed = np.where(counts > 0, sum_y / np.maximum(counts, 1), np.nan)
    return {"edges": edges.tolist(), "count": counts.tolist(), "mean_predicted": mean_pred.tolist(),
            "observed": observed.tolist()}


def expected_calibration_error(y_true, prob, *, n_bins: int = DEFAULT_BINS) -> float:
    """ECE = sum over equal-width bins of (bin share) x |observed frequency - mean predicted probability|."""
    curve = reliability_curve(y_true, prob, n_bins=n_bins)
    counts = np.asarray(curve["count"], dtype=float)
    gap = np.abs(np.nan_to_num(np.asarray(curve["observed"]) - np.asarray(curve["mean_predicted"])))
    return float((counts / counts.sum() * gap).sum()) if counts.sum() else float("nan")


def brier_score(y_true, prob) -> float:
    y, p = check_binary(y_true, prob)
    return float(np.mean((p - y) ** 2))


@dataclass
class TemperatureScaling:
    """Divides log-probabilities by ``temperature`` before the softmax (T > 1 softens, T < 1 sharpens)."""

    temperature: float
    fitted_on: str = "val"
    n: int = 0
    nll_before: float | None = None
    nll_after: float | None = None

    @classmethod
    def fit(cls, probs: np.ndarray, y_index, *, fitted_on: str = "val") -> "TemperatureScaling":
        """Fit T by minimising the negative log-likelihood of class indices ``y_index`` (validation data)."""
        logp, y = _check_probs(probs, y_index)
        if len(np.unique(y)) < 2:
            raise CovidCXRError("temperature scaling needs validation images of at least two classes")

        def nll(log_t: float) -> float:
            return float(-log_softmax(logp / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

        res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
        return cls(float(np.exp(res.x)), fitted_on, int(len(y)), nll(0.0), float(res.fun))

    def transform(self, probs: np.ndarray) -> np.ndarray:
        logp, _ = _check_probs(probs, None)
        return softmax(logp / self.temperature, axis=1)

    def transform_threshold(self, threshold: float, classes: int = 2) -> float:
        """The binary threshold mapped through the same transform (keeps every decision unchanged)."""
        if classes != 2:
            raise CovidCXRError("a single threshold maps through temperature scaling only for binary models")
        t = float(np.clip(threshold, 1e-12, 1 - 1e-12))
        return float(self.transform(np.array([[1 - t, t]]))[0, 1])

    def to_record(self) -> dict:
        """What the run record stores (``RunRecord.calibration``, written through its one writer)."""
        return {"method": "temperature", **asdict(self)}

    @classmethod
    def from_record(cls, record: dict | None) -> "TemperatureScaling | None":
        """The temperature stored in a run record, or None."""
        if not record:
            return None
        try:
            return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})
        except TypeError as exc:
            raise CovidCXRError(f"run record calibration is not a temperature scaling ({exc})") from exc


def _check_probs(probs, y_index):
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise CovidCXRError(f"probabilities must be N x K with K >= 2 (got shape {p.shape})")
    y = None
    if y_index is not None:
        y = np.asarray(y_index, dtype=np.int64)
        if y.shape != (len(p),) or y.min() < 0 or y.max() >= p.shape[1]:
            raise CovidCXRError("class indices must give one valid class per row of probabilities")
    return np.log(np.clip(p, 1e-12, 1.0)), y
