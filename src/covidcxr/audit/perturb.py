"""Altered copies of test images for the shortcut scorecard: markers, border-only, resolution, gamma.

Each copy is the original's decoded 8-bit pixels changed in one way and saved losslessly (PNG)
under ``folder/<kind>/``, keyed by the source file and the change, so it is written once and shared
by every run audited on the same images. The masks and re-encodings of the existing proxies
(:mod:`covidcxr.evaluation.proxy_images`: lungs removed / lungs only, JPEG re-saves) are used
as they are; only what they lack is here.

* ``marker_text``: an "AP PORTABLE"-style burnt-in label, white, in the top-left corner (where
  portable-unit labels and laterality markers usually sit), its height 4% of the image;
* ``marker_lateral``: a laterality letter "L" in the top-right corner, 6% of the image high;
* ``marker_border``: a thin white frame (1% of the longer side), as some scanners and exports add;
* ``border_only``: everything black except an outer frame of ``BORDER_SHARE`` of each side;
* ``lowres``: shrunk to 1/``LOWRES_FACTOR`` and enlarged back (area / linear);
* ``gamma_<g>``: intensity ``x ** g``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

#: border-only copies keep an outer frame of this share of each side.
BORDER_SHARE = 0.12
LOWRES_FACTOR = 4
GAMMAS = (0.7, 1.4)


def _text(u8: np.ndarray, text: str, height_share: float, corner: str) -> np.ndarray:
    h, w = u8.shape
    scale = height_share * h / 22.0  # cv2's Hershey simplex is ~22 px high at scale 1
    thick = max(1, round(scale * 2))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = round(0.03 * w)
    x = pad if corner == "left" else max(0, w - tw - pad)
    out = u8.copy()
    cv2.putText(out, text, (x, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    return out


def marker_text(u8):
    return _text(u8, "AP PORTABLE", 0.04, "left")


def marker_lateral(u8):
    return _text(u8, "L", 0.06, "right")


def marker_border(u8):
    out = u8.copy()
    t = max(1, round(0.01 * max(u8.shape)))
    out[:t], out[-t:], out[:, :t], out[:, -t:] = 255, 255, 255, 255
    return out


def border_only(u8):
    h, w = u8.shape
    bh, bw = max(1, round(BORDER_SHARE * h)), max(1, round(BORDER_SHARE * w))
    out = u8.copy()
    out[bh:h - bh, bw:w - bw] = 0
    return out


def lowres(u8):
    h, w = u8.shape
    small = cv2.resize(u8, (max(8, w // LOWRES_FACTOR), max(8, h // LOWRES_FACTOR)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def gamma(g: float) -> Callable[[np.ndarray], np.ndarray]:
    lut = np.round(255 * (np.arange(256) / 255.0) ** g).astype(np.uint8)
    return lambda u8: lut[u8]


#: name -> change; the scorecard's marker and perturbation checks use these names.
CHANGES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "marker_text": marker_text, "marker_lateral": marker_lateral, "marker_border": marker_border,
    "border_only": border_only, "lowres": lowres, **{f"gamma_{g:g}": gamma(g) for g in GAMMAS},
}
MARKERS = ("marker_text", "marker_lateral", "marker_border")


def altered_copies(paths: Sequence[str | Path], folder: str | Path, kind: str) -> list[Path]:
    """PNG copies of ``paths`` with change ``kind`` (one of :data:`CHANGES`) applied, written once."""
    from covidcxr.evaluation.proxy_images import _digest, _read_u8, _save

    change = CHANGES[kind]
    folder = Path(folder) / kind
    out = []
    for p in paths:
        target = folder / f"{_digest(kind, BORDER_SHARE, LOWRES_FACTOR, Path(p).resolve())}.png"
        if not target.exists():
            _save(change(_read_u8(p)), target, quality=None)
        out.append(target)
    return out
