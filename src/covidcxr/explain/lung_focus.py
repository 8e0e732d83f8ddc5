"""Do the heatmaps look at the lungs?

Two scores per image, against a :class:`~covidcxr.data.annotations.LungRegion`:

* **mass share**: the share of the heatmap's total mass that lies inside the lungs,
  ``sum(cam * lung) / sum(cam)`` over the *valid* pixels (pixels a v7labs mask marks "ignore" -
  pacemakers, devices, markup - are left out of both sums);
* **pointing game**: is the heatmap's peak (over valid pixels) inside the lungs?

Both come with the value a heatmap that ignores the image would get: a uniform map has a mass share
of exactly the lungs' area share, and a peak placed at random hits the lungs with that probability.
A model that looks at the lungs scores well above this baseline; one that looks at text labels or
borders scores below it.
"""

from __future__ import annotations

import numpy as np

from covidcxr.errors import ConfigError
from covidcxr.data.annotations import LungRegion


def _check(cam: np.ndarray, region: LungRegion) -> np.ndarray:
    cam = np.asarray(cam, dtype=np.float64)
    if cam.shape != region.lung.shape:
        raise ConfigError(f"heatmap shape {cam.shape} differs from the lung region's {region.lung.shape} "
                          "(map it onto the stored image first: cam.to_original_geometry)")
    if np.any(cam < 0):
        raise ConfigError("heatmap has negative values; lung focus needs a non-negative map")
    return cam


def mass_share(cam: np.ndarray, region: LungRegion) -> float:
    """Share of heatmap mass inside the lungs (valid pixels only); NaN for an all-zero map."""
    cam = _check(cam, region)
    valid = cam[region.valid]
    total = valid.sum()
    return float(cam[region.lung & region.valid].sum() / total) if total > 0 else float("nan")


def pointing_hit(cam: np.ndarray, region: LungRegion) -> bool:
    """Whether the heatmap's maximum over valid pixels lies inside the lungs."""
    cam = _check(cam, region)
    masked = np.where(region.valid, cam, -np.inf)
    peak = np.unravel_index(int(np.argmax(masked)), masked.shape)
    return bool(region.lung[peak])


def lung_cam_area(cam: np.ndarray, region: LungRegion, threshold: float = 0.5) -> float:
    """Share of (valid) lung pixels where the heatmap exceeds ``threshold`` (severity proxy)."""
    cam = _check(cam, region)
    inside = region.lung & region.valid
    return float((cam[inside] > threshold).mean()) if inside.any() else float("nan")


def lung_focus(cam: np.ndarray, region: LungRegion) -> dict:
    """All lung-focus scores of one heatmap, with the uniform-map baseline.

    A map with no mass on valid pixels (Grad-CAM found no positive evidence for the target class:
    common when the model gives that class a low probability) has no share and no peak:
    ``mass_share`` and ``pointing_hit`` are None and ``empty`` is True.
    """
    cam = _check(cam, region)
    empty = not cam[region.valid].sum() > 0
    return {
        "mass_share": None if empty else mass_share(cam, region),
        "pointing_hit": None if empty else pointing_hit(cam, region),
        "baseline": region.area_share,
        "region": region.kind,
        "empty": empty,
    }


def summarise_lung_focus(results: list[dict]) -> dict:
    """Mean scores over a set of images (empty maps counted apart), with the mean baseline they should beat."""
    results = [r for r in results if r is not None]
    rows = [r for r in results if r["mass_share"] is not None]
    n_empty = len(results) - len(rows)
    if not rows:
        return {"n": 0, "n_empty": n_empty}
    share = np.array([r["mass_share"] for r in rows])
    base = np.array([r["baseline"] for r in rows])
    hits = np.array([r["pointing_hit"] for r in rows], dtype=float)
    return {
        "n": len(rows),
        "n_empty": n_empty,
        "mean_mass_share": float(share.mean()),
        "mean_baseline": float(base.mean()),
        "mean_mass_share_minus_baseline": float((share - base).mean()),
        "share_above_baseline": float((share > base).mean()),
        "pointing_game": float(hits.mean()),
        "regions": {k: int(sum(r["region"] == k for r in rows)) for k in sorted({r["region"] for r in rows})},
    }
