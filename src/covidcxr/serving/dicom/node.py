"""``covidcxr dicom listen``: the DICOM node (pynetdicom Storage SCP + Verification SCP + result sender).

* Associations from calling AE titles not in ``allowed_callers`` are rejected (and logged).
* C-ECHO is answered.
* Every storage SOP class is accepted at negotiation so that each C-STORE gets an answer with a
  DIMSE status: an instance is checked *before* it is acknowledged (:meth:`Analyser.check`: SOP class,
  the reader's frontal / chest / modality rules, decodability); refused instances get the status of
  :mod:`covidcxr.serving.dicom.analysis` with the reason in ErrorComment and one log line, and the node
  goes on. Accepted instances are written to the :class:`~covidcxr.serving.dicom.spool.Spool` and
  acknowledged with 0x0000 only then.
* One worker thread takes queued instances, predicts, builds the SR and the overlay and C-STOREs them
  to the destination; the instance is then deleted (or moved to the keep-folder). A destination that
  cannot be reached is retried with back-off; the instance stays queued meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

from covidcxr.errors import ConfigError
from covidcxr.serving.dicom.analysis import (ANALYSED_SOP_CLASSES, INTERNAL_ERROR, OUT_OF_RESOURCES, SUCCESS,
                                             STATUS_NAMES, Analyser, Refused, read_header)
from covidcxr.serving.dicom.audit import DicomAuditLog
from covidcxr.serving.dicom.settings import NodeSettings
from covidcxr.serving.dicom.spool import Item, Spool
from covidcxr.serving.dicom.uids import uid_hash

log = logging.getLogger("covidcxr.dicom")
#: Sending is retried this many times (back-off 5 s doubling to 5 min) before the instance is failed.
MAX_SEND_ATTEMPTS = 12
_CACHE_SIZE = 16


def _decodable_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data this installation can decode (negotiated for CR / DX)."""
    from pydicom.pixels import get_decoder
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    out = []
    for ts in ALL_TRANSFER_SYNTAXES:
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except NotImplementedError:
            continue
    return out


def _status(code: int, reason: str | None = None):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = code
    if reason and code != SUCCESS:
        ds.ErrorComment = reason[:64]
    return ds


class DicomNode:
    """The node; ``with DicomNode(run_dir, settings) as node:`` serves until the block ends."""

    def __init__(self, run_dir: str | Path, settings: NodeSettings, *, analyser: Analyser | None = None):
        if not settings.allowed_callers:
            raise ConfigError("allowed_callers is empty: name the calling AE titles that may send "
                              "(--allow-caller ORTHANC, or allowed_callers in --config)")
        if settings.destination is None:
            raise ConfigError("no destination for the results: pass --destination AET@HOST:PORT "
                              "(or destination in --config)")
        self.run_dir, self.settings = Path(run_dir), settings
        self.analyser = analyser or Analyser(run_dir, allow_non_frontal=settings.allow_non_frontal,
                                             heatmaps=settings.heatmaps,
                                             max_instance_bytes=settings.max_instance_bytes)
        self.spool = Spool(settings.spool_dir(run_dir), keep_folder=settings.keep_folder)
        self.audit = DicomAuditLog(settings.audit_url(run_dir))
        if self.spool.recovered:
            log.warning("%d instance(s) were being processed when the node stopped; queued again", self.spool.recovered)
        self._prepared: OrderedDict = OrderedDict()
        self._cache_lock = threading.Lock()
        self._stop = threading.Event()
        self.server = None
        self.worker: threading.Thread | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, worker: bool = True) -> "DicomNode":
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.require_calling_aet = list(s.allowed_callers)
        ae.maximum_pdu_size = s.max_pdu
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = s.network_timeout_s
        decodable = _decodable_syntaxes()
        for cx in AllStoragePresentationContexts:
            analysed = cx.abstract_syntax in ANALYSED_SOP_CLASSES
            ae.add_supported_context(cx.abstract_syntax, decodable if analysed else cx.transfer_syntax)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REQUESTED, self._on_requested)]
        self.server = ae.start_server((s.host, s.port), block=False, evt_handlers=handlers)
        self.port = int(self.server.server_address[1])
        if worker:
            self.start_worker()
        log.info("DICOM node %s listening on %s:%d (callers %s; results to %s@%s:%d)", s.ae_title, s.host, self.port,
                 ", ".join(s.allowed_callers), s.destination.ae_title, s.destination.host, s.destination.port)
        return self

    def start_worker(self) -> None:
        self._stop.clear()
        self.worker = threading.Thread(target=self._work, name="covidcxr-dicom-worker", daemon=True)
        self.worker.start()

    def stop(self) -> None:
        """Stop listening and let the worker finish the instance in hand; queued ones wait for the next start."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self._stop.set()
        self.spool.wake()
        if self.worker is not None:
            self.worker.join(timeout=120)
            self.worker = None
        self.spool.close()
        self.audit.close()

    def __enter__(self) -> "DicomNode":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_idle(self, timeout: float = 120.0) -> bool:
        """True once nothing is queued or processing (tests, ``covidcxr dicom listen --once``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.spool.counts()
            if counts["queued"] == 0 and counts["processing"] == 0:
                return True
            time.sleep(0.1)
        return False

    # ------------------------------------------------------------------ DIMSE handlers (one thread per association)

    def _on_echo(self, event) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    def _on_requested(self, event) -> None:
        primitive = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ (ae_title is filled in later)
        caller = str(getattr(primitive, "calling_ae_title", "") or "").strip()
        if caller not in self.settings.allowed_callers:
            log.warning("association from %s (%s) rejected: calling AE title not in allowed_callers",
                        caller, event.assoc.requestor.address)
            self.audit.record("rejected", calling_ae=caller[:16], channel="c-store",
                              error="calling AE title not in allowed_callers")

    def _on_store(self, event):
        start = time.perf_counter()
        caller = str(event.assoc.requestor.ae_title).strip()[:16]
        data, sha = b"", None
        try:
            data = event.encoded_dataset()
            source = read_header(data)
            sha = uid_hash(source.SOPInstanceUID)
            prior = self.spool.state(sha)
            if prior in ("queued", "processing", "done"):  # failed ones may be sent again
                log.info("instance %s from %s already received (%s): acknowledged, not queued again",
                         sha[:12], caller, prior)
                self.audit.record("duplicate", sop_uid_sha256=sha, calling_ae=caller, channel="c-store",
                                  dimse_status=SUCCESS)
                return _status(SUCCESS)
            prepared = self.analyser.check(data, source)
            prior = self.spool.add(sha, data, caller)
            if prior is None:
                with self._cache_lock:
                    self._prepared[sha] = prepared
                    while len(self._prepared) > _CACHE_SIZE:
                        self._prepared.popitem(last=False)
            self.audit.record("received" if prior is None else "duplicate", sop_uid_sha256=sha, calling_ae=caller,
                              channel="c-store", dimse_status=SUCCESS, input_sha256=prepared.input_sha256,
                              total_ms=(time.perf_counter() - start) * 1000)
            log.info("instance %s from %s: %s (%.0f ms)", sha[:12], caller,
                     "accepted, queued" if prior is None else f"already received ({prior}), not queued again",
                     (time.perf_counter() - start) * 1000)
            return _status(SUCCESS)
        except Refused as exc:
            return self._refuse(exc.status, exc.reason, sha, caller, data, start)
        except OSError as exc:  # the spool's disk: full, read-only, ...
            return self._refuse(OUT_OF_RESOURCES, f"cannot write the instance to the spool "
                                                  f"({exc.strerror or exc.__class__.__name__})", sha, caller, data, start)
        except Exception as exc:  # a bug must cost one instance, never the node
            log.exception("unexpected error handling a C-STORE from %s", caller)
            return self._refuse(INTERNAL_ERROR, f"unexpected error ({exc.__class__.__name__}); see the node's log",
                                sha, caller, data, start)

    def _refuse(self, status: int, reason: str, sha: str | None, caller: str, data: bytes, start: float):
        log.warning("instance %s from %s refused: status 0x%04X (%s): %s", (sha or "unknown")[:12], caller, status,
                    STATUS_NAMES.get(status, "refused"), reason)
        self.audit.record("refused", data=data, sop_uid_sha256=sha, calling_ae=caller, channel="c-store",
                          dimse_status=status, error=reason, total_ms=(time.perf_counter() - start) * 1000)
        return _status(status, reason)

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self.spool.claim(timeout=0.5)
            if item is not None:
                self.process(item)

    def process(self, item: Item) -> None:
        """Predict one claimed instance, send its results, then finish it (or queue it again for a retry)."""
        from covidcxr.serving.dicom.scu import SendError, send_datasets

        start = time.perf_counter()
        wait_ms = max(0.0, (time.time() - item.received_at) * 1000)
        s, run = self.settings, self.analyser.run
        data = b""
        try:
            data = item.path.read_bytes()
            source = read_header(data)
            with self._cache_lock:
                prepared = self._prepared.pop(item.sop_sha256, None)
            if prepared is None:  # after a restart: read again (same reader, same rules)
                prepared = self.analyser.check(data, source)
            analysis = self.analyser.analyse(prepared, source)
        except Exception as exc:  # Refused (e.g. settings changed across a restart), a vanished file, a bug
            status = exc.status if isinstance(exc, Refused) else INTERNAL_ERROR
            reason = exc.reason if isinstance(exc, Refused) else f"{exc.__class__.__name__}: {exc}"
            if not isinstance(exc, Refused):
                log.exception("instance %s: processing failed", item.sop_sha256[:12])
            else:
                log.warning("instance %s: not processed: %s", item.sop_sha256[:12], reason)
            self.spool.finish(item, "failed")
            self.audit.record("failed", data=data, sop_uid_sha256=item.sop_sha256, calling_ae=item.calling_ae,
                              channel="c-store", dimse_status=status, model_sha256=run.model_sha256, error=reason,
                              queue_wait_ms=wait_ms, total_ms=(time.perf_counter() - start) * 1000)
            return
        sent_at = time.perf_counter()
        try:
            sent = send_datasets(analysis.results, s.destination, calling_ae=s.ae_title, timeout_s=s.network_timeout_s)
        except SendError as exc:
            final = item.attempts >= MAX_SEND_ATTEMPTS
            log.warning("instance %s: results not sent (attempt %d): %s%s", item.sop_sha256[:12], item.attempts, exc,
                        "; giving up" if final else "; will retry")
            if final:
                self.spool.finish(item, "failed")
            else:
                self.spool.retry_later(item, min(300.0, 5.0 * 2 ** (item.attempts - 1)))
            self.audit.record("failed" if final else "send-retry", sop_uid_sha256=item.sop_sha256,
                              calling_ae=item.calling_ae, channel="c-store", model_sha256=run.model_sha256,
                              error=str(exc), queue_wait_ms=wait_ms)
            return
        send_ms = (time.perf_counter() - sent_at) * 1000
        self.spool.finish(item, "done")
        total_ms = (time.perf_counter() - start) * 1000
        probs = analysis.probabilities(run.classes)
        self.audit.record("processed", sop_uid_sha256=item.sop_sha256, calling_ae=item.calling_ae, channel="c-store",
                          input_sha256=analysis.record.input.input_sha256, model_sha256=run.model_sha256,
                          predicted=analysis.record.predicted, probabilities=probs, threshold=run.threshold,
                          results_sent=sent, queue_wait_ms=wait_ms, predict_ms=analysis.predict_ms, send_ms=send_ms,
                          total_ms=total_ms)
        pos = run.positive_class
        log.info("instance %s: %s -> %s; %d result(s) sent to %s in %.0f ms (model %.0f ms)", item.sop_sha256[:12],
                 f"P({pos})={probs[pos]:.4g}" if pos else "", analysis.record.predicted, sent, s.destination.ae_title,
                 total_ms, analysis.predict_ms)
