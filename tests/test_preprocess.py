"""The preprocessing spec on real shared X-rays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidcxr.data.preprocess import PreprocessSpec, prepare_image, preprocess, resize_square, standardise_intensity
from covidcxr.errors import ConfigError


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


def test_contrast_differences_removed_by_percentile_and_clahe(xray):
    # The same image exported with low contrast (like raw hospital exports) ends up close to the original.
    washed = 0.4 + 0.2 * xray
    for mode in ("percentile", "hist_eq"):
        spec = PreprocessSpec(intensity=mode)
        a, b = standardise_intensity(xray, spec), standardise_intensity(washed, spec)
        assert np.abs(a - b).mean() < 0.02, mode


def test_letterbox_keeps_aspect_and_pads_black():
    img = np.ones((100, 200), dtype=np.float32)
    out = resize_square(img, 64, "letterbox")
    assert out.shape == (64, 64)
    assert out[:16].max() == 0 and out[-16:].max() == 0 and out[32, :].min() == pytest.approx(1.0)


def test_preprocess_shape_normalisation_and_roundtrip(xray):
    spec = PreprocessSpec(image_size=96, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    t = preprocess(xray, spec)
    assert t.shape == (3, 96, 96) and t.dtype == torch.float32
    expected = torch.from_numpy(prepare_image(xray, spec)) * 2 - 1
    assert torch.allclose(t[0], expected, atol=1e-6) and torch.equal(t[0], t[2])
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_single_channel_spec_uses_mean_statistics():
    spec = PreprocessSpec(channels=1)
    assert len(spec.mean) == 1 and spec.mean[0] == pytest.approx(np.mean([0.485, 0.456, 0.406]))


@pytest.mark.parametrize("bad", [dict(image_size=4), dict(channels=2), dict(intensity="gamma"), dict(resize="crop")])
def test_invalid_spec_names_the_key(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        PreprocessSpec(**bad)
