"""Shared fixtures. Tests read real data from ``../shared`` (override with ``COVIDCXR_DATA_ROOT``).

Where the shared data is missing, tests that need it are skipped locally but FAIL in CI
(``CI=true``): a CI run must never pass by silently skipping the real-data tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from covidcxr import paths

REPO_ROOT = Path(__file__).resolve().parent.parent
# Tests run from the repository root, so ../shared is beside the checkout.
os.environ.setdefault(paths.DATA_ROOT_ENV, str(REPO_ROOT.parent / "shared" / "data" / "cxr"))
os.environ.setdefault(paths.WEIGHTS_DIR_ENV, str(REPO_ROOT.parent / "shared" / "weights"))

EFFNET_LITE0_SHA256 = "711997994847d2d492117ee702a3aa7f2e37bc1898d00ffe67e7288f16274ac1"
MOBILENET_V2_SHA256 = "2f3656925dbcba43a561f7fa0d7f00d433df053f0597ae570d72e2ef6614de20"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        msg = f"{what} not found at {path}; set {paths.DATA_ROOT_ENV} / {paths.WEIGHTS_DIR_ENV}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {msg}", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared CXR data folder (``manifest.csv``, ``images/``, ``annotations/``, ...)."""
    return _require(paths.data_root() / "manifest.csv", "shared CXR data").parent


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    return _require(paths.weights_dir() / "efficientnet_lite0_imagenet_timm.pth", "shared weights").parent


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Never write into the user's real cache from tests.
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path_factory.getbasetemp() / "covidcxr-cache"))


# ---------------------------------------------------------------- manifest fixtures (manifest engineer)
@pytest.fixture(scope="session")
def shared_manifest(data_root):
    """Manifest of ../shared/data/cxr/manifest.csv (3,495 images, ``split`` still empty)."""
    from covidcxr.data.manifest import Manifest

    return Manifest.read(data_root / "manifest.csv")


@pytest.fixture(scope="session")
def split_manifest(shared_manifest):
    """``shared_manifest`` with a patient-grouped, label x source stratified split (seed 0, val 0.15,
    test 0.15): every row is train / val / test; no patient spans two splits."""
    from covidcxr.data.splits import assign_splits

    return assign_splits(shared_manifest, val=0.15, test=0.15, seed=0)


# ---------------------------------------------------------------- trained model fixture (training engineer)
# trained_run: Path to a run directory trained on split_manifest's train/val (binary covid vs non-covid),
# threshold chosen on val. (defined here)
