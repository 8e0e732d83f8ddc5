"""A torch Dataset over a :class:`~covidcxr.data.manifest.Manifest`.

``CXRDataset(manifest, label_space, spec, augment=None)`` yields ``(tensor, target, index)``:
the C x S x S model input, the integer class index, and the row index in the dataset. The input goes
through the one pipeline of :mod:`covidcxr.data.preprocess` (working-size image from the cache ->
:func:`~covidcxr.data.preprocess.prepare` -> :func:`~covidcxr.data.preprocess.to_tensor`), so it is
bit-identical to what :func:`~covidcxr.data.preprocess.preprocess` gives inference for the same
file; the optional training augmentation ``augment(image, seed)`` runs on the prepared image.

Rows the label space excludes are dropped and counted (``excluded``); images that cannot be read
are skipped with their reason when the dataset is built with ``validate="decode"`` (``skipped``) -
nothing is dropped silently. With ``validate="exists"`` only missing files are skipped up front and
an image that later fails to decode stops with :class:`~covidcxr.errors.ImageReadError` naming it.

With a spec that crops to the lungs (``roi: lungs``) the dataset needs the run's ``lung_finder``
(:data:`covidcxr.data.lung_roi.LungFinder`); it finds every image's lungs once, up front (like
``validate="decode"``), so an image with no lungs is skipped with that reason before training starts,
and an image that fell back to the full image (``roi_fallback: full``) is listed in ``roi_fallbacks``.

An item may be requested as ``dataset[i]`` or ``dataset[(i, seed)]``; the seed fixes that item's
augmentation, which is how the training samplers make runs reproducible across worker counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from covidcxr.data.labels import LabelSpace, get_label_space
from covidcxr.data.lung_roi import LungFinder, LungROI, locate_lungs
from covidcxr.data.manifest import Manifest
from covidcxr.data.preprocess import PreprocessSpec, dequantise, prepare, to_tensor
from covidcxr.errors import ImageReadError

log = logging.getLogger(__name__)

#: ``augment(prepared image as a 1 x S x S float tensor in [0, 1], seed) -> same shape``
Augment = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class SkippedImage:
    row: int  # row in the manifest the dataset was built from
    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"row": self.row, "path": self.path, "reason": self.reason}


def load_working(path: str | Path, working_size: int) -> np.ndarray:
    """The uint16 working-size image of ``path`` (pipeline stage 1), read once through the cache."""
    return _cache(working_size).load_working(path)[0]


_CACHES: dict[tuple[str, int], object] = {}


def _cache(working_size: int):
    # One cache object per cache folder and size ($COVIDCXR_CACHE_DIR may change, e.g. between tests).
    from covidcxr import paths
    from covidcxr.data.cache import WorkingSizeCache

    key = (str(paths.cache_dir()), int(working_size))
    if key not in _CACHES:
        _CACHES[key] = WorkingSizeCache(working_size=int(working_size))
    return _CACHES[key]


class CXRDataset(Dataset):
    """Manifest rows -> ``(C x S x S tensor, class index, row index)``."""

    def __init__(self, manifest: Manifest, label_space: LabelSpace | str, spec: PreprocessSpec, *,
                 augment: Augment | None = None, validate: str = "exists",
                 memory_cache: bool = True, progress: bool = False, allow_outside_root: bool = False,
                 lung_finder: LungFinder | None = None):
        if validate not in ("decode", "exists"):
            raise ValueError(f"validate={validate!r}: use 'decode' or 'exists'")
        self.label_space = get_label_space(label_space) if not isinstance(label_space, LabelSpace) else label_space
        self.spec = spec.require_resolved()
        self.augment = augment
        self.lung_finder = lung_finder
        self._rois: dict[str, LungROI | None] = {}  # path -> the image's lung ROI (found once)
        keep, y = self.label_space.targets(manifest.table)
        self.excluded = int((~keep).sum())
        rows = np.flatnonzero(keep)
        # Rows pointing outside the data root (../../etc/passwd) are refused before any file is opened.
        paths = manifest.image_paths(check_root=not allow_outside_root)
        good = np.asarray([paths[r].is_file() for r in rows], dtype=bool)
        self.skipped: list[SkippedImage] = [SkippedImage(int(r), str(paths[r]), "file not found") for r in rows[~good]]
        self._memory: dict[int, np.ndarray] | None = {} if memory_cache else None  # index -> prepared uint16
        self.rows, self.targets = rows[good], y[good]
        self.paths = [paths[r] for r in self.rows]
        if validate == "decode" or spec.roi == "lungs":
            self._decode_all(progress)
        self.table = manifest.table.iloc[self.rows].reset_index(drop=True)
        self.sources = self.table["source"].to_numpy()
        for s in self.skipped:
            log.warning("skipping %s: %s", s.path, s.reason)

    def _decode_all(self, progress: bool) -> None:
        from covidcxr.progress import make_progress

        ok = np.ones(len(self.rows), dtype=bool)
        with make_progress("img", disable=not progress) as bar:
            what = "finding lungs" if self.spec.roi == "lungs" else "checking images"
            task = bar.add_task(what, total=len(self.rows))
            for i in range(len(self.rows)):
                try:
                    self._prepared(i)
                except ImageReadError as exc:
                    ok[i] = False
                    self.skipped.append(SkippedImage(int(self.rows[i]), str(self.paths[i]), exc.reason))
                bar.advance(task)
        if not ok.all():
            keep_memory = {}
            new_index = np.cumsum(ok) - 1
            for i, v in (self._memory or {}).items():
                if ok[i]:
                    keep_memory[int(new_index[i])] = v
            if self._memory is not None:
                self._memory = keep_memory
            self.rows, self.targets = self.rows[ok], self.targets[ok]
            self.paths = [p for p, k in zip(self.paths, ok) if k]

    # ------------------------------------------------------------------ access
    @property
    def classes(self) -> list[str]:
        return list(self.label_space.classes)

    @property
    def labels(self) -> list[str]:
        """Class name per item."""
        return [self.label_space.classes[t] for t in self.targets]

    def __len__(self) -> int:
        return len(self.rows)

    def roi(self, i: int, working: np.ndarray | None = None) -> LungROI | None:
        """Item ``i``'s lung ROI (None with ``roi: full``), found once per image."""
        key = str(self.paths[i])
        if key not in self._rois:
            if working is None:
                working = load_working(self.paths[i], self.spec.working_size)
            self._rois[key] = locate_lungs(working, self.spec, self.lung_finder, key)
        return self._rois[key]

    def _prepared(self, i: int) -> np.ndarray:
        """The prepared uint16 S x S image (pipeline stage 2), kept in memory after the first read."""
        if self._memory is not None and i in self._memory:
            return self._memory[i]
        working = load_working(self.paths[i], self.spec.working_size)
        img = prepare(working, self.spec, self.roi(i, working))
        if self._memory is not None:
            self._memory[i] = img
        return img

    def __getitem__(self, item: int | tuple[int, int]):
        i, seed = (item if isinstance(item, tuple) else (item, None))
        i = int(i)
        x = self._prepared(i)
        if self.augment is not None and seed is not None:
            x = self.augment(torch.from_numpy(dequantise(x))[None], seed)
        return to_tensor(x, self.spec), int(self.targets[i]), i

    def report(self) -> dict:
        """What was left out and why (stored in run.json)."""
        out = {"images": len(self), "excluded_by_label_space": self.excluded,
               "skipped": [s.to_dict() for s in self.skipped]}
        if self.spec.roi == "lungs":
            out["roi_fallbacks"] = [{"path": p, "reason": r.fallback} for p, r in self._rois.items()
                                    if r is not None and r.fallback is not None]
        return out


def class_counts(targets: Sequence[int], num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes)
