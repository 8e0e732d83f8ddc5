"""``covidcxr predict RUN_DIR PATHS... --out predictions.csv``: batch prediction over files, folders and archives.

Inputs are files, folders (walked recursively), glob patterns and ``.zip`` / ``.tar[.gz|.bz2|.xz]``
archives (members are read from a private temporary folder and reported as ``archive.zip::member``).
The format of each file is decided by its content (:func:`covidcxr.data.read_xray`), not its
extension; while walking folders, files whose extension says they are something else (``.txt``,
``.csv``, ...) are not offered to the model, and their number is reported.

Rows are appended to a CSV journal and flushed to disk after every batch, so a job that is killed
loses at most the batch in flight; ``resume=True`` skips every input already in the output (or in
its skipped list). The final file is CSV, JSON (list of records), JSON Lines or Parquet, chosen by
the extension of ``out``. Unreadable files are listed with the reason in ``<out>.skipped.csv`` and
skipped; the rest go on.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.files import atomic_write_bytes, write_json
from covidcxr.models.predict import Predictor

#: Extensions offered to the model when walking a folder. Files named explicitly are always tried;
#: extension-less files are included because DICOM files often have no extension.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ".tif", ".tiff", ".bmp", ""})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
#: Largest archive member extracted (uncompressed), against zip bombs.
MAX_MEMBER_BYTES = 512 * 1024 * 1024
ARCHIVE_SEPARATOR = "::"
SKIPPED_COLUMNS = ["path", "reason"]


# ---------------------------------------------------------------------------- output formats


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    table.to_csv(path, index=False)


def _records(table: pd.DataFrame) -> list[dict]:
    return table.astype(object).where(table.notna(), None).to_dict(orient="records")


def _write_json(table: pd.DataFrame, path: Path) -> None:
    write_json(path, _records(table))


def _write_jsonl(table: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in _records(table)).encode())


def _write_parquet(table: pd.DataFrame, path: Path) -> None:
    try:
        table.to_parquet(path, index=False)
    except ImportError as exc:
        raise ConfigError(f"{path}: Parquet output needs pyarrow (`pip install pyarrow`); or use .csv / .json") from exc


def _read_json(path: Path) -> pd.DataFrame:
    return pd.read_json(path, orient="records", dtype=False)


def _read_jsonl(path: Path) -> pd.DataFrame:
    return pd.read_json(path, orient="records", lines=True, dtype=False)


#: Output format by file extension: (writer, reader).
OUTPUT_FORMATS = {
    ".csv": (_write_csv, lambda p: pd.read_csv(p, dtype={"input_sha256": str, "model_sha256": str})),
    ".json": (_write_json, _read_json),
    ".jsonl": (_write_jsonl, _read_jsonl),
    ".parquet": (_write_parquet, pd.read_parquet),
}


def _output_format(out: Path):
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"{out}: unknown output format {suffix or '(none)'}; use one of {', '.join(OUTPUT_FORMATS)}")
    return OUTPUT_FORMATS[suffix]


def skipped_path(out: str | Path) -> Path:
    """Where the files that could not be read are listed: ``<out>.skipped.csv``."""
    out = Path(out)
    return out.with_name(out.name + ".skipped.csv")


def journal_path(out: Path) -> Path:
    """The CSV that rows are appended to batch by batch: ``out`` itself for CSV, else ``<out>.partial.csv``."""
    return out if out.suffix.lower() == ".csv" else out.with_name(out.name + ".partial.csv")


class _CsvAppender:
    """Appends rows to a CSV and makes them durable (flush + fsync) before returning."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if header != columns:
                raise CovidCXRError(f"{path}: its columns ({', '.join(header)}) differ from this job's "
                                    f"({', '.join(columns)}); resume with the same options (e.g. --heatmaps) "
                                    "or write to a new --out")
        self._file = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(columns)
            self._sync()

    def append(self, rows: Iterable[Sequence]) -> None:
        self._writer.writerows(rows)
        self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """Image files to predict: ``files`` (readable paths) with the name to report for each."""

    files: list[Path] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # extracted temp path -> "archive::member"
    ignored: list[str] = field(default_factory=list)  # folder files whose extension is not an image's
    missing: list[tuple[str, str]] = field(default_factory=list)  # (input, reason) for inputs matching nothing

    def name(self, path: str | Path) -> str:
        return self.names.get(str(path), str(path))


def _is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


def _extract_archive(archive: Path, into: Path, inputs: Inputs) -> None:
    """Extract image members under ``into`` with generated names (no path traversal), remembering their names."""
    target = Path(tempfile.mkdtemp(dir=into, prefix="archive-"))
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                members = [(m.filename, m.file_size, lambda m=m: zf.open(m)) for m in zf.infolist() if not m.is_dir()]
                _extract_members(archive, members, target, inputs)
        else:
            with tarfile.open(archive) as tf:
                members = []
                for m in tf.getmembers():
                    if m.isfile():
                        members.append((m.name, m.size, lambda m=m: tf.extractfile(m)))
                    elif not m.isdir():  # links and devices are never followed; say so instead of dropping them
                        kind = "link" if (m.issym() or m.islnk()) else "special file"
                        inputs.missing.append((f"{archive}{ARCHIVE_SEPARATOR}{m.name}",
                                               f"archive member is a {kind}, not a regular file; not extracted"))
                _extract_members(archive, members, target, inputs)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        inputs.missing.append((str(archive), f"cannot read archive ({exc.__class__.__name__}: {exc})"))


def _extract_members(archive: Path, members, target: Path, inputs: Inputs) -> None:
    for i, (member, size, open_member) in enumerate(sorted(members, key=lambda m: m[0])):
        display = f"{archive}{ARCHIVE_SEPARATOR}{member}"
        if Path(member).suffix.lower() not in IMAGE_SUFFIXES:
            inputs.ignored.append(display)
            continue
        if size > MAX_MEMBER_BYTES:
            inputs.missing.append((display, f"archive member of {size:,} bytes exceeds the {MAX_MEMBER_BYTES:,} byte limit"))
            continue
        dest = target / f"{i:07d}{Path(member).suffix.lower()}"
        try:
            with open_member() as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, RuntimeError, NotImplementedError,
                OSError) as exc:  # a damaged or encrypted member: skip it, extract the rest
            dest.unlink(missing_ok=True)
            inputs.missing.append((display, f"cannot extract archive member ({exc.__class__.__name__}: {exc})"))
            continue
        inputs.files.append(dest)
        inputs.names[str(dest)] = display


def collect_inputs(paths: Sequence[str | Path], extract_dir: Path | None = None) -> Inputs:
    """Expand files, folders (recursive), globs and archives into image files, in a stable order.

    Archives are extracted under ``extract_dir`` (required when an archive is given). Inputs that
    match nothing are listed in ``Inputs.missing`` with the reason.
    """
    inputs = Inputs()
    seen: set[str] = set()

    def add(p: Path) -> None:
        key = str(p)
        if key not in seen:
            seen.add(key)
            inputs.files.append(p)

    for raw in paths:
        raw = str(raw)
        candidates = [Path(raw)] if Path(raw).exists() else [Path(m) for m in sorted(glob.glob(raw, recursive=True))]
        if not candidates:
            inputs.missing.append((raw, "no such file, folder or glob match"))
        for path in candidates:
            if path.is_dir():
                for child in sorted(p for p in path.rglob("*") if p.is_file()):
                    if _is_archive(child) and extract_dir is not None:
                        _extract_archive(child, extract_dir, inputs)
                    elif child.suffix.lower() in IMAGE_SUFFIXES and not child.name.startswith("."):
                        add(child)
                    else:
                        inputs.ignored.append(str(child))
            elif _is_archive(path):
                if extract_dir is None:
                    raise ConfigError(f"{path}: archives need an extraction folder")
                _extract_archive(path, extract_dir, inputs)
            else:
                add(path)
    return inputs


# ---------------------------------------------------------------------------- prediction


@dataclass
class BatchResult:
    """What ``predict_files`` did: the output files and the counts a user wants to see."""

    out: Path
    skipped_file: Path
    predicted: int  # rows written in this invocation
    already_done: int  # inputs skipped because --resume found them in the output
    skipped: list[tuple[str, str]]  # (path, reason), this invocation
    ignored: int  # folder files that are not images by their extension
    total_rows: int  # rows in the final output


def _done_paths(out: Path, journal: Path, skipped_file: Path, model_sha256: str) -> set[str]:
    done: set[str] = set()
    for path in dict.fromkeys([out, journal]):
        if path.exists() and path.stat().st_size > 0:
            table = _output_format(path)[1](path) if path != journal else pd.read_csv(path, dtype=str)
            if "model_sha256" in table and len(table) and set(table["model_sha256"].astype(str)) != {model_sha256}:
                raise CovidCXRError(f"{path}: holds predictions of another model (model_sha256 "
                                    f"{sorted(set(table['model_sha256'].astype(str)))[0][:12]}...); "
                                    "resume with the same run directory or write to a new --out")
            done.update(table["path"].astype(str))
    if skipped_file.exists() and skipped_file.stat().st_size > 0:
        done.update(pd.read_csv(skipped_file, dtype=str)["path"].astype(str))
    return done


def predict_files(run: Predictor, paths: Sequence[str | Path], out: str | Path, *, batch_size: int = 16,
                  resume: bool = False, overwrite: bool = False, heatmaps: str | Path | None = None,
                  cam_run: Predictor | None = None, progress: bool = True, workers: int = 2,
                  allow_non_frontal: bool = False) -> BatchResult:
    """Predict every image in ``paths`` with ``run`` and write one row per image to ``out``.

    Columns: ``path``, ``prob_<class>`` per class, ``predicted`` (at the run's stored threshold),
    ``threshold``, ``input_sha256``, ``model_sha256``, ``backend`` (and ``heatmap`` with
    ``heatmaps=DIR``: a Grad-CAM overlay PNG per image, computed on ``cam_run`` - the PyTorch model -
    when ``run`` is an ONNX backend). ``resume=True`` continues a killed job; without it an
    existing ``out`` is refused unless ``overwrite=True``.
    """
    from covidcxr.models.predict import predict_paths

    out = Path(out)
    write_final, _ = _output_format(out)
    journal, skipped_file = journal_path(out), skipped_path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    existing = [p for p in (out, journal, skipped_file) if p.exists()]
    if existing and not resume:
        if not overwrite:
            raise CovidCXRError(f"{existing[0]} exists; pass --resume to continue that job or --overwrite to start again")
        for p in existing:
            p.unlink()
    if journal != out and out.exists() and not journal.exists():
        # Resuming a finished non-CSV output: continue in a journal seeded with its rows.
        out.parent.mkdir(parents=True, exist_ok=True)
        _output_format(out)[1](out).to_csv(journal, index=False)
    done = _done_paths(out, journal, skipped_file, run.model_sha256) if resume else set()
    out.parent.mkdir(parents=True, exist_ok=True)
    heat_dir = Path(heatmaps) if heatmaps is not None else None
    backend = run.backend

    with ExitStack() as stack:
        extract_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="covidcxr-predict-")))
        inputs = collect_inputs(paths, extract_dir)
        todo = [p for p in inputs.files if inputs.name(p) not in done]
        columns = ["path", *[f"prob_{c}" for c in run.classes], "predicted", "threshold", "input_sha256",
                   "model_sha256", "backend"] + (["heatmap"] if heat_dir is not None else [])
        rows_out = stack.enter_context(closing(_CsvAppender(journal, columns)))
        skipped_out = stack.enter_context(closing(_CsvAppender(skipped_file, SKIPPED_COLUMNS)))
        skipped: list[tuple[str, str]] = []
        if inputs.missing:
            missing = [m for m in inputs.missing if m[0] not in done]
            skipped_out.append(missing)
            skipped.extend(missing)
        counter = {"rows": 0}
        if heat_dir is not None:
            from covidcxr.serving.heatmap import HeatmapWriter

            heat_writer = HeatmapWriter(cam_run if cam_run is not None else run, heat_dir)

        def on_batch(records, rows: pd.DataFrame, bad: list[tuple[str, str]]) -> None:
            rows = rows.copy()
            if heat_dir is not None and len(rows):
                # Drawn from the inputs the prediction used: no file is decoded twice.
                rows["heatmap"] = heat_writer.write(records, [inputs.name(r.path) for r in records])
            rows["path"] = [inputs.name(p) for p in rows["path"]]
            rows["backend"] = backend
            rows_out.append(rows.reindex(columns=columns).itertuples(index=False, name=None))
            named_bad = [(inputs.name(p), reason) for p, reason in bad]
            skipped_out.append(named_bad)
            skipped.extend(named_bad)
            counter["rows"] += len(rows)

        if todo:
            predict_paths(run, todo, batch_size=batch_size, progress=progress, workers=workers, on_batch=on_batch,
                          allow_non_frontal=allow_non_frontal)

    table = pd.read_csv(journal, dtype={"input_sha256": str, "model_sha256": str})
    if journal != out:
        write_final(table, out)
        journal.unlink()
    return BatchResult(out=out, skipped_file=skipped_file, predicted=counter["rows"],
                       already_done=len(inputs.files) - len(todo), skipped=skipped, ignored=len(inputs.ignored),
                       total_rows=len(table))



def predict_run(run_dir: str | Path, paths: Sequence[str | Path], out: str | Path, *, backend: str = "torch",
                heatmaps: str | Path | None = None, **kwargs) -> BatchResult:
    """``covidcxr predict``: open ``run_dir`` on ``backend`` (SHA-256 checked) and run :func:`predict_files`."""
    from covidcxr.models.run import load_run
    from covidcxr.serving.onnx import open_run

    run = open_run(run_dir, backend)
    cam_run = None
    if heatmaps is not None and backend != "torch":
        cam_run = load_run(run_dir)  # Grad-CAM needs gradients, i.e. the PyTorch model
    return predict_files(run, paths, out, heatmaps=heatmaps, cam_run=cam_run, **kwargs)
