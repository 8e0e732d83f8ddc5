"""Training refuses what would only fail later, stops at once on a NaN loss, leaves no half run."""

from __future__ import annotations

import pytest
import torch

from covidcxr.errors import ConfigError, WeightsError
from covidcxr.training import load_config


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"), ("train.lr=.nan", "train.lr"), ("train.lr=true", "lr"),
    ("train.epochs=true", "epochs"), ("augment.noise_std=.inf", "augment.noise_std"),
    ("preprocess.clahe_clip=.inf", "preprocess.clahe_clip"), ("preprocess.working_size=64", "working_size"),
    ("train.device=tpu:3", "train.device"), ("train.device=cuda:x", "train.device"),
    ("preprocess.colour=grey", "preprocess.colour"),
])
def test_bad_numbers_devices_and_keys_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_valid_devices_pass():
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert load_config(None, [f"train.device={device}"]).train.device == device


def test_weights_file_with_nan_is_refused(tmp_path):
    from covidcxr.models.registry import create_model

    state = create_model("resnet18", 2).state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(WeightsError, match="NaN or infinity.*layer1.0.conv1.weight"):
        create_model("resnet18", 2, weights=str(tmp_path / "nan.pth"))


def test_nan_loss_stops_at_once_and_leaves_no_half_run(split_manifest, weights_dir, tmp_path, monkeypatch):
    import torch.nn.functional as F

    from covidcxr.training.loop import TrainingDiverged, fit

    real = F.cross_entropy  # every objective ends in it: make the first loss NaN
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    config = load_config(None, ["preprocess.image_size=64", "train.epochs=2", "train.batch_size=8",
                                "train.samples_per_epoch=16", "data.val_max_images=40", "train.progress=false",
                                "data.validate_images=exists"])
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1: the training loss is NaN"):
        fit(config, out, manifest=split_manifest)
    assert not out.exists()  # failed before its first checkpoint: nothing half-written is left


def test_a_run_that_fails_after_a_checkpoint_keeps_it_and_says_why(split_manifest, tmp_path, monkeypatch):
    import covidcxr.training.loop as loop
    from covidcxr.training.loop import FAILED_FILE, TrainingDiverged, fit

    real = loop.train_one_epoch
    calls = {"n": 0}

    def second_epoch_diverges(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise TrainingDiverged("epoch 2, step 1: the training loss is NaN or infinite (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", second_epoch_diverges)
    config = load_config(None, ["preprocess.image_size=64", "train.epochs=2", "train.batch_size=8",
                                "train.samples_per_epoch=16", "data.val_max_images=40", "train.progress=false",
                                "data.validate_images=exists", "train.selection_metric=val_loss"])
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged):
        fit(config, out, manifest=split_manifest)
    assert (out / "checkpoints" / "last.pt").is_file() and "--resume" in (out / FAILED_FILE).read_text()
    assert not (out / "run.json").exists()
