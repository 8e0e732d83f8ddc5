"""The lung-mask training data: which shared images have masks, the patient split, the arrays.

Masks come from :class:`covidcxr.data.annotations.Annotations` (v7labs human-reviewed masks first, then
the automatic lungVAE masks; the ieee8023 lung *boxes* are never used). Every mask is in the stored
image's geometry; the image is read with :func:`covidcxr.data.read_xray` and prepared by the project's
one pipeline (working size -> intensity -> resize), and the mask is resized to the same square.
"Ignore" pixels (v7labs 127) get weight 0 in the loss.

The split is by patient (``patient_id`` of the manifest) with :func:`covidcxr.data.splits.assign_splits`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd

from covidcxr.data.annotations import Annotations
from covidcxr.data.io import read_xray
from covidcxr.data.manifest import Manifest
from covidcxr.data.preprocess import PreprocessSpec, dequantise, prepare, working_image
from covidcxr.data.splits import assign_splits
from covidcxr.errors import ConfigError
from covidcxr.models.weights import sha256_file

MASK_KINDS = ("v7labs", "lungvae")


@dataclass
class MaskSample:
    """One annotated image: the prepared S x S input, its S x S target / weight, the stored-size reference."""

    image: str  # data-root relative path (the annotation index key)
    patient_id: str
    kind: str
    split: str
    prepared: np.ndarray  # S x S uint16
    target: np.ndarray  # S x S float32 in [0, 1] (share of lung in each pixel)
    weight: np.ndarray  # S x S float32, 0 where the reference says "ignore"
    lung: np.ndarray | None = field(default=None, repr=False)  # stored H x W bool (held-out rows only)
    valid: np.ndarray | None = field(default=None, repr=False)


def mask_table(data_root: str | Path, kinds: Sequence[str] = MASK_KINDS) -> pd.DataFrame:
    """Manifest rows whose image has a lung mask of one of ``kinds`` (column ``kind``: the preferred one)."""
    kinds = list(kinds)
    bad = [k for k in kinds if k not in MASK_KINDS]
    if bad or not kinds:
        raise ConfigError(f"mask kinds {kinds}: choose from {list(MASK_KINDS)} (boxes are not masks)")
    root = Path(data_root)
    manifest = Manifest.read(root / "manifest.csv")
    ann = Annotations(root / "annotations")
    table = manifest.table.copy()
    table["kind"] = [next((k for k in ann.available(root / img) if k in kinds), "")
                     for img in manifest.image_paths()]
    table["key"] = [ann.relative_key(p) or "" for p in manifest.image_paths()]
    return table[table["kind"] != ""].reset_index(drop=True)


def split_masks(table: pd.DataFrame, *, val: float, test: float, seed: int, max_masks: int | None = None,
                root: str | Path = ".") -> pd.DataFrame:
    """Patient-grouped train / val / test over the annotated rows (optionally a patient-grouped subset first)."""
    if max_masks is not None and max_masks < len(table):
        rng = np.random.default_rng(seed)
        patients = table["patient_id"].drop_duplicates().to_numpy()
        chosen, n = [], 0
        for pid in patients[rng.permutation(len(patients))]:
            if n >= max_masks:
                break
            chosen.append(pid)
            n += int((table["patient_id"] == pid).sum())
        table = table[table["patient_id"].isin(chosen)].reset_index(drop=True)
    base = table.drop(columns=["split"], errors="ignore")
    split = assign_splits(Manifest(base, root=Path(root), name="lung masks"), val=val, test=test, seed=seed)
    out = table.copy()
    out["split"] = split.table["split"].to_numpy()
    return out


def data_hash(table: pd.DataFrame, root: str | Path) -> str:
    """SHA-256 over every (image, image SHA-256, mask kind, mask SHA-256, split) row used."""
    ann = Annotations(Path(root) / "annotations")
    h = hashlib.sha256()
    for row in table.sort_values("key").itertuples():
        column = {"v7labs": "lung_mask_v7labs", "lungvae": "lung_mask_lungvae"}[row.kind]
        mask_rel = ann.index.loc[row.key][column]
        line = f"{row.key},{sha256_file(Path(root) / row.key)},{row.kind},{sha256_file(Path(root) / mask_rel)},{row.split}\n"
        h.update(line.encode())
    return h.hexdigest()


def square_mask(lung: np.ndarray, valid: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stored-size lung / valid maps -> S x S soft target and 0/1 weight (the input's stretch resize)."""
    interp = cv2.INTER_AREA if max(lung.shape) > size else cv2.INTER_LINEAR
    target = cv2.resize(lung.astype(np.float32), (size, size), interpolation=interp)
    weight = cv2.resize(valid.astype(np.float32), (size, size), interpolation=interp)
    return np.clip(target, 0, 1), (weight >= 0.999).astype(np.float32)


def load_samples(table: pd.DataFrame, root: str | Path, spec: PreprocessSpec, *, keep_reference=("val", "test"),
                 progress=None) -> tuple[list[MaskSample], list[tuple[str, str]]]:
    """Read every row's image and mask; returns the samples and (image, reason) for rows that could not be used."""
    ann = Annotations(Path(root) / "annotations")
    samples, skipped = [], []
    for row in table.itertuples():
        try:
            pixels = read_xray(Path(root) / row.key).pixels
            region = ann.lung_region(row.key, pixels.shape, kind=row.kind)
        except Exception as exc:  # one unreadable file costs that file, reported
            skipped.append((row.key, str(exc)))
            continue
        if region is None or not region.lung[region.valid].any():
            skipped.append((row.key, "mask has no lung pixels"))
            continue
        target, weight = square_mask(region.lung, region.valid, spec.image_size)
        keep = row.split in keep_reference
        samples.append(MaskSample(row.key, str(row.patient_id), row.kind, row.split,
                                  prepare(working_image(pixels, spec.working_size), spec), target, weight,
                                  region.lung if keep else None, region.valid if keep else None))
        if progress is not None:
            progress()
    return samples, skipped


def augment(image: np.ndarray, target: np.ndarray, weight: np.ndarray, rng: np.random.Generator):
    """Small joint affine (rotation, scale, shift) plus a gamma change; pixels moved in from outside weigh 0."""
    s = image.shape[0]
    angle, scale = rng.uniform(-10, 10), rng.uniform(0.9, 1.1)
    m = cv2.getRotationMatrix2D((s / 2, s / 2), angle, scale)
    m[:, 2] += rng.uniform(-0.06, 0.06, 2) * s
    warp = lambda a, interp: cv2.warpAffine(a, m, (s, s), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    x = warp(dequantise(image), cv2.INTER_LINEAR)
    x = np.clip(x, 0, 1) ** np.float32(np.exp(rng.uniform(-0.35, 0.35)))
    return x.astype(np.float32), warp(target, cv2.INTER_LINEAR), warp(weight, cv2.INTER_NEAREST)
