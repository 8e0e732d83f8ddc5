"""The preprocessing spec: how an X-ray array becomes a model input tensor.

The spec is saved in every run directory (``run.json``) so that training, evaluation, explanation,
batch prediction and the web service all preprocess identically. Intensity standardisation is part
of the spec because per-source contrast differences are one of the shortcuts a CXR model learns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import cv2
import numpy as np
import torch

from covidcxr.errors import ConfigError

Intensity = Literal["none", "minmax", "percentile", "hist_eq", "clahe"]
Resize = Literal["stretch", "letterbox"]
INTENSITY_MODES = ("none", "minmax", "percentile", "hist_eq", "clahe")
RESIZE_MODES = ("stretch", "letterbox")


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn a float32 H x W image in [0, 1] into a C x S x S tensor."""

    image_size: int = 224
    channels: int = 3  # 3: grey repeated (ImageNet stems); 1: single-channel stem
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    intensity: Intensity = "none"
    resize: Resize = "stretch"
    percentiles: tuple[float, float] = (1.0, 99.0)
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not 16 <= self.image_size <= 2048:
            raise ConfigError(f"preprocess.image_size={self.image_size}: must be between 16 and 2048")
        if self.channels not in (1, 3):
            raise ConfigError(f"preprocess.channels={self.channels}: must be 1 or 3")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            # A 1-channel stem uses the mean of the 3-channel statistics.
            if self.channels == 1 and len(self.mean) == 3 and len(self.std) == 3:
                object.__setattr__(self, "mean", (float(np.mean(self.mean)),))
                object.__setattr__(self, "std", (float(np.mean(self.std)),))
            else:
                raise ConfigError("preprocess.mean/std: need one value per channel")
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(f"preprocess.intensity={self.intensity!r}: choose one of {INTENSITY_MODES}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"preprocess.resize={self.resize!r}: choose one of {RESIZE_MODES}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "percentiles", tuple(float(v) for v in self.percentiles))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"], d["percentiles"] = list(self.mean), list(self.std), list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std", "percentiles"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def standardise_intensity(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Apply the spec's intensity standardisation to a float32 image in [0, 1]."""
    x = np.asarray(pixels, dtype=np.float32)
    mode = spec.intensity
    if mode == "none":
        return np.clip(x, 0.0, 1.0)
    if mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if mode == "percentile":
        lo, hi = (np.float32(v) for v in np.percentile(x, spec.percentiles))
        return np.clip((x - lo) / (hi - lo), 0.0, 1.0, dtype=np.float32) if hi > lo else np.zeros_like(x)
    # Histogram methods work on 16-bit integers so 12-16 bit DICOM detail survives.
    x16 = np.round(np.clip(x, 0.0, 1.0) * 65535).astype(np.uint16)
    if mode == "hist_eq":
        hist = np.bincount(x16.ravel(), minlength=65536).astype(np.float64)
        cdf = np.cumsum(hist)
        cdf = (cdf - cdf[cdf > 0][0]) / max(cdf[-1] - cdf[cdf > 0][0], 1.0)
        return np.clip(cdf[x16], 0.0, 1.0).astype(np.float32)
    clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(spec.clahe_tiles, spec.clahe_tiles))
    return clahe.apply(x16).astype(np.float32) / 65535.0


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an H x W image inside its letterboxed size x size version."""
    scale = size / max(height, width)
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    return (size - nh) // 2, (size - nw) // 2, nh, nw


def resize_square(pixels: np.ndarray, size: int, mode: Resize = "stretch") -> np.ndarray:
    """Resize to size x size: stretch, or keep the aspect ratio and pad with black (letterbox)."""
    h, w = pixels.shape[:2]
    interp = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_LINEAR
    if mode == "stretch":
        return cv2.resize(pixels, (size, size), interpolation=interp)
    top, left, nh, nw = letterbox_box(h, w, size)
    out = np.zeros((size, size), dtype=pixels.dtype)
    out[top : top + nh, left : left + nw] = cv2.resize(pixels, (nw, nh), interpolation=interp)
    return out


def to_model_input(pixels: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """Resized, standardised float image in [0, 1] -> normalised C x S x S tensor."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    x = x.unsqueeze(0).expand(spec.channels, -1, -1)
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    return (x - mean) / std


def prepare_image(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The geometric + intensity part of preprocessing: H x W float -> S x S float in [0, 1].

    Augmentation (training only) runs between :func:`prepare_image` and :func:`to_model_input`.
    """
    return resize_square(standardise_intensity(pixels, spec), spec.image_size, spec.resize)


def preprocess(pixels: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """H x W float32 image in [0, 1] -> normalised C x S x S tensor, exactly as at training time."""
    return to_model_input(prepare_image(pixels, spec), spec)
