"""Heatmap overlays on the grayscale X-ray (matplotlib, Agg backend) and contact sheets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from covidcxr.plotting import pyplot, save_figure

DEFAULT_CMAP = "jet"
DEFAULT_ALPHA = 0.4


def draw_overlay(ax, pixels: np.ndarray, cam: np.ndarray, *, cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA,
                 lung: np.ndarray | None = None, title: str | None = None):
    """Draw the X-ray in grey with the heatmap on top (and the lung outline if given); returns the heatmap artist."""
    if pixels.shape != cam.shape:
        raise ValueError(f"image {pixels.shape} and heatmap {cam.shape} must have the same shape")
    ax.imshow(pixels, cmap="gray", vmin=0.0, vmax=1.0, interpolation="bilinear")
    artist = ax.imshow(cam, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
    if lung is not None and lung.any():
        ax.contour(lung.astype(float), levels=[0.5], colors="white", linewidths=0.8)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return artist


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
