"""Lung-focus scores and heatmap geometry on the real lung masks and boxes of the shared data."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from covidcxr.data.io import read_xray
from covidcxr.data.preprocess import PreprocessSpec, dequantise, prepare, working_image
from covidcxr.errors import ConfigError
from covidcxr.data.annotations import Annotations
from covidcxr.data.preprocess import letterbox_box
from covidcxr.explain.cam import to_original_geometry
from covidcxr.explain.lung_focus import lung_cam_area, lung_focus, mass_share, pointing_hit, summarise_lung_focus


@pytest.fixture(scope="module")
def ann(data_root):
    return Annotations(data_root / "annotations")


def _index(ann):
    return ann.index.reset_index()


def _regions(ann, data_root, column, n):
    rows = _index(ann)
    rows = rows[(rows[column] != "") & (rows[column] != "0")].head(n)
    out = []
    for image in rows["image"]:
        shape = read_xray(data_root / image).pixels.shape
        out.append((image, ann.lung_region(image, shape, kind={"lung_mask_v7labs": "v7labs",
                                                                "lung_mask_lungvae": "lungvae",
                                                                "lung_bbox_ieee8023": "bbox"}[column])))
    return out


@pytest.mark.parametrize("column", ["lung_mask_v7labs", "lung_mask_lungvae", "lung_bbox_ieee8023"])
def test_mask_heatmap_scores_one_uniform_scores_area_outside_scores_zero(ann, data_root, column):
    for image, region in _regions(ann, data_root, column, 4):
        assert region is not None and region.lung.any() and not region.lung.all(), image
        inside = region.lung.astype(np.float32)
        assert mass_share(inside, region) == pytest.approx(1.0)
        assert pointing_hit(inside, region)
        uniform = np.full(region.lung.shape, 0.37, dtype=np.float32)
        area = region.lung[region.valid].sum() / region.valid.sum()
        assert mass_share(uniform, region) == pytest.approx(area, rel=1e-9)
        assert region.area_share == pytest.approx(area)
        outside = (~region.lung).astype(np.float32)
        assert mass_share(outside, region) == 0.0
        assert not pointing_hit(outside, region)
        assert lung_cam_area(inside, region) == 1.0 and lung_cam_area(outside, region) == 0.0


def test_v7labs_ignore_pixels_count_neither_inside_nor_outside(ann, data_root):
    image = "images/ieee8023/covid/1-s2.0-S2387020620301959-gr4_lrg-b.jpg"
    raw = cv2.imread(str(data_root / ann.index.loc[image, "lung_mask_v7labs"]), cv2.IMREAD_GRAYSCALE)
    assert (raw == 127).sum() > 100  # this real mask has "ignore" pixels
    region = ann.lung_region(image, raw.shape)
    assert region.kind == "v7labs"
    assert not region.valid[raw == 127].any() and region.valid[raw != 127].all()
    # A map with mass on the lungs and (much more) on the ignored device still scores 1 ...
    cam = np.where(raw == 255, 0.2, 0.0) + np.where(raw == 127, 1.0, 0.0)
    assert mass_share(cam, region) == pytest.approx(1.0)
    # ... and its peak is taken over valid pixels only.
    assert pointing_hit(cam, region)
    # The uniform baseline is the lung share of the *valid* pixels.
    assert region.area_share == pytest.approx((raw == 255).sum() / (raw != 127).sum())


def test_lung_boxes_are_in_stored_image_pixels(ann, data_root):
    # Images with both an automatic lungVAE mask and expert boxes: the boxes must contain the mask.
    rows = _index(ann)
    rows = rows[(rows["lung_mask_lungvae"] != "") & (rows["lung_bbox_ieee8023"] == "1")].head(8)
    assert len(rows) >= 5
    for image in rows["image"]:
        shape = read_xray(data_root / image).pixels.shape
        mask = ann.lung_region(image, shape, kind="lungvae")
        boxes = ann.lung_region(image, shape, kind="bbox")
        covered = (mask.lung & boxes.lung).sum() / mask.lung.sum()
        assert covered > 0.8, (image, covered)
        assert boxes.lung.sum() < 0.9 * boxes.lung.size


def test_best_region_preference_and_unannotated_images(ann, data_root):
    image = "images/ieee8023/covid/1-s2.0-S0140673620303706-fx1_lrg.jpg"  # has v7labs, lungVAE and boxes
    assert ann.available(image) == ["v7labs", "lungvae", "bbox"]
    shape = read_xray(data_root / image).pixels.shape
    assert ann.lung_region(image, shape).kind == "v7labs"
    assert ann.lung_region(data_root / image, shape).kind == "v7labs"  # absolute path works too
    normal = pd.read_csv(data_root / "manifest.csv").query("source != 's-mostafa-a/covid-chestxray-dataset'")["image"].iloc[0]
    assert ann.available(normal) == [] and ann.lung_region(normal, (10, 10)) is None
    with pytest.raises(Exception, match="masks must match"):
        ann.lung_region(image, (shape[0] + 1, shape[1]))


def test_every_severity_image_has_a_lung_region(ann):
    scores = ann.severity_scores()
    assert len(scores) == 92
    assert all(ann.available(im) for im in scores["image"])


def test_summary_and_shape_checks(ann, data_root):
    results = []
    for _, region in _regions(ann, data_root, "lung_mask_v7labs", 3):
        results.append(lung_focus(region.lung.astype(float), region))
        results.append(lung_focus(np.ones(region.lung.shape), region))
    empty = lung_focus(np.zeros(region.lung.shape), region)
    assert empty["empty"] and empty["mass_share"] is None and empty["pointing_hit"] is None
    s = summarise_lung_focus(results + [empty])
    assert s["n"] == 6 and s["n_empty"] == 1 and s["pointing_game"] >= 0.5
    assert s["mean_mass_share"] == pytest.approx(np.mean([r["mass_share"] for r in results]))
    with pytest.raises(ConfigError, match="shape"):
        mass_share(np.ones((5, 5)), region)
    with pytest.raises(ConfigError, match="negative"):
        mass_share(-np.ones(region.lung.shape), region)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_heatmap_maps_back_onto_the_stored_image(data_root, resize):
    # A "heatmap" that is the preprocessed image itself must map back onto the original pixels.
    pixels = read_xray(data_root / "images/ieee8023/covid/1-s2.0-S0140673620303706-fx1_lrg.jpg").pixels
    assert pixels.shape[0] != pixels.shape[1]
    spec = PreprocessSpec(image_size=128, resize=resize, intensity="none")
    small = dequantise(prepare(working_image(pixels, spec.working_size), spec))
    back = to_original_geometry(small, pixels.shape, spec)
    assert back.shape == pixels.shape
    assert np.corrcoef(back.ravel(), pixels.ravel())[0, 1] > 0.95
    if resize == "letterbox":
        top, left, h, w = letterbox_box(*pixels.shape, 128)
        assert (top, left) != (0, 0) and small[:top].max() == 0 and small[top + h:].max() == 0
