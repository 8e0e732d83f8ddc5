"""C-STORE SCU: send result objects (SR, Secondary Capture) to the configured destination (the PACS)."""

from __future__ import annotations

from typing import Sequence

from covidcxr.errors import CovidCXRError
from covidcxr.serving.dicom.settings import Destination

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


class SendError(CovidCXRError):
    """The destination could not be reached, refused the association, or refused an object."""


def send_datasets(datasets: Sequence, destination: Destination, *, calling_ae: str, timeout_s: float = 30.0) -> int:
    """C-STORE every dataset in one association; returns how many were stored, raises :class:`SendError`."""
    from pynetdicom import AE

    if not datasets:
        return 0
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid, [EXPLICIT_LE, IMPLICIT_LE])
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise SendError(f"destination {where}: association "
                        f"{'rejected' if assoc.is_rejected else 'not established (unreachable or aborted)'}")
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status is not None else -1
            if code == -1:
                raise SendError(f"destination {where}: no C-STORE response (connection lost or timed out)")
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                raise SendError(f"destination {where}: C-STORE of a {ds.SOPClassUID.name} refused with status "
                                f"0x{code:04X}")
            stored += 1
    finally:
        assoc.release()
    return stored
