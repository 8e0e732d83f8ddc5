"""Grad-CAM heatmaps for batch prediction and the web service, via :mod:`covidcxr.explain`.

The maps come from the one heatmap function, :func:`covidcxr.explain.cam.heatmaps` (the ``grad-cam``
library), computed on the prepared inputs the prediction itself used, and are drawn with the one
overlay renderer (:func:`covidcxr.explain.overlay.blend_overlay`); this module only turns them into
files (batch) or PNG layers for the page (service).

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

from covidcxr.models.predict import PreparedInput, PredictionRecord
from covidcxr.models.run import LoadedRun

METHOD = "gradcam"
#: Longest side of the PNG layers the service returns (the page scales them; keeps responses small).
DISPLAY_MAX_SIDE = 512


class CamRenderer:
    """Grad-CAM of a PyTorch run (ensembles averaged), one lock per model."""

    def __init__(self, run: LoadedRun, method: str = METHOD):
        from covidcxr.explain.cam import cam_models, canonical_method

        if not isinstance(run, LoadedRun):
            raise ValueError("Grad-CAM needs the PyTorch model; pass load_run(run_dir)")
        self.run = run
        self.method = canonical_method(method)
        self.models = cam_models(run)
        self.lock = threading.Lock()

    def heatmaps(self, inputs: Sequence[PreparedInput]) -> list[np.ndarray]:
        """One map per prepared input, on the input's image geometry (the run's positive class, else predicted)."""
        from covidcxr.explain.cam import heatmaps

        with self.lock:
            return heatmaps(self.run, inputs, method=self.method, models=self.models)

    def target_class(self) -> str:
        idx = self.run.positive_index
        return self.run.classes[idx] if idx is not None else "predicted"


class HeatmapWriter:
    """Writes one overlay PNG per image (``<stem>_<sha8>_gradcam.png``) for ``covidcxr predict --heatmaps``."""

    def __init__(self, run: LoadedRun, out_dir: str | Path):
        self.renderer = CamRenderer(run)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, records: Sequence[PredictionRecord], names: Sequence[str]) -> list[str]:
        """Overlay files for predicted ``records`` (drawn from the inputs the prediction used); their paths."""
        from covidcxr.explain.overlay import save_overlay

        inputs = [r.input for r in records]
        written = []
        for x, heat, name in zip(inputs, self.renderer.heatmaps(inputs), names):
            stem = Path(name.split("::")[-1]).stem
            path = self.out_dir / f"{stem}_{x.input_sha256[:8]}_{self.renderer.method}.png"
            save_overlay(path, x.pixels, heat, title=f"{name[-60:]}\n{self.renderer.method} for "
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
    """The X-ray, the coloured heatmap (for an opacity slider) and the overlay (:func:`blend_overlay`), as base64 PNGs."""
    from covidcxr.explain.overlay import DEFAULT_CMAP, blend_overlay, colour_map

    size = _display_size(pixels.shape, max_side)
    grey = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    grey8 = np.round(np.clip(grey, 0, 1) * 255).astype(np.uint8)
    layers = {"width": size[0], "height": size[1], "image_png": png_base64(grey8), "heatmap_png": None,
              "overlay_png": None}
    if heat is None:
        return layers
    heat = np.clip(cv2.resize(heat.astype(np.float32), size, interpolation=cv2.INTER_LINEAR), 0, 1)
    colour = np.round(colour_map(heat, cmap or DEFAULT_CMAP) * 255).astype(np.uint8)
    layers["heatmap_png"] = png_base64(np.dstack([colour, np.full(heat.shape, 255, np.uint8)]))
    layers["overlay_png"] = png_base64(blend_overlay(np.clip(grey, 0, 1), heat, cmap=cmap or DEFAULT_CMAP,
                                                     alpha=alpha))
    return layers
