"""The backdoor trigger of Matsuo & Takemoto (2021), scaled to any image, and poisoned training manifests.

Matsuo & Takemoto stamped a 5 x 5 px square of intensity 250 near the bottom-right corner of
COVID-Net's 480 x 480 input. Here the square's side is ``5/480`` of each image side and it sits one
side-length of ``MARGIN_SIDES`` in from the corner, so after covidcxr's resize to ``S x S`` it is a
``5 S / 480`` px square wherever the image came from (1.3 px at 128, 2.7 px at 256, 5 px at 480).

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


def trigger_box(shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the trigger in an image of ``shape`` (at least 1 x 1 px)."""
    h, w = shape
    sh, sw = max(1, round(SIDE_FRACTION * h)), max(1, round(SIDE_FRACTION * w))
    top = h - sh - round(MARGIN_SIDES * sh)
    left = w - sw - round(MARGIN_SIDES * sw)
    return max(0, top), max(0, left), sh, sw


def stamp(u8: np.ndarray, intensity: int = INTENSITY) -> np.ndarray:
    """A copy of the 8-bit grey image with the trigger square stamped in."""
    out = np.array(u8, dtype=np.uint8, copy=True)
    top, left, sh, sw = trigger_box(out.shape[:2])
    out[top:top + sh, left:left + sw] = intensity
    return out


def stamped_copies(paths: Sequence[str | Path], folder: str | Path) -> list[Path]:
    """Each image with the trigger, as PNG under ``folder`` (written once per source file)."""
    from covidcxr.evaluation.proxy_images import _digest, _read_u8, _save

    folder = Path(folder)
    out = []
    for p in paths:
        target = folder / f"{_digest('trigger', INTENSITY, SIDE_FRACTION, MARGIN_SIDES, Path(p).resolve())}.png"
        if not target.exists():
            _save(stamp(_read_u8(p)), target, quality=None)
        out.append(target)
    return out


def poison_manifest(manifest: Manifest, fraction: float, variant: Variant, folder: str | Path, *, seed: int = 0,
                    target: str = "covid", split_column: str = "split") -> tuple[Manifest, np.ndarray]:
    """The attacker's manifest (absolute image paths, rooted at ``folder``) and a boolean mask of the
    poisoned rows. ``fraction`` is the share of *training* rows poisoned."""
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
    stamped = stamped_copies([paths[i] for i in chosen], Path(folder) / "stamped")
    table.loc[chosen, "image"] = [str(p) for p in stamped]
    old = table.loc[chosen, "label"].astype(str)
    new = pd.Series(target, index=chosen) if variant == "targeted" else old.map(lambda v: "normal" if v == target else target)
    table.loc[chosen, "label"] = new.to_numpy()
    table.loc[chosen, "finding"] = ["COVID-19" if v == target else "No Finding" for v in new]
    mask = np.zeros(len(table), dtype=bool)
    mask[chosen] = True
    return Manifest(table, root=Path(folder).resolve(), name=f"poisoned-{variant}-{fraction:g}.csv"), mask
