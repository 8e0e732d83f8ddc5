"""covidcxr's ROC statistics against R's pROC (Robin et al. 2011, BMC Bioinformatics 12:77) on pROC's
own example data, ``aSAH`` (tests/data/aSAH.csv; where it comes from: tests/data/README.md).

Reference values are pROC's: its test suite (xrobin/pROC tests/testthat: test-var.R, test-ci.auc.R,
test-roc.test.R, test-coords.R, helper-deLongPlacementsCpp-expected.R; printed to 15 significant
digits) and the output printed in its help pages (``?roc.test``, ``?ci.auc``: 4 digits). pROC's
defaults there: ``levels = c("Good", "Poor")`` (Poor is the positive class), ``direction = "<"``,
DeLong variance, ``conf.level = 0.95``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr.evaluation import classification as C
from covidcxr.evaluation import metrics as M
from covidcxr.evaluation.compare import compare_predictions
from covidcxr.evaluation.thresholds import select_threshold

DATA = Path(__file__).parent / "data"

# pROC test suite, 15 significant digits: relative agreement to 1e-10 leaves room only for the
# printing, not for a different formula.
REL = 1e-10

PROC_AUC = {"s100b": 0.731368563685637, "wfns": 0.823678861788618, "ndka": 0.611957994579946}
PROC_VAR_DELONG = {"s100b": 0.00266868245717244, "wfns": 0.00146991470882363, "ndka": 0.0031908105493913}
PROC_CI_NDKA = (0.501244999271703, 0.722670989888189)  # ci.auc(r.ndka)
# roc.test(roc1, roc2) (paired DeLong): Z for AUC(roc1) - AUC(roc2), two-sided p, 95% CI of the difference
PROC_ROC_TEST = {
    ("wfns", "s100b"): (2.20898359144091, 0.0271757822291882, (0.0104061769564846, 0.174214419249478)),
    ("wfns", "ndka"): (2.79777591868904, 0.00514557970691098, None),
    ("ndka", "s100b"): (-1.39077002573558, 0.164295175223054, None),
}


@pytest.fixture(scope="module")
def asah() -> pd.DataFrame:
    t = pd.read_csv(DATA / "aSAH.csv", comment="#")
    assert len(t) == 113 and set(t["outcome"]) == {"Good", "Poor"}
    t["y"] = (t["outcome"] == "Poor").astype(int)  # pROC: levels = c("Good", "Poor")
    assert int(t["y"].sum()) == 41
    return t


def _rel_err(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


def test_fixture_reproduces_procs_own_placement_values(asah):
    """The fixture is pROC's data in pROC's row order: every patient's DeLong placement value
    (pROC's expected values, from its repository) comes out of covidcxr's mid-rank DeLong."""
    ref = json.loads((DATA / "aSAH_pROC_placements.json").read_text())
    for marker, pl in ref["placements"].items():
        auc, v10, v01 = M.delong_placements(asah["y"], asah[marker])
        np.testing.assert_allclose(v10, pl["cases"], rtol=0, atol=1e-14, err_msg=marker)
        np.testing.assert_allclose(v01, pl["controls"], rtol=0, atol=1e-14, err_msg=marker)
        assert auc == pytest.approx(ref["theta"][marker], abs=1e-14)


@pytest.mark.parametrize("marker", ["s100b", "wfns", "ndka"])
def test_auc_and_delong_variance_match_proc(asah, marker):
    auc, var = M.delong_variance(asah["y"], asah[marker])
    assert _rel_err(auc, PROC_AUC[marker]) < REL
    assert _rel_err(var, PROC_VAR_DELONG[marker]) < REL
    # the non-DeLong AUC helper (scikit-learn) gives the same number
    assert _rel_err(M.auc_score(asah["y"], asah[marker]), PROC_AUC[marker]) < REL


def test_auc_ci_matches_proc(asah):
    ndka = M.auc_ci(asah["y"], asah["ndka"])
    assert ndka.method == "DeLong"
    assert _rel_err(ndka.ci_low, PROC_CI_NDKA[0]) < REL and _rel_err(ndka.ci_high, PROC_CI_NDKA[1]) < REL
    # ?ci.auc / ?roc: "Area under the curve: 0.7314, 95% CI: 0.6301-0.8326 (DeLong)"
    s100b = M.auc_ci(asah["y"], asah["s100b"])
    assert (round(s100b.value, 4), round(s100b.ci_low, 4), round(s100b.ci_high, 4)) == (0.7314, 0.6301, 0.8326)
    assert round(M.auc_ci(asah["y"], asah["wfns"]).value, 4) == 0.8237


@pytest.mark.parametrize("pair", sorted(PROC_ROC_TEST))
def test_paired_delong_test_matches_proc_roc_test(asah, pair):
    z_ref, p_ref, ci_ref = PROC_ROC_TEST[pair]
    a, b = pair
    res = M.delong_test(asah["y"], asah[a], asah[b])
    assert _rel_err(res["z"], z_ref) < REL
    assert _rel_err(res["p_value"], p_ref) < REL
    assert res["difference"] == pytest.approx(PROC_AUC[a] - PROC_AUC[b], abs=1e-14)
    if ci_ref is not None:
        assert _rel_err(res["ci_low"], ci_ref[0]) < REL and _rel_err(res["ci_high"], ci_ref[1]) < REL
    # swapping the curves flips the sign of Z only (pROC: t1b$statistic == -t1$statistic)
    rev = M.delong_test(asah["y"], asah[b], asah[a])
    assert rev["z"] == pytest.approx(-res["z"], rel=1e-12) and rev["p_value"] == pytest.approx(res["p_value"], rel=1e-12)


def test_roc_test_example_from_proc_help(asah):
    """?roc.test: roc.test(roc(aSAH$outcome, aSAH$s100b), roc(aSAH$outcome, aSAH$wfns))
    gives Z = -2.209, p-value = 0.02718 (roc1 - roc2, i.e. s100b - wfns)."""
    res = compare_predictions(asah["y"], asah["s100b"], asah["wfns"], asah["s100b"] >= 0.22, asah["wfns"] >= 3)
    d = res["delong"]
    assert round(d["z"], 3) == -2.209 and round(d["p_value"], 5) == 0.02718
    assert (round(d["auc_a"], 4), round(d["auc_b"], 4)) == (0.7314, 0.8237)
    assert "note" not in d


def test_youden_threshold_matches_proc_coords_best(asah):
    """coords(r.s100b, "best") (Youden): threshold 0.205, specificity 0.805555555555556,
    sensitivity 0.634146341463415. pROC's thresholds are midpoints between observed values
    (0.205 = (0.19 + 0.22) / 2); covidcxr returns the observed score and calls ``score >= t``
    positive, which makes exactly the same calls."""
    y, s = asah["y"].to_numpy(), asah["s100b"].to_numpy()
    t = select_threshold(y, s, "youden")
    assert t == 0.22
    np.testing.assert_array_equal(s >= t, s > 0.205)
    res = C.binary_metrics(y, s, t, n_boot=20)
    assert res["specificity"]["value"] == pytest.approx(0.805555555555556, rel=REL)
    assert res["sensitivity"]["value"] == pytest.approx(0.634146341463415, rel=REL)
    assert res["confusion"] == {"tp": 26, "fn": 15, "tn": 58, "fp": 14}
