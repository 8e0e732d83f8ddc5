"""One received instance -> checked, predicted, explained -> the result objects (SR + overlay).

Shared by the Storage SCP (:mod:`covidcxr.serving.dicom.node`) and the DICOMweb path
(:mod:`covidcxr.serving.dicom.dicomweb`). Nothing here reads, preprocesses or draws on its own: the
reader and its frontal / chest / modality rules are :func:`covidcxr.models.predict.prepare_bytes`, the
model is :func:`covidcxr.models.run.load_run` (SHA-256 checked), the heatmap is
:class:`covidcxr.serving.heatmap.CamRenderer`.

An instance the node will not analyse raises :class:`Refused` with the DIMSE status it is answered with:

======  ===========================================================================
0x0122  SOP class not analysed (not CR / DX image storage: SR, CT, SC, US, ...)
0xA700  out of resources (instance larger than the configured limit)
0xC001  not a frontal chest radiograph (the reader's modality / view / body-part rules)
0xC002  unreadable: header or pixel data truncated, corrupt or undecodable
0xC003  implausible image (the plausibility gate: tiny, elongated, constant, noise)
0xC0FF  unexpected internal error (a bug; logged with its traceback)
======  ===========================================================================
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from covidcxr.errors import CovidCXRError, ImageReadError, ImplausibleImageError, NotAChestXRayError
from covidcxr.models.predict import PredictionRecord, PreparedInput, predict_inputs, prepare_bytes

log = logging.getLogger("covidcxr.dicom")

#: SOP classes the node analyses: CR, DX for presentation, DX for processing.
ANALYSED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
NOT_FRONTAL_CHEST = 0xC001
UNREADABLE = 0xC002
IMPLAUSIBLE = 0xC003
INTERNAL_ERROR = 0xC0FF
STATUS_NAMES = {SUCCESS: "success", SOP_CLASS_NOT_SUPPORTED: "SOP class not analysed",
                OUT_OF_RESOURCES: "out of resources", NOT_FRONTAL_CHEST: "not a frontal chest radiograph",
                UNREADABLE: "unreadable", IMPLAUSIBLE: "implausible image", INTERNAL_ERROR: "internal error"}


class Refused(CovidCXRError):
    """An instance the node does not analyse, with the DIMSE status it is answered with and the reason."""

    def __init__(self, status: int, reason: str):
        self.status, self.reason = status, reason
        super().__init__(f"status 0x{status:04X} ({STATUS_NAMES.get(status, 'refused')}): {reason}")


@dataclass
class Analysis:
    """The prediction on one instance and the DICOM objects that carry it."""

    record: PredictionRecord
    source: object  # pydicom header (no pixels) of the received instance
    results: list = field(default_factory=list)  # [SR, Secondary Capture]
    predict_ms: float = 0.0

    def probabilities(self, classes: list[str]) -> dict[str, float]:
        return {c: float(p) for c, p in zip(classes, self.record.probabilities)}


def read_header(data: bytes):
    """The pydicom header (no pixel data) of an encoded instance, or :class:`Refused` (0xC002)."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not str(ds.get(keyword, "") or "").strip():
                raise ValueError(f"no {keyword}")
    except Exception as exc:  # InvalidDicomError, EOFError, ValueError ...: no common base
        raise Refused(UNREADABLE, f"unreadable DICOM header: {exc.__class__.__name__}: {str(exc)[:200]}") from None
    return ds


class Analyser:
    """The run's model with its Grad-CAM, turning received instances into result objects."""

    def __init__(self, run_dir: str | Path, *, allow_non_frontal: bool = False, heatmaps: bool = True,
                 max_instance_bytes: int | None = None):
        from covidcxr.models.run import load_run
        from covidcxr.serving.heatmap import CamRenderer

        self.run = load_run(run_dir)
        self.cam = CamRenderer(self.run) if heatmaps else None
        self.allow_non_frontal = allow_non_frontal
        self.max_instance_bytes = max_instance_bytes

    def check(self, data: bytes, source=None) -> PreparedInput:
        """Decode and preprocess ``data`` (one encoded instance) or raise :class:`Refused` with the status."""
        if self.max_instance_bytes is not None and len(data) > self.max_instance_bytes:
            raise Refused(OUT_OF_RESOURCES, f"instance of {len(data):,} bytes is larger than the node's limit "
                                            f"({self.max_instance_bytes:,})")
        source = source if source is not None else read_header(data)
        sop_class = str(source.SOPClassUID)
        if sop_class not in ANALYSED_SOP_CLASSES:
            name = getattr(source.SOPClassUID, "name", sop_class)
            raise Refused(SOP_CLASS_NOT_SUPPORTED, f"SOP class {name} is not analysed; covidcxr reads CR and DX "
                                                   "chest radiographs")
        try:
            return prepare_bytes(data, "instance", self.run.spec, allow_non_frontal=self.allow_non_frontal)
        except NotAChestXRayError as exc:
            raise Refused(NOT_FRONTAL_CHEST, exc.reason) from None
        except ImplausibleImageError as exc:
            raise Refused(IMPLAUSIBLE, exc.reason) from None
        except ImageReadError as exc:
            raise Refused(UNREADABLE, exc.reason) from None

    def analyse(self, prepared: PreparedInput, source) -> Analysis:
        """Predict, explain and build the SR (and the overlay Secondary Capture) for one checked instance."""
        from covidcxr.serving.dicom.capture import build_overlay
        from covidcxr.serving.dicom.report import build_report
        from covidcxr.serving.dicom.uids import result_uids

        run = self.run
        start = time.perf_counter()
        if self.cam is not None:
            with self.cam.lock:  # Grad-CAM hooks the model: no plain forward pass at the same time
                record = predict_inputs(run, [prepared])[0]
        else:
            record = predict_inputs(run, [prepared])[0]
        heat = self.cam.heatmaps([prepared])[0] if self.cam is not None else None
        predict_ms = (time.perf_counter() - start) * 1000
        try:
            number = max(1, int(source.get("InstanceNumber") or 1))
        except (TypeError, ValueError):
            number = 1
        with warnings.catch_warnings():
            # highdicom warns about one-component person names copied from the source (e.g. "ward"):
            # they are copied as they are, never rewritten.
            warnings.simplefilter("ignore", UserWarning)
            series, sop = result_uids(source, run.model_sha256, "sr")
            results = [build_report(source, record, run, series_uid=series, sop_uid=sop, instance_number=number)]
            if heat is not None:
                series, sop = result_uids(source, run.model_sha256, "overlay")
                results.append(build_overlay(source, record, heat, run, series_uid=series, sop_uid=sop,
                                               instance_number=number))
        return Analysis(record=record, source=source, results=results, predict_ms=predict_ms)
