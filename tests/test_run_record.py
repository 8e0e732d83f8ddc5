"""The run record: typed, versioned, one writer, and an integrity check that covers its content."""

from __future__ import annotations

import json

import pytest
import torch

from covidcxr.data.preprocess import PreprocessSpec
from covidcxr.errors import CovidCXRError, WeightsError
from covidcxr.models.record import RUN_KEY_ENV, read_run_record, update_run_record
from covidcxr.models.registry import create_model, resolve_spec
from covidcxr.models.run import load_run, save_model, save_weights
from covidcxr.models.weights import sha256_file

CLASSES = ["non-covid", "covid"]


@pytest.fixture()
def run_dir(tmp_path):
    torch.manual_seed(0)
    spec = resolve_spec(PreprocessSpec(image_size=64), "resnet18")
    save_model(tmp_path / "run", create_model("resnet18", 2), architecture="resnet18", classes=CLASSES,
               preprocess_spec=spec, threshold=0.3, label_space={"name": "binary"})
    return tmp_path / "run"


def _edit(run_dir, change):
    path = run_dir / "run.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record, indent=2))


def test_record_round_trips_and_is_typed(run_dir):
    record = read_run_record(run_dir)
    assert record.format == "covidcxr-run/2" and record.classes == CLASSES and record.threshold == 0.3
    assert record.preprocess.resolved and record.preprocess.working_size == 512 and record.channels == 3
    assert record.integrity is not None and len(record.integrity.record_sha256) == 64
    run = load_run(run_dir)
    assert run.spec == record.preprocess and run.backend == "torch"


@pytest.mark.parametrize("field, change", [
    ("classes", lambda r: r.__setitem__("classes", r["classes"][::-1])),
    ("threshold", lambda r: r.__setitem__("threshold", 0.0)),
    ("preprocess", lambda r: r["preprocess"].__setitem__("intensity", "none")),
    ("label_space", lambda r: r.__setitem__("label_space", {"name": "3class"})),
    ("positive_class", lambda r: r.__setitem__("positive_class", "non-covid")),
])
def test_editing_a_decision_field_is_refused_naming_it(run_dir, field, change):
    _edit(run_dir, change)
    with pytest.raises(WeightsError, match=f"changed since it was written \\({field}\\)"):
        load_run(run_dir)
    with pytest.raises(WeightsError, match=field):
        read_run_record(run_dir)


def test_swapped_weights_with_their_new_hash_written_in_are_refused(run_dir):
    torch.manual_seed(1)
    save_weights(run_dir / "model.safetensors", create_model("resnet18", 2))
    with pytest.raises(WeightsError, match="does not match the recorded"):
        load_run(run_dir)
    new = sha256_file(run_dir / "model.safetensors")
    _edit(run_dir, lambda r: r.__setitem__("model_sha256", new))
    with pytest.raises(WeightsError, match=r"\(model_sha256\)"):
        load_run(run_dir)


def test_a_record_without_integrity_block_or_of_format_1_is_refused(run_dir):
    _edit(run_dir, lambda r: r.pop("integrity"))
    with pytest.raises(WeightsError, match="no integrity record"):
        load_run(run_dir)
    _edit(run_dir, lambda r: r.__setitem__("format", "covidcxr-run/1"))
    with pytest.raises(CovidCXRError, match="Re-train"):
        load_run(run_dir)


def test_updates_go_through_the_writer_and_stay_valid(run_dir):
    update_run_record(run_dir, calibration={"method": "temperature", "temperature": 1.7})
    assert read_run_record(run_dir).calibration["temperature"] == 1.7
    load_run(run_dir)  # still verifies
    with pytest.raises(CovidCXRError, match="invalid change"):
        update_run_record(run_dir, threshold=2.0)
    with pytest.raises(CovidCXRError, match="invalid change"):
        update_run_record(run_dir, not_a_field=1)


def test_hmac_with_a_secret_key(run_dir, monkeypatch, tmp_path):
    # Written without the key: a loader that has the key refuses it (it cannot be told from a forgery).
    monkeypatch.setenv(RUN_KEY_ENV, "hospital-secret")
    with pytest.raises(WeightsError, match="no HMAC"):
        load_run(run_dir)
    spec = resolve_spec(PreprocessSpec(image_size=64), "resnet18")
    save_model(tmp_path / "signed", create_model("resnet18", 2), architecture="resnet18", classes=CLASSES,
               preprocess_spec=spec)
    load_run(tmp_path / "signed")
    # Someone without the key recomputes every hash after an edit: the HMAC gives it away.
    monkeypatch.setenv(RUN_KEY_ENV, "attacker-guess")
    with pytest.raises(WeightsError, match="HMAC does not match"):
        load_run(tmp_path / "signed")


def test_invalid_content_is_a_clear_error(run_dir):
    from covidcxr.models.record import RunRecord

    record = read_run_record(run_dir)
    with pytest.raises(ValueError, match="positive_class"):
        RunRecord.model_validate({**record.model_dump(exclude={"integrity"}), "positive_class": "flu"})
    with pytest.raises(ValueError, match="probability"):
        RunRecord.model_validate({**record.model_dump(exclude={"integrity"}), "threshold": float("nan")})


def test_a_runs_split_reads_images_where_its_training_manifest_could_and_nowhere_else(data_root, tmp_path):
    """A run trained on a manifest that keeps its images in its own folder (outside the data root, like
    the backdoor benchmark's stamped copies) can still evaluate its own split.csv; without the recorded
    image roots the same rows are refused."""
    import shutil
    from types import SimpleNamespace

    import numpy as np

    from covidcxr.data.manifest import Manifest
    from covidcxr.errors import ManifestError
    from covidcxr.models.run_split import read_run_split, write_run_split

    from pathlib import Path

    shared = Manifest.read(data_root / "manifest.csv")
    sub = shared.subset(mask=shared.table.index.isin(shared.table.groupby("label").head(2).index))
    folder = tmp_path / "elsewhere"
    (folder / "images").mkdir(parents=True)
    sources = sub.image_paths()
    for i, p in enumerate(sources):
        shutil.copyfile(p, folder / "images" / f"{i}{p.suffix}")
    rows = sub.table.reset_index(drop=True).assign(
        image=[f"images/{i}{p.suffix}" for i, p in enumerate(sources)],
        split=["train", "test"] * (len(sources) // 2) + ["train"] * (len(sources) % 2))
    Manifest(rows, root=folder, name="m.csv").write(folder / "m.csv")
    manifest = Manifest.read(folder / "m.csv")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorded = write_run_split(run_dir, manifest, manifest.table["split"].to_numpy())
    assert str(folder.resolve()) in recorded.image_roots
    run = SimpleNamespace(record=SimpleNamespace(split=recorded), run_dir=run_dir)
    paths = read_run_split(run.run_dir, run.record).image_paths(check_root=True)
    assert [p.name for p in paths] == [Path(i).name for i in rows["image"]] and all(p.is_file() for p in paths)
    bare = SimpleNamespace(record=SimpleNamespace(split=recorded.model_copy(update={"image_roots": []})), run_dir=run_dir)
    with pytest.raises(ManifestError, match="outside the data root"):
        read_run_split(bare.run_dir, bare.record).image_paths(check_root=True)
    assert np.array_equal(read_run_split(run.run_dir, run.record).table["split"].to_numpy(), manifest.table["split"].to_numpy())


def test_a_moved_run_still_finds_its_images_under_the_data_root(trained_run, data_root, tmp_path, monkeypatch):
    """split.csv names images relative to the run; a run copied elsewhere (another depth, another
    machine) resolves them through its ``image_in_data_root`` column under the data root here."""
    import os
    import shutil

    from covidcxr.models.record import read_run_record
    from covidcxr.models.run_split import IMAGE_IN_DATA_ROOT, read_run_split

    moved = tmp_path / "a" / "b" / "c" / "copied_run"
    shutil.copytree(trained_run, moved)
    record = read_run_record(moved)
    raw = read_run_split(trained_run, record)
    assert raw.table[IMAGE_IN_DATA_ROOT].astype(str).str.startswith("images/").all()
    stale = [moved / p for p in raw.table["image"]]  # where the copied split.csv points: nowhere
    assert not any(p.exists() for p in stale[:20])
    split = read_run_split(moved, record)
    paths = split.image_paths(check_root=True)
    assert all(p.is_file() for p in paths)
    assert [os.path.realpath(p) for p in paths] == [os.path.realpath(p) for p in raw.image_paths()]
    assert (split.table["split"] == raw.table["split"]).all()
    # The same data under another root (a data folder mounted elsewhere): given explicitly, used.
    other = tmp_path / "mounted_data"
    other.symlink_to(data_root)
    monkeypatch.setenv("COVIDCXR_DATA_ROOT", str(tmp_path / "nowhere"))
    assert all(p.is_file() for p in read_run_split(moved, record, data_root=other).image_paths())
    # No data root holds them: the rows stay as split.csv says, for the caller to report as missing.
    assert not any(p.exists() for p in read_run_split(moved, record).image_paths()[:20])
