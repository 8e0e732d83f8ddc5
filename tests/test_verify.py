"""Verifiable runs: the record hashes every train / val / test image, the manifest and the config;
``covidcxr verify`` names each mismatch; tampered weights and malicious pickles are refused."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.errors import WeightsError
from covidcxr.models.provenance import DATA_HASHES_FILE
from covidcxr.models.record import read_run_record
from covidcxr.models.run import load_run
from covidcxr.models.verify import verify_run

pytestmark = pytest.mark.slow


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_record_hashes_every_train_val_test_image_the_manifest_and_the_config(trained_run, data_root):
    record = read_run_record(trained_run)
    prov = record.provenance
    hashes = pd.read_csv(trained_run / DATA_HASHES_FILE, dtype=str)
    split = pd.read_csv(trained_run / "split.csv", dtype=str)
    used = split[split["run_split"].isin(["train", "val", "test"])]
    assert len(hashes) == len(used) and set(hashes["split"]) == {"train", "val", "test"}
    assert prov.images.counts == hashes["split"].value_counts().to_dict()
    row = hashes.iloc[len(hashes) // 2]  # spot-check one hash against the file itself
    assert row["sha256"] == hashlib.sha256((data_root / row["image"]).read_bytes()).hexdigest()
    assert prov.config.sha256 == hashlib.sha256((trained_run / "config.yaml").read_bytes()).hexdigest()
    assert prov.manifest.file_sha256 == hashlib.sha256((data_root / "manifest.csv").read_bytes()).hexdigest()
    result = _invoke("verify", trained_run)
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "NOT" not in result.output


@pytest.fixture
def tampered_data(trained_run, data_root, tmp_path):
    """A data folder of links to the shared images, except: one image re-encoded (one byte changed),
    one image missing, and a manifest with one byte changed."""
    root = tmp_path / "data"
    hashes = pd.read_csv(trained_run / DATA_HASHES_FILE, dtype=str)
    for image in hashes["image"]:
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(data_root / image, root / image)
    changed, gone = hashes["image"].iloc[3], hashes["image"].iloc[7]
    (root / changed).unlink()
    shutil.copyfile(data_root / changed, root / changed)
    _flip_one_byte(root / changed)
    (root / gone).unlink()
    shutil.copyfile(data_root / "manifest.csv", root / "manifest.csv")
    _flip_one_byte(root / "manifest.csv")
    return root, changed, gone


def test_verify_names_each_changed_or_missing_data_file(trained_run, tampered_data):
    root, changed, gone = tampered_data
    report = verify_run(trained_run, data_root=root)
    failed = {c.what: c.status for c in report.mismatches}
    assert failed == {f"image {changed}": "mismatch", f"image {gone}": "missing",
                      f"manifest {root / 'manifest.csv'}": "mismatch"}
    result = _invoke("verify", trained_run, "--data", root)
    assert result.exit_code == 1 and changed in result.output and gone in result.output


def test_verify_names_tampered_weights_and_config_and_loading_refuses(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _flip_one_byte(run / "model.safetensors")
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "# edited\n")
    failed = {c.what for c in verify_run(run, check_data=False).mismatches}
    assert failed == {"weights model.safetensors", "resolved config config.yaml"}
    with pytest.raises(WeightsError, match="model.safetensors.*does not match the recorded"):
        load_run(run)


def test_serve_refuses_weights_with_one_byte_changed(trained_run, tmp_path):
    from covidcxr.serving.app import create_app
    from covidcxr.serving.settings import ServiceSettings

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _flip_one_byte(run / "model.safetensors")
    with pytest.raises(WeightsError, match="does not match the recorded"):
        create_app(run, ServiceSettings(heatmaps=False, audit_db=f"sqlite:///{tmp_path / 'audit.db'}"))


class _Payload:
    """Unpickling this runs ``exec`` (writes a marker file): what a booby-trapped checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_as_model_weights_is_refused_without_running_it(writer, split_manifest, tmp_path):
    from covidcxr.training import load_config
    from covidcxr.training.loop import fit

    marker, path = tmp_path / "marker.txt", tmp_path / "evil.pth"
    state = {"conv.weight": torch.zeros(1), "bias": _Payload(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    config = load_config(None, ["model.name=tf_efficientnet_lite0", f"model.weights={path}",
                                "preprocess.image_size=64", "train.epochs=1", "train.progress=false"])
    with pytest.raises(WeightsError, match="refused, not a weights-only file"):
        fit(config, tmp_path / "run", manifest=split_manifest)
    assert not marker.exists() and not (tmp_path / "run").exists()
    pickle.loads(path.read_bytes()) if writer == "pickle.dump" else torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"  # the payload was live: only the safe loader kept it from running
