"""Lung regions and severity scores from the shared annotations folder.

``annotations/index.csv`` maps each annotated image (path relative to the data root, e.g.
``images/ieee8023/covid/x.jpg``) to what exists for it. Three kinds of lung region, in the order
they are preferred (best first):

* ``v7labs``: human-reviewed lung polygons rasterised to PNG; 255 = lung (including the lung behind
  the heart), 127 = "ignore" (pacemakers, large devices, markup), 0 = outside.
* ``lungvae``: automatic lungVAE masks, 0 / 255 (they leave out the retro-cardiac lung).
* ``bbox``: the ieee8023 right / left lung boxes (x, y, w, h in stored-image pixels); their union.

All regions are in the geometry of the stored image, the one :func:`covidcxr.data.read_xray` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError

INDEX_CSV = "index.csv"
BOXES_CSV = "lung_bboxes_ieee8023.csv"
SEVERITY_CSV = "covid_severity_scores_ieee8023.csv"
#: Mask kinds in order of preference (human-reviewed first).
REGION_KINDS = ("v7labs", "lungvae", "bbox")
_INDEX_COLUMN = {"v7labs": "lung_mask_v7labs", "lungvae": "lung_mask_lungvae", "bbox": "lung_bbox_ieee8023"}
V7_LUNG, V7_IGNORE = 255, 127


@dataclass(frozen=True)
class LungRegion:
    """Where the lungs are in one stored image.

    ``lung``: bool H x W, True inside the lungs. ``valid``: bool H x W, False where the annotation says
    "ignore" (v7labs value 127); such pixels count neither inside nor outside the lungs.
    """

    lung: np.ndarray
    valid: np.ndarray
    kind: str
    source: str

    @property
    def area_share(self) -> float:
        """Share of valid pixels inside the lungs: what a uniform heatmap scores."""
        return float(self.lung[self.valid].mean()) if self.valid.any() else float("nan")


class Annotations:
    """The annotations folder of a CXR data root (default ``<data_root>/annotations``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_CSV
        if not index.is_file():
            raise CovidCXRError(f"{index}: annotation index not found; pass the data root's annotations/ folder")
        self.root = self.folder.parent  # index.csv paths are relative to the data root
        self.index = pd.read_csv(index, dtype=str, keep_default_na=False).set_index("image")

    def relative_key(self, image: str | Path) -> str | None:
        """The index key of an image path (absolute, or relative to the data root); None if not annotated."""
        p = Path(image)
        if not p.is_absolute():
            key = p.as_posix()
            if key in self.index.index:
                return key
            p = Path.cwd() / p
        try:
            key = p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return None
        return key if key in self.index.index else None

    def available(self, image: str | Path) -> list[str]:
        """The region kinds annotated for ``image`` (preferred first)."""
        key = self.relative_key(image)
        if key is None:
            return []
        row = self.index.loc[key]
        out = []
        for kind in REGION_KINDS:
            value = row[_INDEX_COLUMN[kind]]
            if value and value != "0":
                out.append(kind)
        return out

    def lung_region(self, image: str | Path, shape: tuple[int, int], kind: str | None = None) -> LungRegion | None:
        """The best (or the named) lung region of ``image`` with the given stored-image ``shape``; None if none."""
        kinds = self.available(image)
        if kind is not None:
            if kind not in REGION_KINDS:
                raise CovidCXRError(f"lung region kind {kind!r}: choose one of {REGION_KINDS}")
            kinds = [k for k in kinds if k == kind]
        if not kinds:
            return None
        key = self.relative_key(image)
        chosen = kinds[0]
        if chosen == "bbox":
            return self._box_region(key, shape)
        return self._mask_region(key, chosen, self.index.loc[key][_INDEX_COLUMN[chosen]], shape)

    def _mask_region(self, key: str, kind: str, rel: str, shape: tuple[int, int]) -> LungRegion:
        import cv2

        path = self.root / rel
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise CovidCXRError(f"{path}: lung mask cannot be read")
        if mask.shape != tuple(shape):
            raise CovidCXRError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but the image {key} is "
                                f"{shape[1]}x{shape[0]}; masks must match the stored image")
        if kind == "v7labs":
            lung, valid = mask == V7_LUNG, mask != V7_IGNORE
        else:
            lung, valid = mask > 127, np.ones(mask.shape, dtype=bool)
        return LungRegion(lung=lung, valid=valid, kind=kind, source=str(path))

    def _box_region(self, key: str, shape: tuple[int, int]) -> LungRegion:
        boxes = _read_boxes(self.folder / BOXES_CSV)
        rows = boxes[boxes["image"] == key]
        lung = np.zeros(shape, dtype=bool)
        h, w = shape
        for r in rows.itertuples():
            # Boxes are in continuous pixel coordinates; a pixel is inside when its centre is.
            x0, y0 = int(np.ceil(r.x - 0.5)), int(np.ceil(r.y - 0.5))
            x1, y1 = int(np.floor(r.x + r.w - 0.5)) + 1, int(np.floor(r.y + r.h - 0.5)) + 1
            lung[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = True
        return LungRegion(lung=lung, valid=np.ones(shape, dtype=bool), kind="bbox", source=str(self.folder / BOXES_CSV))

    def severity_scores(self) -> pd.DataFrame:
        """The 92 expert-scored images: ``image`` (data-root relative), ``geographic_extent_mean``, ``opacity_mean``."""
        path = self.folder / SEVERITY_CSV
        if not path.is_file():
            raise CovidCXRError(f"{path}: severity scores not found")
        return pd.read_csv(path)


@lru_cache(maxsize=4)
def _read_boxes(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise CovidCXRError(f"{path}: lung box file not found")
    return pd.read_csv(path)
