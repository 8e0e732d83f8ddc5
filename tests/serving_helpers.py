"""Helpers shared by the serving tests (batch predict, ONNX, service, browser)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

#: Real images from ../shared/data/cxr: two sources, three labels, small files.
SAMPLE_IMAGES = [
    "images/figure1/covid/COVID-00001.jpg",
    "images/nih/normal/00001280_004.jpg",
    "images/kermany/normal/IM-0117-0001.jpg",
    "images/rsna/normal/Normal-10006.jpg",
    "images/nih/pneumonia/00000061_012.jpg",
]
DICOM = "dicom/RG1_UNCR.dcm"


def sample_paths(data_root: Path, n: int = len(SAMPLE_IMAGES)) -> list[Path]:
    paths = [data_root / p for p in SAMPLE_IMAGES[:n]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        pytest.fail(f"shared sample images missing: {missing}")
    return paths


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a run directory (tests write model.onnx / audit.sqlite into it)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.onnx", "audit.sqlite"))
    return dst


def serving_run(request, tmp_path_factory) -> Path:
    """A private copy of the session's ``trained_run`` fixture."""
    src = request.getfixturevalue("trained_run")
    return copy_run(Path(src), tmp_path_factory.mktemp("run") / "run")


def truncated_jpeg(data_root: Path) -> bytes:
    data = (data_root / SAMPLE_IMAGES[0]).read_bytes()
    return data[: len(data) // 2]


def ct_dicom(data_root: Path) -> bytes:
    """The shared chest CR DICOM relabelled as CT (a non-radiograph the service must refuse)."""
    import pydicom

    ds = pydicom.dcmread(data_root / DICOM)
    ds.Modality = "CT"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def dicom_identifiers(data_root: Path) -> list[str]:
    """Patient-identifying header values of the shared DICOM (must never reach an audit log)."""
    import pydicom

    ds = pydicom.dcmread(data_root / DICOM, stop_before_pixels=True)
    values = [str(ds.PatientName), str(ds.PatientID), str(ds.get("PatientBirthDate", "")),
              str(ds.get("InstitutionName", "")), str(ds.get("StudyDate", ""))]
    return [v for v in values if len(v) >= 4]


def killed_predict_job(monkeypatch, loaded, images, out, batch_size: int = 2) -> None:
    """Run ``predict_files`` and kill it (KeyboardInterrupt) as its second batch is predicted."""
    import covidcxr.models.predict as predict_mod
    from covidcxr.serving.batch import predict_files

    real = predict_mod.predict_inputs
    calls = {"n": 0}

    def dies_on_second_batch(run, good):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(run, good)

    monkeypatch.setattr(predict_mod, "predict_inputs", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        predict_files(loaded, images, out, batch_size=batch_size, progress=False)
    monkeypatch.setattr(predict_mod, "predict_inputs", real)

