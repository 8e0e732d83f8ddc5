"""Heatmaps must find what a model looks at: a planted signal, mapped back through the geometry."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from covidcxr.data.preprocess import PreprocessSpec
from covidcxr.explain.cam import CamModel, heatmaps
from covidcxr.explain.overlay import blend_overlay
from covidcxr.models.predict import prepare_bytes


class BrightPatchDetector(nn.Module):
    """P(class 1) rises with the area brighter than 0.75 (normalised > 0.5): a model with a known focus."""

    def __init__(self):
        super().__init__()
        self.detect = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.detect.weight.zero_()
            self.detect.weight[:, :, 1, 1] = 1.0 / 3
            self.detect.bias.fill_(-0.5)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.pool(self.act(self.detect(x))).flatten(1))


def _png(pixels: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.round(pixels * 255).astype(np.uint8))
    return buf.tobytes()


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_heatmap_of_a_planted_signal_peaks_on_it(data_root, resize):
    from covidcxr.data import read_xray

    # A real, non-square X-ray, darkened, with one bright patch planted off-centre.
    pixels = read_xray(data_root / "images/ieee8023/covid/1-s2.0-S0140673620303706-fx1_lrg.jpg").pixels
    h, w = pixels.shape
    assert h != w
    img = 0.3 * pixels
    top, left, size = int(0.62 * h), int(0.18 * w), max(24, min(h, w) // 8)
    img[top : top + size, left : left + size] = 1.0
    spec = PreprocessSpec(image_size=128, intensity="none", resize=resize, mean=(0.5,) * 3, std=(0.5,) * 3)
    prepared = prepare_bytes(_png(img), "planted.png", spec)
    net = BrightPatchDetector().eval()
    run = SimpleNamespace(spec=spec, classes=["non-covid", "covid"], positive_index=1)
    (heat,) = heatmaps(run, [prepared], models=[CamModel(net, "planted", "act")], class_indices=[1])
    assert heat.shape == prepared.pixels.shape == (h, w)
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert top - 2 <= peak[0] < top + size + 2 and left - 2 <= peak[1] < left + size + 2
    inside = np.zeros_like(heat, dtype=bool)
    inside[top : top + size, left : left + size] = True
    assert heat[inside].mean() > 5 * heat[~inside].mean()
    # The overlay renderer shows the heat where it is: the patch is the reddest region.
    rgb = blend_overlay(prepared.pixels, heat).astype(int)
    assert (rgb[..., 0] - rgb[..., 2])[inside].mean() > (rgb[..., 0] - rgb[..., 2])[~inside].mean() + 30
