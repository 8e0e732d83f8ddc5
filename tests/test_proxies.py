"""Shortcut proxies (covidcxr.evaluation.proxies): synthetic checks of each statistic, and one real run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from covidcxr.evaluation import proxies, proxy_images, within_source


def test_a_pure_source_detector_scores_high_plain_auc_and_chance_within_sources():
    rng = np.random.default_rng(0)
    # source A: 30 positives, 20 negatives; source B: 60 negatives only (like NIH); C: 2 pos, 1 neg (like Figure1)
    sources = np.array(["A"] * 50 + ["B"] * 60 + ["C"] * 3)
    y = np.array([1] * 30 + [0] * 20 + [0] * 60 + [1, 1, 0])
    score = np.where(sources == "B", 0.0, 1.0) + 0.01 * rng.random(len(y))  # knows the source, not the disease
    d = proxies.discrimination(y, score, sources)
    assert d["auc"]["value"] > 0.8 and d["cross_source_auc"]["value"] == 1.0
    w = d["within_source_auc"]
    assert abs(w["value"] - 0.5) < 0.2 and w["ci_low"] < 0.5 < w["ci_high"]
    assert w["sources_used"] == ["A"] and w["sources_left_out"] == ["C"]  # C has a single negative: no DeLong CI
    assert d["within_source_auc_all"]["ci_low"] is None  # ... which is why C is left out of the headline
    disease = y + 0.5 * rng.random(len(y))
    assert proxies.discrimination(y, disease, sources)["within_source_auc"]["value"] == 1.0


def test_within_source_auc_by_negative_label_exposes_a_model_that_calls_the_collections_normals_covid():
    """The pooled within-source AUC can look fine while every normal of the COVID collection scores as COVID."""
    rng = np.random.default_rng(1)
    sources = np.array(["A"] * 60 + ["B"] * 40)
    labels = np.array(["covid"] * 30 + ["pneumonia"] * 24 + ["normal"] * 6 + ["normal"] * 20 + ["pneumonia"] * 20)
    y = (labels == "covid").astype(int)
    # COVID above pneumonia, but A's normals carry A's look and score above every COVID image
    score = np.select([labels == "covid", labels == "pneumonia"], [0.6, 0.2], 0.9) + 0.05 * rng.random(len(y))
    pooled = within_source.within_source_auc_defined(y, score, sources)["value"]
    by = within_source.within_source_auc_by_negative_label(y, score, sources, labels)
    assert sorted(by) == ["normal", "pneumonia"] and by["normal"]["sources_used"] == ["A"]  # B holds no COVID
    assert by["normal"]["negatives_in_pairs"] == 6 and by["pneumonia"]["negatives_in_pairs"] == 24
    assert by["pneumonia"]["value"] == 1.0 and by["normal"]["value"] == 0.0 and pooled == pytest.approx(0.8)


def test_source_probe_separates_encoded_sources_and_not_random_ones():
    rng = np.random.default_rng(1)
    n = 240
    sources = np.repeat(["a", "b", "c"], n // 3)
    patients = [f"p{i // 2}" for i in range(n)]  # two images per patient
    onehot = (sources[:, None] == np.array(["a", "b", "c"])[None]).astype(float)
    encoded = np.hstack([onehot * 3, rng.normal(size=(n, 5))]) + 0.3 * rng.normal(size=(n, 8))
    got = proxies.source_probe(encoded, sources, patients, n_boot=200)
    assert got["value"] > 0.95 and got["chance"] == pytest.approx(1 / 3) and got["sources"] == ["a", "b", "c"]
    noise = proxies.source_probe(rng.normal(size=(n, 8)), sources, patients, n_boot=200)
    assert noise["ci_low"] < 1 / 3 + 0.05 and noise["value"] < 0.5


def test_lung_template_covers_the_lungs_and_masked_copies_black_them_out(data_root, tmp_path):
    from covidcxr.data.io import read_xray

    template = proxies.lung_template(str(data_root / "annotations"))
    assert template.shape == (proxies.TEMPLATE_SIZE,) * 2 and 0.2 < template.mean() < 0.7
    rows, cols = np.nonzero(template)
    h = proxies.TEMPLATE_SIZE
    assert rows.min() > 0.03 * h and 0.3 * h < rows.mean() < 0.7 * h  # the chest, not the label text corner
    assert not template[:, h // 2].all()  # two lungs: the mediastinum is not all lung
    image = sorted((data_root / "images").rglob("*.jpg"))[0]
    copies = proxies.masked_copies([str(image)], tmp_path, template)
    original = read_xray(image).pixels
    no_lungs, lungs_only = read_xray(copies["no_lungs"][0]).pixels, read_xray(copies["lungs_only"][0]).pixels
    inside = proxy_images._template_at(template, original.shape)
    assert (no_lungs[inside] == 0).all() and (lungs_only[~inside] == 0).all()
    assert np.allclose(no_lungs[~inside], original[~inside], atol=1 / 255)


def test_segmented_lungs_black_out_each_images_own_lungs_better_than_the_template(data_root, tmp_path):
    """The scorecard's lungs come from the shipped segmenter: on annotated images (ieee8023, the one
    annotated source) far less of the expert-drawn lung area survives in the ``no_lungs`` copy than with
    the one-size template."""
    from covidcxr.data.annotations import Annotations
    from covidcxr.data.io import read_xray
    from covidcxr.models.lung_finder import DEFAULT_SEGMENTER, load_lung_finder

    ann = Annotations(data_root / "annotations")
    keys = [k for k in ann.index.index if "v7labs" in " ".join(ann.available(data_root / k))]
    picked = [keys[i] for i in np.linspace(0, len(keys) - 1, 6).astype(int)]  # an even spread over the folders
    paths = [str(data_root / k) for k in picked]
    finder = load_lung_finder(DEFAULT_SEGMENTER)
    template = proxies.lung_template(str(data_root / "annotations"))
    seg = proxies.masked_copies(paths, tmp_path / "seg", template, lung_of=proxies.segmented_lungs(finder),
                                lung_key=finder.sha256)
    tpl = proxies.masked_copies(paths, tmp_path / "tpl", template)
    left_seg, left_tpl = [], []
    for p, s, t in zip(paths, seg["no_lungs"], tpl["no_lungs"]):
        original = read_xray(p).pixels
        lung = ann.lung_region(p, original.shape).lung
        visible = lambda copy: float((read_xray(copy).pixels[lung] > 0).mean())  # noqa: E731
        left_seg.append(visible(s))
        left_tpl.append(visible(t))
        only = read_xray(seg["lungs_only"][paths.index(p)]).pixels
        assert (only[lung] > 0).mean() > 0.9  # ... and the lungs-only copy keeps them
    assert np.mean(left_seg) < 0.05 and np.mean(left_seg) < 0.5 * np.mean(left_tpl), (left_seg, left_tpl)


def test_resaved_copies_are_lossless_png_and_jpeg_of_the_stored_pixels(data_root, tmp_path):
    from covidcxr.data.io import read_xray

    image = sorted((data_root / "images").rglob("*.jpg"))[0]
    copies = proxies.resaved_copies([str(image)], tmp_path, (90, 50))
    assert set(copies) == {"png", "q90", "q50"}
    original = read_xray(image).pixels
    assert np.array_equal(read_xray(copies["png"][0]).pixels, original)
    e90 = np.abs(read_xray(copies["q90"][0]).pixels - original).mean()
    e50 = np.abs(read_xray(copies["q50"][0]).pixels - original).mean()
    assert 0 < e90 < e50


@pytest.mark.slow
def test_run_proxies_on_a_trained_run(trained_run, tmp_path, data_root):
    result = proxies.run_proxies(trained_run, tmp_path / "out", work_dir=tmp_path / "work", limit_per_source=4,
                                 n_boot=100)
    scores = result.pop("_scores")
    written = json.loads((tmp_path / "out" / "proxies.json").read_text())
    assert set(written) >= {"discrimination", "compression", "lungs", "source_probe"}
    table = pd.read_csv(tmp_path / "out" / "proxy_scores.csv")
    assert len(table) == len(scores) and set(table["source"]) == set(scores["source"])
    # a lossless copy of the stored pixels predicts exactly like the stored file
    both = table.dropna(subset=["p_png"])
    assert len(both) and np.allclose(both["p_png"], both["score"], atol=1e-5)
    q = written["compression"]["qualities"]
    assert set(q) == {"q90", "q70", "q50"} and q["q50"]["mean_abs_change"]["ci_low"] is not None
    assert written["lungs"]["template"]["area_share"] > 0.2 and written["lungs"]["lung_regions"]["source"] == "template"
    assert written["lungs"]["no_lungs"]["auc"]["value"] is not None
    probe = written["source_probe"]
    assert probe["value"] is None or 0 <= probe["value"] <= 1


def test_a_runs_own_split_rows_keep_age_and_sex_for_the_subgroup_checks(trained_run):
    """`audit shortcuts RUN` without --manifest reads the run's own split.csv: its rows must carry age and
    sex, else the scorecard's subgroup checks are never measured (they were not, in the main job)."""
    from covidcxr.audit.shortcut_checks import subgroup_checks
    from covidcxr.models.run import load_run

    rows = proxies.split_rows(load_run(trained_run), "test")
    assert {"age", "sex"} <= set(rows.columns) and rows["sex"].astype(str).str.upper().str[:1].isin(["F", "M"]).any()
    scores = np.random.default_rng(0).random(len(rows))
    out = subgroup_checks(rows, scores)
    assert out["max_gap"]["groups"] >= 2 and out["max_gap"]["value"] is not None
