"""Lung masks for the ``roi: lungs`` preprocessing stage, from a lung segmenter run.

:class:`SegmenterLungFinder` is the :data:`covidcxr.data.lung_roi.LungFinder` the training Dataset and
every inference path use: it runs a :class:`~covidcxr.models.segmenter.LoadedSegmenter` on the working
image and keeps each mask in a disk cache keyed by the segmenter's weights SHA-256 and the working
image's own SHA-256, so a second run (another seed, evaluation after training) does not segment again.

A classifier run that crops to the lungs carries its segmenter in ``RUN/segmenter`` (copied there by
training) and pins it by ``preprocess.segmenter_sha256``; :func:`load_lung_finder` refuses any other.
``default`` names the segmenter shipped with covidcxr (``models/assets/lung_segmenter``: weights
stored as float16 safetensors, see its ``run.json`` for the command and data hashes that made it).
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
from pathlib import Path

import numpy as np

from covidcxr.errors import ConfigError, WeightsError
from covidcxr.files import atomic_write_bytes
from covidcxr.models.segmenter import LoadedSegmenter, load_segmenter

log = logging.getLogger(__name__)

#: The lung segmenter shipped inside the package (``data.lung_segmenter: default``).
DEFAULT_SEGMENTER = Path(__file__).parent / "assets" / "lung_segmenter"
#: Where a classifier run keeps the segmenter its ROI was trained with.
RUN_SEGMENTER_DIR = "segmenter"


def segmenter_dir(name: str | Path) -> Path:
    """``default`` -> the shipped segmenter; anything else is a segmenter run directory."""
    path = DEFAULT_SEGMENTER if str(name) == "default" else Path(name)
    if not (path / "run.json").is_file():
        raise ConfigError(f"{path}: not a lung segmenter run directory (no run.json); train one with "
                          "`covidcxr segment train --out DIR` or use data.lung_segmenter=default")
    return path


class SegmenterLungFinder:
    """``finder(working float image) -> bool lung mask`` of the same shape, cached on disk."""

    def __init__(self, segmenter: LoadedSegmenter, cache_dir: Path | None = None):
        self.segmenter = segmenter
        self.sha256 = segmenter.record.model_sha256 if segmenter.record is not None else "unrecorded"
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / "lungs" / self.sha256[:16]

    def _cache_path(self, pixels: np.ndarray) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.float32).tobytes()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.npz"

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        path = self._cache_path(pixels)
        if path is not None and path.is_file():
            try:
                with np.load(path) as z:
                    mask = np.unpackbits(z["bits"])[: int(np.prod(z["shape"]))].reshape(z["shape"]).astype(bool)
                if mask.shape == pixels.shape:
                    return mask
            except (OSError, ValueError, KeyError) as exc:  # a damaged cache entry costs a recomputation only
                log.warning("lung mask cache %s unreadable (%s); segmenting again", path, exc)
        mask = self.segmenter.predict_masks([pixels])[0]
        if path is not None:
            buf = io.BytesIO()
            np.savez_compressed(buf, bits=np.packbits(mask.ravel()), shape=np.asarray(mask.shape))
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf.getvalue(), fsync=False)
        return mask


def load_lung_finder(run_dir: str | Path, expected_sha256: str | None = None, *,
                     cache: bool = True) -> SegmenterLungFinder:
    """The lung finder of a segmenter run; refuses one whose weights are not ``expected_sha256``."""
    from covidcxr import paths

    segmenter = load_segmenter(run_dir)  # record integrity + weights SHA-256 checked
    if expected_sha256 is not None and segmenter.record.model_sha256 != expected_sha256:
        raise WeightsError(f"{run_dir}: lung segmenter weights {segmenter.record.model_sha256[:12]}... are not the "
                           f"{expected_sha256[:12]}... the classifier's lung ROI was trained with; restore the "
                           "run's own segmenter folder")
    return SegmenterLungFinder(segmenter, paths.cache_dir() if cache else None)


def copy_segmenter(source: str | Path, run_dir: str | Path) -> Path:
    """Copy a segmenter run (run.json + weights) into ``RUN/segmenter`` so the classifier run is self-contained."""
    source, target = segmenter_dir(source), Path(run_dir) / RUN_SEGMENTER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in ("run.json", "model.safetensors"):
        shutil.copyfile(source / name, target / name)
    return target
