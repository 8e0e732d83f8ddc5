"""Data: reading X-rays, manifests, splits, audits, the working-size cache and the Dataset.

Imports are lazy so that ``import covidcxr.data`` stays cheap (no torch / pydicom until needed).
Add an export by adding ``"name": "covidcxr.data.module"`` to ``_EXPORTS``.
"""

from __future__ import annotations

from covidcxr._lazy import lazy_exports

_EXPORTS = {
    # image io (image-io engineer)
    "XRay": "covidcxr.data.io",
    "read_xray": "covidcxr.data.io",
    "decode_xray": "covidcxr.data.io",
    "DEFAULT_MAX_PIXELS": "covidcxr.data.io",
    "WorkingSizeCache": "covidcxr.data.cache",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
