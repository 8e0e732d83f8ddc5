"""Paired comparisons on the same images: model vs model (DeLong + McNemar), model vs readers.

McNemar uses the exact binomial test when the discordant count is below 25 (where the chi-square
approximation is poor), otherwise chi-square with continuity correction as R's ``mcnemar.test``:
``max(|b - c| - 1, 0)^2 / (b + c)`` (the correction never pushes the statistic below zero, so equal
discordant counts give 0 and p = 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from covidcxr.errors import CovidCXRError
from covidcxr.evaluation.classification import confusion_counts
from covidcxr.evaluation.metrics import DEFAULT_LEVEL, Estimate, delong_test, wilson_ci

EXACT_BELOW = 25

#: reader calls accepted as positive / negative (plus the class names of the model)
POSITIVE_CALLS = {"1", "positive", "pos", "yes", "true"}
NEGATIVE_CALLS = {"0", "negative", "neg", "no", "false"}


def mcnemar_test(correct_a, correct_b) -> dict:
    """McNemar test on paired correctness: b = only A right, c = only B right."""
    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise CovidCXRError(f"McNemar needs paired results on the same images ({len(a)} vs {len(b_)})")
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    n = b + c
    if n == 0:
        p, stat, method = 1.0, 0.0, "no discordant pairs"
    elif n < EXACT_BELOW:
        p = float(stats.binomtest(b, n, 0.5).pvalue)
        stat, method = float(b), "exact binomial"
    else:
        stat = max(abs(b - c) - 1, 0) ** 2 / n
        p = float(stats.chi2.sf(stat, 1))
        method = "chi-square, continuity corrected"
    return {"only_a_correct": b, "only_b_correct": c, "both_correct": int((a & b_).sum()),
            "both_wrong": int((~a & ~b_).sum()), "statistic": float(stat), "p_value": p, "method": method}


def compare_predictions(y_true, score_a, score_b, pred_a, pred_b, *, level: float = DEFAULT_LEVEL) -> dict:
    """AUC difference (paired DeLong) and McNemar on decisions at each model's stored threshold.

    Where the DeLong test is undefined (a single positive or negative) its se / z / p / CI are NaN
    (null in the JSON written by :func:`covidcxr.files.write_json`) and ``delong["note"]`` says why.
    """
    y = np.asarray(y_true).astype(int)
    result = {"delong": delong_test(y, score_a, score_b, level=level),
              "mcnemar": mcnemar_test(np.asarray(pred_a) == y, np.asarray(pred_b) == y)}
    result["accuracy_a"] = float((np.asarray(pred_a) == y).mean())
    result["accuracy_b"] = float((np.asarray(pred_b) == y).mean())
    return result


def parse_calls(calls: pd.Series, positive_class: str, classes, *, name: str = "reads",
                label_to_class: dict[str, str] | None = None) -> np.ndarray:
    """Reader calls -> 0/1: a model class name, a manifest label mapped by ``label_to_class`` (e.g.
    ``normal -> non-covid``), or 1/0, positive/negative, yes/no."""
    out = np.zeros(len(calls), dtype=int)
    mapped = {str(k).lower(): str(v).lower() for k, v in (label_to_class or {}).items() if v is not None}
    classes = [str(c).lower() for c in classes] + sorted(mapped)
    for i, (idx, raw) in enumerate(calls.items()):
        v = str(raw).strip().lower()
        v = mapped.get(v, v)
        if v == positive_class.lower() or v in POSITIVE_CALLS:
            out[i] = 1
        elif v in classes or v in NEGATIVE_CALLS:
            out[i] = 0
        else:
            raise CovidCXRError(f"{name}: row {idx + 2}: call {raw!r} is not one of {sorted(set(classes))} "
                                f"or 1/0, positive/negative, yes/no")
    return out


def read_reader_calls(path: str | Path) -> pd.DataFrame:
    """Read ``image, reader, call`` CSV; errors name the file and what is missing."""
    path = Path(path)
    if not path.is_file():
        raise CovidCXRError(f"{path}: reader file not found")
    try:
        reads = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CovidCXRError(f"{path}: cannot be read as CSV ({exc})") from exc
    missing = {"image", "reader", "call"} - set(reads.columns)
    if missing:
        raise CovidCXRError(f"{path}: missing column(s) {sorted(missing)}; need image, reader, call")
    return reads


def compare_readers(predictions: pd.DataFrame, reads: pd.DataFrame, *, positive_class: str, classes,
                    level: float = DEFAULT_LEVEL, name: str = "reads", label_to_class: dict[str, str] | None = None) -> dict:
    """Model vs each reader on the images that reader read.

    ``predictions`` needs ``image`` (manifest path), ``y_true`` (0/1) and ``y_pred`` (0/1 at the
    stored threshold). Reader images are matched to ``image`` exactly, or by file name where that is
    unique; reads of images not in ``predictions`` are counted and reported, not silently dropped.
    """
    by_path = {str(p): i for i, p in enumerate(predictions["image"])}
    names = pd.Series([Path(str(p)).name for p in predictions["image"]])
    by_name = {n: i for i, n in enumerate(names) if (names == n).sum() == 1}
    rows = []
    unmatched = []
    for idx, r in reads.iterrows():
        key = str(r["image"])
        pos = by_path.get(key, by_name.get(Path(key).name))
        if pos is None:
            unmatched.append(key)
        rows.append(pos)
    reads = reads.assign(_row=rows).dropna(subset=["_row"])
    reads["_row"] = reads["_row"].astype(int)
    reads["_call"] = parse_calls(reads["call"], positive_class, classes, name=name, label_to_class=label_to_class)
    y = predictions["y_true"].to_numpy().astype(int)
    model_pred = predictions["y_pred"].to_numpy().astype(int)
    readers = {}
    for reader, part in reads.groupby("reader", sort=True):
        dup = part["_row"].duplicated()
        if dup.any():
            raise CovidCXRError(f"{name}: reader {reader!r} has several calls for image "
                                f"{predictions['image'].iloc[part['_row'][dup].iloc[0]]}")
        rows_ = part["_row"].to_numpy()
        yr, call, mp = y[rows_], part["_call"].to_numpy(), model_pred[rows_]
        readers[str(reader)] = {
            "n": int(len(rows_)),
            "reader": _sens_spec(yr, call, level),
            "model_same_images": _sens_spec(yr, mp, level),
            "mcnemar_model_vs_reader": mcnemar_test(mp == yr, call == yr),
        }
    return {"readers": readers, "unmatched_reads": len(unmatched), "unmatched_examples": unmatched[:10]}


def _sens_spec(y: np.ndarray, pred: np.ndarray, level: float) -> dict:
    c = confusion_counts(y, pred)
    out = {}
    for key, k, n in (("sensitivity", c["tp"], c["tp"] + c["fn"]), ("specificity", c["tn"], c["tn"] + c["fp"])):
        lo, hi = wilson_ci(k, n, level=level)  # (nan, nan) when n == 0 -> None
        out[key] = Estimate(k / n if n else float("nan"), lo, hi, "Wilson", n).to_dict()
    out["confusion"] = c
    return out
