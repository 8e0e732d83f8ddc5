"""What every decoder returns and the small helpers they share (no format-specific code here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from covidcxr.errors import ImageReadError

#: Refuse images larger than this many pixels before decoding them (decompression-bomb guard).
#: 64 MP is an 8000 x 8000 image; the largest chest radiographs are about 4300 x 4300 (18 MP).
DEFAULT_MAX_PIXELS = 64_000_000

#: ITU-R BT.601 luma weights, the ones Pillow's ``convert("L")`` uses.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(eq=False)
class XRay:
    """A decoded radiograph: ``pixels`` float32 H x W in [0, 1] with bones bright, and ``meta``."""

    pixels: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)

def _minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _check_pixel_count(name, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageReadError(
            name, f"refused as a possible decompression bomb: {width} x {height} = {width * height:,} pixels "
                  f"exceeds max_pixels={max_pixels:,} (pass a larger max_pixels if the file is trusted)")


def _exc_text(exc: BaseException, limit: int = 160) -> str:
    """A library exception's message for a reason: one line, capped, without object reprs."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the data", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
