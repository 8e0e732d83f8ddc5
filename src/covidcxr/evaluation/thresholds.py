"""Decision thresholds, chosen on VALIDATION data only and then applied unchanged to test data.

Rule everywhere in covidcxr: an image is called positive when ``score >= threshold``.
Methods are registered by name (``THRESHOLD_METHODS``) so the CLI and training config can name them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import roc_curve

from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.evaluation.metrics import check_binary


def _roc(y: np.ndarray, s: np.ndarray):
    if y.min() == y.max():
        raise CovidCXRError(f"choosing a threshold needs both classes (got only label {int(y[0])} in {len(y)} images)")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    # The first sklearn threshold is +inf (nothing called positive): not a usable operating point.
    return fpr[1:], tpr[1:], thr[1:]


#: Youden J values closer than this are ties (J differences of real data are multiples of
#: 1 / (n_pos * n_neg), far larger; float rounding of tpr - fpr is ~1e-16)
J_TIE_ATOL = 1e-12


def _youden(y: np.ndarray, s: np.ndarray, target: float | None) -> float:
    fpr, tpr, thr = _roc(y, s)
    j = tpr - fpr
    # Thresholds decrease along the curve: the first J within J_TIE_ATOL of the maximum is the
    # highest threshold among ties (fewest false positives). A plain argmax would let the last bit
    # of float rounding pick a lower tied threshold.
    ties = np.flatnonzero(np.isclose(j, j.max(), rtol=0.0, atol=J_TIE_ATOL))
    return float(thr[ties[0]])


def _sensitivity(y: np.ndarray, s: np.ndarray, target: float | None) -> float:
    if target is None or not 0 < target <= 1:
        raise ConfigError(f"threshold target={target}: method 'sensitivity' needs a target in (0, 1], e.g. 0.95")
    fpr, tpr, thr = _roc(y, s)
    # thresholds decrease along the curve, so the first one reaching the target is the highest.
    reach = np.flatnonzero(tpr >= target - 1e-12)
    return float(thr[reach[0]])


def _specificity(y: np.ndarray, s: np.ndarray, target: float | None) -> float:
    if target is None or not 0 < target <= 1:
        raise ConfigError(f"threshold target={target}: method 'specificity' needs a target in (0, 1], e.g. 0.95")
    fpr, tpr, thr = _roc(y, s)
    # the lowest threshold (most sensitive) that still keeps specificity >= target
    ok = np.flatnonzero(1 - fpr >= target - 1e-12)
    if len(ok) == 0:
        return float(np.nextafter(s.max(), np.inf))
    return float(thr[ok[-1]])


#: name -> f(y, scores, target) -> threshold
THRESHOLD_METHODS: dict[str, Callable[[np.ndarray, np.ndarray, float | None], float]] = {
    "youden": _youden,
    "sensitivity": _sensitivity,
    "specificity": _specificity,
}


def select_threshold(y_true, scores, method: str = "youden", target: float | None = None) -> float:
    """Threshold on the positive-class score chosen on validation data.

    * ``'youden'``: maximises Youden's J = sensitivity + specificity - 1; among tied J (equal
      within ``J_TIE_ATOL``) the highest threshold, i.e. the fewest false positives.
    * ``'sensitivity'``: the highest threshold whose sensitivity reaches ``target`` (e.g. 0.95).
    * ``'specificity'``: the lowest threshold whose specificity stays at or above ``target``.

    The returned value is one of the observed scores; ``score >= threshold`` means positive.
    """
    if method not in THRESHOLD_METHODS:
        raise ConfigError(f"threshold method {method!r}: choose one of {sorted(THRESHOLD_METHODS)}")
    y, s = check_binary(y_true, scores)
    return THRESHOLD_METHODS[method](y, s, target)
