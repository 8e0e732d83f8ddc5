"""The derived images the proxies score: JPEG / PNG re-saves and lungs-removed copies (written once, reused)."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError

#: JPEG qualities of the compression proxy (q90 is how the shared images are stored).
QUALITIES = (90, 70, 50)
#: A pixel belongs to the lung template when at least this share of the annotated lungs covers it.
TEMPLATE_LEVEL = 0.3
TEMPLATE_SIZE = 128


# ---------------------------------------------------------------- derived images (written once, reused)


def _digest(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _read_u8(path: str | Path) -> np.ndarray:
    from covidcxr.data.io import read_xray

    return np.round(np.clip(read_xray(path).pixels, 0, 1) * 255).astype(np.uint8)


def _save(u8: np.ndarray, path: Path, quality: int | None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp" + path.suffix)
        img = Image.fromarray(u8, mode="L")
        if quality is None:
            img.save(tmp, format="PNG")
        else:
            img.save(tmp, format="JPEG", quality=int(quality))
        tmp.replace(path)
    return path


def resaved_copies(paths: Sequence[str], folder: str | Path, qualities: Sequence[int] = QUALITIES
                   ) -> dict[str, list[Path]]:
    """``{"png": [...], "q90": [...], ...}``: each image's decoded pixels re-saved losslessly and as JPEG."""
    folder = Path(folder)
    out: dict[str, list[Path]] = {"png": []} | {f"q{q}": [] for q in qualities}
    for p in paths:
        key = _digest(Path(p).resolve())
        targets = {"png": folder / "png" / f"{key}.png"} | {f"q{q}": folder / f"q{q}" / f"{key}.jpg" for q in qualities}
        if not all(t.exists() for t in targets.values()):
            u8 = _read_u8(p)
            _save(u8, targets["png"], None)
            for q in qualities:
                _save(u8, targets[f"q{q}"], q)
        for k, t in targets.items():
            out[k].append(t)
    return out


@lru_cache(maxsize=4)
def lung_template(annotations_folder: str, size: int = TEMPLATE_SIZE, level: float = TEMPLATE_LEVEL) -> np.ndarray:
    """bool size x size: where at least ``level`` of the annotated lungs lie (image stretched to a square).

    Built from every annotated image's preferred lung region (v7labs, else lungVAE, else boxes) of
    the shared annotations; one template for every image, so masking carries no class information.
    """
    import cv2

    from covidcxr.data.annotations import Annotations

    ann = Annotations(annotations_folder)
    acc, n = np.zeros((size, size), dtype=np.float64), 0
    for key in ann.index.index:
        path = ann.root / key
        if not path.is_file():
            continue
        shape = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).shape
        region = ann.lung_region(key, shape)
        if region is None:
            continue
        acc += cv2.resize(region.lung.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        n += 1
    if not n:
        raise CovidCXRError(f"{annotations_folder}: no lung regions to build a template from")
    return (acc / n) >= level


def _template_at(template: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(template.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def masked_copies(paths: Sequence[str], folder: str | Path, template: np.ndarray, annotations=None, *,
                  lung_of=None, lung_key: str = "") -> dict[str, list[Path | None]]:
    """PNG copies with the lungs black (``no_lungs``), all but the lungs black (``lungs_only``) and, for
    annotated images, their own annotated lung region black (``own_lungs_removed``, else None).

    The lungs are the ``template`` resized to each image, or, with ``lung_of(path, shape) -> bool mask``
    (e.g. :func:`segmented_lungs`), each image's own lungs; ``lung_key`` names that source in the cache key.
    """
    folder = Path(folder)
    tkey = _digest(template.shape, hashlib.sha256(np.packbits(template).tobytes()).hexdigest()) if lung_of is None \
        else _digest("lungs", lung_key)
    out: dict[str, list] = {"no_lungs": [], "lungs_only": [], "own_lungs_removed": []}
    for p in paths:
        key = _digest(Path(p).resolve(), tkey)
        t_no, t_only = folder / "no_lungs" / f"{key}.png", folder / "lungs_only" / f"{key}.png"
        t_own = folder / "own_lungs_removed" / f"{key}.png"
        region_kinds = annotations.available(p) if annotations is not None else []
        need = [t_no, t_only] + ([t_own] if region_kinds else [])
        if not all(t.exists() for t in need):
            u8 = _read_u8(p)
            lung = _template_at(template, u8.shape) if lung_of is None else lung_of(p, u8.shape)
            _save(np.where(lung, 0, u8).astype(np.uint8), t_no, None)
            _save(np.where(lung, u8, 0).astype(np.uint8), t_only, None)
            if region_kinds:
                region = annotations.lung_region(p, u8.shape)
                _save(np.where(region.lung, 0, u8).astype(np.uint8), t_own, None)
        out["no_lungs"].append(t_no)
        out["lungs_only"].append(t_only)
        out["own_lungs_removed"].append(t_own if region_kinds else None)
    return out


#: How far the scorecard grows each segmented lung mask (share of the image side): the lung rim goes too.
LUNG_DILATE = 0.03


def segmented_lungs(lung_finder, *, working_size: int = 512, dilate: float = LUNG_DILATE):
    """``lung_of(path, shape)`` for :func:`masked_copies`: the segmenter's lungs of each image, dilated by
    ``dilate`` of the image side, at the original image's shape."""
    import cv2

    from covidcxr.data.dataset import load_working
    from covidcxr.data.lung_roi import dilated, find_lungs

    def lung_of(path, shape: tuple[int, int]) -> np.ndarray:
        mask = dilated(find_lungs(load_working(path, working_size), lung_finder, str(path)), dilate)
        return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)

    return lung_of
