"""Determinism, kill + resume of a real training process, k-fold and seed ensembles - on a tiny subset of the shared data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.errors import CovidCXRError
from covidcxr.models.run import load_run
from covidcxr.models.weights import sha256_file
from covidcxr.training import load_config
from covidcxr.training.loop import fit
from covidcxr.training.state import load_checkpoint

pytestmark = pytest.mark.slow

# Metrics that must be bit-identical between an uninterrupted and a killed + resumed run.
EXACT = ("train_loss", "val_loss", "val_auc", "val_within_source_auc", "lr", "selected")


def _tiny_manifest(split_manifest, per_cell: int = 3):
    """A few dozen real images: train/val rows of every label x source cell (IEEE keeps both classes in val)."""
    t = split_manifest.table
    keep = np.zeros(len(t), dtype=bool)
    for (_, _, split), idx in t.groupby(["label", "source", "split"]).indices.items():
        if split in ("train", "val"):
            keep[idx[: per_cell if split == "train" else 2]] = True
    return split_manifest.subset(mask=keep)


TINY = ["model.name=tf_efficientnet_lite0", "model.weights=none", "preprocess.image_size=48",
        "preprocess.intensity=percentile", "train.epochs=3", "train.batch_size=8", "train.samples_per_epoch=16",
        "train.lr=0.002", "train.threads=1", "train.progress=false", "train.selection_metric=auc", "train.patience=null",
        "augment.mixup_alpha=0.4", "augment.strong_intensity=true", "data.validate_images=decode"]


@pytest.fixture(scope="module")
def tiny(split_manifest, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    manifest = _tiny_manifest(split_manifest)
    path = manifest.write(folder / "manifest.csv")
    return manifest, path


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    manifest, path = tiny
    return fit(load_config(None, TINY + [f"data.manifest={path}"]), tmp_path_factory.mktemp("ref") / "run")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_gives_identical_weights_and_metrics(tiny, reference_run, tmp_path):
    _, path = tiny
    again = fit(load_config(None, TINY + [f"data.manifest={path}"]), tmp_path / "again")
    assert sha256_file(again / "model.safetensors") == sha256_file(reference_run / "model.safetensors")
    assert [{k: m[k] for k in EXACT} for m in _metrics(again)] == [{k: m[k] for k in EXACT} for m in _metrics(reference_run)]
    other = fit(load_config(None, TINY + [f"data.manifest={path}", "train.seed=1", "train.epochs=1"]), tmp_path / "other")
    assert _metrics(other)[0]["train_loss"] != _metrics(reference_run)[0]["train_loss"]


def test_checkpoint_loads_with_weights_only_and_holds_the_training_state(reference_run):
    ckpt = torch.load(reference_run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 3 and set(ckpt) >= {"model", "optimizer", "scheduler", "rng", "best_value", "best_epoch",
                                               "bad_epochs", "history"}
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    assert len(ckpt["history"]) == 3


def test_killed_run_resumes_to_the_same_result(tiny, reference_run, tmp_path):
    _, path = tiny
    out = tmp_path / "killed"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("{}\n")
    cmd = [sys.executable, "-c", "from covidcxr.cli import main; main()", "train", str(cfg), "--out", str(out),
           *TINY, f"data.manifest={path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    assert last.exists(), output
    done = int(load_checkpoint(last)["epoch"])
    assert done < 3, "the process finished before it could be killed"
    assert not (out / "run.json").exists()

    # Without --resume the run directory is protected.
    with pytest.raises(CovidCXRError, match="--resume"):
        fit(load_config(None, TINY + [f"data.manifest={path}"]), out)

    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    got, want = _metrics(out), _metrics(reference_run)
    assert [m["epoch"] for m in got] == [1, 2, 3]
    assert [{k: m[k] for k in EXACT} for m in got] == [{k: m[k] for k in EXACT} for m in want]
    assert sha256_file(out / "model.safetensors") == sha256_file(reference_run / "model.safetensors")


def test_kfold_ensemble_loads_and_predicts_like_one_model(tiny, tmp_path):
    from covidcxr.data.manifest import Manifest
    from covidcxr.training import run_training

    manifest = Manifest.read(tiny[1])  # image paths as stored in the file the run read
    path = tiny[1]

    out = run_training(None, tmp_path / "ens", overrides=TINY + [f"data.manifest={path}", "train.epochs=1",
                                                                 "ensemble.tta=[hflip]"], folds=2)
    record = json.loads((out / "run.json").read_text())
    assert record["architecture"] == "ensemble" and record["members"] == ["members/fold_0", "members/fold_1"]
    assert record["info"]["ensemble"]["folds"] == 2
    oof = pd.read_csv(out / "oof_predictions.csv")
    dev = manifest.table[manifest.table["split"].isin(["train", "val"])]
    # Every development image scored exactly once, by the member that did not train on it; no test rows.
    assert sorted(oof["image"]) == sorted(dev["image"])
    for k in (0, 1):
        member = json.loads((out / "members" / f"fold_{k}" / "run.json").read_text())
        assert member["tta"] == ["hflip"] and member["info"]["fold"] == k
    from covidcxr.evaluation.thresholds import select_threshold

    y = (oof["target"] == "covid").astype(int).to_numpy()
    assert record["threshold"] == pytest.approx(select_threshold(y, oof["p_covid"].to_numpy()))
    assert "out-of-fold" in record["info"]["threshold"]["chosen_on"]
    run = load_run(out)
    from covidcxr.data.io import read_xray

    images = [read_xray(manifest.root / p).pixels for p in oof["image"].head(3)]
    probs = run.predict_arrays(images)
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (out / "MODEL_CARD.md").read_text().count("Research use only") == 1
    # Resuming the ensemble with another config would skip the finished members and mix two trainings.
    import shutil

    shutil.rmtree(out / "members" / "fold_1")  # as if killed before the last member started
    with pytest.raises(CovidCXRError, match=r"config\.yaml: the ensemble was started with another configuration"):
        run_training(None, out, overrides=TINY + [f"data.manifest={path}", "train.epochs=2", "ensemble.tta=[hflip]"],
                     folds=2, resume=True)
    assert json.loads((out / "members" / "fold_0" / "run.json").read_text())["info"]["epochs_planned"] == 1


def test_seed_ensemble_members_share_their_rows_and_the_ensemble_is_their_mean(tiny, tmp_path):
    """ensemble.seeds=[0,1]: two members trained with different seeds on the same train / val rows; the
    ensemble's validation predictions, threshold, probabilities and probe features come from both."""
    from covidcxr.data.io import read_xray
    from covidcxr.errors import ConfigError
    from covidcxr.evaluation.proxies import predict_files
    from covidcxr.evaluation.thresholds import select_threshold
    from covidcxr.training import run_training

    path = tiny[1]
    overrides = TINY + [f"data.manifest={path}", "train.epochs=1"]
    out = run_training(None, tmp_path / "seeds", overrides=overrides + ["ensemble.seeds=[0, 1]"])
    record = json.loads((out / "run.json").read_text())
    assert record["architecture"] == "ensemble" and record["members"] == ["members/seed_0", "members/seed_1"]
    assert record["info"]["ensemble"]["seeds"] == [0, 1] and record["info"]["seed"] == [0, 1]
    members = [out / m for m in record["members"]]
    assert [json.loads((m / "run.json").read_text())["info"]["seed"] for m in members] == [0, 1]
    assert sha256_file(members[0] / "model.safetensors") != sha256_file(members[1] / "model.safetensors")
    splits = [pd.read_csv(m / "split.csv", keep_default_na=False)["run_split"] for m in members + [out]]
    assert splits[0].equals(splits[1]) and splits[0].equals(splits[2])
    val = [pd.read_csv(m / "val_predictions.csv") for m in members + [out]]
    assert val[0]["image"].equals(val[1]["image"]) and val[0]["image"].equals(val[2]["image"])
    assert np.allclose(val[2]["p_covid"], (val[0]["p_covid"] + val[1]["p_covid"]) / 2)
    y = (val[2]["target"] == "covid").astype(int).to_numpy()
    assert record["threshold"] == pytest.approx(select_threshold(y, val[2]["p_covid"].to_numpy()))
    run, singles = load_run(out), [load_run(m) for m in members]
    files = [str(Path(tiny[0].root) / p) for p in tiny[0].table["image"].head(3)]
    images = [read_xray(p).pixels for p in files]
    assert np.allclose(run.predict_arrays(images), np.mean([r.predict_arrays(images) for r in singles], axis=0),
                       atol=1e-6)
    # The probe's features of an ensemble: its members' penultimate features side by side.
    _, feats = predict_files(run, files, features=True)
    parts = [predict_files(r, files, features=True)[1] for r in singles]
    assert feats.shape == (3, sum(p.shape[1] for p in parts)) and np.allclose(feats, np.concatenate(parts, axis=1))
    with pytest.raises(ConfigError, match="choose one kind of ensemble"):
        run_training(None, tmp_path / "both", overrides=overrides + ["ensemble.seeds=[0, 1]"], folds=2)
    with pytest.raises(ConfigError, match="different training seeds"):
        run_training(None, tmp_path / "same", overrides=overrides + ["ensemble.seeds=[3, 3]"])
    # Another train.seed trains other members (it used to be ignored by a seed ensemble).
    again = run_training(None, tmp_path / "seed1", overrides=overrides + ["ensemble.seeds=[0, 1]", "train.seed=1"])
    again_record = json.loads((again / "run.json").read_text())
    assert again_record["members"] == ["members/seed_1000", "members/seed_1001"]
    assert again_record["info"]["ensemble"]["seeds"] == [1000, 1001]
    assert sha256_file(again / "members/seed_1000/model.safetensors") != sha256_file(members[0] / "model.safetensors")
    with pytest.raises(ConfigError, match="ensemble.seeds"):
        run_training(None, tmp_path / "big", overrides=overrides + ["ensemble.seeds=[0, 1000]"])


def test_an_ensemble_under_torchrun_is_refused_before_anything_is_written(tiny, tmp_path, monkeypatch):
    """configs/quick.yaml is a seed ensemble: launched by torchrun, every rank would write the ensemble."""
    from covidcxr.errors import ConfigError
    from covidcxr.training import run_training

    monkeypatch.setenv("WORLD_SIZE", "2")
    overrides = TINY + [f"data.manifest={tiny[1]}", "train.epochs=1", "ensemble.seeds=[0, 1]"]
    with pytest.raises(ConfigError, match=r"torchrun \(DDP\) job cannot train an ensemble.*ensemble.seeds=\[\]"):
        run_training(None, tmp_path / "ddp_seeds", overrides=overrides)
    with pytest.raises(ConfigError, match="cannot train an ensemble"):
        run_training(None, tmp_path / "ddp_folds", overrides=overrides[:-1], folds=2)
    assert not (tmp_path / "ddp_seeds").exists() and not (tmp_path / "ddp_folds").exists()


def test_a_lung_roi_seed_ensemble_gets_its_imagenet_probe_reference(tiny, weights_dir, tmp_path):
    """The scorecard's source probe compares an ensemble's features with its ImageNet starting point: the
    reference model must find the members' lung segmenter (an ensemble folder holds none of its own)."""
    from conftest import EFFNET_LITE0_SHA256

    from covidcxr.audit.shortcut_checks import imagenet_twin
    from covidcxr.evaluation.proxies import predict_files
    from covidcxr.training import run_training

    overrides = TINY + [f"data.manifest={tiny[1]}", "train.epochs=1", "ensemble.seeds=[0, 1]", "preprocess.roi=lungs",
                        f"model.weights={weights_dir / 'efficientnet_lite0_imagenet_timm.pth'}",
                        f"model.weights_sha256={EFFNET_LITE0_SHA256}"]
    run = load_run(run_training(None, tmp_path / "roi_seeds", overrides=overrides))
    assert not (run.run_dir / "segmenter").exists() and (run.run_dir / "members" / "seed_0" / "segmenter").is_dir()
    twin = imagenet_twin(run)
    assert twin is not None and twin.record.architecture == "tf_efficientnet_lite0" and not twin.record.members
    files = [str(Path(tiny[0].root) / p) for p in tiny[0].table["image"].head(2)]
    _, feats = predict_files(twin, files, features=True)
    _, ens_feats = predict_files(run, files, features=True)
    assert feats.shape == (2, ens_feats.shape[1] // 2)


def test_data_counts_follow_the_configured_split_column(tiny, tmp_path):
    """data.split_column=my_split: the recorded counts are per that column, not the (empty) 'split' one."""
    manifest, _ = tiny
    table = manifest.table.copy()
    table["my_split"] = table["split"]
    table["split"] = ""
    path = manifest.replace(table).write(tmp_path / "manifest.csv")
    out = fit(load_config(None, TINY + [f"data.manifest={path}", "data.split_column=my_split", "train.epochs=1"]),
              tmp_path / "run")
    counts = pd.read_csv(out / "data_counts.csv", keep_default_na=False)
    assert set(counts["split"]) == {"train", "val"}
    assert counts.loc[counts["split"] == "val", "images"].sum() == (table["my_split"] == "val").sum()
