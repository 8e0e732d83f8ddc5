"""`covidcxr evaluate` / `compare` / readers on a real trained run and real shared images."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats
from sklearn import metrics as skm
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.data import read_xray
from covidcxr.errors import CovidCXRError
from covidcxr.evaluation import classification as C
from covidcxr.evaluation import metrics as M
from covidcxr.evaluation.calibration import TemperatureScaling, expected_calibration_error
from covidcxr.evaluation.compare import compare_predictions, mcnemar_test
from covidcxr.evaluation.run_comparison import compare_runs
from covidcxr.evaluation.evaluate import evaluate_run
from covidcxr.models.run import load_run

PER_SOURCE = 10  # images per (split, source) in the small evaluation manifest: keeps CI time low


def small_eval_manifest(split_manifest, path, per_source: int = PER_SOURCE, external_source: str = "Figure1"):
    """A few test (and val) images of every source; one source's test rows relabelled 'external' to play the
    held-out source. Written as CSV (absolute image paths) so the CLI can read it."""
    t = split_manifest.table
    t = t[t["split"].isin(["test", "val"])].sample(frac=1, random_state=0)
    # keep the covid images (rare) and a few of the rest, per split and source
    small = pd.concat([t[t["label"] == "covid"].groupby(["split", "source"]).head(per_source),
                       t[t["label"] != "covid"].groupby(["split", "source"]).head(per_source)])
    small = small.copy()
    small["image"] = [str(p) for p in split_manifest.replace(small).image_paths()]
    small.loc[small["source"].str.contains(external_source) & (small["split"] == "test"), "split"] = "external"
    small.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    """A private copy of the shared trained run (evaluation writes eval/ and calibration.json into it)."""
    import shutil

    dst = tmp_path_factory.mktemp("evalrun") / "run"
    shutil.copytree(trained_run, dst)
    return dst


@pytest.fixture(scope="module")
def eval_manifest(split_manifest, tmp_path_factory):
    return small_eval_manifest(split_manifest, tmp_path_factory.mktemp("evalmanifest") / "small.csv")


@pytest.fixture(scope="module")
def evaluated(run_dir, eval_manifest):
    """`covidcxr evaluate` run once through the CLI, with every option that changes the output."""
    reads = run_dir.parent / "reads.csv"
    table = pd.read_csv(eval_manifest)
    test = table[table["split"] == "test"]
    rows = [{"image": img, "reader": "oracle", "call": lab} for img, lab in zip(test["image"], test["label"])]
    rows += [{"image": img, "reader": "always-covid", "call": "covid"} for img in test["image"]]
    rows.append({"image": "not/in/this/evaluation.jpg", "reader": "oracle", "call": "covid"})
    pd.DataFrame(rows).to_csv(reads, index=False)
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), "--manifest", str(eval_manifest), "--by", "source",
                                      "--prevalence", "0.05", "--readers", str(reads), "--n-boot", "200",
                                      "--temperature-scaling"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = run_dir / "eval" / "test"
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=_no_nan)
    return {"out": out, "metrics": metrics, "pred": pd.read_csv(out / "predictions.csv"), "stdout": result.output,
            "manifest": table}


def _no_nan(name):
    raise AssertionError(f"metrics.json contains {name}; undefined values must be null")


def test_threshold_comes_from_run_json_and_metrics_match_sklearn(evaluated, run_dir):
    m, pred = evaluated["metrics"], evaluated["pred"]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["threshold"] is not None
    assert m["threshold"] == record["threshold"] and "validation" in m["threshold_source"]
    test = pred[pred["split"] == "test"]
    b = m["groups"]["test"]["binary"]
    y, s = test["y_true"].to_numpy(), test["score"].to_numpy()
    assert b["n"] == len(test) and b["n_positive"] == int(y.sum()) > 0
    assert b["auc"]["value"] == pytest.approx(skm.roc_auc_score(y, s))
    called = (s >= record["threshold"]).astype(int)
    assert b["sensitivity"]["value"] == pytest.approx(skm.recall_score(y, called))
    assert b["specificity"]["value"] == pytest.approx(skm.recall_score(1 - y, 1 - called))
    assert (test["y_pred"].to_numpy() == called).all()  # decisions in predictions.csv use the stored threshold
    for name in ("auc", *C.THRESHOLD_METRICS):
        e = b[name]
        if e["value"] is not None and e["ci_low"] is not None:
            assert e["ci_low"] <= e["value"] + 1e-12 and e["value"] <= e["ci_high"] + 1e-12, name
    w = m["groups"]["test"]["within_source_auc"]
    expected_w = M.within_source_auc(y, s, test["source"])
    assert (w["value"] is None and math.isnan(expected_w)) or w["value"] == pytest.approx(expected_w)
    assert b["at_prevalence"]["prevalence"] == 0.05


def test_predictions_are_the_models_probabilities_for_each_manifest_row(evaluated, run_dir):
    pred, manifest = evaluated["pred"], evaluated["manifest"]
    wanted = manifest[manifest["split"].isin(["test", "external"])]
    assert sorted(pred["image"]) == sorted(wanted["image"])  # every row scored, none silently dropped
    run = load_run(run_dir)
    sample = pred.iloc[:4]
    probs = run.predict_arrays([read_xray(p).pixels for p in sample["image"]])
    np.testing.assert_allclose(sample[f"prob_{run.positive_class}"].to_numpy(), probs[:, run.positive_index], atol=1e-5)
    assert set(pred["class"]) <= set(run.classes)


def test_per_source_and_internal_vs_external(evaluated):
    m = evaluated["metrics"]
    test, ext = m["groups"]["test"], m["groups"]["external"]
    assert set(test["by"]["groups"]) == set(evaluated["pred"].query("split == 'test'")["source"])
    assert sum(g["n_images"] for g in test["by"]["groups"].values()) == test["n_images"]
    gap = m["internal_vs_external"]["gap"]
    assert gap["sensitivity"] == pytest.approx(test["binary"]["sensitivity"]["value"] - ext["binary"]["sensitivity"]["value"])
    assert "internal - external" in evaluated["stdout"]


def test_plots_are_real_pngs(evaluated):
    out = evaluated["out"]
    plots = evaluated["metrics"]["plots"]["test"]
    for key in ("roc", "pr", "histogram", "reliability", "confusion", "roc_by"):
        img = Image.open(out / plots[key])
        assert img.format == "PNG" and img.size[0] > 300
        assert np.asarray(img.convert("L")).std() > 10  # not blank


def test_temperature_scaling_fitted_on_val_and_stored(evaluated, run_dir):
    from covidcxr.models.record import read_run_record

    stored = TemperatureScaling.from_record(read_run_record(run_dir).calibration)
    assert stored is not None and stored.fitted_on == "val"
    val = evaluated["manifest"].query("split == 'val'")
    assert stored.n == len(val)  # fitted on exactly the validation rows, never on test
    assert stored.nll_after <= stored.nll_before
    cal = evaluated["metrics"]["groups"]["test"]["calibration"]
    assert cal["temperature_scaled"]["temperature"] == pytest.approx(stored.temperature)


def test_reader_comparison(evaluated):
    r = evaluated["metrics"]["readers"]
    assert r["unmatched_reads"] == 1
    oracle, always = r["readers"]["oracle"], r["readers"]["always-covid"]
    test = evaluated["pred"].query("split == 'test'")
    assert oracle["n"] == always["n"] == len(test)
    assert oracle["reader"]["sensitivity"]["value"] == 1 and oracle["reader"]["specificity"]["value"] == 1
    assert always["reader"]["specificity"]["value"] == 0
    # McNemar model vs oracle: discordant pairs are exactly the model's errors
    errors = int((test["y_pred"] != test["y_true"]).sum())
    assert oracle["mcnemar_model_vs_reader"]["only_b_correct"] == errors
    assert oracle["model_same_images"]["sensitivity"]["value"] == pytest.approx(
        evaluated["metrics"]["groups"]["test"]["binary"]["sensitivity"]["value"])


def test_val_split_is_flagged(run_dir, eval_manifest, tmp_path):
    res = evaluate_run(run_dir, eval_manifest, split="val", out=tmp_path, n_boot=50, progress=False, make_plots=False,
                       patient_bootstrap=True)
    assert "VALIDATION" in res["warning"]
    assert res["ci_unit"].startswith("patient")
    assert res["groups"]["val"]["binary"]["sensitivity"]["method"] == "cluster bootstrap (patients)"
    assert json.loads((tmp_path / "metrics.json").read_text())["warning"] == res["warning"]


def test_unreadable_file_is_skipped_and_reported(run_dir, eval_manifest, tmp_path):
    table = pd.read_csv(eval_manifest)
    table = table[table["split"] == "test"].head(12).copy()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    extra = table.iloc[[0]].copy()
    extra["image"], extra["patient_id"] = str(bad), "broken:1"
    pd.concat([table, extra]).to_csv(tmp_path / "m.csv", index=False)
    res = evaluate_run(run_dir, tmp_path / "m.csv", out=tmp_path / "ev", n_boot=50, progress=False, make_plots=False)
    assert [s["image"] for s in res["skipped"]] == [str(bad)] and res["skipped"][0]["reason"]
    assert res["groups"]["test"]["n_images"] == len(table)


def test_missing_split_is_a_clear_error(run_dir, eval_manifest, tmp_path):
    table = pd.read_csv(eval_manifest)
    table[table["split"] == "val"].to_csv(tmp_path / "valonly.csv", index=False)
    with pytest.raises(CovidCXRError, match="no rows in split 'test'"):
        evaluate_run(run_dir, tmp_path / "valonly.csv", out=tmp_path, progress=False)


def test_compare_runs_paired_delong_and_mcnemar(run_dir, eval_manifest, tmp_path):
    import shutil

    from covidcxr.models.run import save_model

    # B: the same run with its classifier head perturbed, so it ranks images differently
    run = load_run(run_dir)
    head = [p for n, p in run.model.named_parameters() if "classifier" in n]
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for p in head:
            p.add_(torch.randn_like(p) * p.std() * 2)
    other = save_model(tmp_path / "b", run.model, architecture=run.record.architecture, classes=run.classes,
                       preprocess_spec=run.spec, threshold=run.threshold, label_space=run.record.label_space,
                       info=run.record.info)
    table = pd.read_csv(eval_manifest)
    table[table["split"] == "test"].to_csv(tmp_path / "t.csv", index=False)
    res = compare_runs(run_dir, other, tmp_path / "t.csv", out=tmp_path / "cmp.json", progress=False)
    ev = pd.read_csv(run_dir / "eval" / "test" / "predictions.csv").query("split == 'test'")
    assert res["n_images"] == len(ev)
    assert res["delong"]["se"] > 0 and res["delong"]["auc_b"] != res["delong"]["auc_a"]  # B really ranks differently
    assert res["delong"]["auc_a"] == pytest.approx(skm.roc_auc_score(ev["y_true"], ev["score"]), abs=1e-6)
    assert json.loads((tmp_path / "cmp.json").read_text())["mcnemar"] == res["mcnemar"]
    same = compare_predictions(ev["y_true"], ev["score"], ev["score"], ev["y_pred"], ev["y_pred"])
    assert same["delong"]["difference"] == 0 and same["mcnemar"]["p_value"] == 1.0
    shutil.rmtree(tmp_path / "b")


def test_mcnemar_exact_and_chi_square_branches():
    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.8
    b = a.copy()
    b[:8] = ~b[:8]  # 8 discordant pairs -> exact binomial
    res = mcnemar_test(a, b)
    k = res["only_a_correct"]
    assert res["method"] == "exact binomial"
    assert res["p_value"] == pytest.approx(stats.binomtest(k, 8, 0.5).pvalue)
    b2 = a.copy()
    b2[:60] = ~b2[:60]
    res2 = mcnemar_test(a, b2)
    bb, cc = res2["only_a_correct"], res2["only_b_correct"]
    assert res2["method"].startswith("chi-square")
    assert res2["p_value"] == pytest.approx(stats.chi2.sf((abs(bb - cc) - 1) ** 2 / (bb + cc), 1))


def test_temperature_scaling_fixes_overconfidence_and_keeps_decisions():
    rng = np.random.default_rng(0)
    n = 2000
    logit = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    over = 1 / (1 + np.exp(-3 * logit))  # 3x overconfident
    probs = np.c_[1 - over, over]
    t = TemperatureScaling.fit(probs, y)
    assert t.temperature == pytest.approx(3.0, rel=0.15)
    cal = t.transform(probs)[:, 1]
    assert expected_calibration_error(y, cal) < expected_calibration_error(y, over) / 2
    thr = 0.7
    assert ((cal >= t.transform_threshold(thr)) == (over >= thr)).all()



def test_three_class_run_gets_one_vs_rest_and_confusion_matrix(eval_manifest, weights_dir, tmp_path):
    """A 3-class run (ImageNet backbone, new head: real outputs, no training needed to check the bookkeeping)."""
    import torch

    from covidcxr.data.labels import get_label_space
    from covidcxr.data.preprocess import PreprocessSpec
    from covidcxr.models.registry import create_model
    from covidcxr.models.run import save_model

    torch.manual_seed(0)
    space = get_label_space("3class")
    model = create_model("tf_efficientnet_lite0", 3, weights=str(weights_dir / "efficientnet_lite0_imagenet_timm.pth"))
    run3 = save_model(tmp_path / "run3", model, architecture="tf_efficientnet_lite0", classes=space.classes,
                      positive_class="covid", preprocess_spec=PreprocessSpec(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3),
                      threshold=0.3, label_space=space.to_dict())
    table = pd.read_csv(eval_manifest)
    table[table["split"] == "test"].to_csv(tmp_path / "t.csv", index=False)
    res = evaluate_run(run3, tmp_path / "t.csv", out=tmp_path / "ev", n_boot=50, progress=False)
    pred = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    mc = res["groups"]["test"]["multiclass"]
    assert res["excluded_by_label_space"] == table.query("split == 'test' and label == 'other'")["label"].value_counts().to_dict()
    for c in space.classes:
        if pred["class"].eq(c).any():
            assert mc["auc_ovr"][c]["value"] == pytest.approx(skm.roc_auc_score(pred["class"] == c, pred[f"prob_{c}"]))
    assert mc["confusion_matrix"]["matrix"] == skm.confusion_matrix(pred["class"], pred["predicted"],
                                                                    labels=list(space.classes)).tolist()
    assert (pred["y_pred"] == (pred["prob_covid"] >= 0.3)).all()  # covid-vs-rest decision at the stored threshold
    assert (tmp_path / "ev" / res["plots"]["test"]["confusion_multiclass"]).is_file()


def test_label_space_from_run_record_yaml_and_errors(run_dir, tmp_path):
    import yaml

    from covidcxr.errors import ConfigError
    from covidcxr.evaluation.evaluate import run_label_space

    assert run_label_space(load_run(run_dir)).name == "binary"  # recorded by training in run.json info
    run = tmp_path / "yamlrun"
    run.mkdir()
    for name in ("run.json", "model.safetensors", "config.yaml"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    space_file = tmp_path / "space.yaml"
    space_file.write_text("name: covid-or-not\nclasses: [non-covid, covid]\npositive: covid\n"
                          "rules:\n  - {label: covid, class: covid}\ndefault: non-covid\n")
    from covidcxr.models.record import update_run_record

    update_run_record(run, label_space={"name": "covid-or-not"})
    with pytest.raises(ConfigError, match="--label-space"):
        run_label_space(load_run(run))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["label_space"] = str(space_file)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_label_space(load_run(run)).name == "covid-or-not"
    with pytest.raises(ConfigError, match="classes"):
        run_label_space(load_run(run), "3class")


def test_roc_plot_draws_the_curve_whose_area_is_the_reported_auc(tmp_path, monkeypatch):
    """The plotted ROC points are the metric's: their trapezoid area equals the AUC, the operating
    point is the sensitivity / specificity at the threshold."""
    from covidcxr.evaluation import plots
    from covidcxr.evaluation.classification import binary_metrics

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(40), np.zeros(60)].astype(int)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    captured = {}
    real_save = plots.save_figure

    def keep(fig, path, **kw):
        captured["lines"] = [(ln.get_label(), np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float))
                             for ln in fig.axes[0].get_lines()]
        return real_save(fig, path, **kw)

    monkeypatch.setattr(plots, "save_figure", keep)
    plots.plot_roc(tmp_path / "roc.png", y, s, threshold=0.5, n_boot=20)
    m = binary_metrics(y, s, 0.5, n_boot=20)
    curve = next(c for c in captured["lines"] if c[0].startswith("ROC"))
    assert np.trapezoid(curve[2], curve[1]) == pytest.approx(m["auc"]["value"], abs=1e-12)
    point = next(c for c in captured["lines"] if c[0].startswith("threshold"))
    assert point[1][0] == pytest.approx(1 - m["specificity"]["value"]) and point[2][0] == pytest.approx(m["sensitivity"]["value"])
