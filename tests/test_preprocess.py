"""The preprocessing spec and the one pipeline, on real shared X-rays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.data.preprocess import (PreprocessSpec, dequantise, prepare, preprocess, resize_square,
                                      standardise_intensity, to_tensor, to_working_size, working_image)
from covidcxr.errors import ConfigError

LITE = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channels=3)


@pytest.fixture(scope="module")
def xray(data_root):
    from covidcxr.data import read_xray

    return read_xray(data_root / "images/nih/normal" / sorted(p.name for p in (data_root / "images/nih/normal").iterdir())[0]).pixels


@pytest.mark.parametrize("mode", ["none", "minmax", "percentile", "hist_eq", "clahe"])
def test_every_intensity_mode_keeps_range_and_order(xray, mode):
    out = standardise_intensity(xray, PreprocessSpec(intensity=mode))
    assert out.dtype == np.float32 and out.shape == xray.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Standardisation must not invert the image: brighter pixels stay (on average) brighter.
    assert np.corrcoef(out.ravel(), xray.ravel())[0, 1] > 0.5


def test_hist_eq_flattens_histogram(xray):
    out = standardise_intensity(xray, PreprocessSpec(intensity="hist_eq"))
    # A uniform distribution has quartiles near 0.25 / 0.5 / 0.75.
    assert np.allclose(np.percentile(out, [25, 50, 75]), [0.25, 0.5, 0.75], atol=0.05)


def _local_std(img: np.ndarray, tile: int = 16) -> float:
    h, w = (s - s % tile for s in img.shape)
    blocks = img[:h, :w].reshape(h // tile, tile, w // tile, tile)
    return float(blocks.std(axis=(1, 3)).mean())


def test_clahe_really_raises_local_contrast(xray):
    # A washed-out export (like raw hospital PNGs): CLAHE must restore local contrast. An identity
    # "CLAHE" keeps the ratio at 1; OpenCV's CLAHE on 16-bit values (65,536-bin tiles) reaches only
    # 1.5 here, 8-bit CLAHE 2.5-3.1 on NIH images.
    washed = (0.45 + 0.1 * xray).astype(np.float32)
    out = standardise_intensity(washed, PreprocessSpec(intensity="clahe"))
    assert _local_std(out) > 2.0 * _local_std(washed)
    assert _local_std(standardise_intensity(xray, PreprocessSpec(intensity="clahe"))) > 1.3 * _local_std(xray)
    # And it is local: the same grey value maps to different outputs in different tiles.
    values = np.round(washed * 1000).astype(int)
    common = np.bincount(values.ravel()).argmax()
    assert np.ptp(out[values == common]) > 0.05


def test_contrast_differences_removed_by_percentile_and_hist_eq(xray):
    # The same image exported with low contrast (like raw hospital exports) ends up close to the original.
    washed = 0.4 + 0.2 * xray
    for mode in ("percentile", "hist_eq"):
        spec = PreprocessSpec(intensity=mode)
        a, b = standardise_intensity(xray, spec), standardise_intensity(washed, spec)
        assert np.abs(a - b).mean() < 0.02, mode


def test_hist_eq_of_a_lung_crop_keeps_the_outside_black_and_undoes_a_gamma_change(xray):
    # bench recipe wsauc_roi_1pass_histeq: equalising the lung crop gives a model the same input whatever
    # window / gamma a collection exported with; the blacked-out surroundings must stay black (no lung texture).
    from covidcxr.data.lung_roi import roi_from_mask

    working = working_image(xray, 512)
    h, w = working.shape
    yy, xx = np.mgrid[:h, :w]
    lungs = (((yy - 0.5 * h) / (0.3 * h)) ** 2 + ((xx - 0.3 * w) / (0.12 * w)) ** 2 < 1) | \
            (((yy - 0.5 * h) / (0.3 * h)) ** 2 + ((xx - 0.7 * w) / (0.12 * w)) ** 2 < 1)
    gamma = working_image(dequantise(working) ** 2.0, 512)
    out = {}
    for mode in ("none", "hist_eq"):
        spec = PreprocessSpec(image_size=160, intensity=mode, roi="lungs", roi_mask_outside=True, roi_dilate=0.0)
        roi = roi_from_mask(lungs, spec, "nih")
        out[mode] = [dequantise(prepare(img, spec, roi)) for img in (working, gamma)]
    outside = out["none"][0] == 0
    assert 0.2 < outside.mean() < 0.8
    assert np.all(out["hist_eq"][0][outside] == 0) and np.all(out["hist_eq"][1][outside] == 0)
    inside = ~outside
    assert np.abs(out["none"][0] - out["none"][1])[inside].mean() > 0.1  # gamma 2 changes the plain crop a lot
    assert np.abs(out["hist_eq"][0] - out["hist_eq"][1])[inside].mean() < 0.01  # and the equalised one hardly


def test_letterbox_keeps_aspect_and_pads_black():
    img = np.ones((100, 200), dtype=np.float32)
    out = resize_square(img, 64, "letterbox")
    assert out.shape == (64, 64)
    assert out[:16].max() == 0 and out[-16:].max() == 0 and out[32, :].min() == pytest.approx(1.0)


def test_pipeline_stages_compose_to_preprocess(xray):
    spec = PreprocessSpec(image_size=96, intensity="clahe", **LITE)
    working = working_image(xray, spec.working_size)
    assert working.dtype == np.uint16 and max(working.shape) <= spec.working_size
    prepared = prepare(working, spec)
    assert prepared.dtype == np.uint16 and prepared.shape == (96, 96)
    t = preprocess(xray, spec)
    assert t.shape == (3, 96, 96) and t.dtype == torch.float32
    assert torch.equal(t, to_tensor(prepared, spec)) and torch.equal(t[0], t[2])
    assert torch.allclose(t[0], torch.from_numpy(dequantise(prepared)) * 2 - 1, atol=1e-6)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_array_and_tensor_inputs_normalise_bit_for_bit_alike(xray):
    """Inference hands to_tensor the prepared array, training the augmented tensor: the two must give
    the same float32 bits, or training and inference would differ in the last digit."""
    spec = PreprocessSpec(image_size=128, intensity="percentile", mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225), channels=3)
    prepared = prepare(working_image(xray, spec.working_size), spec)
    from_array = to_tensor(prepared, spec)
    from_tensor = to_tensor(torch.from_numpy(dequantise(prepared))[None], spec)
    assert from_array.is_contiguous() and from_array.dtype == torch.float32
    assert torch.equal(from_array, from_tensor) and not torch.equal(from_array[0], from_array[1])


def test_intensity_runs_at_working_size_whatever_the_file_resolution(xray):
    # The same picture at 4x resolution gives (almost) the same model input: CLAHE sees the working size.
    import cv2

    spec = PreprocessSpec(image_size=128, working_size=256, **LITE)
    big = cv2.resize(xray, (xray.shape[1] * 4, xray.shape[0] * 4), interpolation=cv2.INTER_CUBIC)
    a, b = preprocess(xray, spec), preprocess(big, spec)
    assert float((a - b).abs().mean()) < 0.02
    assert to_working_size(big, 256).shape == to_working_size(xray, 256).shape


def test_spec_resolves_against_the_architecture():
    from covidcxr.models.registry import resolve_spec

    spec = PreprocessSpec(image_size=128)
    assert not spec.resolved
    with pytest.raises(ConfigError, match="resolve"):
        to_tensor(np.zeros((128, 128), np.uint16), spec)
    lite = resolve_spec(spec, "tf_efficientnet_lite0")
    assert lite.resolved and lite.mean == (0.5, 0.5, 0.5) and lite.channels == 3
    grey = resolve_spec(spec, "resnet18", channels=1)
    assert grey.channels == 1 and grey.mean == pytest.approx((np.mean([0.485, 0.456, 0.406]),))
    with pytest.raises(ConfigError, match="channels"):
        resolve_spec(PreprocessSpec(channels=3), "resnet18", channels=1)


@pytest.mark.parametrize("bad", [dict(image_size=4), dict(channels=2), dict(intensity="gamma"), dict(resize="crop"),
                                 dict(working_size=128, image_size=224), dict(clahe_clip=float("inf")),
                                 dict(percentiles=[99, 1]), dict(mean=[0.5] * 3)])
def test_invalid_spec_names_the_key(bad):
    with pytest.raises(ConfigError, match=next(iter(bad)) if "working_size" not in bad else "working_size"):
        PreprocessSpec.from_dict(bad)


def test_unknown_spec_keys_are_errors():
    with pytest.raises(ConfigError, match="clahe_tile.*unknown key"):
        PreprocessSpec.from_dict({"clahe_tile": 8})


# ---------------------------------------------------------------- training == inference on real files


def _parity_files(data_root):
    originals = pd.read_csv(data_root / "originals" / "originals.csv")["file"].tolist()
    return originals + ["dicom/RG1_UNCR.dcm", "dicom/RG1_J2KI.dcm"]


def test_training_dataset_and_predict_build_identical_tensors_on_full_resolution_files(data_root):
    """Every untouched original (up to 3052 px) and both DICOMs: the Dataset's tensor is what predict feeds."""
    from covidcxr.data.dataset import CXRDataset
    from covidcxr.data.manifest import Manifest
    from covidcxr.models.predict import prepare_input

    files = _parity_files(data_root)
    table = pd.DataFrame({"image": files, "label": "normal", "patient_id": [f"x:{i}" for i in range(len(files))],
                          "source": "originals"})
    manifest = Manifest(table, root=data_root)
    spec = PreprocessSpec(image_size=160, intensity="clahe", **LITE)
    dataset = CXRDataset(manifest, "binary", spec, validate="decode")
    assert len(dataset) == len(files) and not dataset.skipped
    for i, name in enumerate(files):
        train_tensor = dataset[i][0]
        infer_tensor = prepare_input(data_root / name, spec).tensor
        assert float((train_tensor - infer_tensor).abs().max()) < 1e-3, name
        assert torch.equal(train_tensor, infer_tensor), name  # in fact bit-identical
    # A second dataset reading from the now warm working-size cache gives the same tensors.
    again = CXRDataset(manifest, "binary", spec, validate="exists")
    assert all(torch.equal(again[i][0], dataset[i][0]) for i in range(len(files)))
