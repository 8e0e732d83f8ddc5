"""Data: reading X-rays, manifests, splits, audits, the working-size cache and the Dataset.

Imports are lazy so that ``import covidcxr.data`` stays cheap (no torch / pydicom until needed).
Add an export by adding ``"name": "covidcxr.data.module"`` to ``_EXPORTS``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # image io (image-io engineer)
    "XRay": "covidcxr.data.io",
    "read_xray": "covidcxr.data.io",
    "decode_xray": "covidcxr.data.io",
    "DEFAULT_MAX_PIXELS": "covidcxr.data.io",
    "WorkingSizeCache": "covidcxr.data.cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'covidcxr.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
