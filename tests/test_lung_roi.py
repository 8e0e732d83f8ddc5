"""The lung-ROI stage (``preprocess.roi: lungs``) on real shared images and their human lung masks:
the crop holds the lungs plus the margin, masking blacks out the rest, an image without lungs is refused
with its name or recorded as a fallback, and the training Dataset and inference give identical inputs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from covidcxr.data.annotations import Annotations
from covidcxr.data.dataset import CXRDataset, load_working
from covidcxr.data.io import read_xray
from covidcxr.data.lung_roi import apply_roi, locate_lungs, lung_box, roi_from_mask
from covidcxr.data.manifest import Manifest
from covidcxr.data.preprocess import PreprocessSpec, dequantise, prepare, working_image
from covidcxr.errors import ConfigError, ImageReadError
from covidcxr.models.predict import prepare_input

IMAGE = "images/ieee8023/covid/01E392EE-69F9-4E33-BFCE-E5C968654078.jpg"


def _spec(**roi) -> PreprocessSpec:
    return PreprocessSpec(image_size=96, working_size=256, intensity="none", channels=1, mean=(0.5,), std=(0.25,),
                          roi="lungs", **roi)


@pytest.fixture(scope="module")
def annotated(data_root):
    """(working uint16 image, human lung mask in its geometry) of a v7labs-annotated shared image."""
    xray = read_xray(data_root / IMAGE)
    region = Annotations(data_root / "annotations").lung_region(data_root / IMAGE, xray.pixels.shape, "v7labs")
    working = working_image(xray.pixels, 256)
    mask = cv2.resize(region.lung.astype(np.uint8), working.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert 0.1 < mask.mean() < 0.7  # a real pair of lungs
    return working, mask


def test_crop_holds_the_lungs_and_the_margin(annotated):
    working, mask = annotated
    roi = roi_from_mask(mask, _spec(roi_margin=0.1), IMAGE)
    top, left, bottom, right = roi.box
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert top <= rows[0] and bottom > rows[-1] and left <= cols[0] and right > cols[-1]
    h, w = mask.shape
    # 10% of the lung box's height on each side, unless the image ends first.
    assert top == max(0, rows[0] - round(0.1 * (rows[-1] + 1 - rows[0])))
    assert bottom == min(h, rows[-1] + 1 + round(0.1 * (rows[-1] + 1 - rows[0])))
    crop = apply_roi(working, roi)
    assert crop.shape == (bottom - top, right - left) and crop.dtype == np.uint16
    assert np.array_equal(crop, working[top:bottom, left:right])
    assert roi.fallback is None and roi.to_dict()["lung_fraction"] == pytest.approx(mask.mean(), abs=1e-4)


def test_masking_blacks_out_everything_outside_the_dilated_lungs(annotated):
    working, mask = annotated
    roi = roi_from_mask(mask, _spec(roi_mask_outside=True, roi_dilate=0.02), IMAGE)
    out = apply_roi(working, roi)
    top, left, bottom, right = roi.box
    keep = roi.keep[top:bottom, left:right]
    assert keep.sum() > mask.sum()  # dilated
    assert (out[~keep] == 0).all()
    assert np.array_equal(out[keep], working[top:bottom, left:right][keep])
    lungs = mask[top:bottom, left:right]
    assert (out[lungs] == working[top:bottom, left:right][lungs]).all()  # the lungs themselves are untouched


def test_no_lungs_is_refused_with_the_file_name_or_recorded_as_fallback(annotated):
    working, _ = annotated
    empty = np.zeros(working.shape, dtype=bool)
    with pytest.raises(ImageReadError, match="no lungs found") as info:
        roi_from_mask(empty, _spec(), IMAGE)
    assert info.value.path == IMAGE
    fallback = roi_from_mask(empty, _spec(roi_fallback="full"), IMAGE)
    assert "no lungs found" in fallback.fallback
    assert np.array_equal(apply_roi(working, fallback), working)
    assert fallback.to_dict()["fallback"] == fallback.fallback


def test_a_lungs_spec_never_runs_without_lungs(annotated):
    working, _ = annotated
    with pytest.raises(ConfigError, match="roi: lungs"):
        prepare(working, _spec())
    with pytest.raises(ConfigError, match="no lung segmenter"):
        locate_lungs(working, _spec(), None, IMAGE)
    assert locate_lungs(working, _spec().model_copy(update={"roi": "full"}), None, IMAGE) is None


def test_bad_roi_settings_are_config_errors():
    with pytest.raises(ConfigError, match="roi"):
        PreprocessSpec.from_dict({"roi": "heart"})
    with pytest.raises(ConfigError, match="roi_margin"):
        PreprocessSpec.from_dict({"roi_margin": -0.1})
    with pytest.raises(ConfigError, match="segmenter_sha256"):
        PreprocessSpec.from_dict({"segmenter_sha256": "abc"})


def dark_field_finder(pixels: np.ndarray) -> np.ndarray:
    """A crude but real lung finder for parity tests: the two largest dark regions inside the body."""
    x = cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), 3)
    h, w = x.shape
    inner = np.zeros_like(x, dtype=bool)
    inner[h // 8 : h - h // 8, w // 10 : w - w // 10] = True
    dark = (x < np.percentile(x[inner], 40)) & inner
    n, labels, stats, _ = cv2.connectedComponentsWithStats(dark.astype(np.uint8))
    order = np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1][:2] + 1
    return np.isin(labels, order)


def test_training_dataset_and_inference_give_identical_lung_inputs(data_root, shared_manifest):
    table = shared_manifest.table
    rows = table.groupby("source").head(2)  # every source: adults, children, DICOM-derived, figures
    small = Manifest(rows.assign(split="train").reset_index(drop=True), root=shared_manifest.root)
    spec = _spec(roi_mask_outside=True)
    ds = CXRDataset(small, "binary", spec, lung_finder=dark_field_finder)
    assert len(ds) == len(rows) and not ds.skipped
    for i in range(len(ds)):
        x, _, _ = ds[i]
        inference = prepare_input(ds.paths[i], spec, lung_finder=dark_field_finder)
        assert torch.equal(x, inference.tensor)
        box = inference.meta["roi"]["box"]
        assert inference.pixels.shape == (box[2] - box[0], box[3] - box[1])  # the crop the model saw
    assert ds.report()["roi_fallbacks"] == []


def test_an_image_without_lungs_is_skipped_with_its_reason_and_fallbacks_are_reported(shared_manifest):
    table = shared_manifest.table
    rows = table[table.image.str.contains("ieee8023")].head(4).assign(split="train").reset_index(drop=True)
    small = Manifest(rows, root=shared_manifest.root)
    paths = small.image_paths()
    blank_one = str(paths[1])

    def finder(pixels):  # finds no lungs in the second image only
        return dark_field_finder(pixels) & (not np.array_equal(pixels, _working_float(blank_one)))

    ds = CXRDataset(small, "binary", _spec(), lung_finder=finder)
    assert [s.path for s in ds.skipped] == [blank_one] and "no lungs found" in ds.skipped[0].reason
    assert len(ds) == 3
    kept = CXRDataset(small, "binary", _spec(roi_fallback="full"), lung_finder=finder)
    assert len(kept) == 4 and [f["path"] for f in kept.report()["roi_fallbacks"]] == [blank_one]


def _working_float(path: str) -> np.ndarray:
    return dequantise(load_working(path, 256))
