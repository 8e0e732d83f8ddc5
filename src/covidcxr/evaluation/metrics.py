"""Discrimination and classification metrics, each with a 95 % confidence interval.

* AUC: fast DeLong (Sun & Xu, IEEE SPL 2014) variance from mid-ranks, CI on the AUC scale clipped
  to [0, 1]; paired DeLong test for two models scored on the same images. With a single positive
  or a single negative the DeLong variance (a sample variance of one placement value) is
  undefined: the CI / test is NaN (JSON null) with a ``note`` saying why, never a number.
  Checked against R's pROC on its ``aSAH`` data (tests/test_proc_parity.py).
* Within-source AUC: discrimination measured only between images of the *same* source (see
  :func:`within_source_auc`). A model that separates classes by recognising which data set an image
  came from scores high on plain AUC but not here.
* Proportions: Wilson score interval (scipy's ``binomtest(...).proportion_ci(method="wilson")``,
  no continuity correction); the threshold metrics built on it (sensitivity, specificity, PPV, NPV,
  F1, balanced accuracy, multi-class) are in :mod:`covidcxr.evaluation.classification`.
* ``clusters=`` (e.g. patient ids) switches every interval to a cluster bootstrap that resamples
  patients, not images, because images of one patient are not independent.

Point values are plain scikit-learn / scipy where they have them (every AUC outside DeLong goes
through :func:`auc_score`, i.e. ``sklearn.metrics.roc_auc_score``; confusion counts through
``sklearn.metrics.confusion_matrix``; Wilson through scipy); only what they lack (DeLong,
within-source AUC, cluster bootstrap) is written here. NaN -> None for JSON is
:func:`covidcxr.files.jsonable`, the project's one rule for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from covidcxr.errors import CovidCXRError
from covidcxr.files import jsonable

DEFAULT_LEVEL = 0.95
DEFAULT_N_BOOT = 1000


# ---------------------------------------------------------------- input checks


def check_binary(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate 0/1 labels and finite scores of the same length; return them as arrays."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise CovidCXRError(f"labels and scores must be 1-D (got shapes {y.shape} and {s.shape})")
    if len(y) != len(s):
        raise CovidCXRError(f"labels and scores differ in length ({len(y)} vs {len(s)})")
    if y.dtype == bool:
        y = y.astype(np.int64)
    uniq = np.unique(y)
    if not np.isin(uniq, [0, 1]).all():
        raise CovidCXRError(f"binary labels must be 0/1 (got values {uniq[:5].tolist()})")
    if not np.isfinite(s).all():
        raise CovidCXRError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    return y.astype(np.int64), s


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise CovidCXRError(f"confidence level {level}: must be between 0 and 1")
    return float(stats.norm.ppf(0.5 + level / 2))


# ---------------------------------------------------------------- results


@dataclass
class Estimate:
    """A point value with its confidence interval and how the interval was computed."""

    value: float
    ci_low: float
    ci_high: float
    method: str
    n: int | None = None
    #: why the interval is missing (e.g. DeLong variance undefined); only written when set
    note: str | None = None

    def to_dict(self) -> dict:
        """Plain dict for JSON: NaN / infinity become None (:func:`covidcxr.files.jsonable`)."""
        d = asdict(self)
        if d["note"] is None:
            del d["note"]
        return jsonable(d)


def auc_score(y_true, scores) -> float:
    """ROC AUC (``sklearn.metrics.roc_auc_score``); NaN when one class is absent.

    The one AUC outside DeLong: bootstrap loops, within-source AUC and macro AUC all use it.
    """
    y = np.asarray(y_true)
    m = int((y == 1).sum())
    if m == 0 or m == len(y):
        return float("nan")
    return float(skm.roc_auc_score(y, scores))


# ---------------------------------------------------------------- DeLong


def _midrank(x: np.ndarray) -> np.ndarray:
    """Mid-ranks (1-based; ties get the mean of their ranks)."""
    return stats.rankdata(x, method="average")


def delong_placements(y_true, scores) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and the DeLong structural components (placement values), via mid-ranks (Sun & Xu 2014).

    ``v10[i]`` = P(score of positive i > random negative) (+1/2 ties), ``v01[j]`` = P(random
    positive > score of negative j). The AUC is ``mean(v10) == mean(v01)``.
    """
    y, s = check_binary(y_true, scores)
    pos, neg = s[y == 1], s[y == 0]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        raise CovidCXRError(f"AUC needs both classes (got {m} positives, {n} negatives)")
    tx, ty, tz = _midrank(pos), _midrank(neg), _midrank(np.concatenate([pos, neg]))
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    auc = float(v10.mean())
    return auc, v10, v01


def delong_variance(y_true, scores) -> tuple[float, float]:
    """AUC and its DeLong variance ``var(v10)/m + var(v01)/n``; NaN variance with a single
    positive or negative (see :func:`delong_undefined_reason`)."""
    auc, v10, v01 = delong_placements(y_true, scores)
    var = _var(v10) / len(v10) + _var(v01) / len(v01)
    return auc, float(var)


def _var(x: np.ndarray) -> float:
    """Sample variance; NaN for a single value (undefined, as R's ``var`` gives NA)."""
    return float(np.var(x, ddof=1)) if len(x) > 1 else float("nan")


def delong_undefined_reason(n_positive: int, n_negative: int) -> str | None:
    """Why the DeLong variance cannot be estimated (None when it can).

    It needs the sample variance of the positives' and of the negatives' placement values, which
    is undefined for a single value; pROC returns NA there too.
    """
    single = [name for name, k in (("positive", n_positive), ("negative", n_negative)) if k < 2]
    if not single:
        return None
    return (f"DeLong variance undefined with a single {' and a single '.join(single)} "
            f"(sample variance of one placement value); no CI or test")


def auc_ci(y_true, scores, *, level: float = DEFAULT_LEVEL, clusters=None, n_boot: int = DEFAULT_N_BOOT,
           seed: int = 0) -> Estimate:
    """ROC AUC with a DeLong CI (or a cluster-bootstrap CI when ``clusters`` is given)."""
    y, s = check_binary(y_true, scores)
    auc, var = delong_variance(y, s)
    if clusters is not None:
        lo, hi = bootstrap_ci(lambda idx: auc_score(y[idx], s[idx]), len(y), clusters=clusters,
                              n_boot=n_boot, level=level, seed=seed)
        return Estimate(auc, lo, hi, "cluster bootstrap (patients)", len(y))
    reason = delong_undefined_reason(int(y.sum()), int(len(y) - y.sum()))
    if reason:
        return Estimate(auc, float("nan"), float("nan"), "DeLong", len(y), note=reason)
    half = _z(level) * np.sqrt(var)
    return Estimate(auc, max(0.0, auc - half), min(1.0, auc + half), "DeLong", len(y))


def delong_test(y_true, scores_a, scores_b, *, level: float = DEFAULT_LEVEL) -> dict:
    """Paired DeLong test of AUC(a) - AUC(b) for two score vectors on the same images."""
    y, sa = check_binary(y_true, scores_a)
    _, sb = check_binary(y_true, scores_b)
    if len(sa) != len(sb):
        raise CovidCXRError(f"paired DeLong test needs scores for the same images ({len(sa)} vs {len(sb)})")
    auc_a, v10a, v01a = delong_placements(y, sa)
    auc_b, v10b, v01b = delong_placements(y, sb)
    diff = auc_a - auc_b
    out = {"auc_a": auc_a, "auc_b": auc_b, "difference": diff, "n": int(len(y)),
           "n_positive": int(len(v10a)), "n_negative": int(len(v01a)), "method": "paired DeLong"}
    reason = delong_undefined_reason(len(v10a), len(v01a))
    if reason:
        # NaN (JSON null via covidcxr.files.jsonable), never a number that looks like a result
        nan = float("nan")
        return {**out, "ci_low": nan, "ci_high": nan, "se": nan, "z": nan, "p_value": nan, "note": reason}
    cov = np.cov(np.vstack([v10a, v10b])) / len(v10a) + np.cov(np.vstack([v01a, v01b])) / len(v01a)
    var_diff = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = np.sqrt(max(var_diff, 0.0))
    if se == 0:
        z, p = (0.0, 1.0) if diff == 0 else (np.inf * np.sign(diff), 0.0)
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    half = _z(level) * se
    return {**out, "ci_low": diff - half, "ci_high": diff + half, "se": float(se), "z": float(z),
            "p_value": float(p)}


def hanley_mcneil_variance(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) AUC variance (exponential approximation); an independent check on DeLong."""
    q1 = auc / (2 - auc)
    q2 = 2 * auc**2 / (1 + auc)
    return (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)


# ---------------------------------------------------------------- within-source AUC


def within_source_auc(y_true, scores, sources) -> float:
    """P(random positive scores above random negative of the SAME source); NaN if no source has both.

    Pairs are counted only within sources (ties count 1/2) and pooled over the sources that hold
    both classes, so each source's AUC is weighted by its number of positive-negative pairs
    ``n_pos_s * n_neg_s`` (a source-stratified Mann-Whitney statistic). Sources with one class
    contribute no pairs and are ignored. See :func:`within_source_auc_details` for per-source
    AUCs, pair counts and a CI.
    """
    y, s, src = _check_sources(y_true, scores, sources)
    total_pairs = 0.0
    total_wins = 0.0
    for key in _source_order(src):
        mask = src == key
        ys = y[mask]
        n_pos = int(ys.sum())
        n_neg = len(ys) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        auc = auc_score(ys, s[mask])
        total_wins += auc * n_pos * n_neg
        total_pairs += n_pos * n_neg
    return float(total_wins / total_pairs) if total_pairs else float("nan")


def within_source_auc_details(y_true, scores, sources, *, level: float = DEFAULT_LEVEL) -> dict:
    """Within-source AUC with per-source AUCs (DeLong CIs), pair counts and a pooled CI.

    The pooled estimate is ``sum_s w_s AUC_s`` with ``w_s = P_s / sum P`` (``P_s`` = positive-negative
    pairs in source s). Sources are disjoint sets of images, so their AUC estimates are independent
    and the pooled variance is ``sum_s w_s^2 Var_DeLong(AUC_s)``; the CI is normal on that scale,
    clipped to [0, 1]. (Patients never span sources, so this also holds for patient-clustered data
    to the extent per-source DeLong does.) A used source with a single positive or negative has no
    DeLong variance: its CI and the pooled CI are then None, with a ``note`` naming the sources.
    """
    y, s, src = _check_sources(y_true, scores, sources)
    z = _z(level)
    per_source = []
    for key in _source_order(src):
        mask = src == key
        ys = y[mask]
        n_pos = int(ys.sum())
        n_neg = len(ys) - n_pos
        row = {"source": str(key), "n": int(mask.sum()), "n_positive": n_pos, "n_negative": n_neg,
               "pairs": n_pos * n_neg, "auc": None, "ci_low": None, "ci_high": None, "used": False}
        if n_pos and n_neg:
            auc, var = delong_variance(ys, s[mask])
            half = z * np.sqrt(var)  # NaN when the variance is undefined
            row.update(auc=auc, ci_low=max(0.0, auc - half), ci_high=min(1.0, auc + half), used=True,
                       _var=var)
            reason = delong_undefined_reason(n_pos, n_neg)
            if reason:
                row.update(ci_low=float("nan"), ci_high=float("nan"), note=reason)
        per_source.append(row)
    used = [r for r in per_source if r["used"]]
    total = sum(r["pairs"] for r in used)
    note = None
    if not total:
        value = lo = hi = float("nan")
    else:
        value = sum(r["auc"] * r["pairs"] for r in used) / total
        var = sum((r["pairs"] / total) ** 2 * r["_var"] for r in used)
        undefined = [r["source"] for r in used if not np.isfinite(r["_var"])]
        if undefined:
            lo = hi = float("nan")
            note = (f"no pooled CI: DeLong variance undefined in source(s) {undefined} "
                    f"(a single positive or negative)")
        else:
            half = z * np.sqrt(var)
            lo, hi = max(0.0, value - half), min(1.0, value + half)
    for r in per_source:
        r.pop("_var", None)
    out = {
        "value": value, "ci_low": lo, "ci_high": hi,
        "method": "within-source AUC: pair-weighted mean of per-source AUCs, variance sum of w^2 x DeLong",
        "pairs": int(total), "sources_used": [r["source"] for r in used],
        "sources_ignored": [r["source"] for r in per_source if not r["used"]], "per_source": per_source,
    }
    if note:
        out["note"] = note
    return jsonable(out)


def _check_sources(y_true, scores, sources):
    y, s = check_binary(y_true, scores)
    src = np.asarray(sources, dtype=object)
    if src.shape != y.shape:
        raise CovidCXRError(f"sources must give one value per image ({len(src)} vs {len(y)})")
    if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in src):
        raise CovidCXRError("sources contain missing values; every image needs a source")
    return y, s, src.astype(str)


def _source_order(src: np.ndarray) -> list[str]:
    return sorted(set(src.tolist()))


# ---------------------------------------------------------------- proportions / bootstrap


def wilson_ci(successes: int, n: int, *, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Wilson score interval (no continuity correction) for a binomial proportion; (nan, nan) when n == 0.

    scipy's ``binomtest(k, n).proportion_ci(method="wilson")``.
    """
    _z(level)
    if n == 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(max(0.0, ci.low)), float(min(1.0, ci.high))


def cluster_indices(clusters) -> list[np.ndarray]:
    """Row indices of each cluster (e.g. each patient), in first-appearance order."""
    arr = np.asarray(clusters, dtype=object).astype(str)
    _, first, inverse = np.unique(arr, return_index=True, return_inverse=True)
    order = np.argsort(first)
    groups = [[] for _ in range(len(first))]
    for i, g in enumerate(inverse):
        groups[g].append(i)
    return [np.asarray(groups[g]) for g in order]


def bootstrap_samples(n: int, *, clusters=None, n_boot: int = DEFAULT_N_BOOT, seed: int = 0):
    """Yield index arrays of bootstrap resamples (of images, or of whole clusters when given)."""
    rng = np.random.default_rng(seed)
    if clusters is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, n)
        return
    arr = np.asarray(clusters, dtype=object).astype(str)
    if len(arr) != n:
        raise CovidCXRError(f"clusters must give one value per image (got {len(arr)} for {n})")
    _, inverse, sizes = np.unique(arr, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped by cluster
    starts = np.cumsum(sizes) - sizes
    for _ in range(n_boot):
        pick = rng.integers(0, len(sizes), len(sizes))
        lens = sizes[pick]
        offsets = np.cumsum(lens) - lens
        # all rows of each picked cluster, vectorised: start of the cluster + position within it
        yield order[np.repeat(starts[pick] - offsets, lens) + np.arange(lens.sum())]


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, *, clusters=None, n_boot: int = DEFAULT_N_BOOT,
                 level: float = DEFAULT_LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(indices)``; resamples where it is undefined (NaN) are dropped."""
    _z(level)
    values = [statistic(idx) for idx in bootstrap_samples(n, clusters=clusters, n_boot=n_boot, seed=seed)]
    return _percentile_ci(np.asarray(values, dtype=float), level, n_boot)

def _percentile_ci(values: np.ndarray, level: float, n_boot: int) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < max(10, n_boot // 10):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))
