"""Is this decoded image plausibly a radiograph at all? A cheap gate applied after decoding.

:func:`~covidcxr.data.io.read_xray` and :func:`~covidcxr.data.io.decode_xray` call
:func:`check_plausible` on every image they decode (``checks=InputChecks()`` by default;
``checks=None`` switches the gate off). It refuses, with :class:`~covidcxr.errors.ImplausibleImageError`
(a subclass of :class:`~covidcxr.errors.ImageReadError`), inputs that would make any model output
meaningless while looking like a valid prediction:

* **too small**: either side shorter than ``min_side`` (default 64 px; the shared data set's smallest
  side is 156 px). A 1 x 1 or 2 x 2 "image" is a bug upstream, not a radiograph.
* **too elongated**: longer side / shorter side above ``max_aspect`` (default 4.0; the shared data set's
  most elongated image is 2.96). 1 x 4000 or 20000 x 2 are strips, not chests.
* **near-constant content**: the 1st-99th percentile range of the pixels below ``min_spread`` or their
  standard deviation below ``min_std``: all black, all white, constant grey, a fully transparent PNG
  (composited on black), a blank page with a few specks.
* **uncorrelated noise**: the correlation between neighbouring pixels below ``min_neighbour_corr``.
  Radiographs are smooth at every scale that matters (the shared images: >= 0.85 at 256 px); uniform
  or Gaussian noise has a neighbour correlation of about 0.

The content statistics are computed on a box-filtered reduction whose longer side is at most
``stats_size`` (default 256 px). The reduction uses an *integer* factor (non-overlapping block means),
so independent noise stays independent and the noise test does not depend on the original size; it
costs about 1 ms for a 512 px image and a few ms for a 4000 px one.

The thresholds were measured on the shared data (3,495 images, 10 originals, 2 DICOMs); see
``docs/data-io.md`` ("Plausibility gate") for the distributions and the margins. Override any of them::

    from covidcxr.data.io import read_xray
    from covidcxr.data.plausibility import InputChecks

    read_xray("thumb.png", checks=InputChecks(min_side=32))      # a smaller minimum size
    read_xray("strip.png", checks=InputChecks(max_aspect=10))     # a very elongated image
    read_xray("phantom.dcm", checks=InputChecks(content=False))   # size checks only
    read_xray("anything.png", checks=None)                        # no plausibility checks at all
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from covidcxr.errors import ImplausibleImageError

__all__ = ["InputChecks", "ContentStats", "content_stats", "check_plausible", "DEFAULT_CHECKS"]


@dataclass(frozen=True)
class InputChecks:
    """What :func:`check_plausible` requires of a decoded image (all thresholds can be overridden).

    ``min_side``: minimum pixels on *each* side. ``max_aspect``: maximum longer / shorter side.
    ``content``: run the content checks (near-constant, noise) at all. ``min_spread``: minimum
    1st-99th percentile range of the pixels in [0, 1]. ``min_std``: minimum standard deviation.
    ``min_neighbour_corr``: minimum correlation between neighbouring pixels (the mean of the
    horizontal and vertical correlations) on the reduced image. ``stats_size``: longer side of the
    reduced image the content statistics are computed on.
    """

    min_side: int = 64
    max_aspect: float = 4.0
    content: bool = True
    min_spread: float = 0.02
    min_std: float = 0.005
    min_neighbour_corr: float = 0.5
    stats_size: int = 256

    def __post_init__(self):
        if isinstance(self.min_side, bool) or not isinstance(self.min_side, (int, np.integer)) or self.min_side < 1:
            raise ValueError(f"InputChecks.min_side={self.min_side!r}: must be a positive integer")
        if not _is_number(self.max_aspect) or self.max_aspect < 1.0:
            raise ValueError(f"InputChecks.max_aspect={self.max_aspect!r}: must be a number >= 1")
        for key in ("min_spread", "min_std"):
            value = getattr(self, key)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"InputChecks.{key}={value!r}: must be a number in [0, 1)")
        if not _is_number(self.min_neighbour_corr) or not -1.0 <= self.min_neighbour_corr < 1.0:
            raise ValueError(f"InputChecks.min_neighbour_corr={self.min_neighbour_corr!r}: must be in [-1, 1)")
        if (isinstance(self.stats_size, bool) or not isinstance(self.stats_size, (int, np.integer))
                or self.stats_size < 16):
            raise ValueError(f"InputChecks.stats_size={self.stats_size!r}: must be an integer >= 16")


def _is_number(value) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


#: The default gate (what ``read_xray`` uses unless told otherwise).
DEFAULT_CHECKS = InputChecks()


@dataclass(frozen=True)
class ContentStats:
    """Content statistics of an image, measured on its reduction (see :func:`content_stats`)."""

    shape: tuple[int, int]          # the image's own shape
    reduced_shape: tuple[int, int]  # the shape the statistics were computed on
    mean: float                     # mean of the pixels
    std: float                      # standard deviation of the pixels
    spread: float                   # 99th - 1st percentile
    neighbour_corr: float           # mean of horizontal and vertical neighbour correlations (nan if constant)
    corr_horizontal: float
    corr_vertical: float


def reduce_for_stats(pixels: np.ndarray, size: int = 256) -> np.ndarray:
    """Block means by the smallest integer factor that brings the longer side to <= ``size``."""
    h, w = pixels.shape
    k = max(1, math.ceil(max(h, w) / size))
    if k == 1:
        return np.asarray(pixels, dtype=np.float32)
    hh, ww = (h // k) * k, (w // k) * k
    if hh < k or ww < k:  # a strip thinner than the factor: keep what there is
        k = max(1, min(h, w))
        hh, ww = (h // k) * k, (w // k) * k
    import cv2

    cropped = np.asarray(pixels[:hh, :ww], dtype=np.float32)  # a view for the reader's float32 pixels: no copy
    # INTER_AREA with an exact integer factor is the mean of non-overlapping k x k blocks.
    return cv2.resize(cropped, (ww // k, hh // k), interpolation=cv2.INTER_AREA)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if denom <= 0.0:
        return float("nan")
    return float((a * b).sum()) / denom


def content_stats(pixels: np.ndarray, size: int = 256) -> ContentStats:
    """Standard deviation, 1st-99th percentile spread and neighbour correlation of a 2-D image."""
    pixels = np.asarray(pixels)
    reduced = reduce_for_stats(pixels, size).astype(np.float64)
    flat = reduced.ravel()
    lo, hi = np.percentile(flat, [1.0, 99.0])
    ch = _corr(reduced[:, :-1], reduced[:, 1:]) if reduced.shape[1] > 1 else float("nan")
    cv = _corr(reduced[:-1, :], reduced[1:, :]) if reduced.shape[0] > 1 else float("nan")
    valid = [c for c in (ch, cv) if not math.isnan(c)]
    return ContentStats(shape=tuple(int(v) for v in pixels.shape), reduced_shape=tuple(int(v) for v in reduced.shape),
                        mean=float(flat.mean()), std=float(flat.std()), spread=float(hi - lo),
                        neighbour_corr=float(np.mean(valid)) if valid else float("nan"),
                        corr_horizontal=ch, corr_vertical=cv)


def check_plausible(pixels: np.ndarray, name="<image>", checks: InputChecks = DEFAULT_CHECKS) -> None:
    """Raise :class:`ImplausibleImageError` if ``pixels`` (H x W in [0, 1]) is not plausibly a radiograph.

    The reason names the check that failed, the measured value, the threshold and how to override it.
    """
    if checks is None:
        return
    if not isinstance(checks, InputChecks):
        raise TypeError(f"checks must be an InputChecks or None, not {type(checks).__name__}")
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ImplausibleImageError(name, f"implausible image: shape {pixels.shape} is not 2-D")
    h, w = (int(v) for v in pixels.shape)
    failed = []
    if min(h, w) < checks.min_side:
        failed.append(f"too small: {w} x {h} px, each side must be at least min_side={checks.min_side} px "
                      f"(override: InputChecks(min_side=...))")
    aspect = max(h, w) / max(1, min(h, w))
    if aspect > checks.max_aspect:
        failed.append(f"too elongated: {w} x {h} px has an aspect ratio of {aspect:,.1f}, more than "
                      f"max_aspect={checks.max_aspect:g} (override: InputChecks(max_aspect=...))")
    if failed:
        raise ImplausibleImageError(name, "implausible image, " + "; ".join(failed) + _OFF)
    if not checks.content:
        return
    stats = content_stats(pixels, checks.stats_size)
    if stats.spread < checks.min_spread or stats.std < checks.min_std:
        raise ImplausibleImageError(
            name, f"implausible image, near-constant content: 1st-99th percentile range {stats.spread:.4f} "
                  f"(min_spread={checks.min_spread:g}), standard deviation {stats.std:.4f} "
                  f"(min_std={checks.min_std:g}), mean {stats.mean:.3f} "
                  f"(blank, all black / white, constant grey or fully transparent; "
                  f"override: InputChecks(content=False))" + _OFF)
    if not stats.neighbour_corr >= checks.min_neighbour_corr:  # also refuses NaN
        raise ImplausibleImageError(
            name, f"implausible image, looks like noise: neighbouring pixels correlate at "
                  f"{stats.neighbour_corr:.3f}, below min_neighbour_corr={checks.min_neighbour_corr:g} "
                  f"(radiographs are smooth, > 0.85 on the shared data; override: "
                  f"InputChecks(min_neighbour_corr=...) or InputChecks(content=False))" + _OFF)


_OFF = "; checks=None skips all plausibility checks"
