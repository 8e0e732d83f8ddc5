"""Audit log of every prediction the service makes: who asked what of which model, and what it said.

One row per request that reaches the prediction endpoint (authenticated and admitted): time, input
SHA-256, model SHA-256, backend, outputs (probabilities, label, threshold), latency and status /
error. Deliberately *no* pixel data, *no* image metadata and *no* file name: DICOM headers and file
names carry patient names, ids and dates, so nothing from the file except its hash is stored. The
``error`` column holds the refusal's class and reason passed through :func:`scrub_reason`, which
removes the file name and anything the reason might have copied out of the upload.

SQLite (embedded, one file) is the default; any SQLAlchemy URL works (``postgresql://...``).
"""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

from covidcxr.errors import ConfigError

AUDIT_DB_FILE = "audit.sqlite"

_metadata = sa.MetaData()
predictions_table = sa.Table(
    "predictions",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time_utc", sa.String(32), nullable=False, index=True),
    sa.Column("request_id", sa.String(36), nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_sha256", sa.String(64)),
    sa.Column("input_bytes", sa.Integer),
    sa.Column("model_sha256", sa.String(64), nullable=False),
    sa.Column("backend", sa.String(16), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=False),
    sa.Column("predicted", sa.String(64)),
    sa.Column("probabilities_json", sa.Text),
    sa.Column("threshold", sa.Float),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("error", sa.Text),
)
#: Columns of the audit table, in order (documented in docs/serving.md).
AUDIT_COLUMNS = tuple(c.name for c in predictions_table.columns)


#: Reason text that also occurs in the upload is removed in runs of this many characters or more.
SCRUB_WINDOW = 6
#: Where in an upload copied text can come from: headers, text, DICOM elements (not the pixel data).
SCRUB_HEAD_BYTES, SCRUB_TAIL_BYTES = 1 << 20, 64 << 10
REMOVED = "[...]"
MAX_ERROR_CHARS = 500


def scrub_reason(reason: str, data: bytes = b"", filename: str | None = None) -> str:
    """``reason`` without the upload's file name and without any run of :data:`SCRUB_WINDOW` or more
    characters that also occurs in the upload's bytes (its first MiB and last 64 KiB: headers, text,
    DICOM elements). For the audit row; the uploader is told the reason in full.
    """
    text = str(reason)
    if filename:
        base = filename.replace("\\", "/").rsplit("/", 1)[-1]
        # the full name and its base name anywhere; the stem only as a whole word of 6+ characters
        # ("empty.png" must not turn the reason "empty file" into "<file name> file")
        for name in sorted({filename, base}, key=len, reverse=True):
            if len(name) >= 3:
                text = text.replace(name, "<file name>")
        stem = base.rsplit(".", 1)[0]
        if len(stem) >= 6:
            text = re.sub(rf"(?<!\w){re.escape(stem)}(?!\w)", "<file name>", text)
    sample = data if len(data) <= SCRUB_HEAD_BYTES + SCRUB_TAIL_BYTES else \
        data[:SCRUB_HEAD_BYTES] + b"\0" + data[-SCRUB_TAIL_BYTES:]
    if sample and len(text) >= SCRUB_WINDOW:
        tainted = [False] * len(text)
        seen: dict[str, bool] = {}
        for i in range(len(text) - SCRUB_WINDOW + 1):
            window = text[i:i + SCRUB_WINDOW]
            if window not in seen:
                encoded = {window.encode("utf-8", "replace"), window.encode("latin-1", "replace")}
                seen[window] = any(e in sample for e in encoded)
            if seen[window]:
                tainted[i:i + SCRUB_WINDOW] = [True] * SCRUB_WINDOW
        out, i = [], 0
        while i < len(text):
            if tainted[i]:
                while i < len(text) and tainted[i]:
                    i += 1
                out.append(REMOVED)
            else:
                out.append(text[i])
                i += 1
        text = "".join(out)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def default_audit_url(run_dir: str | Path) -> str:
    """SQLite file inside the run directory: the log travels with the model it describes."""
    return f"sqlite:///{(Path(run_dir) / AUDIT_DB_FILE).resolve()}"


def open_audit_database(url: str, metadata: sa.MetaData, what: str, example: str) -> sa.engine.Engine:
    """An engine on ``url`` with ``metadata``'s tables created; a ConfigError naming the URL if it cannot open."""
    try:
        engine = sa.create_engine(url, future=True)
        metadata.create_all(engine)
    except (sa.exc.ArgumentError, sa.exc.OperationalError, ModuleNotFoundError) as exc:
        raise ConfigError(f"{what} {url!r} cannot be opened ({exc.__class__.__name__}: {exc}); "
                          f"pass a SQLAlchemy URL such as sqlite:////path/{example}") from exc
    return engine


class AuditLog:
    """Append-only prediction log on any SQLAlchemy database (SQLite file by default)."""

    def __init__(self, url: str):
        self.engine = open_audit_database(url, _metadata, "audit database", "audit.sqlite")
        self.url = url
        # SQLite serialises writers anyway; the lock keeps concurrent threadpool workers from
        # failing with "database is locked" instead of waiting.
        self._lock = threading.Lock()

    def record(self, *, request_id: str, endpoint: str, model_sha256: str, backend: str, status_code: int,
               latency_ms: float, input_sha256: str | None = None, input_bytes: int | None = None,
               predicted: str | None = None, probabilities: dict[str, float] | None = None,
               threshold: float | None = None, error: str | None = None) -> None:
        row = dict(
            time_utc=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            request_id=request_id, endpoint=endpoint, input_sha256=input_sha256, input_bytes=input_bytes,
            model_sha256=model_sha256, backend=backend, status_code=int(status_code), predicted=predicted,
            probabilities_json=json.dumps(probabilities) if probabilities is not None else None,
            threshold=threshold, latency_ms=float(latency_ms), error=error,
        )
        with self._lock, self.engine.begin() as conn:
            conn.execute(predictions_table.insert().values(**row))

    def rows(self, limit: int | None = None) -> list[dict]:
        """Most recent rows first."""
        query = sa.select(predictions_table).order_by(predictions_table.c.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def close(self) -> None:
        self.engine.dispose()
