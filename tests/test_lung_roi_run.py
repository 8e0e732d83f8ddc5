"""The shipped lung segmenter and a classifier trained on lung-ROI inputs, end to end on real shared images:
the segmenter finds lungs on sources it never trained on, the run carries and pins its segmenter, `predict`
gives exactly the training pipeline's input, and a changed segmenter is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from covidcxr.data.dataset import CXRDataset
from covidcxr.data.io import read_xray
from covidcxr.errors import WeightsError
from covidcxr.models.lung_finder import DEFAULT_SEGMENTER, load_lung_finder, segmenter_dir
from covidcxr.models.predict import try_prepare
from covidcxr.models.segmenter import read_segmenter_record

pytestmark = pytest.mark.slow

ROI_RUN = ["model.name=tf_efficientnet_lite0", "model.weights=${COVIDCXR_WEIGHTS_DIR}/efficientnet_lite0_imagenet_timm.pth",
           "model.weights_sha256=711997994847d2d492117ee702a3aa7f2e37bc1898d00ffe67e7288f16274ac1",
           "preprocess.image_size=64", "preprocess.intensity=none", "preprocess.roi=lungs",
           "preprocess.roi_mask_outside=true", "train.epochs=1", "train.batch_size=8", "train.samples_per_epoch=16",
           "train.progress=false", "train.threads=2", "train.selection_metric=val_loss", "data.validate_images=exists"]


def test_shipped_segmenter_is_small_checked_and_records_how_it_was_made():
    record = read_segmenter_record(DEFAULT_SEGMENTER)  # integrity-checked
    assert (DEFAULT_SEGMENTER / "model.safetensors").stat().st_size <= 10 * 2**20
    assert record.metrics["test"]["dice"]["mean"] >= 0.94
    assert record.data["manifest_sha256"] and record.data["masks_sha256"]
    assert "covidcxr segment train" in record.info["trained_by"]
    assert segmenter_dir("default") == DEFAULT_SEGMENTER


@pytest.mark.parametrize("image", ["images/kermany/normal/NORMAL2-IM-1302-0001.jpg", "images/nih/pneumonia/00000499_008.jpg",
                                   "dicom/RG1_UNCR.dcm", "images/figure1/covid/COVID-00015b.jpg"])
def test_shipped_segmenter_finds_two_lungs_on_sources_it_never_trained_on(data_root, image):
    import cv2

    finder = load_lung_finder(DEFAULT_SEGMENTER, cache=False)
    pixels = read_xray(data_root / image).pixels
    mask = finder(pixels)
    assert mask.shape == pixels.shape
    assert 0.1 < mask.mean() < 0.65
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    assert n - 1 == 2  # left and right lung
    left, right = sorted(stats[1:, cv2.CC_STAT_LEFT])
    assert right > pixels.shape[1] * 0.35 > left


@pytest.fixture(scope="module")
def roi_run(shared_manifest, tmp_path_factory):
    from covidcxr.training import load_config
    from covidcxr.training.loop import fit

    t = shared_manifest.table
    rows = t.groupby(["source", "label"]).head(6).reset_index(drop=True)
    rows = rows[rows.label != "other"].reset_index(drop=True)
    rows["split"] = np.where(np.arange(len(rows)) % 3 == 0, "val", "train")
    manifest = shared_manifest.replace(rows)
    out = tmp_path_factory.mktemp("roi") / "run"
    fit(load_config(None, ROI_RUN), out, manifest=manifest)
    return out, manifest


def test_roi_run_carries_its_segmenter_and_predict_matches_training(roi_run, tmp_path):
    from covidcxr.cli import app
    from covidcxr.models.run import load_run

    out, manifest = roi_run
    run = load_run(out)
    assert run.spec.roi == "lungs" and run.spec.roi_mask_outside
    assert run.spec.segmenter_sha256 == read_segmenter_record(DEFAULT_SEGMENTER).model_sha256
    assert (out / "segmenter" / "model.safetensors").is_file()
    ds = CXRDataset(manifest.subset(mask=(manifest.table.split == "val").to_numpy()), "binary", run.spec,
                    lung_finder=run.lung_finder)
    paths = [str(p) for p in ds.paths[:4]]
    expected = run.predict_tensor(torch.stack([ds[i][0] for i in range(4)]))[:, run.positive_index]
    result = CliRunner().invoke(app, ["predict", str(out), *paths, "--out", str(tmp_path / "p.csv")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = pd.read_csv(tmp_path / "p.csv").set_index("path").loc[paths, "prob_covid"].to_numpy()
    assert np.allclose(got, expected, atol=1e-6)


def test_an_image_without_lungs_gets_its_reason_in_predict(roi_run, data_root):
    from covidcxr.models.run import load_run

    run = load_run(roi_run[0])
    image = data_root / "images/nih/pneumonia/00000499_008.jpg"
    prepared, reason = try_prepare(image, run.spec, lung_finder=lambda pixels: np.zeros(pixels.shape, bool))
    assert prepared is None and reason.startswith("no lungs found")
    prepared, reason = try_prepare(image, run.spec, lung_finder=run.lung_finder)
    assert reason is None and prepared.meta["roi"]["fallback"] is None


def test_a_changed_or_swapped_segmenter_is_refused(roi_run, tmp_path):
    from covidcxr.models.run import load_run

    copy = tmp_path / "run"
    shutil.copytree(roi_run[0], copy)
    weights = copy / "segmenter" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_run(copy)
    # A valid segmenter, but not the one the ROI was trained with (same weights stored as float32).
    from covidcxr.models.segmenter import load_segmenter, save_segmenter

    seg = load_segmenter(DEFAULT_SEGMENTER)
    shutil.rmtree(copy / "segmenter")
    fields = seg.record.model_dump(exclude={"model_sha256", "integrity", "format", "kind", "architecture"})
    save_segmenter(copy / "segmenter", seg.model, **fields)
    with pytest.raises(WeightsError, match="trained with"):
        load_run(copy)


def test_heatmaps_of_a_roi_run_are_drawn_on_the_crop_with_the_cropped_lung_mask(roi_run, data_root, tmp_path):
    from covidcxr.explain.images import explain_images
    from covidcxr.models.run import load_run

    image = data_root / "images/ieee8023/covid/01E392EE-69F9-4E33-BFCE-E5C968654078.jpg"  # has a v7labs mask
    result = explain_images(roi_run[0], [image], out=tmp_path, method="gradcam", annotations=data_root / "annotations",
                            run=load_run(roi_run[0]))
    entry = result["images"][0]
    assert entry["lung_focus"] is not None and 0 <= entry["lung_focus"]["mass_share"] <= 1
