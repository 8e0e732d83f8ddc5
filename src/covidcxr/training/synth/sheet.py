"""What a CycleGAN run shows while it trains: contact sheets of translations and the loss curves."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from covidcxr.files import atomic_write_bytes
from covidcxr.plotting import pyplot, save_figure

LABEL_WIDTH = 128


def _label(text: str, height: int) -> np.ndarray:
    strip = np.full((height, LABEL_WIDTH), 255, np.uint8)
    cv2.putText(strip, text[:22], (3, height // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.33, 0, 1, cv2.LINE_AA)
    return strip


def contact_sheet(rows: list[tuple[str, np.ndarray]], path: str | Path, gap: int = 2) -> Path:
    """A PNG grid: one labelled row per ``(label, N x S x S images in [0, 1])``, written atomically."""
    lines = []
    for label, images in rows:
        s = images.shape[-1]
        tiles = [_label(label, s)]
        for img in images:
            tiles += [np.full((s, gap), 255, np.uint8), np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)]
        lines += [np.concatenate(tiles, axis=1), np.full((gap, sum(t.shape[1] for t in tiles)), 255, np.uint8)]
    ok, data = cv2.imencode(".png", np.concatenate(lines, axis=0))
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 array
        raise RuntimeError(f"{path}: PNG encoding failed")
    atomic_write_bytes(Path(path), data.tobytes())
    return Path(path)


def plot_losses(history: pd.DataFrame, path: str | Path, names: tuple[str, str]) -> Path:
    """Generator (adversarial, cycle, identity) and discriminator losses against the step."""
    plt = pyplot()
    fig, (ax_g, ax_d) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    a, b = names
    for col, label in (("g_gan_a2b", f"G {a}->{b} (LSGAN)"), ("g_gan_b2a", f"G {b}->{a} (LSGAN)"),
                       ("cycle_a", f"cycle {a}"), ("cycle_b", f"cycle {b}"),
                       ("identity_a", f"identity {a}"), ("identity_b", f"identity {b}")):
        if col in history and len(history):
            ax_g.plot(history["step"], history[col], label=label, lw=1)
    for col, label in (("d_a", f"D {a}"), ("d_b", f"D {b}")):
        if col in history and len(history):
            ax_d.plot(history["step"], history[col], label=label, lw=1)
    ax_g.set_title("generators (unweighted terms)")
    ax_d.set_title("discriminators (LSGAN; 0.25 = chance)")
    ax_d.axhline(0.25, color="grey", lw=0.5, ls="--")
    for ax in (ax_g, ax_d):
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return save_figure(fig, path)
