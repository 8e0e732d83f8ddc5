"""``covidcxr segment predict``: lung masks for many images, none silently dropped.

For every input image it writes ``OUT/masks/<name>.png`` (0 / 255, in the geometry of the decoded
image: the file's own pixel grid, a DICOM at full resolution) and one row of ``OUT/lungs.csv``: the
lung box (x0, y0, x1, y1, exclusive ends, in that image's pixels), the lung area fraction and the
number of lung components found. An input that is not used gets one row in ``OUT/skipped.csv`` with
its reason: unreadable or implausible (blank, noise; the project's reader and plausibility gate), or
no lungs found (the predicted lung area is below ``min_lung_fraction`` of the image).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd

from covidcxr.data.io import read_xray
from covidcxr.data.plausibility import DEFAULT_CHECKS, InputChecks
from covidcxr.errors import CovidCXRError, ImageReadError
from covidcxr.files import atomic_write_bytes, write_csv
from covidcxr.models.segmenter import load_segmenter

LUNGS_CSV = "lungs.csv"
SKIPPED_CSV = "skipped.csv"
MASK_DIR = "masks"
#: Below this predicted lung share of the image the image is reported as "no lungs found".
MIN_LUNG_FRACTION = 0.02
_COLUMNS = ["image", "mask", "width", "height", "lung_fraction", "box_x0", "box_y0", "box_x1", "box_y1", "components"]


@dataclass
class SegmentResult:
    out: Path
    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"  skipped {name}: {reason}" for name, reason in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more")
        lines.append(f"{len(self.rows)} masks written to {self.out / MASK_DIR}, lungs in {self.out / LUNGS_CSV}; "
                     f"{len(self.skipped)} skipped (reasons in {self.out / SKIPPED_CSV})")
        return "\n".join(lines)


def _mask_name(path: Path, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:120] or "image"
    name, k = f"{stem}.png", 1
    while name in used:
        k += 1
        name = f"{stem}-{k}.png"
    used.add(name)
    return name


def lung_row(mask: np.ndarray) -> dict:
    """Box, area fraction and component count of a bool lung mask."""
    ys, xs = np.nonzero(mask)
    n = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1
    if len(xs) == 0:
        return {"lung_fraction": 0.0, "box_x0": None, "box_y0": None, "box_x1": None, "box_y1": None, "components": 0}
    return {"lung_fraction": float(mask.mean()), "box_x0": int(xs.min()), "box_y0": int(ys.min()),
            "box_x1": int(xs.max()) + 1, "box_y1": int(ys.max()) + 1, "components": int(n)}


def segment_images(run_dir: str | Path, images: Sequence[str | Path], out: str | Path, *,
                   checks: InputChecks | None = DEFAULT_CHECKS, min_lung_fraction: float = MIN_LUNG_FRACTION,
                   allow_non_frontal: bool = False) -> SegmentResult:
    """Predict and write lung masks for ``images`` (see the module docstring); returns what was done."""
    seg = load_segmenter(run_dir)
    out = Path(out)
    (out / MASK_DIR).mkdir(parents=True, exist_ok=True)
    result, used = SegmentResult(out=out), set()
    for image in images:
        path = Path(image)
        try:
            pixels = read_xray(path, checks=checks, allow_non_frontal=allow_non_frontal).pixels
        except ImageReadError as exc:
            result.skipped.append((str(path), exc.reason if hasattr(exc, "reason") else str(exc)))
            continue
        except CovidCXRError as exc:
            result.skipped.append((str(path), str(exc)))
            continue
        mask = seg.predict_masks([pixels])[0]
        row = lung_row(mask)
        if row["lung_fraction"] < min_lung_fraction:
            result.skipped.append((str(path), f"no lungs found: predicted lung area {row['lung_fraction']:.1%} of "
                                              f"the image (< {min_lung_fraction:.0%})"))
            continue
        name = _mask_name(path, used)
        ok, png = cv2.imencode(".png", mask.astype(np.uint8) * 255)
        if not ok:  # pragma: no cover - encoding a uint8 array does not fail
            result.skipped.append((str(path), "mask could not be encoded as PNG"))
            continue
        atomic_write_bytes(out / MASK_DIR / name, png.tobytes(), fsync=False)
        h, w = mask.shape
        result.rows.append({"image": str(path), "mask": f"{MASK_DIR}/{name}", "width": w, "height": h, **row})
    write_csv(out / LUNGS_CSV, pd.DataFrame(result.rows, columns=_COLUMNS), float_format="%.6g")
    write_csv(out / SKIPPED_CSV, pd.DataFrame(result.skipped, columns=["image", "reason"]))
    return result
