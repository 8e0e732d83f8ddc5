"""Lung segmentation on the real shared masks: a tiny U-Net beats the template baseline on held-out patients,
`segment predict` writes masks in each image's own geometry, edited runs are refused, nothing vanishes."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.data.io import read_xray
from covidcxr.errors import CovidCXRError, WeightsError

pytestmark = pytest.mark.slow

#: 64 px, ~60 masks (patient-grouped), 10 epochs: ~20 s on one CPU core.
TINY = ["image_size=64", "max_masks=60", "epochs=10", "lr=0.003", "augment=false", "n_boot=200",
        "progress=false", "threads=1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root, weights_dir):
    run_dir = tmp_path_factory.mktemp("seg") / "run"
    threads = torch.get_num_threads()
    result = CliRunner().invoke(app, ["segment", "train", "--out", str(run_dir), *TINY], catch_exceptions=False)
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "held-out patients" in result.output
    return run_dir


def test_encoder_loads_the_shared_imagenet_weights_strictly(weights_dir):
    from covidcxr.models.segmenter import ENCODER_FILE, build_segmenter

    model = build_segmenter(weights_dir / ENCODER_FILE)
    source = torch.load(weights_dir / ENCODER_FILE, map_location="cpu", weights_only=True)
    encoder = model.encoder.state_dict()
    assert set(encoder) == {f"features.{k}" for k in source}
    assert torch.equal(encoder["features.18.0.weight"], source["18.0.weight"])
    assert torch.allclose(encoder["features.0.0.weight"], source["0.0.weight"].sum(1, keepdim=True))


def test_encoder_file_with_another_sha256_is_refused(tmp_path, weights_dir):
    from covidcxr.models.segmenter import ENCODER_FILE, build_segmenter

    bad = tmp_path / ENCODER_FILE
    data = bytearray((weights_dir / ENCODER_FILE).read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256"):
        build_segmenter(bad)


def test_tiny_segmenter_beats_the_template_baseline_on_held_out_patients(tiny_run):
    record = json.loads((tiny_run / "run.json").read_text())
    assert record["kind"] == "lung_segmenter" and record["integrity"]["record_sha256"]
    split = pd.read_csv(tiny_run / "split.csv")
    by_split = split.groupby("split")["patient_id"].apply(set)
    assert not by_split["train"] & by_split["test"] and not by_split["val"] & by_split["test"]
    assert set(split["kind"]) <= {"v7labs", "lungvae"}  # never the ieee8023 boxes
    scores = pd.read_csv(tiny_run / "test_scores.csv")
    assert set(scores["image"]) == set(split.loc[split["split"] == "test", "image"])
    test, base = record["metrics"]["test"], record["metrics"]["baseline_template"]
    assert test["n_images"] >= 6
    # Clearly better than a constant mask: the lower CI bound of the model above the baseline's mean.
    assert test["dice"]["mean"] >= base["dice"]["mean"] + 0.05, (test["dice"], base["dice"])
    assert test["dice"]["ci_low"] > base["dice"]["mean"]
    assert test["dice"]["ci_low"] <= test["dice"]["mean"] <= test["dice"]["ci_high"]
    assert np.isfinite(test["hd95_px"]["mean"]) and test["hd95_px"]["mean"] > 0
    assert record["data"]["masks_sha256"] and record["config"]["image_size"] == 64
    assert record["encoder_init"]["sha256"] == "2f3656925dbcba43a561f7fa0d7f00d433df053f0597ae570d72e2ef6614de20"


def test_predict_writes_masks_in_original_geometry(tiny_run, data_root, tmp_path):
    split = pd.read_csv(tiny_run / "split.csv")
    held_out = [data_root / p for p in split.loc[split["split"] == "test", "image"][:3]]
    large = data_root / "originals" / "covid-19-pneumonia-34.png"  # 2169 x 1852 RGBA original
    dicom = data_root / "dicom" / "RG1_UNCR.dcm"
    inputs = [*held_out, large, dicom]
    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["segment", "predict", str(tiny_run), *map(str, inputs), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lungs, skipped = pd.read_csv(out / "lungs.csv"), pd.read_csv(out / "skipped.csv")
    assert sorted(lungs["image"].tolist() + skipped["image"].tolist()) == sorted(map(str, inputs))  # none dropped
    assert {str(p) for p in [*held_out, large]} <= set(lungs["image"])
    for row in lungs.itertuples():
        mask = cv2.imread(str(out / row.mask), cv2.IMREAD_UNCHANGED)
        shape = read_xray(row.image).pixels.shape
        assert mask.shape == shape == (row.height, row.width)
        assert set(np.unique(mask)) <= {0, 255}
        assert 0.05 <= row.lung_fraction <= 0.7
        assert abs((mask > 0).mean() - row.lung_fraction) < 1e-6
        assert 0 <= row.box_x0 < row.box_x1 <= row.width and 0 <= row.box_y0 < row.box_y1 <= row.height
    big = lungs[lungs["image"] == str(large)].iloc[0]
    assert (big.width, big.height) == (2169, 1852)


def test_blank_image_gets_a_per_image_reason(tiny_run, data_root, tmp_path):
    from covidcxr.serving.segment import segment_images

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((400, 400), 128, np.uint8))
    real = data_root / pd.read_csv(tiny_run / "split.csv").query("split == 'test'")["image"].iloc[0]
    result = segment_images(tiny_run, [blank, real], tmp_path / "a")
    skipped = pd.read_csv(tmp_path / "a" / "skipped.csv")
    assert skipped["image"].tolist() == [str(blank)] and "constant" in skipped["reason"].iloc[0]
    assert [r["image"] for r in result.rows] == [str(real)]
    # With the plausibility gate off, the model itself finds no lungs in a blank image, and says so.
    segment_images(tiny_run, [blank], tmp_path / "b", checks=None)
    reason = pd.read_csv(tmp_path / "b" / "skipped.csv")["reason"].iloc[0]
    assert reason.startswith("no lungs found")
    assert not list((tmp_path / "b" / "masks").iterdir())


def test_edited_record_or_weights_are_refused(tiny_run, tmp_path):
    from covidcxr.models.record import read_run_record
    from covidcxr.models.segmenter import load_segmenter

    load_segmenter(tiny_run)  # the untouched run loads
    edited = tmp_path / "edited"
    shutil.copytree(tiny_run, edited)
    record = json.loads((edited / "run.json").read_text())
    record["threshold"] = 0.1
    (edited / "run.json").write_text(json.dumps(record))
    with pytest.raises(WeightsError, match="threshold"):
        load_segmenter(edited)
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_run, swapped)
    data = bytearray((swapped / "model.safetensors").read_bytes())
    data[-5] ^= 0x01
    (swapped / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256"):
        load_segmenter(swapped)
    with pytest.raises(CovidCXRError, match="segmenter"):
        read_run_record(tiny_run)  # classifier commands refuse a segmenter run with a clear reason


def test_bad_config_key_is_an_error():
    from covidcxr.errors import ConfigError
    from covidcxr.training.segment import load_segment_config

    with pytest.raises(ConfigError, match="unknown key"):
        load_segment_config(None, ["epoch=3"])
    with pytest.raises(ConfigError):
        load_segment_config(None, ["kinds=[bbox]"])
