"""Explainability: Grad-CAM family heatmaps, lung-focus scores, sanity checks, faithfulness (ROAD),
severity correlation, serial-X-ray progression and feature maps. See ``docs/explain.md``.

Imports are lazy so that ``import covidcxr.explain`` stays cheap.
"""

from __future__ import annotations

from covidcxr._lazy import lazy_exports

_EXPORTS = {
    "METHODS": "covidcxr.explain.cam",
    "compute_cams": "covidcxr.explain.cam",
    "cam_models": "covidcxr.explain.cam",
    "to_original_geometry": "covidcxr.explain.cam",
    "explain_images": "covidcxr.explain.images",
    "lung_focus": "covidcxr.explain.lung_focus",
    "summarise_lung_focus": "covidcxr.explain.lung_focus",
    "sanity_check": "covidcxr.explain.sanity",
    "road_scores": "covidcxr.explain.faithfulness",
    "severity_study": "covidcxr.explain.severity",
    "plot_progression": "covidcxr.explain.progression",
    "serial_patients": "covidcxr.explain.progression",
    "feature_maps": "covidcxr.explain.features",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
