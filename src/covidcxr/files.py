"""Writing files safely: atomic replace, JSON with numpy values. No heavy imports (no torch)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

# Read once at import: os.umask() can only be read by setting it, which is not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write via a temporary file + rename so a killed process never leaves half a file.

    ``fsync=False`` keeps the atomicity but skips forcing the data to disk (for caches that verify
    their entries anyway; the fsync dominates writing many small files).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    """Strict JSON (NaN / infinity written as null, numpy values as numbers), atomically."""
    atomic_write_bytes(Path(path), (dumps_json(obj, indent=2) + "\n").encode())


def dumps_json(obj, **kwargs) -> str:
    """The one JSON serialiser: strict JSON with NaN / infinity as ``null`` (see :func:`jsonable`)."""
    return json.dumps(jsonable(obj), allow_nan=False, default=json_default, **kwargs)


def jsonable(obj):
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None: the one NaN -> null rule."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return obj


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.bool_):
        return bool(o)
    # Paths, dates and DICOM value types are written as their text form.
    return str(o)


# ---------------------------------------------------------------------- CSV written for people (spreadsheets)
#: First characters that make a spreadsheet read a cell as a formula (OWASP "CSV injection"), plus
#: tab and carriage return, which some spreadsheets strip before looking for one.
CSV_FORMULA_CHARS = ("=", "+", "-", "@", "\t", "\r")


def _csv_needs_quote(text: str) -> bool:
    """Whether a text cell must be prefixed with ``'``: it starts (after any ``'`` already there, so
    that :func:`csv_unquote` can undo the prefix exactly) with a formula character, also after spaces."""
    rest = text.lstrip("'")
    if rest != text and not rest:
        return False
    return rest[:1] in CSV_FORMULA_CHARS or rest.lstrip(" ")[:1] in CSV_FORMULA_CHARS[:4]


def csv_safe_text(value):
    """One cell for a CSV file: NUL bytes removed and, for text starting with ``= + - @``, tab or CR
    (also after spaces), a ``'`` prefix so a spreadsheet shows it as text instead of running it
    (``'=HYPERLINK(...)``, ``'-5``). Non-strings (numbers, None, NaN) are returned unchanged."""
    if not isinstance(value, str):
        return value
    value = value.replace("\x00", "")
    return "'" + value if value and _csv_needs_quote(value) else value


def csv_unquote_text(value):
    """Undo :func:`csv_safe_text`'s prefix (``'=x`` -> ``=x``, ``''=x`` -> ``'=x``); other values as they are.

    Exact inverse for everything :func:`csv_safe_text` wrote; a cell some other tool wrote as ``'=x``
    reads as ``=x``, which is also what a spreadsheet shows for it."""
    if isinstance(value, str) and value.startswith("'") and len(value) > 1 and _csv_needs_quote(value[1:]):
        return value[1:]
    return value


def csv_safe(df):
    """A copy of ``df`` safe to open in a spreadsheet: :func:`csv_safe_text` on every text cell and on
    the column names. Numeric, boolean and datetime columns are left alone, so numbers stay numbers
    (a negative number *stored as text* in a text column, e.g. ``"-5"``, becomes ``"'-5"``)."""
    import pandas as pd

    out = df.copy()
    for i in range(out.shape[1]):
        col = out.iloc[:, i]
        if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col) \
                or pd.api.types.is_datetime64_any_dtype(col):
            continue
        out.isetitem(i, col.map(csv_safe_text).astype(object))
    out.columns = [csv_safe_text(c) for c in out.columns]
    return out


def csv_unquote(df):
    """Inverse of :func:`csv_safe` for a table read back with ``dtype=str`` (text cells and column names)."""
    import pandas as pd

    out = df.copy()
    for i in range(out.shape[1]):
        col = out.iloc[:, i]
        if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            continue
        out.isetitem(i, col.map(csv_unquote_text).astype(object))
    out.columns = [csv_unquote_text(c) for c in out.columns]
    return out


def write_csv(path, df, *, fsync: bool = True, **to_csv_kwargs) -> Path:
    """Write ``df`` as UTF-8 CSV atomically (see :func:`atomic_write_bytes`), neutralised with
    :func:`csv_safe` (formula prefixes quoted, NUL bytes removed). ``to_csv_kwargs`` go to
    ``DataFrame.to_csv`` (default ``index=False``, ``lineterminator="\\n"``). Returns the path."""
    import csv

    path = Path(path)
    kwargs = {"index": False, "lineterminator": "\n"} | to_csv_kwargs
    safe = csv_safe(df)
    # A bare CR inside a cell is not quoted by the csv module when the line terminator is "\n", and
    # readers take it as a line break (a forged row); quote every text cell when one holds a CR.
    if "quoting" not in kwargs and _has_cr(safe):
        kwargs["quoting"] = csv.QUOTE_NONNUMERIC
    data = safe.to_csv(**kwargs)
    atomic_write_bytes(path, data.encode("utf-8"), fsync=fsync)
    return path


def _has_cr(df) -> bool:
    import pandas as pd

    if any("\r" in str(c) for c in df.columns):
        return True
    for i in range(df.shape[1]):
        col = df.iloc[:, i]
        if not pd.api.types.is_numeric_dtype(col) and col.map(lambda v: isinstance(v, str) and "\r" in v).any():
            return True
    return False
