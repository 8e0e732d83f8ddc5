"""``covidcxr audit shortcuts``: the altered images, the verdict rules, and the card on a real trained run."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from covidcxr.audit import perturb
from covidcxr.audit.scorecard import THRESHOLDS, Threshold, build_checks, parse_overrides
from covidcxr.cli import app
from covidcxr.errors import ConfigError


def test_altered_images_change_only_what_they_say():
    rng = np.random.default_rng(0)
    img = rng.integers(20, 200, size=(400, 300), dtype=np.uint8)
    b = perturb.border_only(img)
    assert (b[48:352, 36:264] == 0).all() and (b[:48] == img[:48]).all()
    t = perturb.marker_text(img)
    changed = np.argwhere(t != img)
    assert len(changed) > 50 and changed[:, 0].max() < 0.15 * 400 and changed[:, 1].max() < 0.6 * 300
    lat = perturb.marker_lateral(img)
    assert np.argwhere(lat != img)[:, 1].min() > 0.7 * 300  # top-right corner
    frame = perturb.marker_border(img)
    assert (frame[0] == 255).all() and (frame[200, 10:290] == img[200, 10:290]).all()
    low = perturb.lowres(img)
    assert low.shape == img.shape and np.abs(low.astype(int) - img).mean() > 10  # fine detail is gone
    g = perturb.CHANGES["gamma_0.7"](img)
    assert (g >= img).all() and (g > img).any()  # gamma < 1 brightens mid-tones


def test_verdicts_follow_the_thresholds_and_overrides_replace_them():
    above = Threshold(0.65, 0.75, "above", "{value}")
    assert [above.verdict(v) for v in (0.5, 0.7, 0.8, None)] == ["pass", "warn", "fail", "n/a"]
    below = Threshold(0.7, 0.6, "below", "{value}")
    assert [below.verdict(v) for v in (0.9, 0.65, 0.5)] == ["pass", "warn", "fail"]
    changed = parse_overrides(["lungs_removed_auc=0.55,0.6"])
    assert changed["lungs_removed_auc"].warn == 0.55 and changed["lungs_removed_auc"].worse == "above"
    with pytest.raises(ConfigError, match="no check 'nope'"):
        parse_overrides(["nope=1,2"])
    with pytest.raises(ConfigError, match="two numbers"):
        parse_overrides(["lungs_removed_auc=0.5"])


def _measurements(no_lungs: float, marker: float) -> dict:
    est = lambda v: {"value": v, "ci_low": v - 0.05, "ci_high": v + 0.05}  # noqa: E731
    return {"source_probe": {"value": 0.9, "ci_low": 0.85, "ci_high": 0.95, "chance": 0.2, "imagenet": {"value": 0.88},
                             "excess_over_imagenet": 0.02},
            "lungs": {"no_lungs": est(no_lungs), "lungs_only": est(0.8), "border_only": est(0.55)},
            "heatmaps": {"mass_share_over_uniform": est(0.2), "pointing_game": est(0.9)},
            "markers": {"marker_text": {"mean_abs_delta_p": est(marker), "flipped": est(0.0)},
                        "marker_border": {"mean_abs_delta_p": est(marker / 2), "flipped": est(0.0)}},
            "perturbation": {"original_auc": est(0.9), "lowres": {"delta_auc": -0.01, "mean_abs_delta_p": est(0.01)}},
            "subgroups": {"max_gap": {"value": 0.05, "groups": 3}, "age_only_auc": est(0.6)}}


def test_card_rows_tell_a_lung_reader_from_a_shortcut_reader():
    lung_reader = {c["name"]: c for c in build_checks(_measurements(0.52, 0.01), THRESHOLDS)}
    shortcut = {c["name"]: c for c in build_checks(_measurements(0.85, 0.2), THRESHOLDS)}
    assert set(lung_reader) == set(THRESHOLDS)
    assert lung_reader["lungs_removed_auc"]["verdict"] == "pass" and shortcut["lungs_removed_auc"]["verdict"] == "fail"
    assert lung_reader["marker_delta_p"]["verdict"] == "pass" and shortcut["marker_delta_p"]["verdict"] == "fail"
    assert shortcut["marker_delta_p"]["detail"] == "worst: marker_text"
    assert "0.85" in shortcut["lungs_removed_auc"]["sentence"]
    assert lung_reader["source_probe_excess"]["ci_low"] == pytest.approx(0.85 - 0.88)


@pytest.mark.slow
def test_shortcut_card_on_a_trained_run_goes_into_run_json_and_the_report(trained_run, tmp_path):
    from covidcxr.models.record import read_run_record

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # 12 per (source, class): the source probe needs >= 10 images and 5 patients per source.
    result = CliRunner().invoke(app, ["audit", "shortcuts", str(run), "--limit-per-source", "12",
                                      "--threshold", "age_only_auc=0.9,0.95"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    card = read_run_record(run).audits["shortcuts"]
    checks = {c["name"]: c for c in card["checks"]}
    assert set(checks) == set(THRESHOLDS)
    assert checks["age_only_auc"]["thresholds"]["warn"] == 0.9  # the override reached the card
    for name in ("source_probe_excess", "lungs_removed_auc", "lungs_only_auc", "border_only_auc", "marker_delta_p",
                 "perturbation_delta_p"):
        c = checks[name]
        assert c["value"] is not None and c["verdict"] in ("pass", "warn", "fail"), name
        assert c["verdict"] == THRESHOLDS[name].verdict(c["value"]) if name != "age_only_auc" else True
    assert checks["lungs_removed_auc"]["ci_low"] <= checks["lungs_removed_auc"]["value"] <= checks["lungs_removed_auc"]["ci_high"]
    assert CliRunner().invoke(app, ["report", str(run)]).exit_code == 0
    html = (run / "report.html").read_text()
    assert html.index("Shortcut scorecard") < html.index("Data summary and audit")
    assert "lungs_removed_auc" in html and f"data-verdict='{card['verdict']}'" in html
