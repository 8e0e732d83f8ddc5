"""Speed of the evaluation statistics, with peak RSS: fast DeLong vs the O(n^2) placement matrix,
within-source AUC, the full binary metric set (Wilson + bootstrap CIs) and the cluster bootstrap.

    .venv/bin/python bench/evaluation_metrics.py

Scores are synthetic (binormal, 1:4 positives, 6 sources); sizes up to 1e6 images. Writes
``bench/results/evaluation_metrics.json``. Single thread on a shared 2-core machine: compare ratios
more than absolute values.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import numpy as np

from covidcxr.evaluation import classification as C
from covidcxr.evaluation import metrics as M

RESULTS = Path(__file__).resolve().parent / "results" / "evaluation_metrics.json"


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    s = rng.normal(y * 1.2, 1.0)
    src = rng.integers(0, 6, n).astype(str)
    patients = (np.arange(n) // 3).astype(str)  # 3 images per patient
    return y, s, src, patients


def _time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _brute_variance(y, s):
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return np.var(psi.mean(1), ddof=1) / len(pos) + np.var(psi.mean(0), ddof=1) / len(neg)


def main() -> None:
    rows = []
    for n in (1_000, 10_000, 100_000, 1_000_000):
        y, s, src, pat = _data(n)
        row = {"n_images": n, "delong_fast_s": _time(lambda: M.delong_variance(y, s)),
               "within_source_auc_details_s": _time(lambda: M.within_source_auc_details(y, s, src))}
        if n <= 10_000:
            row["delong_brute_force_s"] = _time(lambda: _brute_variance(y, s), repeats=1)
            row["variance_rel_diff"] = abs(M.delong_variance(y, s)[1] / _brute_variance(y, s) - 1)
        if n <= 10_000:
            row["binary_metrics_1000_boot_s"] = _time(lambda: C.binary_metrics(y, s, 0.5), repeats=1)
            row["binary_metrics_patient_bootstrap_1000_s"] = _time(
                lambda: C.binary_metrics(y, s, 0.5, clusters=pat), repeats=1)
        rows.append(row)
        print(row, flush=True)
    result = {"benchmark": "evaluation_metrics", "python": platform.python_version(), "machine": platform.machine(),
              "rows": rows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
