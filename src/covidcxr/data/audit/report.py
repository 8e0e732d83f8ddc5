"""The audit's result objects: :class:`Finding` (one check's verdict) and :class:`AuditReport`
(all findings plus the tables behind them; JSON via :meth:`AuditReport.to_dict`). Drawing and
printing are in :mod:`covidcxr.data.audit.render`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Finding:
    """One audit result: which check, how bad, a one-line message and machine-readable details."""

    check: str
    severity: str  # "error" | "warning" | "info"
    message: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"check": self.check, "severity": self.severity, "message": self.message, "details": self.details}


@dataclass
class AuditReport:
    """What :func:`audit_manifest` found. ``tables`` hold the numbers behind the findings."""

    manifest: str
    n_images: int
    n_patients: int
    settings: dict
    findings: list[Finding] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    duplicates: pd.DataFrame = field(default_factory=pd.DataFrame)
    unreadable: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "manifest": self.manifest, "n_images": self.n_images, "n_patients": self.n_patients,
            "settings": self.settings, "ok": self.ok,
            "n_errors": len(self.errors), "n_warnings": len(self.warnings),
            "findings": [f.to_dict() for f in self.findings],
            "near_duplicates": _records(self.duplicates),
            "unreadable": self.unreadable,
            "tables": {name: _table_dict(t) for name, t in self.tables.items()},
            "seconds": self.seconds,
        }

    def write_json(self, path: str | Path) -> Path:
        from covidcxr.files import write_json

        write_json(Path(path), self.to_dict())
        return Path(path)

    def plot(self, path: str | Path, table: pd.DataFrame | None = None) -> Path:
        """One PNG: label mix of every source per split and, if ``table`` (the manifest table) is
        given, known ages by label (:func:`covidcxr.data.audit.render.plot_report`). Returns ``path``."""
        from covidcxr.data.audit.render import plot_report

        return plot_report(self, path, table)

    def render(self, console=None, max_pairs: int = 20) -> None:
        """Print the report as rich tables (:func:`covidcxr.data.audit.render.render_report`)."""
        from covidcxr.data.audit.render import render_report

        render_report(self, console, max_pairs=max_pairs)


def _records(df: pd.DataFrame) -> list[dict]:
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in df.to_dict("records")]


def _table_dict(t: pd.DataFrame) -> dict:
    """A table as ``{row key: {column: value}}`` (multi-index keys joined with ``/``), NaN -> None."""
    out = {}
    for idx, row in t.iterrows():
        key = "/".join(map(str, idx)) if isinstance(idx, tuple) else str(idx)
        out[key] = {str(c): (None if isinstance(v, float) and not np.isfinite(v) else (v.item() if hasattr(v, "item") else v))
                    for c, v in row.items()}
    return out
