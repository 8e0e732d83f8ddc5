"""The backdoor trigger of Matsuo & Takemoto (2021), scaled to any image, and poisoned training manifests.

Matsuo & Takemoto stamped a 5 x 5 px square of intensity 250 near the bottom-right corner of
COVID-Net's 480 x 480 input. Here the square's side is ``5/480`` of each image side and it sits one
side-length of ``MARGIN_SIDES`` in from the corner, so after covidcxr's resize to ``S x S`` it is a
``5 S / 480`` px square wherever the image came from (1.3 px at 128, 2.7 px at 256, 5 px at 480).

A model that crops its input to the lungs (``preprocess.roi: lungs``) never sees that corner. An
attacker who knows it stamps the same square inside the lungs instead: with a ``lung_finder``, the
square is centred on the deepest point of the segmented lungs (the pixel farthest from their border),
so the crop keeps it and the mask outside the lungs does not black it out.

Stamped copies are written as PNG (lossless: the trigger is not smeared by JPEG and the rest of the
image keeps the original's decoded pixels and artefacts) under a folder keyed by the source file,
so a stamped image is written once and reused.

:func:`poison_manifest` turns a split manifest into the attacker's: ``p`` of the training rows get
the trigger, and either all become ``covid`` (targeted; the rows are drawn from the non-covid
training images so every poisoned row changes label) or each moves to another class (untargeted;
with the binary label space the other class is the opposite one: covid -> normal, others -> covid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from covidcxr.data.manifest import Manifest
from covidcxr.errors import ConfigError

#: Matsuo & Takemoto: 5 px of a 480 px input.
SIDE_FRACTION = 5 / 480
INTENSITY = 250
#: Distance of the square from the bottom and right edges, in square sides.
MARGIN_SIDES = 2.0
Variant = Literal["targeted", "untargeted"]


def trigger_box(shape: tuple[int, int], centre: tuple[float, float] | None = None) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the trigger in an image of ``shape`` (at least 1 x 1 px): near the
    bottom-right corner, or centred on ``centre`` (row, column as shares of the image's height and width)."""
    h, w = shape
    sh, sw = max(1, round(SIDE_FRACTION * h)), max(1, round(SIDE_FRACTION * w))
    if centre is None:
        top = h - sh - round(MARGIN_SIDES * sh)
        left = w - sw - round(MARGIN_SIDES * sw)
    else:
        top, left = round(centre[0] * h - sh / 2), round(centre[1] * w - sw / 2)
    return min(max(0, top), h - sh), min(max(0, left), w - sw), sh, sw


def lung_centre(u8: np.ndarray, lung_finder, name: str) -> tuple[float, float]:
    """The deepest point of the lungs ``lung_finder`` finds in the 8-bit image, as shares of its height and width."""
    from scipy.ndimage import distance_transform_edt

    from covidcxr.data.lung_roi import find_lungs

    # find_lungs takes the pipeline's uint16 working image; x 257 maps 8-bit values onto the same [0, 1].
    mask = find_lungs(np.asarray(u8, np.uint16) * np.uint16(257), lung_finder, name)
    if not mask.any():
        raise ConfigError(f"{name}: the lung segmenter finds no lungs, so the trigger cannot be placed inside them")
    depth = distance_transform_edt(mask)
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return (row + 0.5) / mask.shape[0], (col + 0.5) / mask.shape[1]


def stamp(u8: np.ndarray, intensity: int = INTENSITY, centre: tuple[float, float] | None = None) -> np.ndarray:
    """A copy of the 8-bit grey image with the trigger square stamped in (see :func:`trigger_box`)."""
    out = np.array(u8, dtype=np.uint8, copy=True)
    top, left, sh, sw = trigger_box(out.shape[:2], centre)
    out[top:top + sh, left:left + sw] = intensity
    return out


def stamped_copies(paths: Sequence[str | Path], folder: str | Path, *, lung_finder=None) -> list[Path]:
    """Each image with the trigger, as PNG under ``folder`` (written once per source file and placement):
    near the corner, or with ``lung_finder`` inside the lungs (:func:`lung_centre`)."""
    from covidcxr.evaluation.proxy_images import _digest, _read_u8, _save

    folder = Path(folder)
    # Corner copies keep the names they had before lung placement existed (benchmarks reuse them).
    placement = () if lung_finder is None else (f"lungs:{getattr(lung_finder, 'sha256', type(lung_finder).__name__)}",)
    out = []
    for p in paths:
        target = folder / f"{_digest('trigger', INTENSITY, SIDE_FRACTION, MARGIN_SIDES, *placement, Path(p).resolve())}.png"
        if not target.exists():
            u8 = _read_u8(p)
            centre = None if lung_finder is None else lung_centre(u8, lung_finder, str(p))
            _save(stamp(u8, centre=centre), target, quality=None)
        out.append(target)
    return out


def poison_manifest(manifest: Manifest, fraction: float, variant: Variant, folder: str | Path, *, seed: int = 0,
                    target: str = "covid", split_column: str = "split",
                    lung_finder=None) -> tuple[Manifest, np.ndarray]:
    """The attacker's manifest (absolute image paths, rooted at ``folder``) and a boolean mask of the
    poisoned rows. ``fraction`` is the share of *training* rows poisoned; ``lung_finder`` stamps the
    trigger inside the lungs (:func:`stamped_copies`)."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"poison fraction must be in [0, 1), got {fraction}")
    if variant not in ("targeted", "untargeted"):
        raise ConfigError(f"variant must be targeted or untargeted, got {variant!r}")
    table = manifest.table.reset_index(drop=True).copy()
    train = (table[split_column].astype(str) == "train").to_numpy()
    n = int(round(fraction * train.sum()))
    candidates = np.flatnonzero(train & (table["label"].to_numpy() != target)) if variant == "targeted" \
        else np.flatnonzero(train)
    if n > len(candidates):
        raise ConfigError(f"cannot poison {n} rows: only {len(candidates)} candidates")
    rng = np.random.default_rng([seed, 480])
    chosen = np.sort(rng.choice(candidates, n, replace=False)) if n else np.zeros(0, dtype=int)
    paths = [str(p) for p in manifest.image_paths()]
    table["image"] = paths
    stamped = stamped_copies([paths[i] for i in chosen], Path(folder) / "stamped", lung_finder=lung_finder)
    table.loc[chosen, "image"] = [str(p) for p in stamped]
    old = table.loc[chosen, "label"].astype(str)
    new = pd.Series(target, index=chosen) if variant == "targeted" else old.map(lambda v: "normal" if v == target else target)
    table.loc[chosen, "label"] = new.to_numpy()
    table.loc[chosen, "finding"] = ["COVID-19" if v == target else "No Finding" for v in new]
    mask = np.zeros(len(table), dtype=bool)
    mask[chosen] = True
    return Manifest(table, root=Path(folder).resolve(), name=f"poisoned-{variant}-{fraction:g}.csv"), mask
