"""Explainability: Grad-CAM family heatmaps, lung-focus scores, sanity checks, faithfulness (ROAD),
severity correlation, serial-X-ray progression and feature maps. See ``docs/explain.md``.

Imports are lazy so that ``import covidcxr.explain`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "METHODS": "covidcxr.explain.cam",
    "compute_cams": "covidcxr.explain.cam",
    "cam_models": "covidcxr.explain.cam",
    "to_original_geometry": "covidcxr.explain.cam",
    "explain_images": "covidcxr.explain.images",
    "Annotations": "covidcxr.explain.annotations",
    "LungRegion": "covidcxr.explain.annotations",
    "lung_focus": "covidcxr.explain.lung_focus",
    "summarise_lung_focus": "covidcxr.explain.lung_focus",
    "sanity_check": "covidcxr.explain.sanity",
    "road_scores": "covidcxr.explain.faithfulness",
    "severity_study": "covidcxr.explain.severity",
    "plot_progression": "covidcxr.explain.progression",
    "serial_patients": "covidcxr.explain.progression",
    "feature_maps": "covidcxr.explain.features",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'covidcxr.explain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
