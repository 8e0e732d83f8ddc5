"""Outputs of ``covidcxr predict``: the journals rows are appended to, and the final files.

While a job runs, rows go to ``<out>.partial.csv`` and skipped inputs to ``<out>.skipped.partial.csv``
(flushed + fsynced after every batch; every cell quoted, formula-like text neutralised). When the job
ends the final ``out`` (CSV, JSON, JSON Lines or Parquet) and ``<out>.skipped.csv`` are written
atomically (temporary file + rename), so an existing output is replaced only by a finished one, and
the journals are removed. A journal or output whose last row was cut mid-write (a kill, a full disk)
is read up to its last complete row: the cut row's input is predicted again.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.files import (atomic_write_bytes, csv_safe_text, csv_unquote, csv_unquote_text, dumps_json, write_csv,
                            write_json)

SKIPPED_COLUMNS = ["path", "reason"]


def skipped_path(out: str | Path) -> Path:
    """Where the inputs that were not predicted are listed: ``<out>.skipped.csv``."""
    out = Path(out)
    return out.with_name(out.name + ".skipped.csv")


def journal_path(out: str | Path) -> Path:
    """The CSV rows are appended to batch by batch while the job runs: ``<out>.partial.csv``."""
    out = Path(out)
    return out.with_name(out.name + ".partial.csv")


def skipped_journal_path(out: str | Path) -> Path:
    """The CSV skipped inputs are appended to while the job runs: ``<out>.skipped.partial.csv``."""
    out = Path(out)
    return out.with_name(out.name + ".skipped.partial.csv")


# ---------------------------------------------------------------------------- reading CSV, torn rows tolerated


def scan_csv(path: Path) -> tuple[list[str] | None, list[list[str]], int]:
    """(header, complete rows, bytes up to the end of the last complete row) of a CSV file.

    A row is complete when its line ends with a newline and it has the header's number of fields;
    reading stops at the first row that is not (a row cut mid-write, also inside a quoted field).
    Cells are returned as written (see :func:`table_from_rows` for undoing the formula quoting).
    """
    data = path.read_bytes()
    pieces = data.split(b"\n")
    lines = [p + b"\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    ends, total = [], 0
    for line in lines:
        total += len(line)
        ends.append(total)
    state = {"i": 0}

    def feed():
        for i, line in enumerate(lines):
            state["i"] = i
            yield line.decode("utf-8", errors="replace")

    header, rows, good_end = None, [], 0
    try:
        for row in csv.reader(feed(), strict=True):
            i = state["i"]
            if not lines[i].endswith(b"\n") or (header is not None and len(row) != len(header)) or not row:
                break
            if header is None:
                header = [csv_unquote_text(c) for c in row]
            else:
                rows.append(row)
            good_end = ends[i]
    except csv.Error:
        pass  # the file ends inside a quoted field: the row was cut
    return header, rows, good_end


def table_from_rows(columns: Sequence[str], rows: list[list[str]]) -> pd.DataFrame:
    """Rows of text as written by a journal or ``write_csv`` -> a table: formula quoting undone,
    ``prob_*`` and ``threshold`` as numbers, every other column as text."""
    table = csv_unquote(pd.DataFrame(rows, columns=list(columns), dtype=object))
    for col in table.columns:
        if col.startswith("prob_") or col == "threshold":
            table[col] = pd.to_numeric(table[col], errors="coerce")
    return table


def _read_csv(path: Path) -> pd.DataFrame:
    header, rows, _ = scan_csv(path)
    return table_from_rows(header or [], rows)


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    for line in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            break  # a line cut mid-write (or anything after it): predicted again
        if not isinstance(record, dict):
            break
        records.append(record)
    return pd.DataFrame.from_records(records)


def _read_json(path: Path) -> pd.DataFrame:
    try:
        return pd.DataFrame.from_records(json.loads(path.read_bytes()))
    except (ValueError, TypeError) as exc:
        raise CovidCXRError(f"{path}: cannot be read as a JSON list of records ({exc}); pass --overwrite to "
                            "predict again from scratch") from None


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except ImportError as exc:
        raise ConfigError(f"{path}: Parquet needs pyarrow (`pip install pyarrow`)") from exc
    except Exception as exc:  # pyarrow's errors for a damaged file
        raise CovidCXRError(f"{path}: cannot be read as Parquet ({type(exc).__name__}); pass --overwrite to "
                            "predict again from scratch") from None


# ---------------------------------------------------------------------------- final formats


def _records(table: pd.DataFrame) -> list[dict]:
    return table.astype(object).where(table.notna(), None).to_dict(orient="records")


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    write_csv(path, table)  # formula-like cells neutralised, written atomically


def _write_json(table: pd.DataFrame, path: Path) -> None:
    write_json(path, _records(table))


def _write_jsonl(table: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, "".join(dumps_json(r) + "\n" for r in _records(table)).encode())


def _write_parquet(table: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        table.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except ImportError as exc:
        raise ConfigError(f"{path}: Parquet output needs pyarrow (`pip install pyarrow`); or use .csv / .json") from exc
    finally:
        tmp.unlink(missing_ok=True)


#: Output format by file extension: (writer, reader).
OUTPUT_FORMATS = {
    ".csv": (_write_csv, _read_csv),
    ".json": (_write_json, _read_json),
    ".jsonl": (_write_jsonl, _read_jsonl),
    ".parquet": (_write_parquet, _read_parquet),
}


def output_format(out: Path):
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"{out}: unknown output format {suffix or '(none)'}; use one of {', '.join(OUTPUT_FORMATS)}")
    return OUTPUT_FORMATS[suffix]


def read_output(path: Path) -> pd.DataFrame:
    """A finished output (any format), up to its last complete row."""
    return output_format(path)[1](path)


# ---------------------------------------------------------------------------- journals


class CsvJournal:
    """Appends rows to a CSV and makes them durable (flush + fsync) before returning.

    ``fresh=True`` starts the file again (header only, or header + ``seed`` rows). Otherwise an
    existing file is continued: its header must be ``columns`` and a torn last row is cut off.
    ``rows`` holds the rows the file had when opened (text, as :func:`table_from_rows` returns them).
    """

    def __init__(self, path: Path, columns: list[str], *, fresh: bool, seed: pd.DataFrame | None = None):
        self.path, self.columns = path, list(columns)
        self.rows = table_from_rows(self.columns, [])
        continuing = not fresh and path.exists() and path.stat().st_size > 0
        if continuing:
            header, rows, good_end = scan_csv(path)
            if header is not None and header != self.columns:
                raise CovidCXRError(f"{path}: its columns ({', '.join(header)}) differ from this job's "
                                    f"({', '.join(self.columns)}); resume with the same options (e.g. --heatmaps) "
                                    "or write to a new --out (or pass --overwrite)")
            if header is None:
                continuing = False
            else:
                os.truncate(path, good_end)  # a row cut mid-write is dropped (and predicted again)
                self.rows = table_from_rows(self.columns, rows)
        self._file = open(path, "a" if continuing else "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file, lineterminator="\n", quoting=csv.QUOTE_ALL)
        if not continuing:
            self._writer.writerow([csv_safe_text(c) for c in self.columns])
            if seed is not None and len(seed):
                missing = [c for c in self.columns if c not in seed.columns]
                extra = [c for c in seed.columns if c not in self.columns]
                if missing or extra:
                    raise CovidCXRError(f"columns of the output being resumed ({', '.join(map(str, seed.columns))}) "
                                        f"differ from this job's ({', '.join(self.columns)}); resume with the same "
                                        "options (e.g. --heatmaps) or write to a new --out (or pass --overwrite)")
                seed = seed[self.columns]
                self._write(seed.astype(object).where(seed.notna(), None).itertuples(index=False, name=None))
                self.rows = seed.reset_index(drop=True)
            self._sync()

    def _write(self, rows: Iterable[Sequence]) -> None:
        self._writer.writerows([csv_safe_text(v) for v in row] for row in rows)

    def append(self, rows: Iterable[Sequence]) -> None:
        self._write(rows)
        self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def table(self) -> pd.DataFrame:
        """Everything in the file now (call after :meth:`close`)."""
        header, rows, _ = scan_csv(self.path)
        return table_from_rows(header or self.columns, rows)
