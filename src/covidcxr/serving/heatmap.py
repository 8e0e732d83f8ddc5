"""Grad-CAM heatmaps for batch prediction and the web service, via :mod:`covidcxr.explain`.

The maps themselves come from :func:`covidcxr.explain.cam.compute_cams` (the ``grad-cam`` library)
and are mapped back onto the image with :func:`~covidcxr.explain.cam.to_original_geometry`; this
module only turns them into files (batch) or PNG layers for the page (service).

Grad-CAM hooks the model's target layer, so two CAMs (or a CAM and a plain forward pass) must not
run on one model at the same time: callers serialise on :attr:`CamRenderer.lock`.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from covidcxr.data.preprocess import preprocess
from covidcxr.models.run import LoadedRun

METHOD = "gradcam"
#: Longest side of the PNG layers the service returns (the page scales them; keeps responses small).
DISPLAY_MAX_SIDE = 512


class CamRenderer:
    """Grad-CAM of a PyTorch run (ensembles averaged), one lock per model."""

    def __init__(self, run: LoadedRun, method: str = METHOD):
        from covidcxr.explain.cam import cam_models, canonical_method

        if run.model is None:
            raise ValueError("Grad-CAM needs the PyTorch model; pass load_run(run_dir)")
        self.run = run
        self.method = canonical_method(method)
        self.models = cam_models(run)
        self.lock = threading.Lock()

    def cams(self, inputs: torch.Tensor, class_indices: list[int] | None = None) -> np.ndarray:
        """N x S x S maps in [0, 1] for preprocessed inputs (the run's positive class, else predicted)."""
        from covidcxr.explain.cam import compute_cams

        with self.lock:
            return compute_cams(self.run, inputs, method=self.method, models=self.models, class_indices=class_indices)

    def heatmap(self, pixels: np.ndarray) -> np.ndarray:
        """H x W map in [0, 1] on the geometry of ``pixels`` (the image as read)."""
        from covidcxr.explain.cam import to_original_geometry

        cam = self.cams(preprocess(pixels, self.run.spec).unsqueeze(0))[0]
        return to_original_geometry(cam, pixels.shape, self.run.spec)

    def target_class(self) -> str:
        idx = self.run.positive_index
        return self.run.classes[idx] if idx is not None else "predicted"


class HeatmapWriter:
    """Writes one overlay PNG per image (``<stem>_<sha8>_gradcam.png``) for ``covidcxr predict --heatmaps``."""

    def __init__(self, run: LoadedRun, out_dir: str | Path, *, allow_non_frontal: bool = False):
        self.renderer = CamRenderer(run)
        self.allow_non_frontal = allow_non_frontal  # must match the prediction's reader, which read these files
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, paths: Sequence[str], names: Sequence[str], sha256s: Sequence[str]) -> list[str]:
        """Overlay files for ``paths`` (already read once successfully); returns their paths."""
        from covidcxr.data import read_xray
        from covidcxr.explain.cam import to_original_geometry
        from covidcxr.explain.overlay import save_overlay

        images = [read_xray(p, allow_non_frontal=self.allow_non_frontal).pixels for p in paths]
        cams = self.renderer.cams(torch.stack([preprocess(px, self.renderer.run.spec) for px in images]))
        written = []
        for pixels, cam, name, digest in zip(images, cams, names, sha256s):
            heat = to_original_geometry(cam, pixels.shape, self.renderer.run.spec)
            stem = Path(name.split("::")[-1]).stem
            path = self.out_dir / f"{stem}_{digest[:8]}_{self.renderer.method}.png"
            save_overlay(path, pixels, heat, title=f"{name[-60:]}\n{self.renderer.method} for "
                                                    f"'{self.renderer.target_class()}'")
            written.append(str(path))
        return written


# ---------------------------------------------------------------------------- PNG layers for the page


def _display_size(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    h, w = shape
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))


def png_base64(image: np.ndarray) -> str:
    """uint8 grey / RGB / RGBA array -> base64 PNG (RGB(A) given in RGB order)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA if image.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def display_layers(pixels: np.ndarray, heat: np.ndarray | None, *, max_side: int = DISPLAY_MAX_SIDE,
                   alpha: float = 0.4, cmap: str | None = None) -> dict:
    """The X-ray, the coloured heatmap (RGBA, for an opacity slider) and a ready-made overlay, as base64 PNGs."""
    import matplotlib

    from covidcxr.explain.overlay import DEFAULT_CMAP

    size = _display_size(pixels.shape, max_side)
    grey = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    grey8 = np.round(np.clip(grey, 0, 1) * 255).astype(np.uint8)
    layers = {"width": size[0], "height": size[1], "image_png": png_base64(grey8), "heatmap_png": None,
              "overlay_png": None}
    if heat is None:
        return layers
    heat = np.clip(cv2.resize(heat.astype(np.float32), size, interpolation=cv2.INTER_LINEAR), 0, 1)
    rgba = matplotlib.colormaps[cmap or DEFAULT_CMAP](heat)  # H x W x 4 floats
    colour = np.round(rgba[..., :3] * 255).astype(np.uint8)
    layers["heatmap_png"] = png_base64(np.dstack([colour, np.full(heat.shape, 255, np.uint8)]))
    blend = (1 - alpha) * np.repeat(grey8[..., None], 3, axis=2) + alpha * colour
    layers["overlay_png"] = png_base64(np.round(blend).astype(np.uint8))
    return layers
