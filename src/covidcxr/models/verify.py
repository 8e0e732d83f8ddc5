"""``covidcxr verify RUN [--data ROOT]``: is this run what its record says, and are its data still the same?

Checks, each reported by name, none stopping the others:

* ``run.json``: the record's integrity block (every field hashed when written; HMAC with ``COVIDCXR_RUN_KEY``);
* the weights (``model.safetensors``; every member of an ensemble; an ONNX export if recorded);
* ``split.csv``, ``config.yaml`` and ``data_hashes.csv`` against their recorded SHA-256;
* where the data are at hand (``--data ROOT``, else the folder recorded at training time): the
  manifest file and every train / val / test image file against :mod:`covidcxr.models.provenance`.

A missing data folder is "not checked", not a failure: a run copied to another machine can still
have its weights verified. With ``--data`` given, a missing image *is* a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from covidcxr.errors import CovidCXRError
from covidcxr.models.provenance import read_data_hashes
from covidcxr.models.record import MODEL_FILE, RUN_JSON, RunRecord, read_run_record
from covidcxr.models.weights import sha256_file

#: At most this many mismatching images are named one by one (the count is always complete).
MAX_NAMED = 50


@dataclass
class Check:
    what: str  # the file or group of files checked
    status: str  # ok | mismatch | missing | not checked
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("mismatch", "missing")


@dataclass
class VerifyReport:
    run_dir: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.checks)

    @property
    def mismatches(self) -> list[Check]:
        return [c for c in self.checks if c.failed]

    def add(self, what: str, status: str, detail: str = "") -> None:
        self.checks.append(Check(what, status, detail))

    def lines(self) -> list[str]:
        out = [f"{c.status:>11}  {c.what}" + (f": {c.detail}" if c.detail else "") for c in self.checks]
        verdict = "verified" if self.ok else f"NOT verified: {len(self.mismatches)} check(s) failed"
        return out + [f"{self.run_dir}: {verdict}"]


def _file(report: VerifyReport, path: Path, expected: str, what: str) -> bool:
    if not path.is_file():
        report.add(what, "missing", f"{path} not found")
        return False
    actual = sha256_file(path)
    if actual != expected:
        report.add(what, "mismatch", f"SHA-256 {actual[:16]}... is not the recorded {expected[:16]}...")
        return False
    report.add(what, "ok")
    return True


def _weights(report: VerifyReport, run_dir: Path, record: RunRecord, data_root: Path | None, check_data: bool) -> None:
    if record.members:  # an ensemble: each member is a run of its own, with its own weights and data hashes
        for member in record.members:
            sub = verify_run(run_dir / member, data_root=data_root, check_data=check_data)
            for c in sub.checks:
                report.add(f"member {member}: {c.what}", c.status, c.detail)
        return
    _file(report, run_dir / MODEL_FILE, record.model_sha256, f"weights {MODEL_FILE}")
    if record.onnx is not None:
        _file(report, run_dir / record.onnx.file, record.onnx.sha256, f"ONNX export {record.onnx.file}")


def _recorded_files(report: VerifyReport, run_dir: Path, record: RunRecord) -> bool:
    """The resolved config and the image hash list in the run directory; True when the list can be used."""
    prov = record.provenance
    if prov is None:
        report.add("data hashes", "not checked", "the run records none (trained before covidcxr recorded them)")
        return False
    _file(report, run_dir / prov.config.file, prov.config.sha256, f"resolved config {prov.config.file}")
    return _file(report, run_dir / prov.images.file, prov.images.sha256, f"image hash list {prov.images.file}")


def _data(report: VerifyReport, run_dir: Path, record: RunRecord, data_root: Path | None) -> None:
    prov = record.provenance
    root = Path(data_root) if data_root is not None else Path(prov.images.root)
    explicit = data_root is not None
    if not root.is_dir():
        report.add("image files", "missing" if explicit else "not checked", f"data folder {root} not found"
                   + ("" if explicit else "; pass --data ROOT where the data are"))
        return
    m = prov.manifest
    if m.file_sha256:
        path = root / Path(m.path).name if explicit else Path(m.path)
        if path.is_file():
            _file(report, path, m.file_sha256, f"manifest {path}")
        else:
            report.add(f"manifest {path}", "not checked", "not found (the image files are still checked)")
    table = read_data_hashes(run_dir, prov)
    missing, changed = [], []
    for image, expected in zip(table["image"], table["sha256"]):
        p = Path(image)
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            missing.append(image)
        elif sha256_file(p) != expected:
            changed.append(image)
    n = len(table)
    for status, names in (("mismatch", changed), ("missing", missing)):
        for image in names[:MAX_NAMED]:
            report.add(f"image {image}", status, "SHA-256 differs from the recorded one" if status == "mismatch"
                       else f"not found under {root}")
        if len(names) > MAX_NAMED:
            report.add(f"{len(names) - MAX_NAMED} more images", status, f"see {prov.images.file} for the full list")
    if not changed and not missing:
        counts = ", ".join(f"{k} {v}" for k, v in prov.images.counts.items())
        report.add(f"image files ({n}: {counts})", "ok", f"under {root}")


def verify_run(run_dir: str | Path, data_root: str | Path | None = None, *, check_data: bool = True) -> VerifyReport:
    """Every check of the module docstring on ``run_dir``; never raises for a failed check."""
    run_dir = Path(run_dir)
    report = VerifyReport(run_dir)
    if not (run_dir / RUN_JSON).is_file():
        raise CovidCXRError(f"{run_dir}: not a covidcxr run directory (no {RUN_JSON})")
    try:
        record = read_run_record(run_dir)
        report.add(RUN_JSON, "ok", "integrity block matches" + (" (HMAC checked)" if record.integrity
                                                                and record.integrity.hmac_sha256 else ""))
    except CovidCXRError as exc:
        report.add(RUN_JSON, "mismatch", str(exc))
        try:  # still check what the (unverified) record names, so every mismatch is listed
            record = read_run_record(run_dir, verify=False)
        except CovidCXRError:
            return report
    data_root = Path(data_root) if data_root is not None else None
    _weights(report, run_dir, record, data_root, check_data)
    if record.split is not None:
        _file(report, run_dir / record.split.file, record.split.sha256, f"split {record.split.file}")
    if not record.members and _recorded_files(report, run_dir, record) and check_data:
        _data(report, run_dir, record, data_root)
    return report
