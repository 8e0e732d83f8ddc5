"""A torch Dataset over a :class:`~covidcxr.data.manifest.Manifest`.

``CXRDataset(manifest, label_space, spec, augment=None)`` yields ``(tensor, target, index)``:
the C x S x S model input (preprocessed exactly as :func:`covidcxr.data.preprocess.preprocess` does
at inference, with the optional training augmentation between the geometric/intensity step and
normalisation), the integer class index, and the row index in the dataset.

Rows the label space excludes are dropped and counted (``excluded``); images that cannot be read
are skipped with their reason when the dataset is built with ``validate="decode"`` (``skipped``) -
nothing is dropped silently. With ``validate="exists"`` only missing files are skipped up front and
an image that later fails to decode stops with :class:`~covidcxr.errors.ImageReadError` naming it.

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
from covidcxr.data.manifest import Manifest
from covidcxr.data.preprocess import PreprocessSpec, prepare_image, to_model_input
from covidcxr.errors import ImageReadError

log = logging.getLogger(__name__)

#: Images are read at this longer side (or smaller; never upscaled) before preprocessing.
WORKING_SIZE = 512


@dataclass(frozen=True)
class SkippedImage:
    row: int  # row in the manifest the dataset was built from
    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"row": self.row, "path": self.path, "reason": self.reason}


def load_pixels(path: str | Path) -> np.ndarray:
    """Float32 H x W image in [0, 1] at working size, read once through the working-size cache."""
    return _cache().load(path)


_CACHES: dict[str, object] = {}


def _cache():
    # One cache object per cache folder ($COVIDCXR_CACHE_DIR may change, e.g. between tests).
    from covidcxr import paths
    from covidcxr.data.cache import WorkingSizeCache

    root = str(paths.cache_dir())
    if root not in _CACHES:
        _CACHES[root] = WorkingSizeCache(working_size=WORKING_SIZE)
    return _CACHES[root]


class CXRDataset(Dataset):
    """Manifest rows -> ``(C x S x S tensor, class index, row index)``."""

    def __init__(self, manifest: Manifest, label_space: LabelSpace | str, spec: PreprocessSpec, *,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None, validate: str = "exists",
                 memory_cache: bool = True, progress: bool = False):
        if validate not in ("decode", "exists"):
            raise ValueError(f"validate={validate!r}: use 'decode' or 'exists'")
        self.label_space = get_label_space(label_space) if not isinstance(label_space, LabelSpace) else label_space
        self.spec = spec
        self.augment = augment
        keep, y = self.label_space.targets(manifest.table)
        self.excluded = int((~keep).sum())
        rows = np.flatnonzero(keep)
        paths = manifest.image_paths()
        good = np.asarray([paths[r].is_file() for r in rows], dtype=bool)
        self.skipped: list[SkippedImage] = [SkippedImage(int(r), str(paths[r]), "file not found") for r in rows[~good]]
        self._memory: dict[int, np.ndarray] | None = {} if memory_cache else None
        self.rows, self.targets = rows[good], y[good]
        self.paths = [paths[r] for r in self.rows]
        if validate == "decode":
            self._decode_all(progress)
        self.table = manifest.table.iloc[self.rows].reset_index(drop=True)
        self.sources = self.table["source"].to_numpy()
        for s in self.skipped:
            log.warning("skipping %s: %s", s.path, s.reason)

    def _decode_all(self, progress: bool) -> None:
        from covidcxr.progress import make_progress

        ok = np.ones(len(self.rows), dtype=bool)
        with make_progress("img", disable=not progress) as bar:
            task = bar.add_task("checking images", total=len(self.rows))
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

    def _prepared(self, i: int) -> np.ndarray:
        """Intensity-standardised, resized S x S image in [0, 1] (float16 in memory, float32 out)."""
        if self._memory is not None and i in self._memory:
            return self._memory[i].astype(np.float32)
        img = prepare_image(load_pixels(self.paths[i]), self.spec).astype(np.float16)
        if self._memory is not None:
            self._memory[i] = img
        # Always go through float16 so a cached and a fresh read give bit-identical inputs.
        return img.astype(np.float32)

    def __getitem__(self, item: int | tuple[int, int]):
        i, seed = (item if isinstance(item, tuple) else (item, None))
        i = int(i)
        x = self._prepared(i)
        if self.augment is not None and seed is not None:
            from covidcxr.training.augment import apply_seeded

            x = apply_seeded(self.augment, torch.from_numpy(x)[None], seed)[0].numpy()
        return to_model_input(x, self.spec), int(self.targets[i]), i

    def report(self) -> dict:
        """What was left out and why (stored in run.json)."""
        return {"images": len(self), "excluded_by_label_space": self.excluded,
                "skipped": [s.to_dict() for s in self.skipped]}


def class_counts(targets: Sequence[int], num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes)
