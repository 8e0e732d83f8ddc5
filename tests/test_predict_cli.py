"""``covidcxr predict``: real images from ../shared, bad files skipped with reasons, resume, tamper check."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from covidcxr.cli import app
from serving_helpers import ct_dicom, killed_predict_job, sample_paths, serving_run, truncated_jpeg


runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(request, tmp_path_factory):
    return serving_run(request, tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(run_dir):
    from covidcxr.models.run import load_run

    return load_run(run_dir)


@pytest.fixture()
def input_folder(data_root, tmp_path):
    """Three real JPEGs (one in a sub-folder), one in a zip, a text file called .png, a truncated JPEG, a README."""
    images = sample_paths(data_root, 4)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(images[0], folder / images[0].name)
    shutil.copy(images[1], folder / images[1].name)
    shutil.copy(images[2], folder / "sub" / images[2].name)
    with zipfile.ZipFile(folder / "batch.zip", "w") as zf:
        zf.write(images[3], f"inner/{images[3].name}")
    (folder / "notes.png").write_text("this is not an image\n")
    (folder / "cut.jpg").write_bytes(truncated_jpeg(data_root))
    (folder / "README.txt").write_text("ignored: not an image extension")
    return folder, images


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _user_error(result) -> str:
    """The CovidCXRError a command raised (``covidcxr.cli.main`` prints it as one line, exit code 2)."""
    from covidcxr.errors import CovidCXRError

    assert isinstance(result.exception, CovidCXRError), (result.exception, result.output)
    return str(result.exception)


def test_predict_folder_archive_and_bad_files(run_dir, loaded, input_folder, tmp_path):
    from covidcxr.data import read_xray

    folder, images = input_folder
    out = tmp_path / "pred.csv"
    result = _invoke("predict", run_dir, folder, "--out", out, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    names = sorted(Path(p.split("::")[-1]).name for p in table["path"])
    assert names == sorted(p.name for p in images)
    assert any("batch.zip::inner/" in p for p in table["path"])
    prob_cols = [f"prob_{c}" for c in loaded.classes]
    np.testing.assert_allclose(table[prob_cols].sum(axis=1), 1.0, atol=1e-5)
    assert (table["model_sha256"] == loaded.model_sha256).all()
    # predicted label follows the stored threshold (LoadedRun.decide) on the written probabilities
    assert table["predicted"].tolist() == loaded.decide(table[prob_cols].to_numpy())
    # the same numbers as a direct, independent prediction of the image as read
    first = table[table["path"] == str(folder / images[0].name)].iloc[0]
    direct = loaded.predict_arrays([read_xray(images[0]).pixels])[0]
    np.testing.assert_allclose(first[prob_cols].to_numpy(dtype=float), direct, atol=1e-5)
    assert first["input_sha256"] == hashlib.sha256(images[0].read_bytes()).hexdigest()
    # bad files: listed with a reason, in the output and in <out>.skipped.csv
    skipped = pd.read_csv(tmp_path / "pred.csv.skipped.csv")
    reasons = dict(zip(skipped["path"].map(lambda p: Path(p).name), skipped["reason"]))
    assert set(reasons) == {"notes.png", "cut.jpg", "README.txt"}  # nothing vanishes: README listed too
    assert "text file" in reasons["notes.png"]
    assert "not an image file extension" in reasons["README.txt"]
    assert "truncated" in reasons["cut.jpg"].lower() or "corrupt" in reasons["cut.jpg"].lower()
    assert "notes.png" in result.output and "1 non-image files ignored" in result.output


def test_existing_output_needs_resume_or_overwrite(run_dir, data_root, tmp_path):
    image = sample_paths(data_root, 1)[0]
    out = tmp_path / "p.json"
    assert _invoke("predict", run_dir, image, "--out", out).exit_code == 0
    records = json.loads(out.read_text())
    assert len(records) == 1 and records[0]["path"] == str(image)
    again = _invoke("predict", run_dir, image, "--out", out)
    assert "--resume" in _user_error(again) and "p.json exists" in _user_error(again)
    assert _invoke("predict", run_dir, image, "--out", out, "--overwrite").exit_code == 0
    resumed = _invoke("predict", run_dir, image, "--out", out, "--resume")
    assert resumed.exit_code == 0 and "1 already done" in resumed.output
    assert len(json.loads(out.read_text())) == 1


def test_killed_job_resumes_without_losing_or_repeating_rows(loaded, data_root, tmp_path, monkeypatch):
    from covidcxr.serving.batch import journal_path, predict_files

    images = sample_paths(data_root, 5)
    out = tmp_path / "big.csv"
    killed_predict_job(monkeypatch, loaded, images, out)
    assert not out.exists()  # the output is written only when the job is finished
    partial = pd.read_csv(journal_path(out))
    assert partial["path"].tolist() == [str(p) for p in images[:2]]  # the finished batch is on disk
    result = predict_files(loaded, images, out, batch_size=2, progress=False, resume=True)
    assert result.already_done == 2 and result.predicted == 3
    table = pd.read_csv(out)
    assert table["path"].tolist() == [str(p) for p in images]


def test_heatmaps_written_per_image(run_dir, data_root, tmp_path):
    images = sample_paths(data_root, 2)
    out = tmp_path / "p.csv"
    result = _invoke("predict", run_dir, *images, "--out", out, "--heatmaps", tmp_path / "heat")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    for path in table["heatmap"]:
        assert Path(path).is_file() and Path(path).stat().st_size > 10_000  # a rendered overlay, not a stub
    assert len(set(table["heatmap"])) == 2


def test_refuses_model_whose_sha256_changed(run_dir, data_root, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(run_dir, tampered)
    model = tampered / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte of a weight
    model.write_bytes(bytes(data))
    result = _invoke("predict", tampered, sample_paths(data_root, 1)[0], "--out", tmp_path / "p.csv")
    message = _user_error(result)
    assert "does not match" in message and "model.safetensors" in message
    assert not (tmp_path / "p.csv").exists()


def test_ct_dicom_skipped_with_reason_unless_allowed(run_dir, data_root, tmp_path):
    ct = tmp_path / "scan.dcm"
    ct.write_bytes(ct_dicom(data_root))
    out = tmp_path / "refused.csv"
    result = _invoke("predict", run_dir, ct, "--out", out)
    assert result.exit_code == 1, result.output  # nothing was predicted: a failed job
    assert "nothing was predicted" in result.output
    skipped = pd.read_csv(str(out) + ".skipped.csv")
    assert skipped["path"].tolist() == [str(ct)] and "CT" in skipped["reason"][0]
    assert len(pd.read_csv(out)) == 0

    allowed = tmp_path / "allowed.csv"
    result = _invoke("predict", run_dir, ct, "--out", allowed, "--allow-non-frontal")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(allowed)
    assert rows["path"].tolist() == [str(ct)] and np.isclose(rows.filter(like="prob_").sum(axis=1), 1).all()


def test_heatmaps_of_allowed_non_frontal_dicom(run_dir, data_root, tmp_path):
    # --allow-non-frontal must reach the heatmap writer too, which reads each image again
    ct = tmp_path / "scan.dcm"
    ct.write_bytes(ct_dicom(data_root))
    out = tmp_path / "p.csv"
    result = _invoke("predict", run_dir, ct, "--out", out, "--allow-non-frontal", "--heatmaps", tmp_path / "heat")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert table["path"].tolist() == [str(ct)]
    assert Path(table["heatmap"][0]).is_file() and Path(table["heatmap"][0]).stat().st_size > 10_000


def test_plausibility_gate_refuses_a_thumbnail_unless_overridden(run_dir, data_root, tmp_path):
    from PIL import Image

    from badinput import phantom

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sample_paths(data_root, 1)[0], folder / "good.jpg")
    Image.fromarray(phantom(96, 48)).save(folder / "thumb.png")  # radiograph-like, but 48 px wide
    strict = _invoke("predict", run_dir, folder, "--out", tmp_path / "a.csv")
    assert strict.exit_code == 0, strict.output
    skipped = pd.read_csv(tmp_path / "a.csv.skipped.csv")
    assert "too small" in skipped.set_index("path").loc[str(folder / "thumb.png"), "reason"]
    relaxed = _invoke("predict", run_dir, folder, "--out", tmp_path / "b.csv", "--min-side", "32")
    assert relaxed.exit_code == 0, relaxed.output
    assert set(pd.read_csv(tmp_path / "b.csv")["path"]) == {str(folder / "good.jpg"), str(folder / "thumb.png")}
