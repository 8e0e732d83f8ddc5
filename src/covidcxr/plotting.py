"""Matplotlib without a display (Agg) and one way to write a figure to disk."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (servers and CI have no display); imported lazily."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, *, dpi: float | None = None) -> Path:
    """Lay out ``fig``, write it to ``path`` (creating folders) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi if dpi is not None else "figure")
    pyplot().close(fig)
    return path
