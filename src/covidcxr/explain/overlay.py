"""Heatmap overlays on the grayscale X-ray (matplotlib, Agg backend) and contact sheets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from covidcxr.plotting import pyplot, save_figure

DEFAULT_CMAP = "jet"
DEFAULT_ALPHA = 0.4


def colour_map(heat: np.ndarray, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """H x W map in [0, 1] -> H x W x 3 float RGB in [0, 1] through ``cmap``."""
    import matplotlib

    return matplotlib.colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3]


def blend_overlay(pixels: np.ndarray, heat: np.ndarray, *, cmap: str = DEFAULT_CMAP,
                  alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """The one overlay renderer: grey X-ray blended with the colour-mapped heatmap -> uint8 H x W x 3 RGB.

    Figures (:func:`draw_overlay`), contact sheets, progression plots and the web page all show this.
    """
    if pixels.shape != heat.shape:
        raise ValueError(f"image {pixels.shape} and heatmap {heat.shape} must have the same shape")
    grey = np.repeat(np.clip(pixels, 0.0, 1.0)[..., None], 3, axis=2)
    return np.round(((1 - alpha) * grey + alpha * colour_map(heat, cmap)) * 255).astype(np.uint8)


def draw_overlay(ax, pixels: np.ndarray, cam: np.ndarray, *, cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA,
                 lung: np.ndarray | None = None, title: str | None = None):
    """Draw :func:`blend_overlay` (and the lung outline if given); returns a mappable for a colour bar."""
    import matplotlib

    ax.imshow(blend_overlay(pixels, cam, cmap=cmap, alpha=alpha), interpolation="bilinear")
    if lung is not None and lung.any():
        ax.contour(lung.astype(float), levels=[0.5], colors="white", linewidths=0.8)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0.0, 1.0), cmap=cmap)


def save_overlay(path: str | Path, pixels: np.ndarray, cam: np.ndarray, *, title: str | None = None,
                 cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA, lung: np.ndarray | None = None,
                 dpi: int = 100) -> Path:
    """One overlay PNG with a colour bar (heatmap value 0 = ignored ... 1 = most important)."""
    plt = pyplot()
    h, w = pixels.shape
    width = 5.0
    fig, ax = plt.subplots(figsize=(width + 1.0, width * h / w + 0.6), dpi=dpi)
    artist = draw_overlay(ax, pixels, cam, cmap=cmap, alpha=alpha, lung=lung, title=title)
    bar = fig.colorbar(artist, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("relevance (scaled per image)", fontsize=8)
    return save_figure(fig, path)


@dataclass
class SheetItem:
    pixels: np.ndarray
    cam: np.ndarray
    caption: str
    lung: np.ndarray | None = None


def thumbnail(a: np.ndarray, size: int) -> np.ndarray:
    """Shrink so the longer side is at most ``size`` (keeps memory small on big contact sheets)."""
    h, w = a.shape[:2]
    scale = size / max(h, w)
    if scale >= 1:
        return a
    return cv2.resize(a.astype(np.float32), (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA)


def save_contact_sheet(path: str | Path, items: list[SheetItem], *, columns: int = 5, thumb: int = 192,
                       cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA, title: str | None = None) -> Path:
    """A grid of small overlays with captions, for skimming many images at once."""
    plt = pyplot()
    n = max(len(items), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.7 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, item in zip(axes.ravel(), items):
        lung = None
        if item.lung is not None:
            lung = thumbnail(item.lung.astype(np.float32), thumb) > 0.5
        draw_overlay(ax, thumbnail(item.pixels, thumb), thumbnail(item.cam, thumb), cmap=cmap, alpha=alpha, lung=lung)
        ax.set_title(item.caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
