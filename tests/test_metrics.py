"""Metrics against reference implementations: sklearn, brute-force pair counting, bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn import metrics as skm

from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.evaluation import classification as C
from covidcxr.evaluation import metrics as M
from covidcxr.evaluation.thresholds import select_threshold


def _scores(n_pos=60, n_neg=90, shift=1.0, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    s = np.concatenate([rng.normal(shift, 1, n_pos), rng.normal(0, 1, n_neg)])
    if ties:
        s = np.round(s, 1)
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    return y, s


def _brute_placements(y, s):
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(1), psi.mean(0), psi.mean()


@pytest.fixture(scope="module")
def manifest_table(data_root):
    return pd.read_csv(data_root / "manifest.csv")


@pytest.fixture(scope="module")
def shortcut_scores(manifest_table):
    """Real labels and sources; scores driven partly by the source (a shortcut) and partly by the label."""
    t = manifest_table
    y = (t["label"] == "covid").to_numpy().astype(int)
    rng = np.random.default_rng(1)
    src_effect = {s: i for i, s in enumerate(sorted(t["source"].unique()))}
    covid_rate = t.groupby("source")["label"].apply(lambda v: (v == "covid").mean())
    s = 3.0 * t["source"].map(covid_rate).to_numpy() + 0.5 * y + rng.normal(0, 1, len(t))
    return y, s, t["source"].to_numpy(), src_effect


@pytest.mark.parametrize("ties", [False, True])
def test_delong_placements_match_brute_force(ties):
    y, s = _scores(ties=ties)
    auc, v10, v01 = M.delong_placements(y, s)
    b10, b01, bauc = _brute_placements(y, s)
    np.testing.assert_allclose(v10, b10, atol=1e-12)
    np.testing.assert_allclose(v01, b01, atol=1e-12)
    assert auc == pytest.approx(bauc) == pytest.approx(skm.roc_auc_score(y, s))
    _, var = M.delong_variance(y, s)
    brute_var = np.var(b10, ddof=1) / len(b10) + np.var(b01, ddof=1) / len(b01)
    assert var == pytest.approx(brute_var, rel=1e-10)


def test_delong_ci_agrees_with_bootstrap_and_hanley_mcneil():
    y, s = _scores(n_pos=120, n_neg=200, shift=1.2, seed=3)
    est = M.auc_ci(y, s)
    auc, var = M.delong_variance(y, s)
    hm = M.hanley_mcneil_variance(auc, int(y.sum()), int((1 - y).sum()))
    assert np.sqrt(var) == pytest.approx(np.sqrt(hm), rel=0.15)
    def mann_whitney_auc(yy, ss):  # independent of covidcxr's own AUC code
        return stats.mannwhitneyu(ss[yy == 1], ss[yy == 0]).statistic / ((yy == 1).sum() * (yy == 0).sum())

    assert mann_whitney_auc(y, s) == pytest.approx(est.value)
    rng = np.random.default_rng(5)
    boot = [mann_whitney_auc(y[i], s[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(1000))]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert est.ci_low == pytest.approx(lo, abs=0.015)
    assert est.ci_high == pytest.approx(hi, abs=0.015)
    assert est.ci_low < est.value < est.ci_high


def test_delong_paired_test_detects_better_model_and_not_itself():
    y, s = _scores(n_pos=100, n_neg=150, shift=1.5, seed=4)
    rng = np.random.default_rng(9)
    worse = s + rng.normal(0, 2.0, len(s))
    res = M.delong_test(y, s, worse)
    assert res["difference"] == pytest.approx(skm.roc_auc_score(y, s) - skm.roc_auc_score(y, worse))
    assert res["p_value"] < 0.01 and res["ci_low"] > 0
    same = M.delong_test(y, s, s)
    assert same["p_value"] == 1.0 and same["difference"] == 0
    # paired variance equals the unpaired variance formula with the covariance term
    _, va = M.delong_variance(y, s)
    _, vb = M.delong_variance(y, worse)
    assert res["se"] ** 2 < va + vb  # positively correlated scores: pairing shrinks the variance


def test_within_source_auc_equals_pairwise_count(shortcut_scores):
    y, s, src, _ = shortcut_scores
    wins = pairs = 0.0
    for key in np.unique(src):
        m = src == key
        if 0 < y[m].sum() < m.sum():
            _, _, auc = _brute_placements(y[m], s[m])
            n = y[m].sum() * (m.sum() - y[m].sum())
            wins += auc * n
            pairs += n
    value = M.within_source_auc(y, s, src)
    assert value == pytest.approx(wins / pairs, abs=1e-12)
    # The source shortcut inflates plain AUC far above the within-source discrimination.
    assert skm.roc_auc_score(y, s) > value + 0.1


def test_within_source_auc_details_ci_matches_stratified_bootstrap(shortcut_scores):
    y, s, src, _ = shortcut_scores
    det = M.within_source_auc_details(y, s, src)
    assert det["value"] == pytest.approx(M.within_source_auc(y, s, src))
    used = {r["source"] for r in det["per_source"] if r["used"]}
    assert set(det["sources_used"]) == used and len(used) >= 2
    assert sum(r["pairs"] for r in det["per_source"] if r["used"]) == det["pairs"]
    # independent check: bootstrap stratified by source (resample within each source)
    rng = np.random.default_rng(0)
    idx_by_src = [np.flatnonzero(src == k) for k in np.unique(src)]
    boot = []
    for _ in range(400):
        idx = np.concatenate([rng.choice(g, len(g)) for g in idx_by_src])
        boot.append(M.within_source_auc(y[idx], s[idx], src[idx]))
    lo, hi = np.nanquantile(boot, [0.025, 0.975])
    assert det["ci_low"] == pytest.approx(lo, abs=0.03)
    assert det["ci_high"] == pytest.approx(hi, abs=0.03)


def test_within_source_auc_nan_when_no_source_has_both_classes():
    y = np.array([1, 1, 0, 0])
    assert np.isnan(M.within_source_auc(y, [0.9, 0.8, 0.1, 0.2], ["a", "a", "b", "b"]))
    # perfect within each source although plain AUC is only 0.75
    assert M.within_source_auc(y, [0.9, 0.3, 0.8, 0.2], ["a", "b", "a", "b"]) == 1.0
    assert skm.roc_auc_score(y, [0.9, 0.3, 0.8, 0.2]) == 0.75
    with pytest.raises(CovidCXRError, match="one value per image"):
        M.within_source_auc(y, [0.1] * 4, ["a"] * 3)


def test_wilson_matches_closed_form_reference():
    # Reference values (Newcombe 1998, table I): 81/263 -> 0.2553 to 0.3662; 15/148 -> 0.0624 to 0.1605
    assert M.wilson_ci(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-4)
    assert M.wilson_ci(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-4)
    lo, hi = M.wilson_ci(0, 10)
    assert lo == 0 and 0.25 < hi < 0.32


def test_binary_metrics_points_match_sklearn(shortcut_scores):
    y, s, src, _ = shortcut_scores
    thr = float(np.median(s))
    res = C.binary_metrics(y, s, thr, n_boot=200, prevalence=0.05)
    pred = (s >= thr).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert res["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert res["sensitivity"]["value"] == pytest.approx(skm.recall_score(y, pred))
    assert res["specificity"]["value"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert res["ppv"]["value"] == pytest.approx(skm.precision_score(y, pred))
    assert res["npv"]["value"] == pytest.approx(skm.precision_score(1 - y, 1 - pred))
    assert res["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred))
    assert res["balanced_accuracy"]["value"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert res["f1"]["value"] == pytest.approx(skm.f1_score(y, pred))
    assert res["auc"]["value"] == pytest.approx(skm.roc_auc_score(y, s))
    for name in C.THRESHOLD_METRICS:
        assert res[name]["ci_low"] <= res[name]["value"] <= res[name]["ci_high"], name
    # Bayes at 5 % prevalence
    se, sp = res["sensitivity"]["value"], res["specificity"]["value"]
    ppv = se * 0.05 / (se * 0.05 + (1 - sp) * 0.95)
    assert res["at_prevalence"]["ppv"]["value"] == pytest.approx(ppv)
    assert res["at_prevalence"]["ppv"]["value"] < res["ppv"]["value"]  # 10.6 % covid here vs 5 %


def test_cluster_bootstrap_resamples_patients_and_widens_ci(manifest_table):
    t = manifest_table[manifest_table["source"].str.contains("covid-chestxray")].reset_index(drop=True)
    y = (t["label"] == "covid").to_numpy().astype(int)
    # scores shared within a patient: images of one patient are strongly correlated
    rng = np.random.default_rng(2)
    pat_effect = {p: rng.normal(0, 1.5) for p in t["patient_id"].unique()}
    s = y * 0.8 + t["patient_id"].map(pat_effect).to_numpy() + rng.normal(0, 0.3, len(t))
    groups = M.cluster_indices(t["patient_id"])
    assert sum(len(g) for g in groups) == len(t) and len(groups) == t["patient_id"].nunique()
    sample = next(M.bootstrap_samples(len(t), clusters=t["patient_id"], n_boot=1, seed=0))
    pats = t["patient_id"].to_numpy()[sample]
    # every drawn patient comes with all of its images
    for p in set(pats[:20]):
        assert (pats == p).sum() % (t["patient_id"] == p).sum() == 0
    plain = M.auc_ci(y, s)
    clustered = M.auc_ci(y, s, clusters=t["patient_id"], n_boot=300)
    assert clustered.method.startswith("cluster")
    assert (clustered.ci_high - clustered.ci_low) > (plain.ci_high - plain.ci_low)


def test_multiclass_metrics_match_sklearn(manifest_table):
    t = manifest_table[manifest_table["label"] != "other"].reset_index(drop=True)
    classes = ["covid", "normal", "pneumonia"]
    rng = np.random.default_rng(0)
    onehot = np.eye(3)[[classes.index(v) for v in t["label"]]]
    logits = 1.5 * onehot + rng.normal(0, 1, onehot.shape)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    res = C.multiclass_metrics(t["label"], probs, classes, n_boot=100)
    for k, c in enumerate(classes):
        assert res["auc_ovr"][c]["value"] == pytest.approx(skm.roc_auc_score(t["label"] == c, probs[:, k]))
    assert res["macro_auc"]["value"] == pytest.approx(skm.roc_auc_score(t["label"], probs, multi_class="ovr",
                                                                         average="macro", labels=classes))
    pred = np.array(classes)[probs.argmax(1)]
    assert res["confusion_matrix"]["matrix"] == skm.confusion_matrix(t["label"], pred, labels=classes).tolist()
    assert res["accuracy"]["value"] == pytest.approx(skm.accuracy_score(t["label"], pred))


def test_select_threshold_youden_and_sensitivity():
    y, s = _scores(n_pos=80, n_neg=120, shift=1.5, seed=7)
    t = select_threshold(y, s, "youden")
    fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
    j = tpr - fpr
    assert t in s
    sens = ((s >= t) & (y == 1)).sum() / y.sum()
    spec = ((s < t) & (y == 0)).sum() / (1 - y).sum()
    assert sens + spec - 1 == pytest.approx(j.max())
    t95 = select_threshold(y, s, "sensitivity", target=0.95)
    assert ((s >= t95) & (y == 1)).sum() / y.sum() >= 0.95
    higher = s[s > t95].min()  # the next threshold up misses the target
    assert ((s >= higher) & (y == 1)).sum() / y.sum() < 0.95
    with pytest.raises(ConfigError, match="target"):
        select_threshold(y, s, "sensitivity")
    with pytest.raises(ConfigError, match="choose one of"):
        select_threshold(y, s, "f1max")
    with pytest.raises(CovidCXRError, match="both classes"):
        select_threshold(np.ones(5, int), np.arange(5.0))


# ---------------------------------------------------------------- statistics fixed against R (pROC, mcnemar.test)


def test_wilson_matches_published_values_and_closed_form():
    # Newcombe (1998) table I, method 3 (Wilson, no continuity correction), and binom::binom.wilson(5, 10)
    assert M.wilson_ci(0, 20) == pytest.approx((0.0, 0.1611), abs=5e-5)
    assert M.wilson_ci(1, 29) == pytest.approx((0.0061, 0.1718), abs=5e-5)
    assert M.wilson_ci(5, 10) == pytest.approx((0.2365931, 0.7634069), abs=5e-8)
    assert M.wilson_ci(10, 10)[1] == 1.0 and M.wilson_ci(10, 10)[0] == pytest.approx(0.7224672, abs=5e-8)
    # closed form (Wilson 1927), written out here independently of scipy
    for level in (0.9, 0.95, 0.99):
        z = stats.norm.ppf(0.5 + level / 2)
        for n in (1, 2, 7, 30, 113):
            for k in range(n + 1):
                p = k / n
                centre = (p + z * z / (2 * n)) / (1 + z * z / n)
                half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
                assert M.wilson_ci(k, n, level=level) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert all(np.isnan(M.wilson_ci(0, 0)))


def test_confusion_counts_match_sklearn_with_one_class_present():
    y = np.zeros(6, int)
    pred = np.array([0, 0, 1, 0, 1, 0])
    assert C.confusion_counts(y, pred) == {"tp": 0, "fp": 2, "tn": 4, "fn": 0}
    assert C.confusion_counts(np.ones(3, int), np.ones(3, int)) == {"tp": 3, "fp": 0, "tn": 0, "fn": 0}
    assert C.confusion_counts([], []) == {"tp": 0, "fp": 0, "tn": 0, "fn": 0}


@pytest.mark.parametrize("b,c", [(25, 25), (30, 30), (26, 25), (25, 26)])
def test_mcnemar_continuity_correction_never_below_zero(b, c):
    """R's mcnemar.test(correct = TRUE) gives statistic 0 and p = 1 when |b - c| <= 1 (the old
    (|b - c| - 1)^2 / (b + c) gave 1/(b + c), e.g. 0.033 and p = 0.855 for b = c = 15 + 15)."""
    from covidcxr.evaluation.compare import mcnemar_test

    a = np.r_[np.ones(b, bool), np.zeros(c, bool), np.ones(40, bool)]
    other = np.r_[np.zeros(b, bool), np.ones(c, bool), np.ones(40, bool)]
    res = mcnemar_test(a, other)
    assert (res["only_a_correct"], res["only_b_correct"]) == (b, c)
    assert res["method"] == "chi-square, continuity corrected"
    assert res["statistic"] == 0.0 and res["p_value"] == 1.0


def test_mcnemar_corrected_statistic_matches_r():
    from covidcxr.evaluation.compare import mcnemar_test

    # R's mcnemar.test (2 x 2, correct = TRUE): STATISTIC = (|b - c| - 1)^2 / (b + c) when b != c,
    # chi-square with 1 df; b = 40, c = 20 -> 19^2 / 60; p = P(chi2_1 > x) = erfc(sqrt(x / 2))
    a = np.r_[np.ones(40, bool), np.zeros(20, bool), np.ones(10, bool), np.zeros(10, bool)]
    b = np.r_[np.zeros(40, bool), np.ones(20, bool), np.ones(10, bool), np.zeros(10, bool)]
    res = mcnemar_test(a, b)
    assert res["statistic"] == pytest.approx(19**2 / 60, rel=1e-12)
    from math import erfc, sqrt

    assert res["p_value"] == pytest.approx(erfc(sqrt(19**2 / 60 / 2)), rel=1e-10)
    # below 25 discordant pairs: exact binomial, unchanged
    small = mcnemar_test(np.r_[np.ones(8, bool), np.zeros(2, bool)], np.r_[np.zeros(8, bool), np.ones(2, bool)])
    assert small["method"] == "exact binomial" and small["p_value"] == pytest.approx(stats.binomtest(8, 10).pvalue)


@pytest.mark.parametrize("single", ["positive", "negative"])
def test_delong_undefined_with_a_single_positive_or_negative(single):
    """The DeLong variance needs the sample variance of each class's placement values: with one
    positive (or negative) it is undefined, so no CI and no test (pROC gives NA). The old code set
    that variance to 0 and reported e.g. a CI of 0.21-0.90 and a paired p of 0.046."""
    import json

    from covidcxr.evaluation.compare import compare_predictions
    from covidcxr.files import dumps_json

    rng = np.random.default_rng(0)
    y = np.r_[1, np.zeros(40, int)] if single == "positive" else np.r_[0, np.ones(40, int)]
    s = rng.normal(0, 1, len(y)) + (0.8 if single == "positive" else -0.8) * (np.arange(len(y)) == 0)
    worse = s + rng.normal(0, 1, len(y))

    est = M.auc_ci(y, s)
    assert est.value == pytest.approx(skm.roc_auc_score(y, s))
    assert np.isnan(est.ci_low) and np.isnan(est.ci_high)
    assert f"single {single}" in est.note
    d = est.to_dict()
    assert d["ci_low"] is None and d["ci_high"] is None and "DeLong variance undefined" in d["note"]
    assert np.isnan(M.delong_variance(y, s)[1])

    test = M.delong_test(y, s, worse)
    assert all(np.isnan(test[k]) for k in ("se", "z", "p_value", "ci_low", "ci_high"))
    assert f"single {single}" in test["note"]
    assert test["difference"] == pytest.approx(skm.roc_auc_score(y, s) - skm.roc_auc_score(y, worse))

    thr = float(np.median(s))
    res = C.binary_metrics(y, s, thr, n_boot=50)
    assert res["auc"]["ci_low"] is None and "single" in res["auc"]["note"]
    json.dumps(res, allow_nan=False)  # strict JSON: undefined values are null, not NaN
    cmp = compare_predictions(y, s, worse, (s >= thr).astype(int), (worse >= thr).astype(int))
    assert np.isnan(cmp["delong"]["p_value"])
    assert json.loads(dumps_json(cmp))["delong"]["p_value"] is None


def test_within_source_ci_undefined_when_a_source_has_a_single_positive():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(20, int), np.zeros(20, int), 1, np.zeros(15, int)]
    src = np.array(["a"] * 40 + ["b"] * 16)
    s = rng.normal(0, 1, len(y)) + y
    det = M.within_source_auc_details(y, s, src)
    rows = {r["source"]: r for r in det["per_source"]}
    assert rows["a"]["ci_low"] is not None and "note" not in rows["a"]
    assert rows["b"]["ci_low"] is None and rows["b"]["ci_high"] is None and "single positive" in rows["b"]["note"]
    assert det["value"] == pytest.approx(M.within_source_auc(y, s, src))
    assert det["ci_low"] is None and det["ci_high"] is None and "['b']" in det["note"]
    # without source b the pooled CI is the per-source DeLong CI of a
    only_a = M.within_source_auc_details(y[:40], s[:40], src[:40])
    assert only_a["ci_low"] == pytest.approx(rows["a"]["ci_low"]) and "note" not in only_a


def test_youden_tie_goes_to_the_highest_threshold_despite_float_rounding():
    """J = 2/3 at threshold 0.8 (tpr 2/3, fpr 0) and at 0.6 (tpr 1, fpr 1/3); in floats the second
    is 0.6666666666666667 and the first 0.6666666666666666, so a plain argmax picks 0.6. The
    docstring promises the highest threshold among ties (fewest false positives): 0.8."""
    y = np.array([1, 1, 0, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
    j = dict(zip(thr, tpr - fpr))
    assert j[0.6] > j[0.8] and j[0.6] - j[0.8] < 1e-15  # the tie really differs in the last bit
    assert select_threshold(y, s, "youden") == 0.8
    # no tie: the unique maximum still wins
    assert select_threshold(np.array([1, 1, 0, 1, 0, 0]), np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.5])) == 0.8


def test_predictive_values_use_a_zero_ci_bound():
    sens = {"value": 0.5, "ci_low": 0.0, "ci_high": 0.9}
    spec = {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9}
    out = C.predictive_values_at_prevalence(sens, spec, 0.1)
    assert out["ppv"]["ci_low"] == 0.0  # sensitivity 0 -> PPV 0 (a falsy 0.0 bound used to be replaced by 0.5)


def test_temperature_scaling_record_roundtrip():
    from covidcxr.evaluation.calibration import TemperatureScaling

    ts = TemperatureScaling(1.7, "val", 10, 0.5, 0.4)
    assert TemperatureScaling.from_record(ts.to_record()) == ts
    assert TemperatureScaling.from_record(None) is None
