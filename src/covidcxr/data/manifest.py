"""The manifest: covidcxr's one data contract.

A :class:`Manifest` is a validated pandas table with one row per image plus the folder that
relative ``image`` paths resolve against. Every importer produces one, splits and audits read and
return one, and training records :meth:`Manifest.sha256` of the data it used.

Columns (always present after validation):

==============  =================================================================================
``image``       path of the image file, relative to :attr:`Manifest.root` (or absolute)
``label``       one of ``covid``, ``normal``, ``pneumonia``, ``other``
``patient_id``  ``<source-prefix>:<id>``; images of one person share it (splits group by it)
``source``      where the pixels came from (e.g. GitHub ``owner/name``)
``view``        ``PA``, ``AP``, ``AP Supine``, ... ; ``""`` when unknown
``sex``         as given by the source (``M`` / ``F``); ``""`` when unknown
``age``         the raw age string of the source (Figure1 has ranges like ``50+``); ``""`` when unknown
``age_years``   numeric age derived from ``age`` (``50+`` -> 50, ``40-50`` -> 45); NaN when unknown
``offset_days`` days since symptom onset / admission (float, NaN when unknown)
``split``       ``train``, ``val``, ``test``, ``external`` or ``""`` (not assigned yet)
==============  =================================================================================

Other columns (``finding``, ``license``, ``notes``, ``fold``, ...) are kept as they are. Unknown
text values are empty strings (not NaN) so that group-bys and CSV round trips keep them.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

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

_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:(\+)|-\s*(\d+(?:\.\d+)?))?\s*[a-zA-Z]*\s*$")
_DECADE_RE = re.compile(r"^\s*(early|mid|late)?\s*(\d0)'?s\s*$", re.IGNORECASE)
_DECADE_OFFSET = {"early": 2.0, "mid": 5.0, "late": 8.0, None: 5.0}


def parse_age(value) -> float:
    """Numeric age in years from a source's age string: ``'33'`` -> 33, ``'50+'`` -> 50 (lower
    bound), ``'40-50'`` -> 45 (midpoint), ``'early 40s'`` -> 42, ``''`` / unparseable -> NaN."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return float("nan")
    decade = _DECADE_RE.match(str(value))
    if decade:  # "early 40s" -> 42, "40s" -> 45
        return float(decade.group(2)) + _DECADE_OFFSET[decade.group(1) and decade.group(1).lower()]
    m = _AGE_RE.match(str(value))
    if not m:
        return float("nan")
    low = float(m.group(1))
    if m.group(3) is not None:
        return (low + float(m.group(3))) / 2
    return low


def patient_prefix(patient_id: str) -> str:
    """The namespace of a patient id (``'kermany:person1'`` -> ``'kermany'``; ``''`` if none)."""
    head, sep, _ = str(patient_id).partition(":")
    return head if sep else ""


def source_short_name(source: str) -> str:
    """A short, id-safe name for a source: ``'owner/Repo-Name'`` -> ``'repo-name'``."""
    name = str(source).rstrip("/").split("/")[-1].strip().lower()
    return re.sub(r"[^a-z0-9._-]+", "-", name) or "unknown"


@dataclass
class Manifest:
    """A validated image table plus the folder that relative ``image`` paths resolve against."""

    table: pd.DataFrame
    root: Path
    name: str = "manifest"  # used in error messages (usually the file name)

    def __post_init__(self):
        self.root = Path(self.root)
        self.table = validate_table(self.table, name=self.name)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """Read and validate a manifest CSV (or Parquet); relative paths resolve against its folder."""
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"{path}: manifest file not found")
        try:
            if path.suffix.lower() == ".parquet":
                table = pd.read_parquet(path)
            else:
                table = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (ValueError, OSError, ImportError, pd.errors.ParserError) as exc:
            raise ManifestError(f"{path}: cannot be read as a manifest ({exc})") from exc
        return cls(table, root=path.resolve().parent, name=path.name)

    def write(self, path: str | Path) -> Path:
        """Write the manifest (CSV, or Parquet for ``.parquet`` if pyarrow is installed).

        Image paths are rewritten relative to the output file's folder, so the written manifest
        stays valid wherever it is placed. Returns the path written.
        """
        from covidcxr.files import atomic_write_bytes

        path = Path(path)
        out_dir = path.resolve().parent
        table = self.table.copy()
        table["image"] = [_relative_to(p, out_dir) for p in self.image_paths()]
        table = table.drop(columns=[c for c in DERIVED_COLUMNS if c in table.columns])
        if path.suffix.lower() == ".parquet":
            buf = io.BytesIO()
            try:
                table.to_parquet(buf, index=False)
            except ImportError as exc:
                raise ManifestError(f"{path}: writing Parquet needs pyarrow; write a .csv instead") from exc
            atomic_write_bytes(path, buf.getvalue())
        else:
            data = table.to_csv(index=False, lineterminator="\n", float_format="%.10g")
            atomic_write_bytes(path, data.encode("utf-8"))
        return path

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        counts = self.table["label"].value_counts().to_dict()
        return f"Manifest({self.name!r}, {len(self)} images, {self.table['patient_id'].nunique()} patients, {counts})"

    def image_paths(self) -> list[Path]:
        """Absolute paths of the images, in table order."""
        return [_resolve(self.root, p) for p in self.table["image"]]

    def replace(self, table: pd.DataFrame) -> "Manifest":
        """A new manifest with the same root and name over another (validated) table."""
        return Manifest(table.reset_index(drop=True), root=self.root, name=self.name)

    def subset(self, split: str | Sequence[str] | None = None, mask=None) -> "Manifest":
        """Rows of one or several splits (``subset("train")``, ``subset(["train", "val"])``) and/or a
        boolean mask over the rows."""
        keep = np.ones(len(self), dtype=bool)
        if split is not None:
            wanted = [split] if isinstance(split, str) else list(split)
            unknown = sorted(set(wanted) - set(SPLITS) - {""})
            if unknown:
                raise ManifestError(f"{self.name}: unknown split(s) {unknown}; use one of {list(SPLITS)}")
            keep &= self.table["split"].isin(wanted).to_numpy()
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (len(self),):
                raise ManifestError(f"{self.name}: mask has {mask.shape} entries, manifest has {len(self)} rows")
            keep &= mask
        return self.replace(self.table[keep])

    def filter(self, predicate: Callable[[pd.DataFrame], Iterable[bool]] | None = None, **equals) -> "Manifest":
        """Rows where every ``column=value`` holds (a list/tuple/set value means "any of") and, if
        given, ``predicate(table)`` is true: ``m.filter(label=["normal", "pneumonia"], sex="F")``."""
        keep = np.ones(len(self), dtype=bool)
        for column, value in equals.items():
            if column not in self.table.columns:
                raise ManifestError(f"{self.name}: no column {column!r} to filter on; columns: {list(self.table.columns)}")
            values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
            keep &= self.table[column].isin(values).to_numpy()
        if predicate is not None:
            keep &= np.asarray(predicate(self.table), dtype=bool)
        return self.replace(self.table[keep])

    @classmethod
    def concat(cls, manifests: Sequence["Manifest"], root: str | Path | None = None, name: str = "manifest") -> "Manifest":
        """Merge manifests (e.g. several imported sources) into one.

        Image paths are made absolute (or relative to ``root`` if given). Patient ids without a
        ``prefix:`` namespace get their source's short name as prefix, so ``'1'`` of one source can
        never collide with ``'1'`` of another; ids that already carry a prefix are kept, so the same
        patient in two manifests of the same source stays one patient.
        """
        if not manifests:
            raise ManifestError("concat needs at least one manifest")
        root = Path(root).resolve() if root is not None else None
        parts = []
        for m in manifests:
            t = m.table.copy()
            t["image"] = [str(p) if root is None else _relative_to(p, root) for p in m.image_paths()]
            t["patient_id"] = prefix_patient_ids(t["patient_id"], t["source"])
            parts.append(t)
        table = pd.concat(parts, ignore_index=True, sort=False)
        for col in table.columns:  # columns only some parts had: unknown -> "" (text) / NaN (numbers)
            if col not in NUMERIC_COLUMNS and col != "fold" and not pd.api.types.is_numeric_dtype(table[col]):
                table[col] = table[col].fillna("")
        if "fold" in table.columns:
            table["fold"] = table["fold"].fillna(-1)
        return cls(table, root=root or Path("/"), name=name)

    def sha256(self) -> str:
        """Content hash of the table (columns in a canonical order, image paths as stored).

        Identical for the same data regardless of column order; changes when any value, row or
        row order changes. Training records it so a run names exactly the data it saw.
        """
        t = self.table.drop(columns=[c for c in DERIVED_COLUMNS if c in self.table.columns])
        cols = [c for c in REQUIRED_COLUMNS] + sorted(c for c in t.columns if c not in REQUIRED_COLUMNS)
        data = t[cols].to_csv(index=False, lineterminator="\n", float_format="%.10g")
        return hashlib.sha256(data.encode("utf-8")).hexdigest()

    def counts(self, by: Sequence[str] = ("source", "label")) -> pd.DataFrame:
        """Image counts as a cross table (rows: all but the last column in ``by``)."""
        by = list(by)
        return self.table.groupby(by[:-1])[by[-1]].value_counts().unstack(fill_value=0) if len(by) > 1 \
            else self.table[by[0]].value_counts().to_frame("images")


def prefix_patient_ids(patient_ids: pd.Series, sources: pd.Series) -> pd.Series:
    """Give ids without a ``prefix:`` namespace their source's short name as prefix."""
    ids = patient_ids.astype(str)
    bare = ~ids.str.contains(":", regex=False)
    out = ids.copy()
    out[bare] = [f"{source_short_name(s)}:{i}" for s, i in zip(sources[bare], ids[bare])]
    return out


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

    for col in ("image", "patient_id", "source"):
        empty = table.index[table[col] == ""]
        if len(empty):
            raise ManifestError(f"{name} row {empty[0] + 1}, column {col!r}: empty value "
                                f"({len(empty)} row(s) in all); every image needs a {col}")
    _check_values(table, "label", LABELS, name)
    _check_values(table, "split", SPLITS + ("",), name)

    table["offset_days"] = _to_float(table["offset_days"], "offset_days", name)
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


def _resolve(root: Path, image: str) -> Path:
    p = Path(image)
    return p if p.is_absolute() else root / p


def _relative_to(path: Path, folder: Path) -> str:
    path = Path(os.path.abspath(path))
    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:  # different drive (Windows): keep it absolute
        return path.as_posix()
