"""The node's persistent queue: received instances on disk plus a SQLite table of their state.

``SPOOL/incoming/<sha256 of the SOP Instance UID>.dcm`` holds each instance waiting for the model
(file names carry no PHI); ``SPOOL/queue.sqlite`` one row per SOP Instance UID (hashed) with its state:

``queued`` -> ``processing`` -> ``done`` (results sent) or ``failed`` (given up; reason in the audit log).

* An instance is written to disk (atomically, fsynced) *before* its row is committed and before the
  sender is told "success", so nothing acknowledged is lost by a crash.
* The SOP Instance UID is unique: an instance received again while queued, processing or done is
  acknowledged and not queued a second time, so none is processed twice.
* On start, rows left ``processing`` by a crash go back to ``queued`` (their results were not
  confirmed sent); result UIDs are deterministic (:mod:`covidcxr.serving.dicom.uids`), so even a
  result that was sent just before the crash is stored once by the PACS. Orphan files (written, never
  committed) are removed.
* Once processed, the file is deleted, or moved to the keep-folder if one is configured.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from covidcxr.files import atomic_write_bytes

STATES = ("queued", "processing", "done", "failed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_sha256 TEXT NOT NULL UNIQUE,
    file TEXT,
    calling_ae TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    received_utc TEXT NOT NULL,
    received_at REAL NOT NULL,
    updated_utc TEXT NOT NULL
)"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Item:
    """One claimed instance: its queue row id, hashed SOP UID, file and when it was received."""

    id: int
    sop_sha256: str
    path: Path
    calling_ae: str
    attempts: int
    received_at: float


class Spool:
    """Received instances waiting for the model; survives restarts (see the module docstring)."""

    def __init__(self, folder: str | Path, *, keep_folder: str | Path | None = None):
        self.folder = Path(folder)
        self.incoming = self.folder / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.keep_folder = Path(keep_folder) if keep_folder is not None else None
        if self.keep_folder is not None:
            self.keep_folder.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.folder / "queue.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._cond = threading.Condition()
        with self._cond:
            self.recovered = self._db.execute(
                "UPDATE instances SET state='queued', updated_utc=? WHERE state='processing'", (_now(),)).rowcount
            known = {r[0] for r in self._db.execute("SELECT file FROM instances WHERE file IS NOT NULL")}
        for path in self.incoming.iterdir():
            if path.name not in known:  # written but never committed (crash in between), or a temp file
                path.unlink(missing_ok=True)

    def add(self, sop_sha256: str, data: bytes, calling_ae: str = "") -> str | None:
        """Queue one instance. Returns ``None`` when queued, else the state of the instance already known
        (``queued``, ``processing`` or ``done``: not queued again). A ``failed`` instance is queued again."""
        with self._cond:
            row = self._db.execute("SELECT state FROM instances WHERE sop_sha256=?", (sop_sha256,)).fetchone()
            if row is not None and row[0] != "failed":
                return row[0]
            name = f"{sop_sha256}.dcm"
            atomic_write_bytes(self.incoming / name, data)
            now = _now()
            if row is not None:  # failed before (e.g. the PACS was down for hours): sent again, processed again
                self._db.execute("UPDATE instances SET state='queued', file=?, calling_ae=?, attempts=0, not_before=0, "
                                 "received_at=?, updated_utc=? WHERE sop_sha256=?",
                                 (name, calling_ae, time.time(), now, sop_sha256))
                self._cond.notify_all()
                return None
            self._db.execute("INSERT INTO instances (sop_sha256, file, calling_ae, state, received_utc, received_at, "
                             "updated_utc) VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                             (sop_sha256, name, calling_ae, now, time.time(), now))
            self._cond.notify_all()
        return None

    def claim(self, timeout: float | None = None) -> Item | None:
        """The oldest queued instance, marked ``processing``; waits up to ``timeout`` s for one (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.time()
                row = self._db.execute(
                    "SELECT id, sop_sha256, file, calling_ae, attempts, received_at FROM instances "
                    "WHERE state='queued' AND not_before<=? ORDER BY id LIMIT 1", (now,)).fetchone()
                if row is not None:
                    self._db.execute("UPDATE instances SET state='processing', attempts=attempts+1, updated_utc=? "
                                     "WHERE id=? AND state='queued'", (_now(), row[0]))
                    return Item(id=row[0], sop_sha256=row[1], path=self.incoming / row[2], calling_ae=row[3] or "",
                                attempts=row[4] + 1, received_at=row[5])
                wait = 1.0
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return None
                self._cond.wait(wait)

    def finish(self, item: Item, state: str) -> None:
        """``done`` or ``failed``: the file is deleted (or moved to the keep-folder), the row keeps the state."""
        if state not in ("done", "failed"):
            raise ValueError(f"state must be done or failed, got {state!r}")
        if item.path.exists():
            if self.keep_folder is not None:
                shutil.move(str(item.path), str(self.keep_folder / item.path.name))
            else:
                item.path.unlink()
        with self._cond:
            self._db.execute("UPDATE instances SET state=?, file=NULL, updated_utc=? WHERE id=?",
                             (state, _now(), item.id))

    def retry_later(self, item: Item, delay_s: float) -> None:
        """Back to ``queued``, not claimed again for ``delay_s`` seconds (e.g. the PACS is unreachable)."""
        with self._cond:
            self._db.execute("UPDATE instances SET state='queued', not_before=?, updated_utc=? WHERE id=?",
                             (time.time() + delay_s, _now(), item.id))
            self._cond.notify_all()

    def counts(self) -> dict[str, int]:
        with self._cond:
            rows = dict(self._db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall())
        return {s: int(rows.get(s, 0)) for s in STATES}

    def state(self, sop_sha256: str) -> str | None:
        with self._cond:
            row = self._db.execute("SELECT state FROM instances WHERE sop_sha256=?", (sop_sha256,)).fetchone()
        return row[0] if row else None

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._db.close()
