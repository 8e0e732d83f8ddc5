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
#: Overrides of the default training config for the shared test model: EfficientNet-Lite0 from the
#: shared ImageNet weights, 128 px, 2 short epochs of source-balanced batches, val capped at 200 images.
TRAINED_RUN_OVERRIDES = [
    "model.name=tf_efficientnet_lite0",
    "model.weights=${COVIDCXR_WEIGHTS_DIR}/efficientnet_lite0_imagenet_timm.pth",
    f"model.weights_sha256={EFFNET_LITE0_SHA256}",
    "preprocess.image_size=128", "preprocess.intensity=percentile",
    "train.epochs=2", "train.batch_size=16", "train.samples_per_epoch=128", "train.lr=0.0005",
    "train.warmup_epochs=0.25", "train.loss_weighting=class_weighted", "train.sampler=source_balanced",
    "train.selection_metric=within_source_auc", "train.progress=false", "train.seed=0",
    "data.val_max_images=200", "data.validate_images=exists",
]


@pytest.fixture(scope="session")
def trained_run(split_manifest, weights_dir, tmp_path_factory) -> Path:
    """Run directory of a small real model trained on ``split_manifest`` train / val (binary covid vs
    non-covid), checkpoint selected on val within-source AUC, Youden threshold chosen on val."""
    from covidcxr.training import load_config
    from covidcxr.training.loop import fit

    # Session fixtures start before the autouse per-test cache redirect: redirect here as well.
    mp = pytest.MonkeyPatch()
    mp.setenv(paths.CACHE_DIR_ENV, str(tmp_path_factory.getbasetemp() / "covidcxr-cache"))
    try:
        return fit(load_config(None, TRAINED_RUN_OVERRIDES), tmp_path_factory.mktemp("trained_run") / "run",
                   manifest=split_manifest)
    finally:
        mp.undo()
