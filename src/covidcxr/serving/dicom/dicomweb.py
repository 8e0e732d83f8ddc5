"""``covidcxr dicom score --dicomweb URL --study UID``: the same analysis over DICOMweb (dicomweb-client).

QIDO-RS finds the study and lists its instances; instances of the analysed SOP classes (CR / DX) are
fetched with WADO-RS and go through :class:`~covidcxr.serving.dicom.analysis.Analyser` exactly as a
C-STORE would (same checks, same refusals, same results); the SR and overlay objects are stored back
into the study with STOW-RS. Instances of other classes (including results of an earlier run) are
listed as skipped without being fetched. Events go to the node's audit log (channel ``dicomweb``).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from covidcxr.errors import CovidCXRError
from covidcxr.serving.dicom.analysis import ANALYSED_SOP_CLASSES, SOP_CLASS_NOT_SUPPORTED, Analyser, Refused
from covidcxr.serving.dicom.audit import DicomAuditLog
from covidcxr.serving.dicom.settings import NodeSettings
from covidcxr.serving.dicom.uids import uid_hash

log = logging.getLogger("covidcxr.dicom")


class DicomWebError(CovidCXRError):
    """The DICOMweb server could not be reached, or answered with an error."""


@dataclass
class ScoreResult:
    """What ``score_study`` did: per analysed instance (hashed UID) the decision, the skipped ones and why."""

    study_found: bool
    processed: list[dict] = field(default_factory=list)  # sop_uid_sha256, predicted, probabilities
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sop_uid_sha256, reason)
    stored: int = 0


def _value(attrs: dict, tag: str) -> str | None:
    values = (attrs.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def _encode(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _call(what: str, url: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # requests.HTTPError, ConnectionError, ...: report one line naming the call
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise DicomWebError(f"{url}: {what} failed ({f'HTTP {status}' if status else exc.__class__.__name__}: "
                            f"{str(exc)[:200]})") from None


def score_study(run_dir: str | Path, url: str, study_uid: str, *, settings: NodeSettings | None = None,
                store: bool = True, analyser: Analyser | None = None, client=None) -> ScoreResult:
    """Analyse every CR / DX instance of ``study_uid`` on the DICOMweb server ``url``; STOW the results."""
    from dicomweb_client.api import DICOMwebClient

    settings = settings or NodeSettings()
    client = client or DICOMwebClient(url=url)
    analyser = analyser or Analyser(run_dir, allow_non_frontal=settings.allow_non_frontal, heatmaps=settings.heatmaps,
                                    max_instance_bytes=settings.max_instance_bytes)
    run = analyser.run
    settings.spool_dir(run_dir).mkdir(parents=True, exist_ok=True)
    audit = DicomAuditLog(settings.audit_url(run_dir))
    try:
        studies = _call("QIDO-RS study search", url, client.search_for_studies,
                        search_filters={"StudyInstanceUID": study_uid})
        if not studies:
            return ScoreResult(study_found=False)
        result = ScoreResult(study_found=True)
        instances = _call("QIDO-RS instance search", url, client.search_for_instances, study_instance_uid=study_uid)
        results = []
        for attrs in instances:
            sop_class, series_uid, sop_uid = (_value(attrs, t) for t in ("00080016", "0020000E", "00080018"))
            sha = uid_hash(sop_uid or "")
            start = time.perf_counter()
            if sop_class not in ANALYSED_SOP_CLASSES:
                reason = f"SOP class {sop_class} is not analysed (not CR / DX)"
                result.skipped.append((sha, reason))
                audit.record("refused", sop_uid_sha256=sha, channel="dicomweb", dimse_status=SOP_CLASS_NOT_SUPPORTED,
                             error=reason)
                continue
            ds = _call("WADO-RS retrieve", url, client.retrieve_instance, study_uid, series_uid, sop_uid)
            data = _encode(ds)
            try:
                analysis = analyser.analyse(analyser.check(data, ds), ds)
            except Refused as exc:
                log.warning("instance %s refused: %s", sha[:12], exc)
                result.skipped.append((sha, exc.reason))
                audit.record("refused", data=data, sop_uid_sha256=sha, channel="dicomweb", dimse_status=exc.status,
                             error=exc.reason)
                continue
            probs = analysis.probabilities(run.classes)
            results.extend(analysis.results)
            result.processed.append({"sop_uid_sha256": sha, "predicted": analysis.record.predicted,
                                     "probabilities": probs, "results": len(analysis.results)})
            audit.record("processed", sop_uid_sha256=sha, channel="dicomweb", model_sha256=run.model_sha256,
                         input_sha256=analysis.record.input.input_sha256, predicted=analysis.record.predicted,
                         probabilities=probs, threshold=run.threshold, results_sent=len(analysis.results) if store else 0,
                         predict_ms=analysis.predict_ms, total_ms=(time.perf_counter() - start) * 1000)
        if store and results:
            _call("STOW-RS store", url, client.store_instances, datasets=results, study_instance_uid=study_uid)
            result.stored = len(results)
        return result
    finally:
        audit.close()
