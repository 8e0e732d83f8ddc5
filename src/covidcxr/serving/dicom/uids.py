"""UIDs of the results, derived (not random) from the source and the model, and the hash the logs use.

A result's SOP Instance UID is a function of the source SOP Instance UID, the model's SHA-256 and the
kind of result; its Series Instance UID of the Study Instance UID, the model and the kind. So the
results of one model on one study share one SR series and one overlay series, and an instance that
is processed again (after a crash between sending and marking it done) produces the *same* objects,
which a PACS stores once, never a duplicate.
"""

from __future__ import annotations

import hashlib
import uuid

#: Result kinds and the series numbers they get.
KINDS = ("sr", "overlay")


#: Namespace of the name-based (version 5) UUIDs the result UIDs are made of.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://covidcxr/dicom-results")


def result_uid(*parts: str) -> str:
    """A deterministic ``2.25.<int>`` UID (PS3.5 B.2: the integer of a UUID, here a name-based UUID v5 of ``parts``)."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(map(str, parts))).int}"


def result_uids(source, model_sha256: str, kind: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the ``kind`` result of ``source`` by the model."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    series = result_uid("series", kind, str(source.StudyInstanceUID), model_sha256)
    instance = result_uid("instance", kind, str(source.SOPInstanceUID), model_sha256)
    return series, instance


def uid_hash(uid: str) -> str:
    """SHA-256 (hex) of a UID as the logs and the queue store it: never the UID itself."""
    return hashlib.sha256(str(uid).strip().encode("ascii", "replace")).hexdigest()
