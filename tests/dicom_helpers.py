"""Helpers of the DICOM node tests: bad instances built from the shared data, and a C-STORE / C-ECHO sender."""

from __future__ import annotations

import io
from pathlib import Path

from orthanc_helpers import dx_from_jpeg
from serving_helpers import SAMPLE_IMAGES

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _edit(data: bytes, **changes) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    if "SOPClassUID" in changes:
        ds.file_meta.MediaStorageSOPClassUID = changes["SOPClassUID"]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def good_dx(data_root: Path, index: int = 0, **kwargs) -> bytes:
    return dx_from_jpeg(data_root / SAMPLE_IMAGES[index], **kwargs)


def bad_instances(data_root: Path) -> dict[str, bytes]:
    """Each kind of instance the node must refuse, made from the shared images."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dx = good_dx(data_root, 1)
    full = pydicom.dcmread(io.BytesIO(dx))
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID = BASIC_TEXT_SR
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.StudyInstanceUID, sr.SeriesInstanceUID = full.StudyInstanceUID, generate_uid()
    sr.PatientName, sr.PatientID, sr.Modality = full.PatientName, full.PatientID, "SR"
    sr.ValueType, sr.ContinuityOfContent, sr.CompletionFlag = "CONTAINER", "SEPARATE", "COMPLETE"
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return {
        "sr": buf.getvalue(),  # a non-image object
        "ct_sop_class": _edit(good_dx(data_root, 2), SOPClassUID=CT_IMAGE_STORAGE, Modality="CT"),
        "ct_modality": _edit(good_dx(data_root, 3), Modality="CT"),  # DX SOP class, header says CT
        "lateral": good_dx(data_root, 4, view="LL"),
        "truncated": _edit(dx, PixelData=full.PixelData[: len(full.PixelData) // 3]),
    }


def sop_instance_uid(data: bytes) -> str:
    import pydicom

    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


class Sender:
    """A modality: one association to the node, C-STORE of encoded instances, C-ECHO."""

    def __init__(self, port: int, *, calling: str = "ORTHANC", called: str = "COVIDCXR"):
        self.port, self.calling, self.called = port, calling, called

    def _assoc(self, sop_classes):
        from pynetdicom import AE

        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        for uid in sorted(set(sop_classes)):
            ae.add_requested_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        return ae.associate("127.0.0.1", self.port, ae_title=self.called)

    def store(self, *instances: bytes) -> list[tuple[int, str]]:
        """(status, ErrorComment) per instance."""
        import pydicom

        datasets = [pydicom.dcmread(io.BytesIO(d)) for d in instances]
        assoc = self._assoc([str(ds.SOPClassUID) for ds in datasets] + ["1.2.840.10008.1.1"])
        assert assoc.is_established, "association to the node not established"
        try:
            answers = []
            for ds in datasets:
                status = assoc.send_c_store(ds)
                answers.append((int(status.Status), str(status.get("ErrorComment", ""))))
            return answers
        finally:
            assoc.release()

    def echo(self) -> int | None:
        """C-ECHO status, or None when the association was rejected / not established."""
        assoc = self._assoc(["1.2.840.10008.1.1"])
        if not assoc.is_established:
            return None
        try:
            return int(assoc.send_c_echo().Status)
        finally:
            assoc.release()
