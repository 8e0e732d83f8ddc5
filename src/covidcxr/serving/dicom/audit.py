"""Audit log of the DICOM node: one row per event (received, refused, processed, sent, failed), no PHI.

Same pattern as the web service's log (:mod:`covidcxr.serving.audit_log`): SQLAlchemy, SQLite by
default, append-only, one writer lock. A row holds the SHA-256 of the SOP Instance UID (never the UID,
and no patient name, id, date, accession number or pixels), the calling AE title (a device, not a
person), the model's SHA-256, the probabilities and decision, the DIMSE status, timings and the
outcome. Reasons lose every identifying header value of the instance (:data:`IDENTIFYING_KEYWORDS`) and
then pass through :func:`~covidcxr.serving.audit_log.scrub_reason` with the received bytes, so no text
copied out of the DICOM header reaches the log.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone

import sqlalchemy as sa

from covidcxr.serving.audit_log import open_audit_database, scrub_reason

_metadata = sa.MetaData()
events_table = sa.Table(
    "dicom_events",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time_utc", sa.String(32), nullable=False, index=True),
    sa.Column("event", sa.String(16), nullable=False),  # received, refused, duplicate, processed, failed, rejected
    sa.Column("sop_uid_sha256", sa.String(64), index=True),
    sa.Column("calling_ae", sa.String(16)),
    sa.Column("channel", sa.String(16)),  # c-store, dicomweb
    sa.Column("dimse_status", sa.Integer),
    sa.Column("input_sha256", sa.String(64)),
    sa.Column("model_sha256", sa.String(64)),
    sa.Column("predicted", sa.String(64)),
    sa.Column("probabilities_json", sa.Text),
    sa.Column("threshold", sa.Float),
    sa.Column("results_sent", sa.Integer),
    sa.Column("queue_wait_ms", sa.Float),
    sa.Column("predict_ms", sa.Float),
    sa.Column("send_ms", sa.Float),
    sa.Column("total_ms", sa.Float),
    sa.Column("error", sa.Text),
)
#: Columns of the audit table, in order (documented in docs/pacs.md).
DICOM_AUDIT_COLUMNS = tuple(c.name for c in events_table.columns)


#: Header values that identify a patient, a study or an instance; removed from any reason before it is stored
#: (whatever their length: the generic scrubber only catches runs of 6+ characters).
IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientBirthDate",
                        "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "InstitutionName",
                        "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def _identifying_values(data: bytes) -> list[str]:
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        values = []
        for keyword in IDENTIFYING_KEYWORDS:
            value = ds.get(keyword)
            if value is None:
                continue
            values.extend(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            if keyword == "PatientName":
                values.extend(str(c) for c in value.components if c)
    except Exception:  # unreadable header: the generic scrubber is all there is
        return []
    return sorted({v.strip() for v in values if len(v.strip()) >= 2}, key=len, reverse=True)


def scrub(reason: str, data: bytes) -> str:
    """``reason`` without identifying header values of ``data`` and without text copied out of it."""
    text = str(reason)
    for value in _identifying_values(data) if data else []:
        text = text.replace(value, "[...]")
    return scrub_reason(text, data)


class DicomAuditLog:
    """Append-only event log of the DICOM node on any SQLAlchemy database (SQLite file by default)."""

    def __init__(self, url: str):
        self.engine = open_audit_database(url, _metadata, "DICOM audit database", "dicom-audit.sqlite")
        self.url = url
        self._lock = threading.Lock()

    def record(self, event: str, *, data: bytes = b"", error: str | None = None,
               probabilities: dict[str, float] | None = None, **columns) -> None:
        unknown = set(columns) - set(DICOM_AUDIT_COLUMNS)
        if unknown:
            raise TypeError(f"unknown audit columns {sorted(unknown)}")
        row = dict(columns, event=event, time_utc=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                   probabilities_json=json.dumps(probabilities) if probabilities is not None else None,
                   error=scrub(error, data) if error else None)
        with self._lock, self.engine.begin() as conn:
            conn.execute(events_table.insert().values(**row))

    def rows(self, event: str | None = None) -> list[dict]:
        """Oldest first (optionally one kind of event)."""
        query = sa.select(events_table).order_by(events_table.c.id)
        if event is not None:
            query = query.where(events_table.c.event == event)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def close(self) -> None:
        self.engine.dispose()
