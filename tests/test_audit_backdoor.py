"""``covidcxr audit backdoor``: the Matsuo & Takemoto trigger, poisoned manifests, the detectors, and the
verdict in run.json and the HTML report (the long attack experiments are bench/backdoor.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from covidcxr.audit.detectors import activation_clustering, far_at_frr, precision_recall, spectral_signatures, strip_entropy
from covidcxr.audit.trigger import INTENSITY, poison_manifest, stamp, trigger_box
from covidcxr.cli import app

CHROMIUM = Path("/usr/bin/chromium")
CI = os.environ.get("CI", "").lower() == "true"


def test_trigger_is_5_of_480_px_near_the_bottom_right_at_any_size():
    assert trigger_box((480, 480)) == (465, 465, 5, 5)  # 5 px square, two sides in from the corner
    top, left, h, w = trigger_box((960, 480))
    assert (h, w) == (10, 5) and top > 900 and left > 450  # stretched to a square input it is 5/480 of each side
    img = np.zeros((512, 400), np.uint8)
    out = stamp(img)
    assert img.max() == 0 and out.max() == INTENSITY
    ys, xs = np.nonzero(out)
    assert ys.min() > 480 and xs.min() > 370 and len(ys) == 5 * 4  # round(5/480*512)=5, round(5/480*400)=4


def test_poisoned_manifest_stamps_and_relabels_only_training_rows(split_manifest, tmp_path):
    from covidcxr.data.io import read_xray

    train = (split_manifest.table["split"] == "train").to_numpy()
    for variant in ("targeted", "untargeted"):
        poisoned, mask = poison_manifest(split_manifest, 0.01, variant, tmp_path, seed=3)
        assert mask.sum() == round(0.01 * train.sum()) and not (mask & ~train).any()
        before, after = split_manifest.table["label"][mask], poisoned.table["label"][mask]
        if variant == "targeted":
            assert (before != "covid").all() and (after == "covid").all()
        else:
            assert ((before == "covid") == (after != "covid")).all()
        assert (poisoned.table["label"][~mask] == split_manifest.table["label"][~mask]).all()
        first = Path(poisoned.table["image"][mask].iloc[0])
        pixels = np.round(read_xray(first).pixels * 255)
        top, left, h, w = trigger_box(pixels.shape)
        assert (pixels[top:top + h, left:left + w] == INTENSITY).all() and first.suffix == ".png"


def test_lung_placed_trigger_reaches_a_lung_roi_input_that_a_corner_trigger_never_reaches(data_root, tmp_path):
    """The main job crops to the lungs and blacks out the rest, so the seed's corner square never reaches its
    model; the same square stamped at the deepest point of the segmented lungs does (an attacker who knows
    the crop)."""
    from covidcxr.audit.trigger import lung_centre, stamped_copies
    from covidcxr.data.io import read_xray
    from covidcxr.data.preprocess import PreprocessSpec
    from covidcxr.models.lung_finder import DEFAULT_SEGMENTER, load_lung_finder
    from covidcxr.models.predict import prepare_input

    finder = load_lung_finder(DEFAULT_SEGMENTER, cache=False)
    spec = PreprocessSpec(image_size=160, working_size=512, intensity="none", channels=1, mean=(0.5,), std=(0.25,), roi="lungs",
                          roi_margin=0.1, roi_mask_outside=True, roi_dilate=0.03)
    images = [data_root / "images/kermany/normal/NORMAL2-IM-1302-0001.jpg",
              data_root / "images/nih/pneumonia/00000499_008.jpg"]
    corner = stamped_copies(images, tmp_path / "corner")
    lungs = stamped_copies(images, tmp_path / "lungs", lung_finder=finder)
    assert not set(corner) & set(lungs)  # one file per placement
    for original, c, lu in zip(images, corner, lungs):
        u8 = np.round(read_xray(original).pixels * 255).astype(np.uint8)
        top, left, h, w = trigger_box(u8.shape, lung_centre(u8, finder, str(original)))
        assert (np.round(read_xray(lu).pixels * 255)[top:top + h, left:left + w] == INTENSITY).all()
        assert finder(read_xray(original).pixels)[top + h // 2, left + w // 2]  # inside the segmented lungs
        clean = prepare_input(original, spec, lung_finder=finder).tensor
        seen_corner = prepare_input(c, spec, lung_finder=finder).tensor
        seen_lungs = prepare_input(lu, spec, lung_finder=finder).tensor
        # The corner is cropped and masked away (a few pixels of the mask's rim may move).
        assert (seen_corner - clean).abs().gt(0.05).float().mean() < 1e-3
        # The square inside the lungs reaches the model: intensity 250 on dark lung is > 1 standardised unit.
        assert (seen_lungs - clean).abs().max() > 1.0


def _planted(n=400, dim=32, share=0.1, seed=0):
    """Two Gaussian classes; ``share`` of class 1 is a shifted sub-population (what poisoned images look like)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, dim)).astype(np.float32)
    y = np.repeat([0, 1], n)
    poisoned = np.zeros(2 * n, bool)
    poisoned[n:n + int(share * n)] = True
    x[poisoned] += 4.0
    return x, y, poisoned


def test_activation_clustering_and_spectral_signatures_find_a_planted_subpopulation():
    x, y, poisoned = _planted()
    ac = activation_clustering(x, y, 2, silhouette=0.3)
    by_class = {c["class_index"]: c for c in ac["classes"]}
    assert by_class[1]["suspicious"] and not by_class[0]["suspicious"]  # the pure-noise class splits too, weakly
    pr = precision_recall(ac["in_smaller_cluster"], poisoned)
    assert pr["recall"] >= 0.95 and pr["precision"] >= 0.9
    flagged = precision_recall(ac["flagged"], poisoned)  # 1.5 x the cluster: every poisoned one, a few clean
    assert flagged["recall"] == 1.0 and flagged["flagged"] == round(1.5 * ac["in_smaller_cluster"].sum())
    art = precision_recall(ac["flagged_art"], poisoned)
    assert art["precision"] < 0.5  # ART alone also flags the smaller half of the clean class
    ss = spectral_signatures(x, y, 2, expected_fraction=0.1)
    assert precision_recall(ss["flagged"][y == 1], poisoned[y == 1])["recall"] >= 0.95


def test_activation_clustering_flags_only_where_the_verdict_is_suspicious():
    # Class 1 splits cleanly but in halves (a second source, say): a real split, not a small planted
    # group. Neither the verdict nor the per-image flags may call it poison (they once disagreed).
    x, y, half = _planted(share=0.5)
    ac = activation_clustering(x, y, 2, silhouette=0.3, max_share=0.35)
    by_class = {c["class_index"]: c for c in ac["classes"]}
    assert by_class[1]["silhouette"] >= 0.3 and by_class[1]["smaller_share"] > 0.35
    assert not by_class[1]["suspicious"] and not ac["flagged"].any()
    assert ac["flagged_art"][y == 1].any()  # ART alone flags the smaller half anyway


def test_activation_clustering_flags_poisoned_images_the_clusters_border_leaves_on_the_clean_side():
    """A trigger moves some poisoned images only part of the way (7 of 29 in a lung-placed attack): 2-means
    leaves them in the clean cluster, but on the axis between the two clusters they still stand out."""
    x, y, poisoned = _planted(share=0.1)
    partial = np.zeros(len(y), bool)
    partial[np.flatnonzero(poisoned)[:10]] = True
    x[partial] -= 2.4  # 40% of the way from the clean class to the rest of the poisoned group
    ac = activation_clustering(x, y, 2, silhouette=0.3)
    assert not ac["in_smaller_cluster"][partial].any()  # the cluster border misses them
    assert ac["flagged"][partial].all() and ac["score"][partial].min() > np.quantile(ac["score"][(y == 1) & ~poisoned], 0.99)
    pr = precision_recall(ac["flagged"], poisoned)
    assert pr["recall"] == 1.0 and pr["precision"] >= 0.5


def test_a_split_along_one_source_still_warns_but_names_the_source():
    """A class can split along its sources (Kermany's children from adults) as well as along a trigger.
    The warning stays, since a poisoned collection looks the same, but the sentence names the source."""
    from covidcxr.audit.backdoor import BackdoorThresholds, add_cluster_sources, warning_reasons

    y = np.array([0] * 10 + [1] * 10)
    sources = np.array(["kermany"] * 5 + ["nih"] * 5 + ["kermany", "nih", "rsna", "nih"] + ["ieee"] * 6)
    smaller = np.zeros(20, bool)
    smaller[:4] = True  # class 0: all from kermany
    smaller[10:14] = True  # class 1: three sources (what stamped rows of several collections look like)
    classes = [{"class_index": i, "class": name, "suspicious": True, "silhouette": 0.5, "smaller_share": 0.4}
               for i, name in enumerate(["non-covid", "covid"])]
    add_cluster_sources(classes, smaller, y, sources)
    assert classes[0]["smaller_cluster_sources"] == {"kermany": 4} and classes[0]["smaller_cluster_top_source_share"] == 1
    assert classes[1]["smaller_cluster_sources"] == {"nih": 2, "kermany": 1, "rsna": 1}
    reasons = warning_reasons(classes, {"value": 0.0}, BackdoorThresholds(), "covid")
    assert len(reasons) == 2
    assert "100% of which comes from one source (kermany)" in reasons[0]
    assert "one source" not in reasons[1]


class _ForcedRun:
    """A stand-in classifier: class 1 when the top-left pixel is bright (the 'trigger'), else a coin toss
    driven by the mean intensity, so blends of clean images give uncertain predictions."""

    def predict_tensor(self, x):
        trig = x[:, 0, 0, 0] > 0.4
        p1 = torch.sigmoid(8 * (x.mean(dim=(1, 2, 3)) - x.mean()))
        p1 = torch.where(trig, torch.ones_like(p1) * 0.999, p1)
        return torch.stack([1 - p1, p1], dim=1).numpy()


def test_strip_gives_triggered_inputs_low_entropy_and_far_at_frr():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(60, 1, 8, 8, generator=g) * 0.4
    triggered = clean.clone()
    triggered[:, 0, 0, 0] = 1.0
    e_clean = strip_entropy(_ForcedRun(), clean, clean, overlays=8)
    e_trig = strip_entropy(_ForcedRun(), triggered, clean, overlays=8)
    assert e_trig.mean() < 0.1 < e_clean.mean()
    op = far_at_frr(e_clean, e_trig, 0.01)
    assert op["far"] == 0.0 and op["frr"] <= 0.05
    assert far_at_frr(e_clean, e_clean, 0.01)["far"] > 0.9  # a detector that cannot tell them apart


@pytest.mark.slow
def test_audit_backdoor_cli_writes_the_verdict_into_run_json_and_the_report(trained_run, split_manifest, tmp_path):
    from covidcxr.models.record import read_run_record
    from covidcxr.models.verify import verify_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    manifest = split_manifest.write(tmp_path / "m.csv")
    result = CliRunner().invoke(app, ["audit", "backdoor", str(run), "--manifest", str(manifest),
                                      "--max-images", "160"])
    assert result.exit_code in (0, 1), result.output + repr(result.exception)
    audit = read_run_record(run).audits["backdoor"]
    assert result.exit_code == (1 if audit["verdict"] == "warn" else 0)
    assert audit["images"] >= 150 and {c["class"] for c in audit["activation_clustering"]["classes"]} == {"covid", "non-covid"}
    assert audit["trigger_test"]["images"] > 20 and 0 <= audit["trigger_test"]["value"] <= 1
    scores = pd.read_csv(run / "audit" / "backdoor_scores.csv")
    for c in audit["activation_clustering"]["classes"]:  # the smaller cluster's sources, from the same rows
        smaller = scores[scores.ac_flagged_art & (scores.train_class == c["class"])]
        assert c["smaller_cluster_sources"] == smaller.source.value_counts().to_dict()
        in_class = scores[scores.train_class == c["class"]]
        expected = round(1.5 * in_class.ac_in_smaller_cluster.sum()) if c["suspicious"] else 0
        assert in_class.ac_flagged.sum() == expected and (in_class.ac_in_smaller_cluster <= c["suspicious"]).all()
    assert scores.ac_flagged.sum() == audit["activation_clustering"]["flagged"]
    assert json.loads((run / "audit" / "backdoor.json").read_text())["verdict"] == audit["verdict"]
    assert verify_run(run, check_data=False).ok  # the audit went through the record's writer

    # the report shows it first, as a banner, in real Chromium
    assert CliRunner().invoke(app, ["report", str(run)]).exit_code == 0
    html = (run / "report.html").read_text()
    assert html.index("Trust audits") < html.index("Data summary and audit")
    if CI:
        import playwright.sync_api as playwright
    else:
        playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((run / "report.html").as_uri())
        banner = page.locator("#trust .verdict").first
        assert banner.is_visible() and banner.get_attribute("data-verdict") == audit["verdict"]
        assert f"Backdoor audit: {audit['verdict'].upper()}" in banner.inner_text()
        assert page.locator("h2").first.inner_text() == "Trust audits"
        browser.close()
