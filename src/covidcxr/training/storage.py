"""Storage augmentation on the working-size image (``augment.storage_stage: working``).

A file that was re-saved as a JPEG (or stored small and enlarged) enters the pipeline *before*
intensity standardisation and resizing: CLAHE then sees the compression artefacts at 512 px and the
resize to S x S averages them. :class:`WorkingStageDataset` reproduces that during training: for an
item whose seed draws a storage change, it takes the item's working-size image (the same cached
array inference starts from), re-compresses it as an 8-bit JPEG at a random quality
(``augment.jpeg_quality``; for the shared 8-bit images this is exactly re-saving the stored file)
and / or shrinks and re-enlarges it (``augment.resolution_scale``), then runs the normal stages
(:func:`covidcxr.data.preprocess.prepare`, the rest of the augmentation, :func:`to_tensor`). With
``roi: lungs`` the lungs are found again on the changed image, as inference finds them in such a file.
Items whose seed draws no storage change come from the prepared-image memory cache as usual.

The storage draw depends on the item's seed alone (through its own generator), so runs stay
reproducible and resumable exactly as with the other augmentations.
"""

from __future__ import annotations

import torch

from covidcxr.data.dataset import CXRDataset, load_working
from covidcxr.data.lung_roi import locate_lungs
from covidcxr.data.preprocess import dequantise, prepare, quantise, to_tensor
from covidcxr.errors import ImageReadError
from covidcxr.training.augment import jpeg_roundtrip, resolution_roundtrip
from covidcxr.training.config import AugmentConfig

_STREAM = 0x5EED5


def storage_draw(cfg: AugmentConfig, seed: int) -> dict:
    """What the storage augmentation does to the item with ``seed``: ``{"jpeg": quality or None,
    "jpeg_scale": f, "resolution": factor or None}``."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + _STREAM) % (2**63 - 1))
    u = torch.rand(5, generator=g).tolist()
    q_lo, q_hi = cfg.jpeg_quality
    out = {"jpeg": None, "jpeg_scale": 1.0, "resolution": None}
    if cfg.resolution_p > 0 and u[0] < cfg.resolution_p:
        lo, hi = cfg.resolution_scale
        factor = lo + (hi - lo) * u[1]
        out["resolution"] = factor if factor < 1.0 else None
    if cfg.jpeg_p > 0 and u[2] < cfg.jpeg_p:
        out["jpeg"] = min(q_hi, q_lo + int(u[3] * (q_hi - q_lo + 1)))
        out["jpeg_scale"] = cfg.jpeg_scale[0] + (cfg.jpeg_scale[1] - cfg.jpeg_scale[0]) * u[4]
    return out


class WorkingStageDataset(CXRDataset):
    """A training :class:`CXRDataset` whose storage augmentation runs on the working-size image."""

    def __init__(self, *args, storage: AugmentConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.storage = storage

    def storage_image(self, i: int, draw: dict) -> torch.Tensor:
        """The prepared 1 x S x S float image of item ``i`` after the storage change ``draw``."""
        x = torch.from_numpy(dequantise(load_working(self.paths[i], self.spec.working_size)))
        if draw["resolution"] is not None:
            x = resolution_roundtrip(x, draw["resolution"])
        if draw["jpeg"] is not None:
            x = jpeg_roundtrip(x, draw["jpeg"], draw["jpeg_scale"])
        working = quantise(x.numpy())
        return torch.from_numpy(dequantise(prepare(working, self.spec, self.storage_roi(i, working))))[None]

    def storage_roi(self, i: int, working):
        """The lungs of the re-saved image, found again as inference finds them in a re-saved file: the
        segmenter's mask moves under re-compression, and a model trained on the clean image's mask reads
        that outline (bench/roi_jpeg_sensitivity.py). If the changed image shows no lungs, the clean
        image's ROI is used; the item itself is not lost."""
        try:  # None for roi: full (locate_lungs runs no segmenter then)
            return locate_lungs(working, self.spec, self.lung_finder, str(self.paths[i]))
        except ImageReadError:
            return self.roi(i)

    def __getitem__(self, item):
        i, seed = (item if isinstance(item, tuple) else (item, None))
        if seed is None:
            return super().__getitem__(item)
        draw = storage_draw(self.storage, seed)
        if draw["jpeg"] is None and draw["resolution"] is None:
            return super().__getitem__(item)
        i = int(i)
        x = self.storage_image(i, draw)
        if self.augment is not None:
            x = self.augment(x, seed)
        return to_tensor(x, self.spec), int(self.targets[i]), i
