"""A real Orthanc PACS for the DICOM tests (Debian's ``orthanc`` + ``orthanc-dicomweb``, installed by scripts/test.sh).

``with OrthancServer(folder) as pacs:`` starts ``/usr/sbin/Orthanc`` with a throwaway configuration and
storage folder, HTTP on 127.0.0.1 only, and stops it when the block ends. Also: wrapping the shared
JPEGs as DX DICOM files with a made-up test patient.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"


def orthanc_binary() -> str:
    """Path of Orthanc; skipped locally when it is not installed, a failure in CI (CI=true)."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if binary is None or not DICOMWEB_PLUGIN.exists():
        msg = ("Orthanc or its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb; "
               "scripts/test.sh installs them as root)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {msg}", pytrace=False)
        pytest.skip(msg)
    return binary


def free_port() -> int:
    from covidcxr.serving.live import free_port as _free

    return _free("127.0.0.1")


class OrthancServer:
    """One Orthanc on loopback ports with its own storage; REST helpers via httpx."""

    def __init__(self, folder: Path, *, aet: str = ORTHANC_AET):
        self.folder = Path(folder)
        self.aet = aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.process: subprocess.Popen | None = None

    def _config(self) -> dict:
        return {
            "Name": "covidcxr-test-pacs", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": self.aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "DicomCheckCalledAet": False,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "SaveJobs": False, "ConcurrentJobs": 1, "StableAge": 60, "HttpThreadsCount": 4,
            "DicomScpTimeout": 120, "DicomScuTimeout": 120, "StorageCompression": False,
        }

    def __enter__(self) -> "OrthancServer":
        import httpx

        binary = orthanc_binary()
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self._config(), indent=1))
        self.log = open(self.folder / "orthanc.log", "wb")
        self.process = subprocess.Popen([binary, str(config)], stdout=self.log, stderr=subprocess.STDOUT,
                                        cwd=self.folder)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not start; log:\n{(self.folder / 'orthanc.log').read_text()[-3000:]}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- REST
    def rest(self, method: str, path: str, **kwargs):
        import httpx

        response = httpx.request(method, f"{self.url}{path}", timeout=300, **kwargs)
        response.raise_for_status()
        return response.json() if "json" in response.headers.get("content-type", "") else response.content

    def upload(self, data: bytes) -> dict:
        """POST /instances: store one DICOM file; returns Orthanc's answer (ID, ParentStudy, ...)."""
        return self.rest("POST", "/instances", content=data, headers={"content-type": "application/dicom"})

    def add_modality(self, name: str, aet: str, port: int) -> None:
        self.rest("PUT", f"/modalities/{name}", json={"AET": aet, "Host": "127.0.0.1", "Port": port})

    def store_to(self, modality: str, resources: list[str]) -> dict:
        """POST /modalities/{name}/store (synchronous C-STORE of the given Orthanc resources)."""
        return self.rest("POST", f"/modalities/{modality}/store", json={"Resources": resources, "Synchronous": True})

    def study_series(self, study_id: str) -> list[dict]:
        return self.rest("GET", f"/studies/{study_id}/series")

    def instance_file(self, instance_id: str) -> bytes:
        return self.rest("GET", f"/instances/{instance_id}/file")


def dx_from_jpeg(jpeg: Path, *, patient_name: str = "Test^Patient", patient_id: str = "CXR-TEST-0001",
                 study_uid: str | None = None, view: str = "PA", modality: str = "DX") -> bytes:
    """A real shared JPEG wrapped as a DX (for presentation) chest image; made-up test patient."""
    import io

    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(Image.open(jpeg).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20200401", "101500", "ACC-TEST-1", "1"
    ds.ReferringPhysicianName = "Referrer^Test"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, "CHEST", view
    ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation = 1, 1, ["L", "F"]
    ds.Manufacturer = "covidcxr tests"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
