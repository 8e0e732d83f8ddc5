"""Where covidcxr finds shared data, weights and its cache. Environment variables override."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variables a user sets to point covidcxr elsewhere.
DATA_ROOT_ENV = "COVIDCXR_DATA_ROOT"
WEIGHTS_DIR_ENV = "COVIDCXR_WEIGHTS_DIR"
CACHE_DIR_ENV = "COVIDCXR_CACHE_DIR"


def _default_shared() -> Path:
    # The project checkout sits beside ``shared/``; the working directory is the checkout.
    return Path.cwd().parent / "shared"


def data_root() -> Path:
    """The covidcxr CXR data folder (``$COVIDCXR_DATA_ROOT`` or ``../shared/data/cxr``)."""
    return Path(os.environ.get(DATA_ROOT_ENV) or _default_shared() / "data" / "cxr").resolve()


def weights_dir() -> Path:
    """Folder with offline pretrained weights (``$COVIDCXR_WEIGHTS_DIR`` or ``../shared/weights``)."""
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or _default_shared() / "weights").resolve()


def cache_dir() -> Path:
    """Cache for decoded working-size images and hashes (``$COVIDCXR_CACHE_DIR`` or ``~/.cache/covidcxr``)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "covidcxr").resolve()
