"""Explaining a model trained on the shared data (``trained_run``): lung focus, sanity check,
severity correlation, progression and feature maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from covidcxr.data.io import read_xray
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.data.annotations import Annotations
from covidcxr.explain.features import feature_maps
from covidcxr.explain.images import explain_images
from covidcxr.explain.progression import plot_progression, serial_patients
from covidcxr.explain.sanity import cascade_steps, rank_correlations, sanity_check
from covidcxr.explain.severity import severity_study
from covidcxr.explain.cam import cam_models
from covidcxr.models.run import load_run


@pytest.fixture(scope="module")
def run(trained_run):
    return load_run(trained_run)


@pytest.fixture(scope="module")
def scored_images(data_root):
    scores = Annotations(data_root / "annotations").severity_scores()
    return [data_root / p for p in scores["image"]]


def test_heatmaps_with_lung_focus_against_real_masks(trained_run, run, data_root, scored_images, tmp_path):
    images = scored_images[:6]
    summary = explain_images(trained_run, images, out=tmp_path, run=run)
    assert summary["target_class"] == run.positive_class and not summary["skipped"]
    probs = run.predict_arrays([read_xray(p).pixels for p in images])
    ann = Annotations(data_root / "annotations")
    for entry, p, path in zip(summary["images"], probs, images):
        np.testing.assert_allclose([entry["probabilities"][c] for c in run.classes], p, atol=1e-5)
        lf = entry["lung_focus"]
        region = ann.lung_region(path, read_xray(path).pixels.shape)
        assert lf["region"] == region.kind and lf["baseline"] == pytest.approx(region.area_share)
        heat = json.loads((tmp_path / entry["json"]).read_text())["lung_focus"]
        assert heat == lf
        if lf["empty"]:  # no positive evidence for the target class: no share, no peak
            assert lf["mass_share"] is None and lf["pointing_hit"] is None
        else:
            assert 0.0 <= lf["mass_share"] <= 1.0 and isinstance(lf["pointing_hit"], bool)
    s = summary["lung_focus_summary"]
    full = [e["lung_focus"] for e in summary["images"] if not e["lung_focus"]["empty"]]
    assert s["n"] == len(full) and s["n_empty"] == 6 - len(full)
    if full:
        assert s["mean_baseline"] == pytest.approx(np.mean([f["baseline"] for f in full]))
        assert s["pointing_game"] == pytest.approx(np.mean([f["pointing_hit"] for f in full]))


def test_sanity_check_randomised_weights_change_gradcam(trained_run, run, scored_images, tmp_path):
    images = scored_images[10:14]
    full = sanity_check(trained_run, images, methods=["gradcam"], mode="full", out=tmp_path, run=run)
    entry = full["methods"]["gradcam"]
    assert len(entry["rho_per_image"]) == 4
    # An unchanged model would give rho = 1 everywhere; randomising the weights must change the maps.
    assert entry["mean_abs_rho"] < 0.9 and entry["flagged"] == (entry["mean_abs_rho"] > 0.5)
    assert json.loads((tmp_path / "sanity.json").read_text())["methods"]["gradcam"]["mean_abs_rho"] == entry["mean_abs_rho"]
    assert (tmp_path / "sanity.png").is_file()
    casc = sanity_check(trained_run, images[:2], methods=["gradcam"], mode="cascading", run=run)["methods"]["gradcam"]
    assert [c["randomized_through"] for c in casc["cascade"]] == cascade_steps(cam_models(run)[0])
    rho_self, constant = rank_correlations(np.random.default_rng(0).random((2, 8, 8)), np.random.default_rng(0).random((2, 8, 8)))
    assert np.allclose(rho_self, 1.0) and constant == 0
    with pytest.raises(ConfigError, match="sanity mode"):
        sanity_check(trained_run, images, mode="partial", run=run)


def test_severity_correlation_writes_json_and_plot(trained_run, run, data_root, tmp_path):
    result = severity_study(trained_run, data_root=data_root, limit=16, n_boot=200, out=tmp_path, run=run)
    assert result["n_images"] == 16 and not result["skipped"]
    assert result["n_patients"] <= 16
    for by_score in result["correlations"].values():
        for c in by_score.values():
            assert -1 <= c["rho"] <= 1 and c["ci_low"] <= c["rho"] <= c["ci_high"] and c["n"] == 16
    rows = result["images"]
    probs = run.predict_arrays([read_xray(data_root / r["image"]).pixels for r in rows])[:, run.positive_index]
    np.testing.assert_allclose([r["probability"] for r in rows], probs, atol=1e-5)
    assert all(0 <= r["cam_lung_area"] <= 1 for r in rows)
    assert json.loads((tmp_path / "severity.json").read_text())["n_images"] == 16
    assert (tmp_path / "severity.png").stat().st_size > 10_000


def test_progression_follows_a_patient_in_day_order(trained_run, run, data_root, tmp_path):
    from covidcxr.data.manifest import Manifest

    manifest = Manifest.read(data_root / "manifest.csv")
    assert "ieee8023:205" in serial_patients(manifest, min_studies=5).index
    result = plot_progression(trained_run, manifest, "ieee8023:205", out=tmp_path, run=run)
    days = [s["offset_days"] for s in result["studies"]]
    assert len(days) == 7 and days == sorted(days)
    probs = run.predict_arrays([read_xray(s["image"]).pixels for s in result["studies"]])
    np.testing.assert_allclose([s["probabilities"][c] for s in result["studies"] for c in run.classes], probs.ravel(), atol=1e-5)
    assert (tmp_path / result["figure"]).stat().st_size > 10_000
    with pytest.raises(CovidCXRError, match="no images of patient"):
        plot_progression(trained_run, manifest, "ieee8023:does-not-exist", out=tmp_path, run=run)


def test_feature_maps_cli(trained_run, run, scored_images, tmp_path):
    from typer.testing import CliRunner

    from covidcxr.cli import app

    stage = cam_models(run)[0].layer
    res = CliRunner().invoke(app, ["explain", str(trained_run), str(scored_images[0]), "--feature-maps", stage,
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / f"{scored_images[0].stem}_features.json").read_text())
    assert len(info["layers"][stage]["channels"]) == 8
    with pytest.raises(ConfigError, match="not a module"):
        feature_maps(trained_run, scored_images[0], ["no.such.layer"], out=tmp_path, run=run)


def test_explain_cli_refuses_a_ct_dicom_unless_allowed(trained_run, data_root, tmp_path):
    """`covidcxr explain --allow-non-frontal` reaches the reader; without it the file is skipped with the reason."""
    from typer.testing import CliRunner

    from covidcxr.cli import app
    from serving_helpers import ct_dicom

    ct = tmp_path / "ct.dcm"
    ct.write_bytes(ct_dicom(data_root))
    refused = CliRunner().invoke(app, ["explain", str(trained_run), str(ct), "--out", str(tmp_path / "a")])
    assert refused.exit_code == 0, refused.output
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert not summary["images"] and "Modality is CT" in summary["skipped"][0]["reason"]
    allowed = CliRunner().invoke(app, ["explain", str(trained_run), str(ct), "--out", str(tmp_path / "b"),
                                       "--allow-non-frontal"])
    assert allowed.exit_code == 0, allowed.output
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert len(summary["images"]) == 1 and not summary["skipped"]
    assert (tmp_path / "b" / summary["images"][0]["overlay"]).stat().st_size > 10_000
