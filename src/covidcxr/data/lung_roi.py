"""The lung region of interest: the pipeline stage between working size and intensity (``roi: lungs``).

With ``PreprocessSpec.roi == "lungs"`` every image is cropped to the box around its predicted lungs,
grown by ``roi_margin`` of the box's height and width on each side, and (``roi_mask_outside``) blacked
out outside the lung mask dilated by ``roi_dilate`` of the image's longer side. Text markers, borders,
collimation edges and the belly then never reach the model - the non-lung signals a source shortcut
feeds on (DeGrave et al. 2021; DeepCOVID-XR crops to the lungs for the same reason).

This module only *uses* a lung mask; finding it needs a model, which lives in a higher layer. The
mask comes from a :data:`LungFinder` - any callable from the working image to a bool mask of the same
shape (:class:`covidcxr.models.lung_finder.SegmenterLungFinder` wraps a trained lung segmenter) - so
the training Dataset and every inference path call the same two functions in the same order::

    roi = locate_lungs(working, spec, lung_finder, name)      # None when spec.roi == "full"
    prepared = prepare(working, spec, roi)                    # crop / mask, intensity, resize

An image whose mask covers less than ``roi_min_lung_fraction`` of it has no lungs to crop to: with
``roi_fallback: reject`` it is refused with a per-image reason (:class:`~covidcxr.errors.ImageReadError`);
with ``roi_fallback: full`` it goes on as the full image, and the :class:`LungROI` says so
(``fallback``), which the Dataset report and every prediction record carry. Never silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import cv2
import numpy as np

from covidcxr.errors import ConfigError, ImageReadError

#: ``lung_finder(working image as float32 H x W in [0, 1]) -> bool H x W lung mask``
LungFinder = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LungROI:
    """Where the lungs of one working-size image are, and what the ROI stage does with them."""

    box: tuple[int, int, int, int]  # (top, left, bottom, right), bottom / right exclusive, margin included
    lung_fraction: float  # share of the image the (undilated) lung mask covers
    keep: Optional[np.ndarray] = None  # bool H x W: pixels kept when masking outside the lungs
    fallback: Optional[str] = None  # why the full image is used instead (roi_fallback: full)

    def to_dict(self) -> dict:
        return {"box": list(self.box), "lung_fraction": round(self.lung_fraction, 4), "fallback": self.fallback}


def lung_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the mask's pixels, grown by ``margin`` x its size, inside the image."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    dy, dx = round(margin * (bottom - top)), round(margin * (right - left))
    h, w = mask.shape
    return max(0, top - dy), max(0, left - dx), min(h, bottom + dy), min(w, right + dx)


def dilated(mask: np.ndarray, share: float) -> np.ndarray:
    """The bool ``mask`` grown by ``share`` of its longer side (an elliptical kernel)."""
    radius = round(share * max(mask.shape))
    if radius < 1:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def roi_from_mask(mask: np.ndarray, spec, name: str) -> LungROI:
    """The :class:`LungROI` of a bool lung mask under ``spec``'s ROI settings (rejects or falls back)."""
    mask = np.asarray(mask, dtype=bool)
    fraction = float(mask.mean()) if mask.size else 0.0
    h, w = mask.shape
    if fraction < spec.roi_min_lung_fraction:
        reason = (f"no lungs found: the lung segmenter's mask covers {100 * fraction:.1f}% of the image "
                  f"(roi_min_lung_fraction {100 * spec.roi_min_lung_fraction:.0f}%); not a frontal chest X-ray, "
                  "or one the segmenter cannot read")
        if spec.roi_fallback == "reject":
            raise ImageReadError(name, reason)
        return LungROI(box=(0, 0, h, w), lung_fraction=fraction, fallback=reason)
    keep = dilated(mask, spec.roi_dilate) if spec.roi_mask_outside else None
    return LungROI(box=lung_box(mask, spec.roi_margin), lung_fraction=fraction, keep=keep)


def locate_lungs(working: np.ndarray, spec, lung_finder: LungFinder | None, name: str) -> LungROI | None:
    """The ROI of a uint16 working image, or None when ``spec.roi`` is ``full`` (no segmenter runs)."""
    if spec.roi == "full":
        return None
    if lung_finder is None:
        raise ConfigError(f"{name}: the preprocessing spec crops to the lungs (roi: lungs) but no lung segmenter "
                          "was given; load the run with load_run() (it brings RUN/segmenter) or pass lung_finder")
    return roi_from_mask(find_lungs(working, lung_finder, name), spec, name)


def find_lungs(working: np.ndarray, lung_finder: LungFinder, name: str) -> np.ndarray:
    """The finder's bool lung mask of a uint16 working image (same shape)."""
    # The finder sees the working image as float [0, 1], as preprocess.dequantise gives it (not imported:
    # the preprocessing module imports this one).
    mask = np.asarray(lung_finder(working.astype(np.float32) * np.float32(1.0 / 65535.0)), dtype=bool)
    if mask.shape != working.shape:
        raise ConfigError(f"{name}: the lung finder returned a {mask.shape} mask for a {working.shape} image")
    return mask


def apply_roi(working: np.ndarray, roi: LungROI) -> np.ndarray:
    """Black out what ``roi.keep`` excludes (if anything), then crop to ``roi.box``."""
    if roi.fallback is not None:
        return working
    out = working
    if roi.keep is not None:
        out = np.where(roi.keep, working, np.zeros((), dtype=working.dtype))
    top, left, bottom, right = roi.box
    return np.ascontiguousarray(out[top:bottom, left:right])
