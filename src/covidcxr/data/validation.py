"""Checking manifest tables: required columns and values, ages, NUL bytes, duplicated CSV columns,
image paths inside the data root. :mod:`covidcxr.data.manifest` re-exports everything public here;
import it from there (``from covidcxr.data.manifest import LABELS, validate_table``).

Error messages name the table, the row (counted from 1 = the first data row, so row 17 is line 18
of a CSV file) and the column.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from covidcxr.data.synthetic import check_synthetic_rows
from covidcxr.errors import ManifestError

#: The labels a manifest row may carry (label spaces map them to training classes).
LABELS = ("covid", "normal", "pneumonia", "other")
#: Values of the ``split`` column; ``""`` means "not assigned yet".
SPLITS = ("train", "val", "test", "external")
#: Columns a manifest file must have.
MUST_HAVE = ("image", "label", "patient_id", "source")
#: Columns filled with "unknown" when a file lacks them.
OPTIONAL_TEXT = ("view", "sex", "age", "split")
REQUIRED_COLUMNS = ("image", "label", "patient_id", "source", "view", "sex", "age", "offset_days", "split")
#: Derived columns (recomputed on read, never trusted from the file).
DERIVED_COLUMNS = ("age_years",)
#: Columns that hold numbers; everything else is text.
NUMERIC_COLUMNS = ("offset_days", "age_years")

#: Youngest / oldest age (years) a manifest accepts; anything else is a data error.
AGE_RANGE = (0.0, 120.0)

_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:(\+)|-\s*(\d+(?:\.\d+)?))?\s*([a-zA-Z]*)\s*$")
#: Age units (DICOM PatientAge uses D / W / M / Y: '030M' is 30 months); other letters mean years.
_AGE_UNITS = {**dict.fromkeys(("d", "day", "days"), 365.25),
              **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), 365.25 / 7),
              **dict.fromkeys(("m", "mo", "mos", "month", "months"), 12.0)}
_DECADE_RE = re.compile(r"^\s*(early|mid|late)?\s*(\d0)'?s\s*$", re.IGNORECASE)
_DECADE_OFFSET = {"early": 2.0, "mid": 5.0, "late": 8.0, None: 5.0}


def parse_age(value) -> float:
    """Numeric age in years from a source's age string: ``'33'`` -> 33, ``'50+'`` -> 50 (lower
    bound), ``'40-50'`` -> 45 (midpoint), ``'early 40s'`` -> 42, ``'18M'`` / ``'6 months'`` -> 1.5 / 0.5
    (DICOM-style units D / W / M / Y), ``''`` / unparseable -> NaN."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return float("nan")
    decade = _DECADE_RE.match(str(value))
    if decade:  # "early 40s" -> 42, "40s" -> 45
        return float(decade.group(2)) + _DECADE_OFFSET[decade.group(1) and decade.group(1).lower()]
    m = _AGE_RE.match(str(value))
    if not m:
        return float("nan")
    per_year = _AGE_UNITS.get(m.group(4).lower(), 1.0)
    low = float(m.group(1)) / per_year
    if m.group(3) is not None:
        return (low + float(m.group(3)) / per_year) / 2
    return low


def age_problem(value) -> str | None:
    """Why an age string is not acceptable (``None`` if it is): a negative age, or any number in it
    (both ends of a range) outside :data:`AGE_RANGE` years. Unknown words (``'adult'``) are fine: unknown."""
    text = "" if value is None else str(value)
    low, high = AGE_RANGE
    if re.match(r"^\s*-\s*\d", text):
        return "a negative age"
    m = _AGE_RE.match(text)
    if m:
        per_year = _AGE_UNITS.get(m.group(4).lower(), 1.0)
        ends = [float(g) / per_year for g in (m.group(1), m.group(3)) if g is not None]
    else:
        ends = [parse_age(text)] if _DECADE_RE.match(text) else [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text)]
    if any(not low <= e <= high for e in ends):
        return f"outside {low:g}-{high:g} years"
    return None


def outside_roots(paths: Sequence[str | Path], roots: Sequence[str | Path]) -> list[int]:
    """Indices of ``paths`` that resolve (``os.path.realpath``: symlinks and ``..`` followed) outside
    every folder of ``roots``. Nothing is opened."""
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    bad = []
    for k, p in enumerate(paths):
        real = Path(os.path.realpath(p))
        if not any(real == r or real.is_relative_to(r) for r in real_roots):
            bad.append(k)
    return bad


def read_csv_table(path: str | Path, *, what: str = "a CSV table") -> pd.DataFrame:
    """A CSV file as text columns (``dtype=str``, empty cells ``""``), refusing a column name that
    appears twice (pandas would silently rename the second ``sex`` to ``sex.1``)."""
    path = Path(path)
    try:
        header = pd.read_csv(path, dtype=str, keep_default_na=False, header=None, nrows=1)
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{path}: empty file; expected {what} with a header row") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise ManifestError(f"{path}: cannot be read as {what} ({exc})") from exc
    names = [str(c).strip() for c in header.iloc[0].tolist()] if len(header) else []
    seen: dict[str, int] = {}
    for k, c in enumerate(names):
        if c in seen:
            raise ManifestError(f"{path}: column {c!r} appears more than once (columns {seen[c] + 1} and {k + 1}); "
                                "each column must be named once")
        seen[c] = k
    return table


# ---------------------------------------------------------------------- validation
def validate_table(table: pd.DataFrame, name: str = "manifest") -> pd.DataFrame:
    """Check and normalise a manifest table; raise :class:`ManifestError` naming row and column.

    Rows are numbered from 1 (the first data row), so "row 17" is line 18 of a CSV file.
    """
    if not isinstance(table, pd.DataFrame):
        raise ManifestError(f"{name}: expected a pandas DataFrame, got {type(table).__name__}")
    table = table.copy().reset_index(drop=True)
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in MUST_HAVE if c not in table.columns]
    if missing:
        raise ManifestError(f"{name}: missing required column(s) {missing}; a manifest needs at least "
                            f"{list(MUST_HAVE)} (found {list(table.columns)})")
    dupes = [c for c in set(table.columns) if list(table.columns).count(c) > 1]
    if dupes:
        raise ManifestError(f"{name}: column(s) {sorted(dupes)} appear more than once")
    for col in OPTIONAL_TEXT:
        if col not in table.columns:
            table[col] = ""
    if "offset_days" not in table.columns:
        table["offset_days"] = np.nan

    text_columns = set(REQUIRED_COLUMNS) - set(NUMERIC_COLUMNS)
    for col in table.columns:
        if col in NUMERIC_COLUMNS or col == "fold":
            continue
        # Required text columns always become text; extra columns only if they are not numeric
        # (a caller's numeric extra, e.g. a score, stays a number in memory).
        if col in text_columns or not pd.api.types.is_numeric_dtype(table[col]):
            table[col] = table[col].map(_as_text)

    for col in table.columns:
        if table[col].dtype == object or pd.api.types.is_string_dtype(table[col]):
            nul = table[col].map(lambda v: isinstance(v, str) and "\x00" in v).to_numpy(dtype=bool)
            if nul.any():
                raise ManifestError(f"{name} row {int(np.flatnonzero(nul)[0]) + 1}, column {col!r}: contains a NUL byte "
                                    f"(\\x00) ({int(nul.sum())} row(s) in all); NUL bytes are refused (they cut file "
                                    "names and hide text), remove them from the file")
    if any("\x00" in c for c in table.columns):
        raise ManifestError(f"{name}: a column name contains a NUL byte (\\x00); remove it from the header")

    for col in ("image", "patient_id", "source"):
        empty = table.index[table[col] == ""]
        if len(empty):
            raise ManifestError(f"{name} row {empty[0] + 1}, column {col!r}: empty value "
                                f"({len(empty)} row(s) in all); every image needs a {col}")
    _check_values(table, "label", LABELS, name)
    _check_values(table, "split", SPLITS + ("",), name)

    table["offset_days"] = _to_float(table["offset_days"], "offset_days", name)
    problems = table["age"].map(age_problem)
    bad_age = problems.notna().to_numpy()
    if bad_age.any():
        row = int(np.flatnonzero(bad_age)[0])
        raise ManifestError(f"{name} row {row + 1}, column 'age': {table['age'].iloc[row]!r} is not an age between "
                            f"{AGE_RANGE[0]:g} and {AGE_RANGE[1]:g} years ({problems.iloc[row]}; "
                            f"{int(bad_age.sum())} row(s) in all); leave it empty when unknown")
    table["age_years"] = table["age"].map(parse_age).astype(float)
    if "fold" in table.columns:
        fold = _to_float(table["fold"].replace("", np.nan), "fold", name).fillna(-1)
        if not np.all(np.mod(fold, 1) == 0):
            bad = int(np.flatnonzero(np.mod(fold, 1) != 0)[0])
            raise ManifestError(f"{name} row {bad + 1}, column 'fold': {table['fold'].iloc[bad]!r} is not an integer")
        table["fold"] = fold.astype(int)

    norm = table["image"].map(lambda p: os.path.normpath(p))
    dup = norm.duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())
        first = norm.iloc[rows[0]]
        same = [int(r) + 1 for r in rows if norm.iloc[r] == first]
        raise ManifestError(f"{name} rows {same}, column 'image': duplicate image path {first!r} "
                            f"({int(dup.sum())} rows share a path with another); each image must appear once")
    # Generated images train only and keep their source patient (covidcxr.data.synthetic).
    check_synthetic_rows(table, name)
    ordered = list(REQUIRED_COLUMNS) + ["age_years"]
    return table[ordered + [c for c in table.columns if c not in ordered]]


def _as_text(v) -> str:
    if v is None or (not isinstance(v, str) and np.ndim(v) == 0 and pd.isna(v)):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _check_values(table: pd.DataFrame, col: str, allowed: Sequence[str], name: str) -> None:
    bad = ~table[col].isin(allowed)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        shown = [a for a in allowed if a] + (["'' (unassigned)"] if "" in allowed else [])
        raise ManifestError(f"{name} row {row + 1}, column {col!r}: {table[col].iloc[row]!r} is not one of "
                            f"{shown} ({int(bad.sum())} row(s) in all)")


def _to_float(values: pd.Series, col: str, name: str) -> pd.Series:
    raw = values.map(lambda v: np.nan if (v is None or (isinstance(v, str) and v.strip() == "")) else v)
    out = pd.to_numeric(raw, errors="coerce")
    bad = out.isna() & raw.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ManifestError(f"{name} row {row + 1}, column {col!r}: {values.iloc[row]!r} is not a number")
    return out.astype(float)
