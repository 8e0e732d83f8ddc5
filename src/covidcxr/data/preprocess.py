"""The preprocessing spec and the one pipeline that turns a decoded X-ray into a model input.

:class:`PreprocessSpec` *is* the ``preprocess:`` section of a training config and is stored in
every run record, so training, evaluation, explanation, batch prediction and the web service all
preprocess identically. Like timm's ``resolve_data_config``, the normalisation (mean / std) and the
channel count come from the architecture: :meth:`PreprocessSpec.resolve` fills them in once, and
only a resolved spec can make tensors.

The pipeline has one order, used by the training Dataset and by every inference path:

    decode (data.io)  ->  working size  ->  [lung ROI]  ->  intensity  ->  resize  ->  [augment, training only]  ->  tensor

* **working size** (:func:`working_image`): the longer side is shrunk to ``working_size``
  (``cv2.INTER_AREA``, aspect kept, never enlarged) and stored as uint16. The working-size cache
  stores exactly this array, so a cache hit and a fresh decode give bit-identical inputs. Intensity
  standardisation (CLAHE in particular) depends on resolution, so it must always see this size,
  whether the file is a 512 px JPEG or a 4000 px DICOM.
* **lung ROI** (``roi: lungs``, :mod:`covidcxr.data.lung_roi`): crop the working image to the box
  around its predicted lungs plus a margin, optionally black out everything outside the dilated lung
  mask. The mask comes from the run's own lung segmenter (``RUN/segmenter``, pinned by
  ``segmenter_sha256``), found on the working image by training and inference alike.
* **intensity + resize** (:func:`prepare`): standardise, resize to ``image_size`` x ``image_size``
  and quantise to uint16 again. The training Dataset keeps these arrays in memory; inference
  builds the same array from the same working image.
* **tensor** (:func:`to_tensor`): [0, 1] -> ``(x - mean) / std``, the grey value repeated per channel.
"""

from __future__ import annotations

from typing import Literal, Optional

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from covidcxr.data.lung_roi import LungFinder, apply_roi, locate_lungs
from covidcxr.errors import ConfigError

#: Intensity standardisations, by name (the one list; configs, CLI help and the spec use it).
INTENSITY_MODES = ("none", "minmax", "percentile", "hist_eq", "clahe")
RESIZE_MODES = ("stretch", "letterbox")
Intensity = Literal["none", "minmax", "percentile", "hist_eq", "clahe"]
Resize = Literal["stretch", "letterbox"]
#: The order of the pipeline's stages (documentation and the run record's provenance).
STAGES = ("decode", "working_size", "roi", "intensity", "resize", "tensor")
ROI_MODES = ("full", "lungs")
_U16 = 65535.0


class PreprocessSpec(BaseModel):
    """Everything that turns a decoded H x W float image in [0, 1] into a C x S x S model input."""

    # Unknown keys are errors everywhere: a typo must never silently change preprocessing.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    image_size: int = Field(224, ge=32, le=2048)
    #: Longer side the image is shrunk to before intensity standardisation (never enlarged).
    working_size: int = Field(512, ge=32, le=8192)
    intensity: Intensity = "clahe"
    resize: Resize = "stretch"
    percentiles: tuple[float, float] = (1.0, 99.0)
    clahe_clip: float = Field(2.0, gt=0, le=100)
    clahe_tiles: int = Field(8, ge=1, le=64)
    #: 3: grey repeated (ImageNet stems); 1: single-channel stem. None: from the model (resolve()).
    channels: Optional[Literal[1, 3]] = None
    #: Normalisation; None: the architecture's pretrained statistics (resolve()).
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    #: full: the whole image; lungs: crop to the predicted lung box (covidcxr.data.lung_roi).
    roi: Literal["full", "lungs"] = "full"
    #: The lung box grows by this share of its height / width on each side.
    roi_margin: float = Field(0.1, ge=0, le=1)
    #: Also black out pixels outside the lung mask dilated by roi_dilate x the image's longer side.
    roi_mask_outside: bool = False
    roi_dilate: float = Field(0.03, ge=0, le=0.5)
    #: A mask covering less of the image than this means "no lungs found".
    roi_min_lung_fraction: float = Field(0.02, ge=0, lt=1)
    #: No lungs found -> reject the image with its reason, or use the full image and record that.
    roi_fallback: Literal["reject", "full"] = "reject"
    #: SHA-256 of the lung segmenter's weights the ROI was trained with (filled in by training).
    segmenter_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="before")
    @classmethod
    def _channels_from_statistics(cls, data):
        # A spec that names its statistics (one per channel) needs no separate channel count.
        if isinstance(data, dict) and data.get("channels") is None and data.get("mean") is not None:
            data = {**data, "channels": len(data["mean"])}
        return data

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, v):
        if not 0.0 <= v[0] < v[1] <= 100.0:
            raise ValueError(f"need 0 <= low < high <= 100, got {list(v)}")
        return v

    @field_validator("std")
    @classmethod
    def _std(cls, v):
        if v is not None and any(not np.isfinite(s) or s <= 0 for s in v):
            raise ValueError(f"every std must be a finite number > 0, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.working_size < self.image_size:
            raise ValueError(f"working_size {self.working_size} is smaller than image_size {self.image_size}; "
                             "the image would be shrunk and enlarged again")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither (then they come from the architecture)")
        if self.mean is not None and self.channels is not None:
            if len(self.mean) != self.channels or len(self.std) != self.channels:
                raise ValueError(f"mean/std need one value per channel ({self.channels})")
        return self

    # ------------------------------------------------------------------ resolution

    @property
    def resolved(self) -> bool:
        return self.channels is not None and self.mean is not None

    def resolve(self, *, mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> "PreprocessSpec":
        """The spec with the architecture's normalisation and channel count filled in.

        Values the spec already has win; a spec that names another channel count than the model
        is an error. A 1-channel stem uses the mean of 3-channel statistics (the stem sums RGB).
        """
        if self.channels is not None and self.channels != channels:
            raise ConfigError(f"preprocess.channels={self.channels} but the model has {channels} input channel(s); "
                              "set model.channels and leave preprocess.channels out")
        mean, std = (tuple(self.mean), tuple(self.std)) if self.mean is not None else (tuple(mean), tuple(std))
        if channels == 1 and len(mean) == 3:
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        return self.model_copy(update={"channels": channels, "mean": tuple(map(float, mean)),
                                       "std": tuple(map(float, std))})._validated()

    def _validated(self) -> "PreprocessSpec":
        return PreprocessSpec.model_validate(self.model_dump())

    def require_resolved(self) -> "PreprocessSpec":
        if not self.resolved:
            raise ConfigError("this preprocessing spec has no channels / mean / std yet; resolve it against the "
                              "architecture first (covidcxr.models.registry.resolve_spec)")
        return self

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: dict, origin: str = "preprocess") -> "PreprocessSpec":
        """Validate a stored / configured spec; unknown keys and bad values are ConfigErrors naming the key."""
        try:
            return cls.model_validate(d)
        except ValidationError as exc:
            raise ConfigError(f"{origin}: " + "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: "
                f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}" for e in exc.errors())) from None


# ---------------------------------------------------------------------------- stages


def quantise(pixels: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint16, the form the working and prepared images are kept in."""
    return np.round(np.clip(pixels, 0.0, 1.0) * _U16).astype(np.uint16)


def dequantise(stored: np.ndarray) -> np.ndarray:
    out = np.asarray(stored).astype(np.float32)
    out *= np.float32(1.0 / _U16)
    return out


def to_working_size(pixels: np.ndarray, working_size: int) -> np.ndarray:
    """Shrink so the longer side is at most ``working_size`` (aspect kept, INTER_AREA); never enlarge."""
    h, w = pixels.shape[:2]
    scale = working_size / max(h, w)
    if scale >= 1.0:
        return np.asarray(pixels, dtype=np.float32)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 wants (width, height)
    return cv2.resize(np.asarray(pixels, dtype=np.float32), size, interpolation=cv2.INTER_AREA)


def working_image(pixels: np.ndarray, working_size: int) -> np.ndarray:
    """Stage 1: decoded float pixels -> uint16 working-size image (what the cache stores)."""
    return quantise(to_working_size(pixels, working_size))


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
    if mode == "hist_eq":
        # Global equalisation on 16-bit integers, so 12-16 bit DICOM detail survives.
        x16 = quantise(x)
        hist = np.bincount(x16.ravel(), minlength=65536).astype(np.float64)
        cdf = np.cumsum(hist)
        cdf = (cdf - cdf[cdf > 0][0]) / max(cdf[-1] - cdf[cdf > 0][0], 1.0)
        return np.clip(cdf[x16], 0.0, 1.0).astype(np.float32)
    # CLAHE on 8 bits, as OpenCV and the CXR literature use it: on uint16 OpenCV builds 65,536-bin
    # tile histograms whose clip limit (clip x mean bin count) falls below one pixel, and the
    # redistributed excess flattens the effect (measured on washed-out NIH exports: local contrast
    # x1.5 on 16 bits against x2.5-3.1 on 8 bits; tests/test_preprocess.py).
    x8 = np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
    clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(spec.clahe_tiles, spec.clahe_tiles))
    return clahe.apply(x8).astype(np.float32) / np.float32(255.0)


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


def prepare(working: np.ndarray, spec: PreprocessSpec, roi=None) -> np.ndarray:
    """Stage 2: uint16 working image -> [lung ROI] -> intensity-standardised, resized uint16 S x S image.

    ``roi`` is the image's :class:`~covidcxr.data.lung_roi.LungROI` (from
    :func:`~covidcxr.data.lung_roi.locate_lungs`); a spec with ``roi: lungs`` refuses to run without it.
    Training augmentation runs on ``dequantise(prepare(...))``, between this and :func:`to_tensor`.
    """
    if working.dtype != np.uint16:
        raise TypeError(f"prepare() takes the uint16 working image (working_image()), got {working.dtype}")
    if spec.roi == "lungs":
        if roi is None:
            raise ConfigError("this spec crops to the lungs (roi: lungs): find the image's lungs first "
                              "(covidcxr.data.lung_roi.locate_lungs) and pass roi=")
        working = apply_roi(working, roi)
    x = standardise_intensity(dequantise(working), spec)
    return quantise(resize_square(x, spec.image_size, spec.resize))


def to_tensor(prepared: np.ndarray | torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Stage 3: a prepared S x S image (uint16, or float in [0, 1] after augmentation) -> C x S x S tensor."""
    spec.require_resolved()
    # Normalised in numpy, for arrays (inference, validation) and augmented tensors (training) alike:
    # one code path, and no torch intra-op thread pool, which prediction's decoding threads would
    # otherwise all wake for one small image each (under load 15 ms per image against 0.02 ms).
    if isinstance(prepared, torch.Tensor):
        prepared = prepared.detach().to("cpu", torch.float32).numpy()
    x = dequantise(prepared) if prepared.dtype == np.uint16 else np.asarray(prepared, dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)  # one value per channel (resolved spec)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return torch.from_numpy((x.reshape(x.shape[-2:])[None] - mean) / std)


def preprocess(pixels: np.ndarray, spec: PreprocessSpec, lung_finder: LungFinder | None = None, name: str = "image") -> torch.Tensor:
    """Decoded H x W float32 image in [0, 1] -> normalised C x S x S tensor, exactly as in training.

    ``lung_finder`` (:data:`covidcxr.data.lung_roi.LungFinder`) is needed when ``spec.roi`` is ``lungs``.
    """
    working = working_image(pixels, spec.working_size)
    return to_tensor(prepare(working, spec, locate_lungs(working, spec, lung_finder, name)), spec)
